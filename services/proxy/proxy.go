package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sync/errgroup"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/nbdmetrics"
	"github.com/keelstore/keel/services/wire"
	"github.com/keelstore/keel/supervise"
)

// Proxy is the nbd.Backend of `keel proxy`: the VM's side of a replicated
// volume. It finds the leader and commits writes through it (an apply
// stream, or POST /v1/apply) as the volume's one writer (a claimed epoch, a request id per
// command, so a write re-sent after a failover is applied once), keeps the
// client's requests waiting across leader changes, reads from any replica
// that has applied the proxy's last acknowledged write, and keeps a
// read-through cache that is coherent because nobody else writes.
//
// Serve runs the proxy's background work (polling the servers, claiming
// the volume at start, releasing it at stop); the NBD service in front of
// it is separate and must be stopped first.
type Proxy struct {
	cfg  Config
	view *clusterView
	api  *wire.Client // apply calls; each attempt has its own deadline
	// streams carry writes to the leader as frames of one long-lived
	// connection (applystream.go); relayed writes go by api.
	streams *applyStreams
	cache   *blockCache
	ahead   readAhead // tells sequential reads (which fetch ahead) from random ones
	log     hclog.Logger

	ready chan struct{} // closed once size is known
	size  uint64

	now     func() time.Time // the writer state's clock
	claimMu sync.Mutex       // one claim (or the release) in flight at a time
	wmu     sync.Mutex       // guards ws; never held across I/O
	ws      writerState      // decides claims, fencing and release (writerstate.go)
	epoch   atomic.Uint64    // ws.epoch, mirrored for the read path

	ids       idWindow
	lastAcked atomic.Uint64 // log index of the latest acknowledged command (read-your-writes)
	handedOff atomic.Bool   // a child took over: keep the claim at stop (HandOff)
	adopted   atomic.Bool   // took over from a parent under the same writer name (Adopt)
	rr        atomic.Uint64 // round robin over readable replicas

	stats    Stats
	requests *nbdmetrics.Requests // NBD requests as the process serves them (Process wraps the proxy in it)
	restarts supervise.Restarts   // the process's supervisor restarts
}

// Stats count what the proxy did; read them with Stats.
type Stats struct {
	Reads, CacheHits, CacheMisses, RemoteReads    atomic.Uint64
	RemoteReadBytes                               atomic.Uint64 // what the remote reads asked for
	Writes, Retries, Relayed, Duplicates, Refused atomic.Uint64
	// Streamed counts the apply attempts sent over an apply stream (the
	// rest went by POST /v1/apply).
	Streamed atomic.Uint64
}

