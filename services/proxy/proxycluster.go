package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/services/wire"
)

// clusterView is the proxy's picture of the servers: which one leads, what
// each has applied, and an NBD connection to each for reads. Every server
// is polled on its own (GET /v1/status), so a hung server delays nobody;
// while no leader is known the polls run fast.
//
// Serve owns every goroutine the view starts: the pollers, the member
// refresh, the barrier fetches and the closing of NBD connections given
// up on. It waits for all of them before it returns; outside Serve the
// view starts none (Barrier fails, connections are closed inline).
type clusterView struct {
	api *wire.Client // status and cluster calls: short timeout
	log hclog.Logger
	// onEpoch is told every writer epoch a server reports (the proxy
	// learns from it that it was fenced, before its next write does).
	onEpoch func(writer string, epoch uint64)
	poll    time.Duration // steady-state poll interval
	fast    time.Duration // poll interval while no leader is known

	mu      sync.Mutex      // guards the following
	ctx     context.Context // Serve's, while serving: work the view starts ends with it
	serving bool            // Serve runs: goroutines may be started in bg
	bg      sync.WaitGroup  // barrier fetches and connection closes; Serve waits for them
	servers map[string]*serverState
	leader  *serverState // nil while unknown
	// leaderless is when leader last became nil (the zero time at
	// first): how long no leader has answered this proxy.
	leaderless time.Time
	// found is cancelled when a leader answers (setLeaderLocked): a
	// write relayed meanwhile gives way to the leader (foundContext).
	found       context.Context
	cancelFound context.CancelFunc
	changed     chan struct{} // closed and replaced whenever something a waiter may want changes
	kick        chan struct{} // closed and replaced to make every poller poll now
	barrier     *barrierCall  // the leader's log index being fetched now, if any
	next        *barrierCall  // the fetch that starts once barrier is done
}

// barrierCall is one fetch of the leader's last log index, shared by the
// reads waiting for it.
type barrierCall struct {
	done  chan struct{}
	index uint64
	err   error
}

// serverState is one server as the proxy sees it.
type serverState struct {
	http string // the API address: its identity here

	mu       sync.Mutex // guards the following
	id       string
	nbdAddr  string
	up       bool   // the last status call answered
	role     string // Leader, Follower, ...
	leaderID string // the leader this server follows, "" when it knows none
	syncing  bool   // resyncing its image: reads would wait
	size     uint64
	client   *nbd.Client
	retire   func(*nbd.Client)  // closes a connection given up on (clusterView.retire)
	leadCtx  context.Context    // while the leader: cancelled when it stops being one
	lost     context.CancelFunc // cancels leadCtx
	downGen  uint64             // counts markDown calls: a poll that straddles one is ignored
	inflight atomic.Int64       // reads in flight on this server
	reads    atomic.Uint64      // reads (and block status calls) this server answered

	applied atomic.Uint64 // highest applied index known (polled or from an apply)
}

func newClusterView(seeds []string, api *wire.Client, log hclog.Logger, poll, fast time.Duration) *clusterView {
	v := &clusterView{
		api: api, log: log, poll: poll, fast: fast,
		servers: map[string]*serverState{},
		changed: make(chan struct{}),
		kick:    make(chan struct{}),
	}
	for _, s := range seeds {
		v.servers[s] = v.newServer(s)
	}
	return v
}

func (v *clusterView) newServer(http string) *serverState {
	return &serverState{http: http, retire: v.retire}
}

// errViewStopped answers a Barrier outside the view's Serve.
var errViewStopped = errors.New("proxy: the cluster view is not running")

// goLocked runs fn in a goroutine that Serve waits for, and reports
// whether it did (not outside Serve). v.mu must be held.
func (v *clusterView) goLocked(fn func(ctx context.Context)) bool {
	if !v.serving {
		return false
	}
	ctx := v.ctx
	v.bg.Go(func() { fn(ctx) })
	return true
}

// retire closes a connection given up on without making the caller (a
// read) wait for its goodbye; outside Serve it closes it inline.
func (v *clusterView) retire(c *nbd.Client) {
	v.mu.Lock()
	started := v.goLocked(func(context.Context) { c.Close() })
	v.mu.Unlock()
	if !started {
		c.Close()
	}
}

