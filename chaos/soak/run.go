package soak

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/keelstore/keel/chaos/control"
	"github.com/keelstore/keel/chaos/diskfault"
	"github.com/keelstore/keel/cmd/keel/keeltest"
	"github.com/keelstore/keel/nbd"
)

// Config describes one soak against real processes.
type Config struct {
	// Bin is the keel binary; required. Network faults need one built
	// with -tags chaos (BuildChaos).
	Bin string
	// Dir holds the cluster's directories and logs, and on a failure the
	// history and its visualisation (Dir/failure); required.
	Dir string
	// Duration is how long the workload runs under faults; at least 1s.
	Duration time.Duration
	// Seed decides the faults and the workload's choices.
	Seed uint64
	// Faults are the fault kinds to inject; default AllFaults.
	// Empty after defaults (Faults: []string{}) is not allowed; NoFaults
	// runs the workload alone.
	Faults []string
	// NoFaults runs the workload without faults.
	NoFaults bool
	// FullRound keeps the run going past Duration until every kind in
	// Faults was injected at least once (a slow machine gets fewer faults
	// into the same time).
	FullRound bool
	// Size is the volume's size; default "64M".
	Size string
	// Workload tunes the clients (Dial and Blocks are filled in).
	Workload WorkloadConfig
	// ServerFlags go to every server; default fast elections for a
	// loopback cluster, and with SnapshotOften its flags after them.
	ServerFlags []string
	// SnapshotOften makes the servers snapshot every 1000 entries (looked
	// for every 2s) and keep only 100 entries behind a snapshot, so that
	// faults land mid-snapshot and a server down for a few seconds comes
	// back by an image resync.
	SnapshotOften bool
	// ProxyFlags go to the proxy.
	ProxyFlags []string
	// CheckTimeout bounds porcupine per block; default 30s.
	CheckTimeout time.Duration
	// Logf hears progress; default silent.
	Logf func(format string, args ...any)
	// ProgressEvery is how often progress is logged; default 10s.
	ProgressEvery time.Duration
}

// Validate names the first bad field.
func (c Config) Validate() error {
	switch {
	case c.Bin == "":
		return fmt.Errorf("%w: Config.Bin is empty", ErrBadConfig)
	case c.Dir == "":
		return fmt.Errorf("%w: Config.Dir is empty", ErrBadConfig)
	case c.Duration < time.Second:
		return fmt.Errorf("%w: Config.Duration %v: must be 1s or more", ErrBadConfig, c.Duration)
	case c.Faults != nil && len(c.Faults) == 0 && !c.NoFaults:
		return fmt.Errorf("%w: Config.Faults is empty (set NoFaults to run without)", ErrBadConfig)
	}
	for _, k := range c.Faults {
		if !known(k) {
			return fmt.Errorf("%w: Config.Faults: unknown kind %q (known: %s)", ErrBadConfig, k, strings.Join(AllFaults(), ", "))
		}
	}
	return nil
}

// AllFaults lists every fault kind this package can inject.
func AllFaults() []string {
	return slices.Concat(ProcessFaults, NetworkFaults, DiskFaults, CodeFaults)
}

func known(k string) bool {
	for _, a := range AllFaults() {
		if a == k {
			return true
		}
	}
	return false
}

func (c *Config) defaults() {
	if c.Faults == nil {
		c.Faults = AllFaults()
	}
	if c.Size == "" {
		c.Size = "64M"
	}
	if c.ServerFlags == nil {
		c.ServerFlags = []string{"--heartbeat-timeout", "500ms", "--election-timeout", "500ms", "--leader-lease-timeout", "250ms"}
	}
	if c.SnapshotOften {
		c.ServerFlags = append(c.ServerFlags, "--snapshot-threshold", "1000", "--snapshot-interval", "2s", "--trailing-logs", "100")
	}
	if c.CheckTimeout == 0 {
		c.CheckTimeout = 30 * time.Second
	}
	if c.Logf == nil {
		c.Logf = func(string, ...any) {}
	}
	if c.ProgressEvery == 0 {
		c.ProgressEvery = 10 * time.Second
	}
}

// ClientError is one operation that failed as the client saw it.
type ClientError struct {
	At      time.Duration
	Kind    Kind
	Err     string
	Allowed bool // inside the unavailable window of a fault
}

