package keeltest

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/keelstore/keel/services/keeltls"
	"github.com/keelstore/keel/services/wire"
)

// ErrPortTaken: a process could not bind one of its ports.
var ErrPortTaken = errors.New("keeltest: a port was taken")

// ClusterConfig describes a cluster of `keel server`s on 127.0.0.1.
type ClusterConfig struct {
	// Bin is the keel binary; required.
	Bin string
	// Dir holds each node's directory (Dir/ID) and log (Dir/ID.log), and
	// each proxy's log; required.
	Dir string
	// LogDir, if set, holds the nodes' and proxies' logs instead of Dir.
	LogDir string
	// NBDSocketDir, if set, makes each node serve NBD on the unix socket
	// NBDSocketDir/ID.sock instead of a loopback port. Socket paths are
	// limited to 108 bytes (see SocketDir).
	NBDSocketDir string
	// N is how many servers Start brings up (n1 bootstraps, n2..nN join);
	// 1 or more.
	N int
	// Size is the bootstrapping node's --size, e.g. "64M"; required.
	Size string
	// Flags go to every server run after the harness's own (--dir, --id,
	// --raft, --http, --nbd), so a later flag given here wins.
	Flags []string
	// GlobalFlags go before the subcommand of every server and proxy,
	// e.g. --log-level debug.
	GlobalFlags []string
	// Env is added to the environment of every server and proxy, e.g.
	// the chaos build's $KEEL_CHAOS_DIR.
	Env []string
	// PidFiles runs every server and proxy with --pid-file (Node.PidFile,
	// Proxy.PidFile) and its output straight to its log (ProcConfig.Direct),
	// so that it can be upgraded in place (keel upgrade) and the harness
	// follow the successor (Node.Adopt, Proxy.Adopt).
	PidFiles bool
	// Logf, if set, hears of retries and other events worth a line.
	Logf func(format string, args ...any)
	// UpTimeout bounds a start: exec to answering HTTP, or to leading
	// after --bootstrap, or a proxy to serving. 0 means 60s.
	UpTimeout time.Duration
	// Timeout bounds membership changes, elections and catching up.
	// 0 means 2m.
	Timeout time.Duration
	// StopTimeout bounds SIGTERM (or SIGKILL) to exit. 0 means 30s.
	StopTimeout time.Duration
	// PollEvery is how often the waits look. 0 means 100ms.
	PollEvery time.Duration
	// HTTPTimeout bounds one request to a server's or proxy's API.
	// 0 means 5s.
	HTTPTimeout time.Duration
	// TLS runs every server and proxy with --cluster-tls (mutual TLS
	// between them): NewCluster makes a CA in Dir/tls/ca, each node and
	// proxy gets Dir/tls/NAME (server and client certificates for
	// 127.0.0.1, CertDir), and the harness reads the APIs with a client
	// certificate of its own (Dir/tls/harness).
	TLS bool
}

// Validate names the first bad field.
func (c ClusterConfig) Validate() error {
	switch {
	case c.Bin == "":
		return fmt.Errorf("%w: ClusterConfig.Bin is empty", ErrBadConfig)
	case c.Dir == "":
		return fmt.Errorf("%w: ClusterConfig.Dir is empty", ErrBadConfig)
	case c.N < 1:
		return fmt.Errorf("%w: ClusterConfig.N %d: want 1 or more", ErrBadConfig, c.N)
	case c.Size == "":
		return fmt.Errorf("%w: ClusterConfig.Size is empty", ErrBadConfig)
	case c.UpTimeout < 0, c.Timeout < 0, c.StopTimeout < 0, c.PollEvery < 0, c.HTTPTimeout < 0:
		return fmt.Errorf("%w: ClusterConfig timeouts must not be negative", ErrBadConfig)
	}
	return nil
}

