package main

// The client-visible stall of a server upgrade, leader and follower,
// against a plain restart of that server (a benchmark, not a test: it
// asserts nothing). Run with
//
//	go test -run '^$' -bench ServerUpgradeStall -benchtime 1x ./cmd/keel
//
// One client writes and reads 4 KiB blocks back to back through a proxy
// in front of a three-node cluster (clientLoop, upgrade_bench_test.go);
// the stall of one operation is the longest gap between two answers from
// its start until the server has caught up again and the client has had
// 50 more answers. A plain restart is SIGTERM (which hands leadership over
// first, as the upgrade does), then a start of the same binary. The
// baseline row measures the same window with nothing done: the client's
// own longest gap on a loaded machine.

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
	"github.com/keelstore/keel/upgrade"
)

func BenchmarkServerUpgradeStall(b *testing.B) {
	const rounds = 20
	c := newUpgradeCluster(b, keeltest.MustBinary(b))
	p := c.MustProxy(keeltest.ProxyConfig{Name: "bench"})
	ctx, cancel := context.WithCancel(context.Background())
	a := &answers{}
	done := make(chan struct{})
	go func() { defer close(done); clientLoop(ctx, p.Listen, a) }()
	defer func() { cancel(); <-done }()
	settle := func() {
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
	// pick is the leader, or a follower (each in turn).
	followerTurn := 0
	pick := func(leader bool) *keeltest.Node {
		lead := c.MustLeader(c.Nodes()...)
		if leader {
			return lead
		}
		var fs []*keeltest.Node
		for _, n := range c.Nodes() {
			if n != lead {
				fs = append(fs, n)
			}
		}
		followerTurn++
		return fs[followerTurn%len(fs)]
	}
	upgradeOne := func(n *keeltest.Node) {
		tctx, tcancel := context.WithTimeout(ctx, time.Minute)
		defer tcancel()
		if _, err := upgrade.Trigger(tctx, c.path(n, ".pid"), 5*time.Millisecond); err != nil {
			b.Fatalf("upgrade of %s: %v", n.ID, err)
		}
	}
	restartOne := func(n *keeltest.Node) {
		pid := c.pid(b, n)
		_ = syscall.Kill(pid, syscall.SIGTERM)
		keeltest.MustPoll(b, time.Minute, n.ID+" exits", func() (bool, string) { return !upgrade.Alive(pid), "" })
		if pr := n.Proc(); pr != nil && pr.Pid() == pid { // the harness's own child: reaped
			_ = pr.Wait(time.Minute)
		}
		if err := n.Start(); err != nil {
			b.Fatal(err)
		}
		keeltest.MustPoll(b, time.Minute, n.ID+" writes its pid file", func() (bool, string) {
			now, err := upgrade.ReadPID(c.path(n, ".pid"))
			return err == nil && now == n.Proc().Pid(), fmt.Sprint(err)
		})
	}
	measure := func(leader bool, op func(*keeltest.Node)) []time.Duration {
		var out []time.Duration
		for range rounds {
			n := pick(leader)
			t0 := time.Now()
			op(n)
			c.caughtUp(b, n)
			settle()
			out = append(out, a.gap(t0, time.Now()))
		}
		return out
	}
	type row struct {
		name  string
		stall []time.Duration
		errs  int
	}
	var rows []row
	for _, k := range []struct {
		name   string
		leader bool
		op     func(*keeltest.Node)
	}{
		{"nothing (baseline)", false, func(*keeltest.Node) {}},
		{"leader upgrade", true, upgradeOne},
		{"follower upgrade", false, upgradeOne},
		{"leader restart", true, restartOne},
		{"follower restart", false, restartOne},
	} {
		before := a.errs
		st := measure(k.leader, k.op)
		rows = append(rows, row{k.name, st, a.errs - before})
	}
	var tab strings.Builder
	fmt.Fprintf(&tab, "\n%-22s %8s %8s %8s %s\n", fmt.Sprintf("stall over %d", rounds), "p50", "p99", "max", "client errors")
	for _, r := range rows {
		p50, p99, worst := percentiles(r.stall)
		fmt.Fprintf(&tab, "%-22s %8s %8s %8s %d\n", r.name, p50.Round(time.Millisecond), p99.Round(time.Millisecond), worst.Round(time.Millisecond), r.errs)
		b.ReportMetric(float64(p99.Microseconds())/1000, strings.ReplaceAll(r.name, " ", "-")+"-p99-ms")
	}
	b.Log(tab.String())
}