// Result is everything a soak found.
type Result struct {
	Seed     uint64
	Duration time.Duration
	Faults   []Fault
	// Recovery is, per fault in order, the time from its injection to the
	// first acknowledged write issued after it (-1: none).
	Recovery []time.Duration
	Report   Report
	Errors   []ClientError
	// Unexpected counts client errors outside any unavailable window.
	Unexpected int
	// ReadBackFailures counts reads of the read-back that failed.
	ReadBackFailures int
	// Verify is keel verify's complaint, "" when the replicas are equal.
	Verify string
	// Stuck says why the volume did not take a write after the run, "" if
	// it did.
	Stuck string
	// Crashes lists panics or data races found in the processes' output.
	Crashes string
	// FailureDir holds the saved history when the check failed.
	FailureDir string
}

// OK reports whether the soak passed.
func (r Result) OK() bool {
	return r.Report.OK() && r.Unexpected == 0 && r.Verify == "" && r.Stuck == "" && r.Crashes == "" && r.faultErrs() == 0
}

func (r Result) faultErrs() int {
	n := 0
	for _, f := range r.Faults {
		if f.Err != "" {
			n++
		}
	}
	return n
}

// Run starts three servers and a proxy under cfg.Dir, runs the workload
// for cfg.Duration while injecting faults, then heals everything, reads
// every changed block back, runs keel verify, and checks the history.
// An error means the soak could not run; its findings are in Result.
func Run(ctx context.Context, cfg Config) (Result, error) {
	if err := cfg.Validate(); err != nil {
		return Result{}, err
	}
	cfg.defaults()
	res := Result{Seed: cfg.Seed}
	// The control sockets live in a short directory of their own (a unix
	// socket's path is at most 107 bytes).
	ctlDir, err := keeltest.SocketDir()
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(ctlDir)
	cl, err := keeltest.StartCluster(ctx, keeltest.ClusterConfig{
		Bin: cfg.Bin, Dir: cfg.Dir, N: 3, Size: cfg.Size, Flags: cfg.ServerFlags,
		Env:       []string{control.EnvDir + "=" + ctlDir, fmt.Sprintf("KEEL_CHAOS_SEED=%d", cfg.Seed)},
		UpTimeout: 2 * time.Minute, Timeout: 3 * time.Minute, Logf: cfg.Logf,
		PidFiles: true, // the upgrade faults follow each process's successor
	})
	if err != nil {
		return res, fmt.Errorf("soak: cluster: %w", err)
	}
	defer cl.Close()
	px, err := cl.StartProxy(ctx, keeltest.ProxyConfig{Name: "soak", Flags: cfg.ProxyFlags})
	if err != nil {
		return res, fmt.Errorf("soak: proxy: %w", err)
	}
	dial := func(ctx context.Context) (*nbd.Client, error) {
		return nbd.Dial(ctx, "tcp", px.Listen, nbd.ClientConfig{HandshakeTimeout: 10 * time.Second, CloseTimeout: time.Second})
	}
	hist := NewHistory()
	wcfg := cfg.Workload
	wcfg.Dial, wcfg.Seed = dial, cfg.Seed
	if wcfg.Blocks == 0 {
		size, err := volumeBlocks(ctx, dial)
		if err != nil {
			return res, err
		}
		wcfg.Blocks = size
	}
	wl, err := NewWorkload(wcfg, hist)
	if err != nil {
		return res, err
	}
	clients := wl.cfg.Conns * wl.cfg.ClientsPerConn

	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	deadline := time.Now().Add(cfg.Duration)
	if cfg.NoFaults || !cfg.FullRound {
		t := time.AfterFunc(cfg.Duration, stop)
		defer t.Stop()
	}
	var wg sync.WaitGroup
	var nFaults atomic.Int64 // len(res.Faults), for the progress line
	wg.Add(2)
	go func() { defer wg.Done(); wl.Run(runCtx) }()
	go func() {
		defer wg.Done()
		t := time.NewTicker(cfg.ProgressEvery)
		defer t.Stop()
		for {
			select {
			case <-runCtx.Done():
				return
			case <-t.C:
				acked, errs, reconns := wl.Progress()
				cfg.Logf("progress %5.0fs: acknowledged changes %d, errors %d, reconnects %d, faults %d",
					hist.Now().Seconds(), acked, errs, reconns, nFaults.Load())
			}
		}
	}()
	if !cfg.NoFaults {
		in := &injector{c: cl, proxy: px, hist: hist, logf: cfg.Logf, bin: cfg.Bin}
		if chaosBuild(cl, ctlDir) {
			in.ctl = map[string]*control.Client{}
			for _, n := range cl.Nodes() {
				in.ctl[n.ID] = control.NewClient(control.SocketPath(ctlDir, n.ID))
			}
			in.pctl = control.NewClient(control.SocketPath(ctlDir, "proxy-"+px.Name))
		}
		in.dial = func(ctx context.Context) error {
			c, err := dial(ctx)
			if err != nil {
				return err
			}
			return c.Close()
		}
		pl := newPlanner(cfg.Seed, cfg.Faults, 3)
		seen := map[string]bool{}
		for runCtx.Err() == nil {
			if cfg.FullRound && time.Now().After(deadline) && len(seen) == len(cfg.Faults) {
				break
			}
			p := pl.next()
			if !sleepCtx(runCtx, p.gap) {
				break
			}
			// A fault runs to its end, healed, even past the duration.
			res.Faults = append(res.Faults, in.run(ctx, p))
			nFaults.Store(int64(len(res.Faults)))
			seen[p.kind] = true
		}
		stop()
	}
	wg.Wait()
	res.Duration = hist.Now()

	probeAndReadBack(ctx, &res, hist, dial, clients)
	if _, err := cl.WaitConverged(ctx); err != nil {
		res.Verify = fmt.Sprintf("servers did not converge: %v", err)
		dumpStacks(cl, cfg.Logf)
	} else {
		res.Verify = verifyReplicas(ctx, cfg.Bin, cl.Nodes()[0].HTTP)
	}
	res.Crashes = unexpectedCrashes(cl.Crashes())
	judge(&res, hist, cfg.CheckTimeout, cfg.Dir, cfg.Logf)
	if err := cl.StopAll(); err != nil {
		cfg.Logf("stopping the cluster: %v", err)
	}
	return res, nil
}