func (c *ClusterConfig) defaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.UpTimeout, 60*time.Second)
	def(&c.Timeout, 2*time.Minute)
	def(&c.StopTimeout, 30*time.Second)
	def(&c.PollEvery, 100*time.Millisecond)
	def(&c.HTTPTimeout, 5*time.Second)
	if c.LogDir == "" {
		c.LogDir = c.Dir
	}
	if c.Logf == nil {
		c.Logf = func(string, ...any) {}
	}
}

// Cluster is a set of `keel server`s and the proxies in front of them.
// Close kills them all.
type Cluster struct {
	cfg    ClusterConfig
	group  Group
	client *wire.Client

	mu      sync.Mutex // guards the following
	nodes   []*Node
	proxies []*Proxy
}

// NewCluster checks cfg and returns a cluster with no node yet; Start
// brings up cfg.N of them.
func NewCluster(cfg ClusterConfig) (*Cluster, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.defaults()
	for _, d := range []string{cfg.Dir, cfg.LogDir, cfg.NBDSocketDir} {
		if d == "" {
			continue
		}
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("keeltest: %w", err)
		}
	}
	c := &Cluster{cfg: cfg}
	var tc *tls.Config
	if cfg.TLS {
		if err := keeltls.CreateCA(c.CADir(), keeltls.CAOptions{Name: "keeltest CA"}); err != nil {
			return nil, fmt.Errorf("keeltest: %w", err)
		}
		dir := filepath.Join(cfg.Dir, "tls", "harness")
		if err := keeltls.CreateCert(c.CADir(), dir, keeltls.CertOptions{Name: "keeltest-harness", Client: true}); err != nil {
			return nil, fmt.Errorf("keeltest: %w", err)
		}
		b, err := keeltls.Load(dir)
		if err != nil {
			return nil, fmt.Errorf("keeltest: %w", err)
		}
		if tc, err = b.ClientConfig(""); err != nil {
			return nil, fmt.Errorf("keeltest: %w", err)
		}
	}
	c.client = wire.NewClient(cfg.HTTPTimeout, tc)
	return c, nil
}

// CADir is the cluster CA's directory (ClusterConfig.TLS): a test signs
// more certificates with it (keel tls cert create --ca).
func (c *Cluster) CADir() string { return filepath.Join(c.cfg.Dir, "tls", "ca") }

// CertDir is the --cluster-tls directory of the node or proxy name, made
// on first use (server and client certificates for 127.0.0.1 and
// localhost); "" without ClusterConfig.TLS.
func (c *Cluster) CertDir(name string) (string, error) {
	if !c.cfg.TLS {
		return "", nil
	}
	dir := filepath.Join(c.cfg.Dir, "tls", name)
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := os.Stat(filepath.Join(dir, keeltls.CACert)); err == nil {
		return dir, nil
	}
	if err := keeltls.CreateCert(c.CADir(), dir, keeltls.CertOptions{Name: name, Hosts: []string{"127.0.0.1", "localhost"}}); err != nil {
		return "", fmt.Errorf("keeltest: certificates of %s: %w", name, err)
	}
	return dir, nil
}