// Config configures a Proxy.
type Config struct {
	// Servers are the HTTP API addresses (keel server --http) of some or
	// all of the volume's servers; the rest are found from the cluster's
	// member list. At least one.
	Servers []string
	// Writer is the name the proxy claims the volume under. A proxy
	// restarted under the same name claims it back without Takeover.
	// Required.
	Writer string
	// Takeover lets the proxy's first write claim the volume even when
	// another writer holds it, fencing that writer: its later writes are
	// refused and never land. (At start the proxy claims without it, so a
	// migration's source keeps writing until the destination first does.)
	Takeover bool
	// CacheBytes bounds the read cache; 0 turns it off. Default 0.
	CacheBytes uint64
	// WriteTimeout bounds how long a write waits for a leader and a
	// quorum (across any number of failovers) before failing with EIO.
	// Default 30s; range 100ms to 1h.
	WriteTimeout time.Duration
	// ReadTimeout bounds how long a read waits for a replica that may
	// answer it before failing with EIO. Default 30s; range 100ms to 1h.
	ReadTimeout time.Duration
	// AttemptTimeout bounds one apply call to the leader; after it the
	// write is re-sent (with the same request id). Default 5s; range 100ms
	// to WriteTimeout.
	AttemptTimeout time.Duration
	// RelayAfter: once no leader has answered this proxy for this long,
	// writes go through a follower that follows one, which forwards them
	// (a proxy cut from the leader alone keeps writing while a quorum
	// exists). Default 500ms; range 10ms to WriteTimeout.
	RelayAfter time.Duration
	// PollInterval is how often each server's status is read while a
	// leader is known; while none is, every 20ms. Default 200ms; range 10ms
	// to 10s.
	PollInterval time.Duration
	// Inherited: this proxy takes over from its parent in an upgrade
	// (docs/upgrade.md). It does not claim at start, since the parent
	// still writes under the same Writer until it has handed over; it
	// claims at its first write. Adopt gives it the parent's last
	// acknowledged write before any request is served.
	Inherited bool
	// Version is the build's version (keel version), reported in
	// /v1/status beside the feature level, so an operator sees which
	// proxies a rolling upgrade has reached.
	Version string
	// Log is the proxy's logger. Default: discard.
	Log hclog.Logger
	// ClusterTLS, when set, is the cluster's mutual TLS: the proxy calls
	// the servers' APIs over https with its client certificate
	// (ClusterTLS.Client), and ProcessConfig's HTTP API is served over
	// TLS (ClusterTLS.Server). Nil: plain HTTP, and the process says so
	// once at WARN.
	ClusterTLS *wire.ClusterTLS
	// Dial, if set, opens the proxy's connections to the servers (their
	// HTTP APIs and, for reads, their NBD exports) instead of a plain
	// net.Dialer: the hook of the chaos tests' network fault layer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// UpstreamTLS, when set, runs the proxy's NBD connections to the
	// servers (its reads) over TLS with this client configuration: its
	// RootCAs check the servers' certificates against the host dialed
	// (when ServerName is empty), and its certificate, if any, is shown
	// to servers that verify peers. Nil: plain NBD.
	UpstreamTLS *tls.Config
}

func (c Config) withDefaults() Config {
	if c.WriteTimeout == 0 {
		c.WriteTimeout = 30 * time.Second
	}
	if c.ReadTimeout == 0 {
		c.ReadTimeout = 30 * time.Second
	}
	if c.AttemptTimeout == 0 {
		c.AttemptTimeout = min(5*time.Second, c.WriteTimeout)
	}
	if c.PollInterval == 0 {
		c.PollInterval = 200 * time.Millisecond
	}
	if c.RelayAfter == 0 {
		c.RelayAfter = min(500*time.Millisecond, c.WriteTimeout)
	}
	if c.Log == nil {
		c.Log = hclog.NewNullLogger()
	}
	return c
}

// Validate checks the configuration; errors name the bad field.
func (c Config) Validate() error {
	c = c.withDefaults()
	if len(c.Servers) == 0 {
		return errors.New("proxy: Servers: at least one server's HTTP address is needed")
	}
	for _, s := range c.Servers {
		if strings.TrimSpace(s) == "" || strings.ContainsAny(s, " \t/") && !strings.HasPrefix(s, "http") {
			return fmt.Errorf("proxy: Servers: %q is not HOST:PORT", s)
		}
	}
	if c.Writer == "" || len(c.Writer) > 1024 {
		return errors.New("proxy: Writer: must be 1 to 1024 bytes")
	}
	if c.WriteTimeout < 100*time.Millisecond || c.WriteTimeout > time.Hour {
		return fmt.Errorf("proxy: WriteTimeout %v: must be from 100ms to 1h", c.WriteTimeout)
	}
	if c.ReadTimeout < 100*time.Millisecond || c.ReadTimeout > time.Hour {
		return fmt.Errorf("proxy: ReadTimeout %v: must be from 100ms to 1h", c.ReadTimeout)
	}
	if c.AttemptTimeout < 100*time.Millisecond || c.AttemptTimeout > c.WriteTimeout {
		return fmt.Errorf("proxy: AttemptTimeout %v: must be from 100ms to the write timeout %v", c.AttemptTimeout, c.WriteTimeout)
	}
	if c.RelayAfter < 10*time.Millisecond || c.RelayAfter > c.WriteTimeout {
		return fmt.Errorf("proxy: RelayAfter %v: must be from 10ms to the write timeout %v", c.RelayAfter, c.WriteTimeout)
	}
	if c.PollInterval < 10*time.Millisecond || c.PollInterval > 10*time.Second {
		return fmt.Errorf("proxy: PollInterval %v: must be from 10ms to 10s", c.PollInterval)
	}
	if c.ClusterTLS != nil {
		if err := c.ClusterTLS.Validate(); err != nil {
			return fmt.Errorf("proxy: ClusterTLS: %w", err)
		}
	}
	return nil
}

