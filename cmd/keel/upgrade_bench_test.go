package main

// The client-visible stall of a proxy upgrade, against a plain restart of
// the proxy (a benchmark, not a test: it asserts nothing). Run with
//
//	go test -run '^$' -bench ProxyUpgradeStall -benchtime 1x ./cmd/keel
//
// One client writes and reads 4 KiB blocks back to back through the proxy;
// the stall of one upgrade is the longest gap between two answers that
// spans it. A plain restart (SIGTERM, start again) closes the connection:
// there the stall runs from the last answer before it to the first answer
// on a new connection, the client redialling every 10ms (as qemu's
// reconnect-delay would, at best).

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/upgrade"
)

// answers records when each answer came, from one client loop.
type answers struct {
	mu    sync.Mutex
	times []time.Time
	errs  int
	last  error
}

func (a *answers) add(t time.Time) {
	a.mu.Lock()
	a.times = append(a.times, t)
	a.mu.Unlock()
}

// gap is the longest interval between consecutive answers that overlaps
// [from, to].
func (a *answers) gap(from, to time.Time) time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	var worst time.Duration
	for i := 1; i < len(a.times); i++ {
		p, q := a.times[i-1], a.times[i]
		if q.Before(from) || p.After(to) {
			continue
		}
		worst = max(worst, q.Sub(p))
	}
	return worst
}

// clientLoop writes and reads back blocks until ctx ends, redialling when
// the connection is lost.
func clientLoop(ctx context.Context, addr string, a *answers) {
	buf, got := make([]byte, 4096), make([]byte, 4096)
	var c *nbd.Client
	for ctx.Err() == nil {
		if c == nil {
			dctx, cancel := context.WithTimeout(ctx, time.Second)
			var err error
			c, err = nbd.Dial(dctx, "tcp", addr, nbd.ClientConfig{Export: "keel"})
			cancel()
			if err != nil {
				c = nil
				a.mu.Lock()
				a.last = err
				a.mu.Unlock()
				select {
				case <-time.After(10 * time.Millisecond):
				case <-ctx.Done():
				}
				continue
			}
		}
		off := uint64(rand.IntN(4096)) * 4096
		buf[0]++
		err := c.WriteAt(ctx, buf, off, false)
		if err == nil {
			err = c.ReadAt(ctx, got, off)
		}
		if err != nil {
			a.mu.Lock()
			a.errs++
			a.last = err
			a.mu.Unlock()
			c.Close()
			c = nil
			continue
		}
		a.add(time.Now())
	}
	if c != nil {
		c.Close()
	}
}

func percentiles(ds []time.Duration) (p50, p99, worst time.Duration) {
	s := slices.Clone(ds)
	slices.Sort(s)
	at := func(q float64) time.Duration { return s[min(len(s)-1, int(q*float64(len(s))))] }
	return at(0.5), at(0.99), s[len(s)-1]
}

func BenchmarkProxyUpgradeStall(b *testing.B) {
	const rounds = 20
	c := keeltest.MustCluster(b, keeltest.ClusterConfig{
		N: 3, Size: "64M", Flags: []string{"--write-timeout", "60s"},
		UpTimeout: nodeUpTimeout, Timeout: clusterTimeout, StopTimeout: nodeStopTimeout, PollEvery: pollEvery,
	})
	dir := b.TempDir()
	bin := filepath.Join(dir, "keel")
	src := keeltest.MustBinary(b)
	data, err := os.ReadFile(src) // a copy, so that the path may be upgraded
	if err == nil {
		err = os.WriteFile(bin, data, 0o755)
	}
	if err != nil {
		b.Fatal(err)
	}
	pidFile, listen, logPath := filepath.Join(dir, "proxy.pid"), keeltest.MustFreeAddr(b), filepath.Join(dir, "proxy.log")
	args := []string{"proxy", "--servers", strings.Join(c.HTTPAddrs(), ","), "--listen", listen, "--writer", "bench", "--pid-file", pidFile}
	start := func() *keeltest.Proc {
		p := startUpgradable(b, "proxy", bin, logPath, args...)
		keeltest.MustPoll(b, time.Minute, "proxy serving", func() (bool, string) {
			pid, err := upgrade.ReadPID(pidFile)
			return err == nil && pid == p.Pid(), ""
		})
		return p
	}
	start()
	b.Cleanup(func() {
		if pid, err := upgrade.ReadPID(pidFile); err == nil {
			_ = syscall.Kill(pid, syscall.SIGTERM)
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	a := &answers{}
	done := make(chan struct{})
	go func() { defer close(done); clientLoop(ctx, listen, a) }()
	defer func() { cancel(); <-done }()
	settle := func() { // let the client run a moment between rounds
		a.mu.Lock()
		n := len(a.times)
		a.mu.Unlock()
		keeltest.MustPoll(b, 30*time.Second, "client answers", func() (bool, string) {
			a.mu.Lock()
			defer a.mu.Unlock()
			return len(a.times) > n+50, fmt.Sprintf("%d answers, %d errors, last %v", len(a.times), a.errs, a.last)
		})
	}
	settle()

	var up []time.Duration
	for range rounds {
		t0 := time.Now()
		tctx, tcancel := context.WithTimeout(ctx, time.Minute)
		_, err := upgrade.Trigger(tctx, pidFile, 5*time.Millisecond)
		tcancel()
		if err != nil {
			out, _ := os.ReadFile(logPath)
			b.Fatalf("upgrade: %v\n%s", err, out[max(0, len(out)-16<<10):])
		}
		settle()
		up = append(up, a.gap(t0, time.Now()))
	}
	upErrs := a.errs

	var re []time.Duration
	for range rounds {
		pid, err := upgrade.ReadPID(pidFile)
		if err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		_ = syscall.Kill(pid, syscall.SIGTERM)
		keeltest.MustPoll(b, time.Minute, "old proxy exits", func() (bool, string) { return !upgrade.Alive(pid), "" })
		start()
		settle()
		re = append(re, a.gap(t0, time.Now()))
	}
	u50, u99, umax := percentiles(up)
	r50, r99, rmax := percentiles(re)
	b.ReportMetric(float64(u99.Microseconds())/1000, "upgrade-p99-ms")
	b.ReportMetric(float64(r99.Microseconds())/1000, "restart-p99-ms")
	b.Logf("\n%-22s %8s %8s %8s\n%-22s %8s %8s %8s\n%-22s %8s %8s %8s\nclient errors: %d during upgrades, %d during restarts (each a lost connection)",
		fmt.Sprintf("stall over %d", rounds), "p50", "p99", "max",
		"proxy upgrade", u50.Round(time.Millisecond), u99.Round(time.Millisecond), umax.Round(time.Millisecond),
		"proxy restart", r50.Round(time.Millisecond), r99.Round(time.Millisecond), rmax.Round(time.Millisecond),
		upErrs, a.errs-upErrs)
}