// StartCluster is NewCluster and Start; on an error it kills what it
// started.
func StartCluster(ctx context.Context, cfg ClusterConfig) (*Cluster, error) {
	c, err := NewCluster(cfg)
	if err != nil {
		return nil, err
	}
	if err := c.Start(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Start bootstraps n1, joins n2..nN through it, and waits until all are
// voters with a leader.
func (c *Cluster) Start(ctx context.Context) error {
	first, err := c.Add("n1")
	if err != nil {
		return err
	}
	if err := first.StartFresh(ctx, "--bootstrap", "--size", c.cfg.Size); err != nil {
		return err
	}
	ids := []string{"n1"}
	for i := 2; i <= c.cfg.N; i++ {
		id := fmt.Sprintf("n%d", i)
		if _, err := c.Join(ctx, id, first); err != nil {
			return err
		}
		ids = append(ids, id)
	}
	_, err = c.WaitVoters(ctx, first, ids, nil)
	return err
}

// Config is the cluster's configuration, defaults filled in.
func (c *Cluster) Config() ClusterConfig { return c.cfg }

// Client is the HTTP client the harness reads the APIs with.
func (c *Cluster) Client() *wire.Client { return c.client }

// Add makes a node that has not started, on free ports.
func (c *Cluster) Add(id string) (*Node, error) {
	n := &Node{ID: id, Dir: filepath.Join(c.cfg.Dir, id), LogPath: filepath.Join(c.cfg.LogDir, id+".log"), c: c}
	if err := n.pickPorts(); err != nil {
		return nil, err
	}
	var err error
	if n.CertDir, err = c.CertDir(id); err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.nodes = append(c.nodes, n)
	c.mu.Unlock()
	return n, nil
}

// Join adds a node and starts it with --join via's HTTP address.
func (c *Cluster) Join(ctx context.Context, id string, via *Node) (*Node, error) {
	n, err := c.Add(id)
	if err != nil {
		return nil, err
	}
	return n, n.StartFresh(ctx, "--join", via.HTTP)
}

// Nodes lists every node added, in order.
func (c *Cluster) Nodes() []*Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.nodes)
}

// Node returns the node with the id, or nil.
func (c *Cluster) Node(id string) *Node {
	for _, n := range c.Nodes() {
		if n.ID == id {
			return n
		}
	}
	return nil
}

// HTTPAddrs lists every node's HTTP address, for a proxy's --servers.
func (c *Cluster) HTTPAddrs() []string {
	var out []string
	for _, n := range c.Nodes() {
		out = append(out, n.HTTP)
	}
	return out
}

// Running lists the nodes whose process runs.
func (c *Cluster) Running() []*Node {
	var out []*Node
	for _, n := range c.Nodes() {
		if n.Running() {
			out = append(out, n)
		}
	}
	return out
}

// Followers lists the running nodes other than lead.
func (c *Cluster) Followers(lead *Node) []*Node {
	var out []*Node
	for _, n := range c.Running() {
		if n != lead {
			out = append(out, n)
		}
	}
	return out
}

