package soak

import (
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/services/keeltls"
	"github.com/keelstore/keel/services/wire"
)

// DevFaults are the kinds a soak can inject into a running `keel dev`:
// process faults on its servers, which keel dev restarts itself.
var DevFaults = []string{FaultKill, FaultPause}

// DevConfig describes a soak against a running `keel dev` (its proxy on
// 127.0.0.1:BasePort, servers' HTTP on BasePort+200..202). It writes the
// volume: use a scratch cluster.
type DevConfig struct {
	// BasePort is keel dev's --base-port; default 10809.
	BasePort int
	// Bin is a keel binary, for keel verify; required.
	Bin string
	// Dir receives the history on a failure; required.
	Dir string
	// Duration, Seed, Logf and CheckTimeout are as in Config.
	Duration     time.Duration
	Seed         uint64
	Logf         func(format string, args ...any)
	CheckTimeout time.Duration
	// Faults are kinds from DevFaults; default all of them.
	Faults []string
	// ClusterTLS is the directory of a client certificate of keel dev's
	// cluster (DIR/tls/cli, which keel dev prints); "" for a keel dev
	// run with --insecure.
	ClusterTLS string
}

// RunDev runs the workload against a running keel dev while killing and
// pausing its servers, then checks as Run does.
func RunDev(ctx context.Context, cfg DevConfig) (Result, error) {
	if cfg.BasePort == 0 {
		cfg.BasePort = 10809
	}
	if cfg.Faults == nil {
		cfg.Faults = DevFaults
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	if cfg.CheckTimeout == 0 {
		cfg.CheckTimeout = 30 * time.Second
	}
	switch {
	case cfg.Bin == "" || cfg.Dir == "":
		return Result{}, fmt.Errorf("%w: DevConfig.Bin and Dir are required", ErrBadConfig)
	case cfg.Duration < time.Second:
		return Result{}, fmt.Errorf("%w: DevConfig.Duration %v: must be 1s or more", ErrBadConfig, cfg.Duration)
	}
	for _, k := range cfg.Faults {
		if !slices.Contains(DevFaults, k) {
			return Result{}, fmt.Errorf("%w: DevConfig.Faults: %q (a running keel dev takes %v)", ErrBadConfig, k, DevFaults)
		}
	}
	res := Result{Seed: cfg.Seed}
	var clientTLS *tls.Config
	var verifyArgs []string
	if cfg.ClusterTLS != "" {
		b, err := keeltls.Load(cfg.ClusterTLS)
		if err != nil {
			return res, fmt.Errorf("%w: DevConfig.ClusterTLS: %w", ErrBadConfig, err)
		}
		if clientTLS, err = b.ClientConfig(""); err != nil {
			return res, err
		}
		verifyArgs = []string{"--cluster-tls", cfg.ClusterTLS}
	}
	proxyAddr := fmt.Sprintf("127.0.0.1:%d", cfg.BasePort)
	var https []string
	for i := 0; i < 3; i++ {
		https = append(https, fmt.Sprintf("127.0.0.1:%d", cfg.BasePort+200+i))
	}
	dial := func(ctx context.Context) (*nbd.Client, error) {
		return nbd.Dial(ctx, "tcp", proxyAddr, nbd.ClientConfig{HandshakeTimeout: 10 * time.Second, CloseTimeout: time.Second})
	}
	blocks, err := volumeBlocks(ctx, dial)
	if err != nil {
		return res, fmt.Errorf("soak: is keel dev running on %s? %w", proxyAddr, err)
	}
	hist := NewHistory()
	wl, err := NewWorkload(WorkloadConfig{Dial: dial, Seed: cfg.Seed, Blocks: blocks}, hist)
	if err != nil {
		return res, err
	}
	clients := wl.cfg.Conns * wl.cfg.ClientsPerConn
	runCtx, stop := context.WithTimeout(ctx, cfg.Duration)
	defer stop()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); wl.Run(runCtx) }()
	in := &devInjector{https: https, hist: hist, logf: cfg.Logf, client: wire.NewClient(5*time.Second, clientTLS)}
	pl := newPlanner(cfg.Seed, cfg.Faults, 3)
	for runCtx.Err() == nil {
		p := pl.next()
		if !sleepCtx(runCtx, p.gap) {
			break
		}
		res.Faults = append(res.Faults, in.run(ctx, p))
	}
	wg.Wait()
	res.Duration = hist.Now()
	probeAndReadBack(ctx, &res, hist, dial, clients)
	res.Verify = verifyReplicas(ctx, cfg.Bin, https[0], verifyArgs...)
	judge(&res, hist, cfg.CheckTimeout, cfg.Dir, cfg.Logf)
	return res, nil
}

// devInjector kills and pauses keel dev's servers, found by their --http
// address among this machine's processes.
type devInjector struct {
	https  []string
	hist   *History
	logf   func(string, ...any)
	client *wire.Client
}

// serverPid finds the pid of the `keel server` whose --http is addr.
func serverPid(addr string) (int, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if slices.Contains(args, "server") {
			if i := slices.Index(args, "--http"); i >= 0 && i+1 < len(args) && args[i+1] == addr {
				return pid, nil
			}
		}
	}
	return 0, fmt.Errorf("no keel server with --http %s", addr)
}

func (in *devInjector) leaderIndex(ctx context.Context) int {
	for i, h := range in.https {
		if st, err := in.client.Status(ctx, h); err == nil && st.State == "Leader" {
			return i
		}
	}
	return -1
}

func (in *devInjector) run(ctx context.Context, pl plan) Fault {
	f := Fault{Kind: pl.kind}
	i := pl.victims[0]
	if pl.leader {
		if l := in.leaderIndex(ctx); l >= 0 {
			i = l
		}
	}
	addr := in.https[i]
	f.Target = fmt.Sprintf("[n%d]", i+1)
	pid, err := serverPid(addr)
	f.Start = in.hist.Now()
	if err == nil {
		sig := syscall.SIGKILL
		if pl.kind == FaultPause {
			sig = syscall.SIGSTOP
		}
		err = syscall.Kill(pid, sig)
	}
	sleepCtx(ctx, pl.hold)
	f.Healed = in.hist.Now()
	if err == nil && pl.kind == FaultPause {
		err = syscall.Kill(pid, syscall.SIGCONT)
	}
	if err == nil {
		// keel dev restarts a killed server; wait until it answers and
		// has applied what the leader had.
		err = keeltest.Poll(ctx, 3*time.Minute, 100*time.Millisecond, f.Target+" back and caught up", func() (bool, string, error) {
			l := in.leaderIndex(ctx)
			if l < 0 {
				return false, "no leader", nil
			}
			lst, err1 := in.client.Status(ctx, in.https[l])
			st, err2 := in.client.Status(ctx, addr)
			if err1 != nil || err2 != nil {
				return false, fmt.Sprint(err1, err2), nil
			}
			return st.AppliedIndex+64 >= lst.AppliedIndex && (st.State == "Leader" || st.Leader != ""), fmt.Sprintf("applied %d of %d", st.AppliedIndex, lst.AppliedIndex), nil
		})
	}
	if err != nil {
		f.Err = err.Error()
	}
	in.logf("fault %-12s %-10s at %6.1fs held %v%s", f.Kind, f.Target, f.Start.Seconds(), pl.hold.Round(time.Millisecond), errSuffix(f.Err))
	return f
}