// New returns a proxy; Serve starts it and Ready waits until it knows
// the volume.
func New(cfg Config) (*Proxy, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	var tc *tls.Config
	if cfg.ClusterTLS != nil {
		tc = cfg.ClusterTLS.Client
	}
	status, api := wire.NewClient(2*time.Second, tc), wire.NewClient(0, tc)
	if cfg.Dial != nil {
		for _, c := range []*wire.Client{status, api} {
			c.HTTP.Transport.(*http.Transport).DialContext = cfg.Dial
		}
	}
	p := &Proxy{
		cfg:   cfg,
		view:  newClusterView(cfg.Servers, status, cfg.Log.Named("cluster"), cfg.PollInterval, 20*time.Millisecond),
		api:   api,
		cache: newBlockCache(cfg.CacheBytes),
		log:   cfg.Log,
		ready: make(chan struct{}),
		now:   time.Now,
		ws:    newWriterState(cfg.Takeover),

		requests: nbdmetrics.New(),
	}
	p.view.onEpoch = p.sawEpoch
	p.streams = newApplyStreams(api, cfg.Log.Named("stream"), func() time.Time { return p.now() })
	return p, nil
}

var _ nbd.Backend = (*Proxy)(nil)

func (p *Proxy) String() string { return "proxy" }