// probeAndReadBack runs after the faults are healed: the volume must take
// a write and give back every block changed.
func probeAndReadBack(ctx context.Context, res *Result, hist *History, dial func(context.Context) (*nbd.Client, error), clients int) {
	probe := Op{Client: clients, Kind: Write, Block: 0, Blocks: 1, Value: MakeValue(uint32(clients)+1, 1)}
	pw := &Workload{cfg: WorkloadConfig{OpTimeout: time.Minute}, hist: hist}
	if c, err := dial(ctx); err != nil {
		res.Stuck = fmt.Sprintf("no connection after the run: %v", err)
	} else {
		pw.do(c, probe, make([]byte, BlockSize))
		c.Close()
		if ops := hist.Ops(); !lastOK(ops, clients) {
			res.Stuck = "the probe write after the run failed"
		}
	}
	rbCtx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	var err error
	res.ReadBackFailures, err = ReadBack(rbCtx, dial, hist, clients+1)
	cancel()
	if err != nil && res.Stuck == "" {
		res.Stuck = err.Error()
	}
}

// verifyReplicas runs keel verify against a member; "" when the replicas
// are identical.
func verifyReplicas(ctx context.Context, bin, http string, extra ...string) string {
	out, err := exec.CommandContext(ctx, bin, append([]string{"verify", "--http", http, "--timeout", "2m"}, extra...)...).CombinedOutput()
	if err != nil {
		return fmt.Sprintf("%v: %s", err, out)
	}
	return ""
}

// judge checks the history and saves it (with its visualisation) under
// dir/failure when the soak failed.
func judge(res *Result, hist *History, timeout time.Duration, dir string, logf func(string, ...any)) {
	ops := hist.Ops()
	res.Report = Check(ops, timeout)
	res.Recovery = recovery(ops, res.Faults)
	res.Errors, res.Unexpected = clientErrors(ops, res.Faults)
	if !res.OK() {
		fdir := filepath.Join(dir, "failure")
		if _, err := SaveFailure(fdir, ops, res.Report); err != nil {
			logf("saving the failure: %v", err)
		}
		res.FailureDir = fdir
	}
}

