package keeltest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/keelstore/keel/services/proxy"
	"github.com/keelstore/keel/services/wire"
)

// This file binds the harness to tests: each Must... calls t.Fatal where
// the core returns an error, and registers the cleanups that stop what it
// started.

// MaxLogDump is how much of a process's output a failed test shows.
const MaxLogDump = 256 << 10

// MustBinary is Binary, failing the test on an error.
func MustBinary(t testing.TB) string {
	t.Helper()
	bin, err := Binary(context.Background())
	if err != nil {
		t.Fatalf("building keel: %v", err)
	}
	return bin
}

// MustStart starts a process for the test (Bin defaults to MustBinary,
// LogPath to a file in t.TempDir). Its cleanup kills it if it still runs,
// fails the test on a panic, data race or fatal error in its output, and
// shows the output's tail if the test failed.
func MustStart(t testing.TB, cfg ProcConfig) *Proc {
	t.Helper()
	if cfg.Bin == "" {
		cfg.Bin = MustBinary(t)
	}
	if cfg.LogPath == "" && len(cfg.Args) > 0 {
		cfg.LogPath = filepath.Join(t.TempDir(), "keel-"+cfg.Args[0]+".log")
	}
	p, err := Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if !p.Exited() {
			_ = p.Kill()
		}
		for _, l := range CrashLines(p.Output()) {
			t.Errorf("%s output: %s", p.Name(), l)
		}
		if t.Failed() {
			t.Logf("%s output (%s):\n%s", p.Name(), p.LogPath(), p.Tail())
		}
	})
	return p
}