// Serve polls the servers, claims the volume, and at stop releases it.
func (p *Proxy) Serve(ctx context.Context) error {
	// The view outlives ctx by the release, which needs the leader.
	vctx, stopView := context.WithCancel(context.WithoutCancel(ctx))
	viewDone := make(chan struct{})
	go func() { defer close(viewDone); _ = p.view.Serve(vctx) }()
	defer func() { stopView(); <-viewDone }()
	defer p.streams.Close() // after the release, which may use one

	size, err := p.view.Size(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	select {
	case <-p.ready:
	default:
		p.size = size
		close(p.ready)
	}
	// Claim now (never as a takeover), so that an operator sees at once
	// whether this proxy may write. A takeover waits for the first write:
	// during a live migration the source VM keeps writing through its
	// proxy until it is paused, and only then does the destination write.
	cctx, cancel := context.WithTimeout(ctx, p.cfg.WriteTimeout)
	if p.cfg.Inherited {
		p.log.Info("taking over from the parent process: the volume is claimed at the first write")
	} else if _, err := p.writerEpoch(cctx, false); err != nil {
		if _, fenced := p.writerStatus(); p.cfg.Takeover && fenced == "" {
			p.log.Info("another writer holds the volume; this proxy takes it over at its first write (--takeover)", "detail", err)
		} else {
			p.log.Warn("not the volume's writer: reads are served, writes refused with EPERM", "error", err)
		}
	}
	cancel()
	<-ctx.Done()
	p.release(ctx)
	return nil
}

// Ready waits until the proxy knows the volume's size.
func (p *Proxy) Ready(ctx context.Context) (uint64, error) {
	select {
	case <-p.ready:
		return p.size, nil
	case <-ctx.Done():
		return 0, fmt.Errorf("no keel server answered at %s: %w", strings.Join(p.cfg.Servers, ", "), context.Cause(ctx))
	}
}

func (p *Proxy) Size() uint64 { return p.size }

// Capabilities: everything. Flush and FUA cost nothing (a write is answered
// once it is durable in a quorum's logs) and act across connections, as the
// read cache is shared by all of them; Cache fills that cache; extents come
// from a replica. A fast zero is honoured, see Zero.
func (p *Proxy) Capabilities() nbd.Caps { return nbd.CapsAll }

// Stats returns the proxy's counters.
func (p *Proxy) Stats() *Stats { return &p.stats }

// ---- the writer: epoch and request ids ----

// writerEpoch returns the proxy's epoch, claiming the volume first if
// the writer state says so (writerstate.go decides; this carries it out).
func (p *Proxy) writerEpoch(ctx context.Context, atWrite bool) (uint64, error) {
	if a := p.nextAction(atWrite); a.kind != actClaim {
		return a.result()
	}
	p.claimMu.Lock()
	defer p.claimMu.Unlock()
	a := p.nextAction(atWrite) // a claim that ended meanwhile may have settled it
	if a.kind != actClaim {
		return a.result()
	}
	c := replica.Command{Kind: replica.KindClaim, Writer: p.cfg.Writer, Takeover: a.takeover}
	// Never relayed: a claim is not idempotent (each one is a new epoch),
	// and a relayed copy could reach the leader after the retry that
	// answered, fencing this proxy's own epoch.
	r, err := p.send(ctx, &c, false)
	if err != nil {
		return 0, err
	}
	switch r.Refused {
	case wire.NotRefused:
	case wire.RefusedWriterHeld:
		var err error
		p.writer(func(w *writerState) { err = w.refused(r.Holder, p.now()) })
		if !p.cfg.Takeover {
			p.log.Warn("volume held by another writer; writes are refused until it releases it (or start with --takeover)", "holder", r.Holder, "detail", r.Error)
		}
		return 0, err
	default:
		return 0, wire.NBDError(r.Refused.Err(r.Error))
	}
	p.noteAcked(r.Index) // reads wait for replicas that have seen the claim (and so every earlier write)
	p.writer(func(w *writerState) { w.claimedEpoch(r.Epoch) })
	p.log.Info("holding the volume", "writer", p.cfg.Writer, "epoch", r.Epoch, "takeover", a.takeover)
	return r.Epoch, nil
}

// result carries out an action that needs no claim.
func (a writerAction) result() (uint64, error) {
	switch a.kind {
	case actWrite:
		return a.epoch, nil
	case actRefuse:
		return 0, a.err
	}
	return 0, fmt.Errorf("proxy: writer action %d has no result", a.kind)
}

// nextAction asks the writer state what to do for a write (atWrite) or
// the claim at start.
func (p *Proxy) nextAction(atWrite bool) writerAction {
	var a writerAction
	p.writer(func(w *writerState) { a = w.next(p.now(), atWrite) })
	return a
}

// writer runs fn on the writer state, and mirrors its epoch for the read
// path (holding).
func (p *Proxy) writer(fn func(w *writerState)) {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	fn(&p.ws)
	p.epoch.Store(p.ws.epoch)
}

// fence records that a takeover fenced this proxy: from now on every write
// is refused, and the cache (which another writer now invalidates) is off.
func (p *Proxy) fence(detail string) error {
	var err error
	var now bool
	p.writer(func(w *writerState) { now = w.fenced(detail); err = w.fencedErr() })
	if now {
		p.log.Error("fenced: another proxy took the volume over; writes are refused from now on", "detail", detail)
	}
	return err
}

// sawEpoch fences the proxy as soon as a server reports a later claim
// than its own: from then on its cache may be stale, and its writes would
// be refused anyway.
func (p *Proxy) sawEpoch(writer string, epoch uint64) {
	var detail string
	var now bool
	p.writer(func(w *writerState) { detail, now = w.sawEpoch(writer, epoch) })
	if now {
		p.log.Error("fenced: another proxy took the volume over; writes are refused from now on", "detail", detail)
	}
}

// holding reports whether the proxy is the volume's writer right now.
func (p *Proxy) holding() bool { return p.epoch.Load() != 0 }

// writerStatus reports the epoch held (0: none) and, once fenced, why.
func (p *Proxy) writerStatus() (epoch uint64, fenced string) {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	if err := p.ws.fencedErr(); err != nil {
		fenced = err.Error()
	}
	return p.ws.epoch, fenced
}

func (p *Proxy) noteAcked(index uint64) {
	for {
		cur := p.lastAcked.Load()
		if index <= cur || p.lastAcked.CompareAndSwap(cur, index) {
			return
		}
	}
}

// release gives the volume up at stop (ctx is Serve's, ended), so that
// another proxy may claim it without a takeover. No claim runs meanwhile
// or after.
func (p *Proxy) release(ctx context.Context) {
	p.claimMu.Lock()
	defer p.claimMu.Unlock()
	if p.handedOff.Load() {
		p.log.Info("a new process took over under the same writer name: the volume is not released")
		return
	}
	var e uint64
	p.writer(func(w *writerState) { e = w.stop() })
	if e == 0 {
		return
	}
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	c := replica.Command{Kind: replica.KindRelease, Epoch: e}
	if _, err := p.send(rctx, &c, false); err != nil {
		p.log.Warn("could not release the volume; the next proxy needs the same --writer name or --takeover", "error", err)
		return
	}
	p.writer(func(w *writerState) { w.released() })
	p.log.Info("released the volume", "epoch", e)
}

// HandOff marks the proxy as handed over to a child in an upgrade (every
// connection quiesced): at stop it keeps the claim, which the child, under
// the same Writer, takes on at its first write. It returns the index the
// child's reads must wait for (Adopt). handed false undoes it (the upgrade
// failed).
func (p *Proxy) HandOff(handed bool) uint64 {
	p.handedOff.Store(handed)
	return p.lastAcked.Load()
}

// Adopt makes reads wait for replicas that have applied index, the
// parent's last acknowledged write. Until its first write claims the
// volume, such a proxy reads as the writer it succeeds (no barrier at the
// leader): the parent had no request in flight when it handed over, and
// index covers every write it acknowledged.
func (p *Proxy) Adopt(index uint64) {
	p.noteAcked(index)
	p.adopted.Store(true)
	p.view.Kick() // the replicas' applied indexes seen at prepare are behind index: poll now
}

// idWindow hands out request ids and tracks which are still unanswered:
// every id below low has been answered to the client.
type idWindow struct {
	mu   sync.Mutex
	next uint64
	low  uint64
	open map[uint64]struct{}
}

func (w *idWindow) take() (id, ackedBelow uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.open == nil {
		w.open, w.next, w.low = map[uint64]struct{}{}, 1, 1
	}
	id = w.next
	w.next++
	w.open[id] = struct{}{}
	return id, w.low
}

func (w *idWindow) done(id uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.open, id)
	for w.low < w.next {
		if _, ok := w.open[w.low]; ok {
			break
		}
		w.low++
	}
}