// notifyLocked wakes everyone waiting for a change.
func (v *clusterView) notifyLocked() {
	close(v.changed)
	v.changed = make(chan struct{})
}

// Kick makes every poller poll now (after a write failed on the leader).
func (v *clusterView) Kick() {
	v.mu.Lock()
	close(v.kick)
	v.kick = make(chan struct{})
	v.mu.Unlock()
}

// LeaderFailed forgets s as the leader (a write to it failed) and polls.
func (v *clusterView) LeaderFailed(s *serverState) {
	v.mu.Lock()
	if v.leader == s {
		v.setLeaderLocked(nil)
	}
	close(v.kick)
	v.kick = make(chan struct{})
	v.mu.Unlock()
}

// Leader waits for a known leader until ctx ends.
func (v *clusterView) Leader(ctx context.Context) (*serverState, error) {
	for {
		v.mu.Lock()
		l, ch := v.leader, v.changed
		v.mu.Unlock()
		if l != nil {
			return l, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("no leader found among %s: %w", strings.Join(v.addrs(), ", "), context.Cause(ctx))
		case <-ch:
		}
	}
}

// Target waits until the leader answers, or, once none has answered this
// proxy for relayAfter (0: never), a follower does that follows a leader:
// it relays a write to the leader (wire.RelayHeader). relayed says which
// it is. A proxy cut from the leader alone thus keeps writing while a
// quorum exists.
func (v *clusterView) Target(ctx context.Context, relayAfter time.Duration) (s *serverState, relayed bool, err error) {
	for {
		v.mu.Lock()
		l, ch, since := v.leader, v.changed, v.leaderless
		v.mu.Unlock()
		if l != nil {
			return l, false, nil
		}
		var t *time.Timer
		var timeout <-chan time.Time
		if relayAfter > 0 {
			wait := relayAfter - time.Since(since)
			if wait <= 0 {
				if r := v.relay(); r != nil {
					return r, true, nil
				}
				wait = relayAfter
			}
			t = time.NewTimer(wait)
			timeout = t.C
		}
		select {
		case <-ctx.Done():
			err = fmt.Errorf("no leader found among %s: %w", strings.Join(v.addrs(), ", "), context.Cause(ctx))
		case <-ch:
		case <-timeout:
		}
		if t != nil {
			t.Stop()
		}
		if err != nil {
			return nil, false, err
		}
	}
}

// foundContext is cancelled once a leader answers this proxy (at once if
// one is known): a write relayed through a follower stops waiting on a
// follower that may still forward to a leader that is gone, and goes to
// the one found.
func (v *clusterView) foundContext() context.Context {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.leader != nil {
		return lostCtx
	}
	if v.found == nil {
		v.found, v.cancelFound = context.WithCancel(context.Background())
	}
	return v.found
}

// relay picks, among the servers answering that follow a leader and are
// not resyncing, the one with the highest applied index; nil if none.
func (v *clusterView) relay() *serverState {
	var best *serverState
	var bestApplied uint64
	for _, s := range v.snapshot() {
		s.mu.Lock()
		ok := s.up && s.role == "Follower" && s.leaderID != "" && !s.syncing
		s.mu.Unlock()
		if a := s.applied.Load(); ok && (best == nil || a > bestApplied) {
			best, bestApplied = s, a
		}
	}
	return best
}

func (v *clusterView) addrs() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := make([]string, 0, len(v.servers))
	for a := range v.servers {
		out = append(out, a)
	}
	return out
}

func (v *clusterView) snapshot() []*serverState {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := make([]*serverState, 0, len(v.servers))
	for _, s := range v.servers {
		out = append(out, s)
	}
	return out
}