// MustFreePort is FreePort, failing the test on an error.
func MustFreePort(t testing.TB) int {
	t.Helper()
	p, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// MustFreeAddr is FreeAddr, failing the test on an error.
func MustFreeAddr(t testing.TB) string { return Loopback(MustFreePort(t)) }

// MustSocketDir is SocketDir, removed when the test ends.
func MustSocketDir(t testing.TB) string {
	t.Helper()
	dir, err := SocketDir()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// MustPoll calls cond every 100ms until it reports done, failing the test
// after timeout with the last state cond described.
func MustPoll(t testing.TB, timeout time.Duration, what string, cond func() (done bool, state string)) {
	t.Helper()
	err := Poll(t.Context(), timeout, 100*time.Millisecond, what, func() (bool, string, error) {
		done, state := cond()
		return done, state, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TCluster is a Cluster bound to a test: its Must methods fail the test
// instead of returning errors.
type TCluster struct {
	*Cluster
	t testing.TB
}

// MustCluster starts a cluster for the test (Bin defaults to MustBinary,
// Dir to t.TempDir, Logf to t.Logf). Its cleanup kills every process still
// running, fails the test on a panic, data race or fatal error in any
// output, and shows every output if the test failed.
func MustCluster(t testing.TB, cfg ClusterConfig) *TCluster {
	t.Helper()
	if cfg.Bin == "" {
		cfg.Bin = MustBinary(t)
	}
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	if cfg.Logf == nil {
		cfg.Logf = t.Logf
	}
	c, err := NewCluster(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		if err := c.Crashes(); err != nil {
			t.Error(err)
		}
		if t.Failed() {
			for _, n := range c.Nodes() {
				t.Logf("%s output (%s):\n%s", n.ID, n.LogPath, lastBytes(n.Output(), MaxLogDump))
			}
			c.mu.Lock()
			proxies := c.proxies
			c.mu.Unlock()
			for _, p := range proxies {
				t.Logf("proxy %s output (%s):\n%s", p.Name, p.LogPath, lastBytes(p.Output(), MaxLogDump))
			}
		}
	})
	if err := c.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	return &TCluster{Cluster: c, t: t}
}

// T is the test the cluster is bound to.
func (c *TCluster) T() testing.TB { return c.t }

func (c *TCluster) check(err error) {
	c.t.Helper()
	if err != nil {
		c.t.Fatal(err)
	}
}

// MustJoin is Join.
func (c *TCluster) MustJoin(id string, via *Node) *Node {
	c.t.Helper()
	n, err := c.Join(c.t.Context(), id, via)
	c.check(err)
	return n
}

// MustLeader is Leader.
func (c *TCluster) MustLeader(among ...*Node) *Node {
	c.t.Helper()
	n, err := c.Leader(c.t.Context(), among...)
	c.check(err)
	return n
}

// MustVoters is WaitVoters.
func (c *TCluster) MustVoters(via *Node, ids []string, observe func(wire.ClusterStatus)) wire.ClusterStatus {
	c.t.Helper()
	v, err := c.WaitVoters(c.t.Context(), via, ids, observe)
	c.check(err)
	return v
}

// MustConverge is WaitConverged.
func (c *TCluster) MustConverge(nodes ...*Node) uint64 {
	c.t.Helper()
	i, err := c.WaitConverged(c.t.Context(), nodes...)
	c.check(err)
	return i
}

// MustCatchUp is WaitCaughtUp.
func (c *TCluster) MustCatchUp(n *Node) {
	c.t.Helper()
	c.check(c.WaitCaughtUp(c.t.Context(), n))
}

// MustStatus is n.Status.
func (c *TCluster) MustStatus(n *Node) wire.NodeStatus {
	c.t.Helper()
	st, err := n.Status(c.t.Context())
	c.check(err)
	return st
}

// MustKill kills n; it fails the test if n had exited.
func (c *TCluster) MustKill(n *Node) {
	c.t.Helper()
	c.check(n.Kill())
}

// MustStop stops n with SIGTERM: fatal if it had exited or did not exit
// in time, an error if it exited with a status other than 0.
func (c *TCluster) MustStop(n *Node) {
	c.t.Helper()
	stopCheck(c.t, n.Stop())
}

// MustStopAll is StopAll: an error for each exit other than status 0.
func (c *TCluster) MustStopAll() {
	c.t.Helper()
	if err := c.StopAll(); err != nil {
		c.t.Errorf("%v (want exit status 0)", err)
	}
}

// MustRestart is n.Restart.
func (c *TCluster) MustRestart(n *Node) {
	c.t.Helper()
	c.check(n.Restart(c.t.Context()))
}

// MustMetric is n.Metric.
func (c *TCluster) MustMetric(n *Node, name string) float64 {
	c.t.Helper()
	v, err := n.Metric(c.t.Context(), name)
	c.check(err)
	return v
}

// MustSnapshotIndex is n.SnapshotIndex.
func (c *TCluster) MustSnapshotIndex(n *Node) uint64 {
	c.t.Helper()
	i, err := n.SnapshotIndex()
	c.check(err)
	return i
}

// TProxy is a Proxy bound to a test.
type TProxy struct {
	*Proxy
	t testing.TB
}

// MustProxy is StartProxy; the cluster's cleanup stops and scans it.
func (c *TCluster) MustProxy(cfg ProxyConfig) *TProxy {
	c.t.Helper()
	p, err := c.StartProxy(c.t.Context(), cfg)
	c.check(err)
	return &TProxy{Proxy: p, t: c.t}
}

func (p *TProxy) check(err error) {
	p.t.Helper()
	if err != nil {
		p.t.Fatal(err)
	}
}

// MustStatus is Status.
func (p *TProxy) MustStatus() proxy.Status {
	p.t.Helper()
	st, err := p.Status(p.t.Context())
	p.check(err)
	return st
}

// MustCounter is Counter.
func (p *TProxy) MustCounter(name string) uint64 {
	p.t.Helper()
	v, err := p.Counter(p.t.Context(), name)
	p.check(err)
	return v
}

// MustWaitLog is WaitLog.
func (p *TProxy) MustWaitLog(s string) {
	p.t.Helper()
	p.check(p.WaitLog(p.t.Context(), s))
}

// MustRestart is Restart.
func (p *TProxy) MustRestart() {
	p.t.Helper()
	p.check(p.Restart(p.t.Context()))
}

// MustKill is Kill.
func (p *TProxy) MustKill() {
	p.t.Helper()
	p.check(p.Kill())
}

// MustStop is Stop: fatal if it had exited or did not exit in time, an
// error if it exited with a status other than 0.
func (p *TProxy) MustStop() {
	p.t.Helper()
	stopCheck(p.t, p.Stop())
}

// stopCheck fails the test at once if the process had exited before or did
// not exit in time, and marks it failed if it exited with a status other
// than 0.
func stopCheck(t testing.TB, err error) {
	t.Helper()
	switch {
	case err == nil:
	case errors.Is(err, ErrExited), errors.Is(err, ErrTimeout):
		t.Fatal(err)
	default:
		t.Errorf("%v (want exit status 0)", err)
	}
}