// commit sends one write, trim or zero as the volume's writer, re-sending
// it (same request id) across failovers until it is committed or the
// write timeout passes.
func (p *Proxy) commit(ctx context.Context, c *replica.Command) error {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.WriteTimeout)
	defer cancel()
	epoch, err := p.writerEpoch(ctx, true)
	if err != nil {
		if errors.Is(err, nbd.EPERM) {
			return err
		}
		return fmt.Errorf("%w: %v", nbd.EIO, err)
	}
	id, acked := p.ids.take()
	defer p.ids.done(id)
	c.Epoch, c.ReqID, c.AckedBelow = epoch, id, acked
	p.stats.Writes.Add(1)
	// Relayed if need be: a copy that lands late is a duplicate of its
	// request id, never applied twice.
	r, err := p.send(ctx, c, true)
	if err != nil {
		length := c.Length
		if c.Kind == replica.KindWrite {
			length = uint64(len(c.Data))
		}
		p.log.Warn("write not committed within the write timeout", "timeout", p.cfg.WriteTimeout, "kind", c.Kind, "offset", c.Offset, "length", length, "error", err)
		return fmt.Errorf("%w: not committed within %v: %v (%w)", nbd.EIO, p.cfg.WriteTimeout, err, errMaybeCommitted)
	}
	if r.Duplicate {
		p.stats.Duplicates.Add(1)
	}
	switch r.Refused {
	case wire.NotRefused:
		p.noteAcked(r.Index)
		return nil
	case wire.RefusedStaleEpoch:
		p.stats.Refused.Add(1)
		return p.fence(r.Error)
	}
	return wire.NBDError(r.Refused.Err(r.Error))
}

// errMaybeCommitted marks a command that was sent but not answered in
// time: it may still be committed later (it is in some log), or never.
var errMaybeCommitted = errors.New("it may still be committed later")