// Barrier returns an index every write committed before the call began is
// at or below: the leader's last log index, fetched after the call began.
// Concurrent callers share fetches: a caller that finds one running waits
// for the next, which starts after the running one ends (and so after the
// caller began). Without a known leader (no quorum) it falls back to the
// highest applied index any server reports, so reads go on.
func (v *clusterView) Barrier(ctx context.Context) (uint64, error) {
	v.mu.Lock()
	var c *barrierCall
	switch {
	case !v.serving:
		v.mu.Unlock()
		return 0, errViewStopped
	case v.barrier == nil:
		c = &barrierCall{done: make(chan struct{})}
		v.barrier = c
		v.goLocked(func(ctx context.Context) { v.fetchBarrier(ctx, c) })
	case v.next == nil:
		c = &barrierCall{done: make(chan struct{})}
		v.next = c
	default:
		c = v.next
	}
	v.mu.Unlock()
	select {
	case <-c.done:
		return c.index, c.err
	case <-ctx.Done():
		return 0, context.Cause(ctx)
	}
}

// fetchBarrier answers c and then every call queued behind it; ctx is
// Serve's.
func (v *clusterView) fetchBarrier(ctx context.Context, c *barrierCall) {
	for c != nil {
		c.index, c.err = v.leaderIndex(ctx)
		close(c.done)
		v.mu.Lock()
		c, v.barrier, v.next = v.next, v.next, nil
		v.mu.Unlock()
	}
}

func (v *clusterView) leaderIndex(ctx context.Context) (uint64, error) {
	v.mu.Lock()
	l := v.leader
	v.mu.Unlock()
	if l != nil {
		sctx, cancel := context.WithTimeout(ctx, time.Second)
		st, err := v.api.Status(sctx, l.http)
		cancel()
		if err == nil && st.State == "Leader" {
			if st.ReadIndex > 0 {
				return st.ReadIndex, nil
			}
			// A server from before read_index, or a leader that could not
			// commit a barrier just now: its log's end is an upper bound
			// (a read may then wait for the next command to be applied).
			return st.LastLogIndex, nil
		}
	}
	var best uint64
	for _, s := range v.snapshot() {
		s.mu.Lock()
		up := s.up
		s.mu.Unlock()
		if up {
			best = max(best, s.applied.Load())
		}
	}
	return best, nil
}

// Size waits for a server to report the volume's size.
func (v *clusterView) Size(ctx context.Context) (uint64, error) {
	for {
		v.mu.Lock()
		ch := v.changed
		v.mu.Unlock()
		for _, s := range v.snapshot() {
			s.mu.Lock()
			size := s.size
			s.mu.Unlock()
			if size > 0 {
				return size, nil
			}
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("no server answered at %s: %w", strings.Join(v.addrs(), ", "), context.Cause(ctx))
		case <-ch:
		}
	}
}

// Serve polls every server until ctx ends, and every few seconds asks the
// leader for the member list so servers added later are found too. It
// returns once every goroutine it or the view started has ended.
func (v *clusterView) Serve(ctx context.Context) error {
	v.mu.Lock()
	v.ctx, v.serving = ctx, true
	v.leaderless = time.Now() // no leader has answered yet: none to relay to for a while
	v.mu.Unlock()
	var wg sync.WaitGroup // the pollers
	defer func() {
		wg.Wait()
		v.mu.Lock()
		v.serving = false // no new goroutines in bg from here on
		v.setLeaderLocked(nil)
		v.mu.Unlock()
		v.bg.Wait()
		for _, s := range v.snapshot() {
			s.closeClient()
		}
	}()
	started := map[string]bool{}
	start := func() {
		for _, s := range v.snapshot() {
			if !started[s.http] {
				started[s.http] = true
				wg.Go(func() { v.pollLoop(ctx, s) })
			}
		}
	}
	start()
	wait := 100 * time.Millisecond // until the member list was read once
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
			if v.refreshMembers(ctx) {
				wait = 5 * time.Second
			}
			start()
		}
	}
}