// chaosBuild reports whether the servers run a chaos build: each made its
// control socket.
func chaosBuild(cl *keeltest.Cluster, dir string) bool {
	for _, n := range cl.Nodes() {
		if _, err := os.Stat(control.SocketPath(dir, n.ID)); err != nil {
			return false
		}
	}
	return true
}

// BuildChaos builds keel with -tags chaos (and -race with race) into out;
// the working directory must lie inside the keel module.
func BuildChaos(ctx context.Context, out string, race bool) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	args := []string{"build", "-tags", "chaos", "-o", out}
	if race {
		args = append(args, "-race")
	}
	b, err := exec.CommandContext(ctx, "go", append(args, keeltest.Package)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("soak: go %s: %w\n%s", strings.Join(args, " "), err, b)
	}
	return nil
}

// unexpectedCrashes drops, from the harness's crash report, the panics
// raft makes on purpose when the disk layer fails a log read (a
// fail-stop: the injector restarts the server) and keeps the rest.
func unexpectedCrashes(err error) string {
	if err == nil {
		return ""
	}
	var keep []string
	for _, l := range strings.Split(err.Error(), "\n") {
		if strings.HasPrefix(l, "panic:") && strings.Contains(l, diskfault.ErrInjected.Error()) {
			continue
		}
		if strings.HasPrefix(l, "panic:") || strings.HasPrefix(l, "fatal error:") || strings.Contains(l, "DATA RACE") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

func volumeBlocks(ctx context.Context, dial func(context.Context) (*nbd.Client, error)) (uint64, error) {
	c, err := dial(ctx)
	if err != nil {
		return 0, fmt.Errorf("soak: first connection: %w", err)
	}
	defer c.Close()
	return c.Size() / BlockSize, nil
}

func lastOK(ops []Op, client int) bool {
	for i := len(ops) - 1; i >= 0; i-- {
		if ops[i].Client == client {
			return ops[i].Out == OK
		}
	}
	return false
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// firstWrite is the return of the first acknowledged write or change
// called at or after t, or -1.
func firstWrite(ops []Op, t time.Duration) time.Duration {
	best := time.Duration(-1)
	for _, op := range ops {
		if op.Mutates() && op.Out == OK && op.Call >= t && (best < 0 || op.Return < best) {
			best = op.Return
		}
	}
	return best
}

func recovery(ops []Op, faults []Fault) []time.Duration {
	out := make([]time.Duration, len(faults))
	for i, f := range faults {
		out[i] = -1
		if w := firstWrite(ops, f.Start); w >= 0 {
			out[i] = w - f.Start
		}
	}
	return out
}

// clientErrors lists the failed operations (the read-back's included),
// each allowed when it falls inside an unavailable fault's window: from
// its injection to the first acknowledged write after it was healed.
func clientErrors(ops []Op, faults []Fault) ([]ClientError, int) {
	type window struct{ from, to time.Duration }
	var wins []window
	for _, f := range faults {
		if !f.Unavailable {
			continue
		}
		to := firstWrite(ops, f.Healed)
		if to < 0 {
			to = 1<<63 - 1
		}
		wins = append(wins, window{f.Start, to})
	}
	var out []ClientError
	unexpected := 0
	for _, op := range ops {
		if op.Out == OK {
			continue
		}
		ce := ClientError{At: op.Return, Kind: op.Kind, Err: op.Err}
		for _, w := range wins {
			// The op must overlap the window: called before it closed and
			// failed after it opened.
			if op.Call <= w.to && op.Return >= w.from {
				ce.Allowed = true
			}
		}
		if !ce.Allowed {
			unexpected++
		}
		out = append(out, ce)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].At < out[j].At })
	return out, unexpected
}

// dumpStacks asks every running server for its goroutines (SIGQUIT makes
// the Go runtime print them all and exit), so a replica that stopped
// making progress leaves in its log where it is waiting.
func dumpStacks(cl *keeltest.Cluster, logf func(string, ...any)) {
	for _, n := range cl.Running() {
		p := n.Proc()
		if p == nil || p.Exited() {
			continue
		}
		if err := p.Signal(syscall.SIGQUIT); err != nil {
			logf("%s: SIGQUIT for a stack dump: %v", p.Name(), err)
			continue
		}
		_ = p.Wait(10 * time.Second)
		logf("%s: goroutine stacks written to %s", p.Name(), p.LogPath())
	}
}