// settle ends a write's cache bracket. A write that may land later leaves
// its range uncacheable for good: a read could otherwise cache the old
// data just before the write lands.
func (p *Proxy) settle(g, off, length uint64, err error) error {
	if errors.Is(err, errMaybeCommitted) && p.cache.poison(off, length) {
		p.log.Warn("read cache turned off: too many writes failed without a known outcome; restart the proxy to cache again")
	}
	p.cache.endWrite(g)
	return err
}

// send delivers a command to the leader, whichever it is, until
// it is answered (committed, possibly refused) or ctx ends. Each attempt
// ends early when the leader is found lost. With relay, a write may go
// through a follower while no leader answers the proxy
// (clusterView.Target): only for commands that are safe to apply late
// and twice (a request id's), since an abandoned relayed copy may still
// reach the leader.
func (p *Proxy) send(ctx context.Context, c *replica.Command, relay bool) (wire.ApplyResponse, error) {
	o := outgoing{c: c}
	var last error
	for attempt := 0; ; attempt++ {
		if attempt > 0 {
			p.stats.Retries.Add(1)
			select {
			case <-ctx.Done():
				return wire.ApplyResponse{}, last
			case <-time.After(min(time.Duration(attempt)*5*time.Millisecond, 100*time.Millisecond)):
			}
		}
		after := p.cfg.RelayAfter
		if !relay {
			after = 0 // the leader only
		}
		l, relayed, err := p.view.Target(ctx, after)
		if err != nil {
			if last == nil {
				last = err
			}
			return wire.ApplyResponse{}, last
		}
		actx, cancel := context.WithTimeout(ctx, p.cfg.AttemptTimeout)
		var r wire.ApplyResponse
		who := "leader"
		if relayed {
			who = "relay"
			p.stats.Relayed.Add(1)
			stop := context.AfterFunc(p.view.foundContext(), cancel)
			r, err = p.api.Relay(actx, l.http, o.compat())
			stop()
		} else {
			stop := context.AfterFunc(l.lostContext(), cancel)
			var streamed bool
			r, streamed, err = p.streams.apply(actx, l.http, &o)
			stop()
			if streamed {
				p.stats.Streamed.Add(1)
			}
		}
		cancel()
		if err != nil {
			last = fmt.Errorf("%s %s: %w", who, l.http, err)
			if ctx.Err() == nil {
				if relayed {
					if p.view.foundContext().Err() == nil { // not given way to a leader found
						l.markDown()
						p.view.Kick()
					}
				} else {
					p.view.LeaderFailed(l)
				}
			}
			continue
		}
		if r.Refused == wire.NotRefused && r.Error != "" {
			last = fmt.Errorf("%s %s: %s", who, l.http, r.Error)
			continue
		}
		l.noteApplied(r.Index)
		return r, nil
	}
}

// ---- writes ----

func (p *Proxy) WriteAt(ctx context.Context, b []byte, off uint64, fua bool) error {
	g := p.cache.startWrite(off, uint64(len(b)))
	if len(b) <= replica.MaxCommandData {
		return p.settle(g, off, uint64(len(b)), p.commit(ctx, &replica.Command{Kind: replica.KindWrite, Offset: off, Data: b}))
	}
	var eg errgroup.Group
	for done := 0; done < len(b); done += replica.MaxCommandData {
		part, at := b[done:min(done+replica.MaxCommandData, len(b))], off+uint64(done)
		eg.Go(func() error {
			return p.commit(ctx, &replica.Command{Kind: replica.KindWrite, Offset: at, Data: part})
		})
	}
	return p.settle(g, off, uint64(len(b)), eg.Wait())
}

// Flush has nothing to do: every write was committed on a quorum (durable
// in its logs) before it was answered.
func (p *Proxy) Flush(context.Context) error { return nil }

func (p *Proxy) Trim(ctx context.Context, off, length uint64, fua bool) error {
	g := p.cache.startWrite(off, length)
	return p.settle(g, off, length, p.commit(ctx, &replica.Command{Kind: replica.KindTrim, Offset: off, Length: length}))
}