// refreshMembers adds the members the leader lists (or, with no leader
// known, any server that answers: a proxy given only a follower's address
// must still find the leader); it reports whether the list was read.
func (v *clusterView) refreshMembers(ctx context.Context) bool {
	v.mu.Lock()
	ask := []*serverState{}
	if v.leader != nil {
		ask = append(ask, v.leader)
	}
	v.mu.Unlock()
	for _, s := range v.snapshot() {
		s.mu.Lock()
		up := s.up
		s.mu.Unlock()
		if up {
			ask = append(ask, s)
		}
	}
	var cs wire.ClusterStatus
	err := errors.New("no server answers")
	for _, s := range ask {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		cs, err = v.api.Cluster(cctx, s.http)
		cancel()
		if err == nil {
			break
		}
	}
	if err != nil {
		return false
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, m := range cs.Members {
		if m.HTTP != "" && v.servers[m.HTTP] == nil {
			v.log.Info("found a new server", "id", m.ID, "http", m.HTTP)
			v.servers[m.HTTP] = v.newServer(m.HTTP)
		}
	}
	return v.leader != nil // until a leader is known, ask again soon
}

func (v *clusterView) pollLoop(ctx context.Context, s *serverState) {
	for {
		v.pollOnce(ctx, s)
		v.mu.Lock()
		wait, kick := v.poll, v.kick
		if v.leader == nil {
			wait = v.fast
		}
		v.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-kick:
		case <-time.After(wait):
		}
	}
}

func (v *clusterView) pollOnce(ctx context.Context, s *serverState) {
	s.mu.Lock()
	gen := s.downGen
	s.mu.Unlock()
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	st, err := v.api.Status(cctx, s.http)
	cancel()
	if ctx.Err() != nil {
		return
	}
	s.mu.Lock()
	if err == nil && gen != s.downGen {
		// The server was found down while this status was on its way: it
		// may describe the process that died. Believe the next one.
		s.mu.Unlock()
		return
	}
	wasUp := s.up
	s.up = err == nil
	if err == nil {
		s.id, s.role, s.size, s.leaderID = st.Self.ID, st.State, st.ImageSize, st.Leader
		s.syncing = st.Sync != nil && st.Sync.Active
		if st.Self.NBD != s.nbdAddr && s.client != nil {
			s.client.Close()
			s.client = nil
		}
		s.nbdAddr = st.Self.NBD
		// The status is the truth, also downwards: a restarted server
		// replays its log from its last snapshot, and until it is back
		// where it was it must not answer reads that need more.
		s.applied.Store(st.AppliedIndex)
	}
	nowUp := s.up
	s.mu.Unlock()
	if err == nil && v.onEpoch != nil {
		v.onEpoch(st.Writer, st.Epoch)
	}
	if wasUp != nowUp {
		if err != nil {
			v.log.Warn("server not answering", "server", s.http, "error", err)
		} else {
			v.log.Info("server answering", "server", s.http, "id", st.Self.ID, "state", st.State)
		}
	}

	v.mu.Lock()
	defer v.mu.Unlock()
	switch {
	case err == nil && st.State == "Leader" && v.leader != s:
		v.log.Info("leader found", "server", s.http, "id", st.Self.ID, "term", st.Term)
		v.setLeaderLocked(s)
	case v.leader == s && (err != nil || st.State != "Leader"):
		v.log.Info("leader lost", "server", s.http)
		v.setLeaderLocked(nil)
	}
	v.notifyLocked()
}

// setLeaderLocked makes s (nil: none) the leader; calls in flight to the
// previous one are cancelled through its lostContext. Outside Serve there
// is no leader.
func (v *clusterView) setLeaderLocked(s *serverState) {
	if !v.serving {
		s = nil
	}
	if old := v.leader; old != nil {
		old.mu.Lock()
		if old.lost != nil {
			old.lost()
		}
		old.mu.Unlock()
	}
	if s == nil && v.leader != nil {
		v.leaderless = time.Now()
	}
	if s != nil && v.cancelFound != nil {
		v.cancelFound()
		v.found, v.cancelFound = nil, nil
	}
	v.leader = s
	if s != nil {
		s.mu.Lock()
		s.leadCtx, s.lost = context.WithCancel(v.ctx)
		s.mu.Unlock()
	}
	v.notifyLocked()
}

// lostContext is cancelled once s is no longer the leader (already
// cancelled when it is not).
func (s *serverState) lostContext() context.Context {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.leadCtx == nil {
		return lostCtx
	}
	return s.leadCtx
}