// Statuses asks every running node for its status at once; a node that
// does not answer is missing from the map.
func (c *Cluster) Statuses(ctx context.Context) map[string]wire.NodeStatus {
	out := map[string]wire.NodeStatus{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, n := range c.Running() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if st, err := n.Status(ctx); err == nil {
				mu.Lock()
				out[n.ID] = st
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return out
}

func (c *Cluster) poll(ctx context.Context, what string, cond func() (bool, string, error)) error {
	return Poll(ctx, c.cfg.Timeout, c.cfg.PollEvery, what, cond)
}

// Leader waits until one of among (every running node if none) leads and
// the others follow it.
func (c *Cluster) Leader(ctx context.Context, among ...*Node) (*Node, error) {
	if len(among) == 0 {
		among = c.Running()
	}
	var lead *Node
	err := c.poll(ctx, "a leader that the others follow", func() (bool, string, error) {
		lead = nil
		var states []string
		sts := map[string]wire.NodeStatus{}
		for _, n := range among {
			st, err := n.Status(ctx)
			if err != nil {
				return false, fmt.Sprintf("%s: %v", n.ID, err), nil
			}
			sts[n.ID] = st
			states = append(states, fmt.Sprintf("%s:%s(leader %q)", n.ID, st.State, st.Leader))
			if st.State == "Leader" {
				lead = n
			}
		}
		if lead == nil {
			return false, strings.Join(states, " "), nil
		}
		for _, st := range sts {
			if st.Leader != lead.ID {
				return false, strings.Join(states, " "), nil
			}
		}
		return true, "", nil
	})
	if err != nil {
		return nil, err
	}
	return lead, nil
}

// Voters lists the ids of a view's voters, sorted.
func Voters(v wire.ClusterStatus) []string {
	var ids []string
	for _, m := range v.Members {
		if m.Suffrage == "Voter" {
			ids = append(ids, m.ID)
		}
	}
	sort.Strings(ids)
	return ids
}

// DescribeCluster is a view in one line: leader, and each member's
// suffrage, state and applied index (or why its status is missing).
func DescribeCluster(v wire.ClusterStatus) string {
	var b strings.Builder
	fmt.Fprintf(&b, "leader %q:", v.Leader)
	for _, m := range v.Members {
		fmt.Fprintf(&b, " %s/%s", m.ID, m.Suffrage)
		if m.Status != nil {
			fmt.Fprintf(&b, "/%s/applied=%d", m.Status.State, m.Status.AppliedIndex)
		} else {
			fmt.Fprintf(&b, "/(%s)", m.Error)
		}
	}
	return b.String()
}

// WaitVoters waits until via's view of the cluster has exactly the voters
// ids, a leader, and a status from each member; observe, if not nil, sees
// every view on the way.
func (c *Cluster) WaitVoters(ctx context.Context, via *Node, ids []string, observe func(wire.ClusterStatus)) (wire.ClusterStatus, error) {
	want := slices.Clone(ids)
	sort.Strings(want)
	var v wire.ClusterStatus
	err := c.poll(ctx, fmt.Sprintf("voters %v via %s", want, via.ID), func() (bool, string, error) {
		var err error
		if v, err = via.ClusterStatus(ctx); err != nil {
			return false, err.Error(), nil
		}
		if observe != nil {
			observe(v)
		}
		if v.Leader == "" || !slices.Equal(Voters(v), want) {
			return false, DescribeCluster(v), nil
		}
		for _, m := range v.Members {
			if m.Status == nil {
				return false, DescribeCluster(v), nil
			}
		}
		return true, "", nil
	})
	return v, err
}

// WaitConverged waits until the nodes given (every running node if none)
// agree on a leader and a commit index that covers the leader's whole log,
// and have applied the same index, and returns that index.
//
// The applied index is the image's: Raft's own entries (the no-op a new
// leader appends, configuration changes) do not reach it. So it equals the
// commit index, or stays below it when such entries end the log; then the
// nodes must hold still for a second.
func (c *Cluster) WaitConverged(ctx context.Context, nodes ...*Node) (uint64, error) {
	if len(nodes) == 0 {
		nodes = c.Running()
	}
	var index uint64
	var last string
	var since time.Time
	err := c.poll(ctx, "every node applies what the leader committed", func() (bool, string, error) {
		var states []string
		var lead *wire.NodeStatus
		sts := make([]wire.NodeStatus, len(nodes))
		for i, n := range nodes {
			st, err := n.Status(ctx)
			if err != nil {
				return false, fmt.Sprintf("%s: %v", n.ID, err), nil
			}
			sts[i] = st
			states = append(states, fmt.Sprintf("%s:%s(leader %q) last=%d commit=%d applied=%d",
				n.ID, st.State, st.Leader, st.LastLogIndex, st.CommitIndex, st.AppliedIndex))
			if st.State == "Leader" {
				lead = &sts[i]
			}
		}
		state := strings.Join(states, " ")
		if lead == nil || lead.CommitIndex != lead.LastLogIndex {
			return false, state, nil
		}
		for _, st := range sts {
			if st.Leader != lead.Self.ID || st.CommitIndex != lead.CommitIndex || st.AppliedIndex != sts[0].AppliedIndex {
				return false, state, nil
			}
		}
		index = lead.AppliedIndex
		if index == lead.CommitIndex {
			return true, "", nil
		}
		if state != last {
			last, since = state, time.Now()
		}
		return time.Since(since) >= time.Second, state, nil
	})
	return index, err
}

// WaitCaughtUp waits until n follows a leader (or leads) and has applied
// everything the leader had applied when the wait began, with no image
// resync running. Unlike WaitConverged it ends while writes go on.
func (c *Cluster) WaitCaughtUp(ctx context.Context, n *Node) error {
	lead, err := c.Leader(ctx)
	if err != nil {
		return err
	}
	st, err := lead.Status(ctx)
	if err != nil {
		return fmt.Errorf("leader %s: %w", lead.ID, err)
	}
	target := st.AppliedIndex
	return c.poll(ctx, fmt.Sprintf("%s applies index %d (leader %s)", n.ID, target, lead.ID), func() (bool, string, error) {
		st, err := n.Status(ctx)
		if err != nil {
			return false, err.Error(), nil
		}
		syncing := st.Sync != nil && st.Sync.Active
		member := st.State == "Leader" || st.State == "Follower" && st.Leader != ""
		return member && st.AppliedIndex >= target && !syncing,
			fmt.Sprintf("%s leader %q applied %d syncing %v", st.State, st.Leader, st.AppliedIndex, syncing), nil
	})
}

// StopAll stops every running proxy, then every running server at once,
// with SIGTERM; it returns the exits other than status 0, joined.
func (c *Cluster) StopAll() error {
	var errs []error
	c.mu.Lock()
	proxies := slices.Clone(c.proxies)
	c.mu.Unlock()
	for _, p := range proxies {
		if p.Running() {
			errs = append(errs, p.Stop())
		}
	}
	running := c.Running()
	stopErrs := make([]error, len(running))
	var wg sync.WaitGroup
	for i, n := range running {
		wg.Add(1)
		go func() {
			defer wg.Done()
			stopErrs[i] = n.Stop()
		}()
	}
	wg.Wait()
	return errors.Join(append(errs, stopErrs...)...)
}

// Close kills every process of the cluster that still runs.
func (c *Cluster) Close() { c.group.KillAll() }

// Crashes scans every node's and proxy's whole log (all runs) and returns
// ErrCrash with the offending lines, joined.
func (c *Cluster) Crashes() error {
	var errs []error
	for _, n := range c.Nodes() {
		errs = append(errs, scanErr(n.ID, n.Output()))
	}
	c.mu.Lock()
	proxies := slices.Clone(c.proxies)
	c.mu.Unlock()
	for _, p := range proxies {
		errs = append(errs, scanErr("proxy "+p.Name, p.Output()))
	}
	return errors.Join(errs...)
}

// ---------------------------------------------------------------------------

// Node is one `keel server` of a cluster, over its runs: every run uses the
// same directory, ports and log file.
type Node struct {
	ID      string
	Dir     string // --dir; the image is Dir/disk.img
	LogPath string // the output of every run, appended
	// Raft, HTTP and NBD are 127.0.0.1:PORT (NBD is unix:PATH with the
	// cluster's NBDSocketDir). StartFresh picks new ones if one was taken;
	// they do not change after it returns.
	Raft, HTTP, NBD string
	// Bin, if set, is the binary of this node's next runs instead of
	// ClusterConfig.Bin (another build, for a mixed-version cluster). Set
	// it while the node is stopped.
	Bin string
	// CertDir is the node's --cluster-tls (ClusterConfig.TLS; "" without):
	// set it to another directory before a start to run the node with
	// other certificates, "" to run it without.
	CertDir string

	c *Cluster

	mu   sync.Mutex // guards proc
	proc *Proc
}

func (n *Node) pickPorts() error {
	addrs := []*string{&n.Raft, &n.HTTP, &n.NBD}
	if n.c.cfg.NBDSocketDir != "" {
		n.NBD = "unix:" + filepath.Join(n.c.cfg.NBDSocketDir, n.ID+".sock")
		addrs = addrs[:2]
	}
	for _, a := range addrs {
		var err error
		if *a, err = FreeAddr(); err != nil {
			return err
		}
	}
	return nil
}

// Image is the node's image file.
func (n *Node) Image() string { return filepath.Join(n.Dir, "disk.img") }

// URI is the node's NBD export as libnbd, qemu and fio spell it.
func (n *Node) URI() string { return nbdURI(n.NBD) }

// NBDSocket is the path of the node's NBD unix socket, "" if it serves
// on a port.
func (n *Node) NBDSocket() string {
	if path, ok := strings.CutPrefix(n.NBD, "unix:"); ok {
		return path
	}
	return ""
}

// nbdURI is the URI of the export keel serves on addr (HOST:PORT or
// unix:PATH).
func nbdURI(addr string) string {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		return "nbd+unix:///keel?socket=" + path
	}
	return "nbd://" + addr + "/keel"
}

// Proc is the current (or last) run, nil before the first.
func (n *Node) Proc() *Proc {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.proc
}

// Running reports whether a run has started and not exited.
func (n *Node) Running() bool {
	p := n.Proc()
	return p != nil && !p.Exited()
}

// Args are the arguments of a run with the given extra flags.
func (n *Node) Args(extra ...string) []string {
	args := append(slices.Clone(n.c.cfg.GlobalFlags), "server", "--dir", n.Dir, "--id", n.ID,
		"--raft", n.Raft, "--http", n.HTTP, "--nbd", n.NBD)
	if n.CertDir != "" {
		args = append(args, "--cluster-tls", n.CertDir)
	}
	args = append(args, n.c.cfg.Flags...)
	if n.c.cfg.PidFiles {
		args = append(args, "--pid-file", n.PidFile())
	}
	return append(args, extra...)
}

// Start runs `keel server` with the given extra flags (--bootstrap,
// --join) and returns at once.
func (n *Node) Start(extra ...string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.proc != nil && !n.proc.Exited() {
		return fmt.Errorf("%s: started while still running", n.ID)
	}
	bin := n.c.cfg.Bin
	if n.Bin != "" {
		bin = n.Bin
	}
	p, err := n.c.group.Start(ProcConfig{Bin: bin, Name: n.ID, Args: n.Args(extra...), Env: n.c.cfg.Env, LogPath: n.LogPath, Direct: n.c.cfg.PidFiles})
	if err != nil {
		return err
	}
	n.proc = p
	return nil
}

// PidFile is where the node's --pid-file is (ClusterConfig.PidFiles):
// beside its log, so that wiping its directory keeps it.
func (n *Node) PidFile() string { return strings.TrimSuffix(n.LogPath, ".log") + ".pid" }

// Adopt makes the process pid, which took over from the node's current
// run in an upgrade, its current run.
func (n *Node) Adopt(pid int) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.proc == nil {
		return fmt.Errorf("%s: never started", n.ID)
	}
	n.proc = n.proc.Successor(pid)
	n.c.group.Adopt(n.proc)
	return nil
}