// Zero is always fast, so nbd.ZeroFast needs no check: it is one zero
// command in the log, a few dozen bytes whatever the length, that every
// replica applies with fallocate (at worst writing zeroes locally, the same
// local work a write would do), so no data moves between the proxy, the
// servers and the log. It is serviced in less time than the corresponding
// write, which is what the protocol asks of a fast zero; the servers'
// volume answers the same way (server.Volume.Zero).
func (p *Proxy) Zero(ctx context.Context, off, length uint64, f nbd.ZeroFlags) error {
	g := p.cache.startWrite(off, length)
	c := &replica.Command{Kind: replica.KindZero, Offset: off, Length: length, ZeroFlags: f & nbd.ZeroNoHole}
	return p.settle(g, off, length, p.commit(ctx, c))
}

// ---- reads ----

func (p *Proxy) ReadAt(ctx context.Context, b []byte, off uint64) error {
	p.stats.Reads.Add(1)
	if !p.cache.enabled() || !p.holding() || len(b) == 0 {
		return p.readRemote(ctx, b, off)
	}
	end := off + uint64(len(b))
	var arr [16]uint64
	missing := p.cache.copyOut(b, off, arr[:0])
	first, last := off/cacheBlock, (end-1)/cacheBlock
	p.stats.CacheHits.Add(last - first + 1 - uint64(len(missing)))
	p.stats.CacheMisses.Add(uint64(len(missing)))
	missEnd := len(missing) > 0 && missing[len(missing)-1] == last
	ahead := min(p.ahead.plan(off, uint64(len(b)), missEnd), p.size)
	if len(missing) == 0 {
		return nil
	}
	// Runs of missing blocks, each fetched in one read; the last one
	// extended by the read-ahead, up to the next cached block.
	var runs []span
	for i := 0; i < len(missing); {
		j := i
		for j+1 < len(missing) && missing[j+1] == missing[j]+1 {
			j++
		}
		runs = append(runs, span{missing[i] * cacheBlock, min((missing[j]+1)*cacheBlock, p.size)})
		i = j + 1
	}
	if r := &runs[len(runs)-1]; missEnd {
		for r.end < ahead && !p.cache.has(r.end/cacheBlock) {
			r.end = min(r.end+cacheBlock, p.size)
		}
	}
	tok := p.cache.startFill()
	if len(runs) == 1 {
		return p.fetchRun(ctx, tok, b, off, runs[0])
	}
	var eg errgroup.Group
	for _, r := range runs {
		eg.Go(func() error { return p.fetchRun(ctx, tok, b, off, r) })
	}
	return eg.Wait()
}

// fetchRun reads run (whole blocks, or up to the volume's end) from a
// replica, copies the part that overlaps [off, off+len(b)) into b and
// fills the cache with it (tok from startFill before the read). A run
// inside b is read straight into b; one that sticks out (an unaligned
// read, read-ahead) goes through a pooled buffer.
func (p *Proxy) fetchRun(ctx context.Context, tok uint64, b []byte, off uint64, run span) error {
	end := off + uint64(len(b))
	if run.start >= off && run.end <= end {
		dst := b[run.start-off : run.end-off]
		if err := p.readRemote(ctx, dst, run.start); err != nil {
			return err
		}
		p.cache.fillRange(tok, run.start, dst)
		return nil
	}
	bufp := getRunBuf(int(run.end - run.start))
	defer putRunBuf(bufp)
	buf := *bufp
	if err := p.readRemote(ctx, buf, run.start); err != nil {
		return err
	}
	lo, hi := max(run.start, off), min(run.end, end)
	copy(b[lo-off:hi-off], buf[lo-run.start:hi-run.start])
	p.cache.fillRange(tok, run.start, buf)
	return nil
}

// runBufSize is the capacity of the pooled buffers of fetchRun: a small
// read with its read-ahead and its unaligned edges fits.
const runBufSize = readAheadWindow + 64<<10

var runBufs = sync.Pool{New: func() any { b := make([]byte, runBufSize); return &b }}

func getRunBuf(n int) *[]byte {
	if n > runBufSize {
		b := make([]byte, n)
		return &b
	}
	bp := runBufs.Get().(*[]byte)
	*bp = (*bp)[:n]
	return bp
}

func putRunBuf(bp *[]byte) {
	if cap(*bp) == runBufSize {
		runBufs.Put(bp)
	}
}