// lostCtx is the lostContext of a server that never led: cancelled.
var lostCtx = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

// markDown takes s out of the read rotation until a poll started after
// this answers.
func (s *serverState) markDown() {
	s.mu.Lock()
	s.markDownLocked()
	s.mu.Unlock()
}

func (s *serverState) markDownLocked() {
	s.up = false
	s.downGen++
}

// noteApplied raises the server's known applied index.
func (s *serverState) noteApplied(idx uint64) {
	for {
		cur := s.applied.Load()
		if idx <= cur || s.applied.CompareAndSwap(cur, idx) {
			return
		}
	}
}

// readable reports whether reads may go to s: it answers, is not
// resyncing, and has applied at least index.
func (s *serverState) readable(index uint64) bool {
	s.mu.Lock()
	ok := s.up && !s.syncing && s.nbdAddr != ""
	s.mu.Unlock()
	return ok && s.applied.Load() >= index
}

// nbdClient returns the server's NBD connection, dialing it (with dial
// when set: Config.Dial; over TLS with tc when set: Config.UpstreamTLS)
// if needed.
func (s *serverState) nbdClient(ctx context.Context, log hclog.Logger, dial func(ctx context.Context, network, addr string) (net.Conn, error), tc *tls.Config) (*nbd.Client, error) {
	s.mu.Lock()
	if c := s.client; c != nil {
		select {
		case <-c.Done():
			// The connection died: the server may have restarted, and
			// what we know of it may describe the old process.
			s.client = nil
			s.markDownLocked()
			s.mu.Unlock()
			return nil, fmt.Errorf("NBD connection to %s lost: %w", s.http, c.Err())
		default:
			s.mu.Unlock()
			return c, nil
		}
	}
	addr := s.nbdAddr
	s.mu.Unlock()
	if addr == "" {
		return nil, errors.New("server's NBD address not known yet")
	}
	network, a := dialAddr(addr)
	dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	ccfg := nbd.ClientConfig{
		MetaContext:      true,
		NoFragment:       true, // one data chunk per read: the server never looks for holes first
		HandshakeTimeout: 2 * time.Second,
		CloseTimeout:     time.Second,
		MaxInFlight:      128,
		Logger:           log,
		TLS:              upstreamTLS(tc, network, a),
	}
	var c *nbd.Client
	var err error
	if dial != nil {
		var nc net.Conn
		if nc, err = dial(dctx, network, a); err == nil {
			c, err = nbd.NewClient(dctx, nc, ccfg)
		}
	} else {
		c, err = nbd.Dial(dctx, network, a, ccfg)
	}
	if err != nil {
		return nil, fmt.Errorf("connecting to %s's NBD at %s: %w", s.http, addr, err)
	}
	s.mu.Lock()
	won := s.client
	if won == nil {
		s.client = c
	}
	s.mu.Unlock()
	if won != nil { // someone else won the race
		s.retire(c)
		return won, nil
	}
	return c, nil
}

func (s *serverState) dropClient(c *nbd.Client) {
	s.mu.Lock()
	if s.client == c {
		s.client = nil
		s.markDownLocked()
	}
	s.mu.Unlock()
	s.retire(c)
}

func (s *serverState) closeClient() {
	s.mu.Lock()
	c := s.client
	s.client = nil
	s.mu.Unlock()
	if c != nil {
		c.Close()
	}
}

// dialAddr splits an address as keel prints them (HOST:PORT or unix:PATH).
func dialAddr(addr string) (network, a string) {
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		return "unix", p
	}
	return "tcp", addr
}

// upstreamTLS is tc for a connection to addr: the server's certificate is
// checked against the host dialed unless tc names one. Nil stays nil.
func upstreamTLS(tc *tls.Config, network, addr string) *tls.Config {
	if tc == nil || tc.ServerName != "" || network == "unix" {
		return tc
	}
	tc = tc.Clone()
	if h, _, err := net.SplitHostPort(addr); err == nil {
		tc.ServerName = h
	}
	return tc
}