// WaitUp waits until the node answers GET /v1/status, and with leading
// until it leads. ErrPortTaken: it could not bind a port (it has exited
// then, or been killed).
func (n *Node) WaitUp(ctx context.Context, leading bool) error {
	p := n.Proc()
	if p == nil {
		return fmt.Errorf("%s: never started", n.ID)
	}
	return Poll(ctx, n.c.cfg.UpTimeout, n.c.cfg.PollEvery, n.ID+" up", func() (bool, string, error) {
		if p.Exited() {
			if strings.Contains(p.Output(), "address already in use") {
				return false, "", ErrPortTaken
			}
			return false, "", fmt.Errorf("%s exited while starting: %v\n%s", n.ID, p.Err(), p.Output())
		}
		st, err := n.Status(ctx)
		if err == nil && (!leading || st.State == "Leader") {
			return true, "", nil
		}
		if strings.Contains(p.Output(), "address already in use") {
			_ = p.Kill() // it may be exiting by itself meanwhile
			return false, "", ErrPortTaken
		}
		return false, fmt.Sprintf("status %+v, %v", st, err), nil
	})
}

// StartFresh starts the node on an empty directory with --bootstrap or
// --join and waits until it is up, starting it again on new ports (at most
// three times) if one was taken meanwhile.
func (n *Node) StartFresh(ctx context.Context, extra ...string) error {
	leading := slices.Contains(extra, "--bootstrap")
	for attempt := 1; ; attempt++ {
		if err := n.Start(extra...); err != nil {
			return err
		}
		err := n.WaitUp(ctx, leading)
		if !errors.Is(err, ErrPortTaken) {
			return err
		}
		// A joining node binds its Raft port only after it joined: the
		// cluster then knows an address nobody serves.
		if !leading && strings.Contains(n.RunOutput(), "raft transport") {
			return fmt.Errorf("%s could not bind its Raft port after joining: %w", n.ID, err)
		}
		if attempt == 3 {
			return fmt.Errorf("%s: ports taken three times: %w", n.ID, err)
		}
		n.c.cfg.Logf("%s: a port was taken; retrying on new ones", n.ID)
		if err := os.RemoveAll(n.Dir); err != nil {
			return fmt.Errorf("keeltest: %w", err)
		}
		if err := n.pickPorts(); err != nil {
			return err
		}
	}
}