// copyBlock copies the part of block blk (holding data) that overlaps
// [off, off+len(b)) into b.
func copyBlock(b []byte, off, blk uint64, data []byte) {
	bs := blk * cacheBlock
	lo, hi := max(bs, off), min(bs+uint64(len(data)), off+uint64(len(b)))
	if lo < hi {
		copy(b[lo-off:hi-off], data[lo-bs:hi-bs])
	}
}

// readRemote reads from a replica that has applied the last acknowledged
// write, trying others when one fails, for up to the read timeout.
func (p *Proxy) readRemote(ctx context.Context, b []byte, off uint64) error {
	p.stats.RemoteReads.Add(1)
	p.stats.RemoteReadBytes.Add(uint64(len(b)))
	return p.onReplica(ctx, func(ctx context.Context, c *nbd.Client) error { return c.ReadAt(ctx, b, off) })
}

func (p *Proxy) onReplica(ctx context.Context, fn func(context.Context, *nbd.Client) error) error {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.ReadTimeout)
	defer cancel()
	need := p.lastAcked.Load()
	if !p.holding() && !p.adopted.Load() {
		// Another proxy may write: read at least what the leader had in
		// its log when this read began (a destination proxy of a live
		// migration, before its first write, must see every write the
		// source acknowledged).
		b, err := p.view.Barrier(ctx)
		if err != nil {
			return fmt.Errorf("%w: finding the cluster's last write: %v", nbd.EIO, err)
		}
		need = max(need, b)
	}
	var last error
	for attempt := 0; ; attempt++ {
		s, changed := p.pickReplica(need)
		if s == nil {
			if last == nil {
				last = fmt.Errorf("no replica has applied index %d yet", need)
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("%w: no replica could answer within %v: %v", nbd.EIO, p.cfg.ReadTimeout, last)
			case <-changed:
			case <-time.After(50 * time.Millisecond):
			}
			continue
		}
		c, err := s.nbdClient(ctx, p.log.Named("nbd-client"), p.cfg.Dial, p.cfg.UpstreamTLS)
		if err == nil {
			s.inflight.Add(1)
			err = fn(ctx, c)
			s.inflight.Add(-1)
			if err == nil {
				s.reads.Add(1)
				return nil
			}
			if errors.Is(err, nbd.ErrConnClosed) {
				s.dropClient(c)
			}
		}
		last = fmt.Errorf("server %s: %w", s.http, err)
		s.markDown()
		p.view.Kick()
		if ctx.Err() != nil {
			return fmt.Errorf("%w: %v", nbd.EIO, last)
		}
	}
}

// pickReplica returns the readable replica with the fewest reads in
// flight (ties broken round robin), or nil and a channel closed on the
// next change of the cluster view.
func (p *Proxy) pickReplica(need uint64) (*serverState, <-chan struct{}) {
	p.view.mu.Lock()
	changed := p.view.changed
	p.view.mu.Unlock()
	all := p.view.snapshot()
	n := uint64(len(all))
	start := p.rr.Add(1)
	var best *serverState
	for i := uint64(0); i < n; i++ {
		s := all[(start+i)%n]
		if !s.readable(need) {
			continue
		}
		if best == nil || s.inflight.Load() < best.inflight.Load() {
			best = s
		}
	}
	return best, changed
}

func (p *Proxy) Extents(ctx context.Context, off, length uint64) ([]nbd.Extent, error) {
	var out []nbd.Extent
	err := p.onReplica(ctx, func(ctx context.Context, c *nbd.Client) error {
		if !c.MetaContext() {
			out = []nbd.Extent{{Length: length}}
			return nil
		}
		var err error
		out, err = c.BlockStatus(ctx, off, length, false)
		return err
	})
	return out, err
}

// Cache reads the range into the read cache (up to the cache's size).
func (p *Proxy) Cache(ctx context.Context, off, length uint64) error {
	if !p.cache.enabled() || !p.holding() {
		return nil
	}
	length = min(length, p.cfg.CacheBytes)
	const chunk = 4 << 20
	buf := make([]byte, min(length, chunk))
	for done := uint64(0); done < length; done += chunk {
		n := min(chunk, length-done)
		if err := p.ReadAt(ctx, buf[:n], off+done); err != nil {
			return err
		}
	}
	return nil
}