// Restart starts the node again on its directory and waits until it is up.
func (n *Node) Restart(ctx context.Context) error {
	if err := n.Start(); err != nil {
		return err
	}
	if err := n.WaitUp(ctx, false); err != nil {
		return fmt.Errorf("%s restarting: %w", n.ID, err)
	}
	return nil
}

func (n *Node) running() (*Proc, error) {
	p := n.Proc()
	if p == nil {
		return nil, fmt.Errorf("%s: never started", n.ID)
	}
	return p, nil
}

// Kill sends SIGKILL and waits until the process is gone; ErrExited if it
// had exited.
func (n *Node) Kill() error {
	p, err := n.running()
	if err != nil {
		return err
	}
	return p.Kill()
}

// Stop sends SIGTERM and waits up to the cluster's StopTimeout; nil means
// the process exited with status 0.
func (n *Node) Stop() error {
	p, err := n.running()
	if err != nil {
		return err
	}
	return p.Stop(n.c.cfg.StopTimeout)
}

// Output is everything the node has printed, over all its runs.
func (n *Node) Output() string {
	b, err := os.ReadFile(n.LogPath)
	if err != nil {
		return fmt.Sprintf("(reading %s: %v)", n.LogPath, err)
	}
	return string(b)
}

// RunOutput is what the node has printed in its current (or last) run.
func (n *Node) RunOutput() string {
	if p := n.Proc(); p != nil {
		return p.Output()
	}
	return ""
}

// Status fetches the node's GET /v1/status.
func (n *Node) Status(ctx context.Context) (wire.NodeStatus, error) {
	return n.c.client.Status(ctx, n.HTTP)
}

// ClusterStatus fetches the node's GET /v1/cluster.
func (n *Node) ClusterStatus(ctx context.Context) (wire.ClusterStatus, error) {
	return n.c.client.Cluster(ctx, n.HTTP)
}

// Metric reads one unlabelled gauge or counter from the node's /metrics.
func (n *Node) Metric(ctx context.Context, name string) (float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, n.c.client.BaseURL(n.HTTP)+"/metrics", nil)
	if err != nil {
		return 0, err
	}
	resp, err := n.c.client.HTTP.Do(req)
	if err != nil {
		return 0, fmt.Errorf("%s /metrics: %w", n.ID, err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == name {
			v, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				return 0, fmt.Errorf("%s /metrics: %s: %w", n.ID, sc.Text(), err)
			}
			return v, nil
		}
	}
	return 0, fmt.Errorf("%s /metrics has no %s (%v)", n.ID, name, sc.Err())
}

// SnapshotIndex is the highest log index among the node's Raft snapshots
// (hashicorp/raft's file store, Dir/snapshots/*/meta.json), 0 if none.
// Keel's status does not show it.
func (n *Node) SnapshotIndex() (uint64, error) {
	metas, err := filepath.Glob(filepath.Join(n.Dir, "snapshots", "*", "meta.json"))
	if err != nil {
		return 0, err
	}
	var best uint64
	for _, p := range metas {
		var m struct{ Index uint64 }
		b, err := os.ReadFile(p)
		if err != nil || json.Unmarshal(b, &m) != nil {
			continue // a snapshot being written
		}
		best = max(best, m.Index)
	}
	return best, nil
}
