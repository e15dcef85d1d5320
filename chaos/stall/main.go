// Command stall measures the stall an NBD client of `keel proxy` sees when
// the cluster's leader is killed with SIGKILL.
//
// It starts three `keel server`s and a `keel proxy` on 127.0.0.1 (free
// ports, a temporary directory, a small volume), connects to the proxy with
// keel's own NBD client and keeps a steady load on it: --writers writers of
// --bs-byte blocks (each writer owns every W-th block and writes them in
// turn, one write in flight each; every write carries a pattern unique to
// its sequence number and block) and --readers readers that read random
// blocks and check what they hold. Then, --trials times: wait --settle with
// the load running and the cluster steady, find the leader (GET
// /v1/status), SIGKILL it, and measure
//
//	election   kill -> a surviving server reports itself Leader (polled
//	           every 10ms); the servers' share of the stall
//	recovery   kill -> the first write SENT AFTER the kill is acknowledged:
//	           when the client can write again
//	max write  the longest latency of any single write that completed (or was
//	           still in flight) from the kill to the end of the trial: the
//	           stall one request saw, including the time it was in flight
//	           before the kill
//	max gap    the longest time with no write completing, from the last
//	           completion before the kill to the end of the trial
//	max read   the longest latency of a read completing in the same span
//
// then restart the killed server with the same flags (it rejoins from its
// directory) and wait until it has applied what the leader had; that ends
// the trial. Percentiles (p50, p99, max) are over the trials.
//
// Any write or read error, and any read that returns something other than a
// write the client may see there, is a failure. (A read racing a write to
// its block may return some pages of each: NBD allows it, and such reads
// are counted as torn, not failed. Every page names its write.) With --verify (default),
// after the load stops every block is read back through the proxy and
// straight from each server's NBD, and must hold its last acknowledged
// write: nothing acknowledged was lost, torn or applied twice out of order.
//
// Elections: the highest term among the servers is watched while the
// cluster is idle (--idle, before the load and after it) and under load
// between trials; any change there is a spurious election. Terms spent per
// kill beyond one are reported as extra rounds.
//
// Everything runs under --timeout and stops on Ctrl-C; the processes are
// stopped and the directory removed on exit (logs kept on failure or with
// --keep). Exit status: 0 all good, 1 a failure above, 2 could not run.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica"
)

type config struct {
	keel           string
	trials         int
	size           uint64
	sizeText       string
	bs             uint64
	bsText         string
	writers        int
	readers        int
	heartbeat      time.Duration
	election       time.Duration
	lease          time.Duration
	proxyPoll      time.Duration
	proxyCache     string
	proxyProfile   string
	settle         time.Duration
	idle           time.Duration
	trialTimeout   time.Duration
	requestTimeout time.Duration
	timeout        time.Duration
	verify         bool
	dir            string
	keep           bool
	logLevel       string
	jsonOut        string
}

func main() {
	os.Exit(run())
}

func parseFlags() (*config, error) {
	cfg := &config{}
	fs := flag.CommandLine
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: go run ./chaos/stall [flags]\n\n%s\nFlags:\n", strings.TrimSpace(usageText))
		fs.PrintDefaults()
	}
	fs.StringVar(&cfg.keel, "keel", "", "keel binary to run (default: go build ./cmd/keel into the work directory)")
	fs.IntVar(&cfg.trials, "trials", 20, "leader kills, 1 to 1000")
	fs.StringVar(&cfg.sizeText, "size", "64M", "volume size (K, M, G suffixes); every block is checked at the end")
	fs.StringVar(&cfg.bsText, "bs", "4K", "bytes per write and read, a multiple of 512 from 512 to 1M")
	fs.IntVar(&cfg.writers, "writers", 4, "writes in flight (one per writer), 1 to 64")
	fs.IntVar(&cfg.readers, "readers", 1, "reads in flight (one per reader), 0 to 64")
	fs.DurationVar(&cfg.heartbeat, "heartbeat-timeout", replica.DefaultHeartbeatTimeout, "servers' --heartbeat-timeout")
	fs.DurationVar(&cfg.election, "election-timeout", replica.DefaultElectionTimeout, "servers' --election-timeout")
	fs.DurationVar(&cfg.lease, "leader-lease-timeout", replica.DefaultLeaderLeaseTimeout, "servers' --leader-lease-timeout")
	fs.DurationVar(&cfg.proxyPoll, "proxy-poll-interval", 200*time.Millisecond, "proxy's --poll-interval")
	fs.StringVar(&cfg.proxyCache, "proxy-cache", "128M", "proxy's --cache")
	fs.StringVar(&cfg.proxyProfile, "proxy-cpu-profile", "", "write the proxy's CPU profile here (keel --cpu-profile)")
	fs.DurationVar(&cfg.settle, "settle", 2*time.Second, "load time with the cluster steady before each kill (and before the first)")
	fs.DurationVar(&cfg.idle, "idle", 5*time.Second, "idle time watched for spurious elections, before the load and after it; 0 skips")
	fs.DurationVar(&cfg.trialTimeout, "trial-timeout", 60*time.Second, "limit for each step of a trial (recovery, restart, catch-up)")
	fs.DurationVar(&cfg.requestTimeout, "request-timeout", 60*time.Second, "client-side limit for one NBD request (the proxy's own --write-timeout is 30s)")
	fs.DurationVar(&cfg.timeout, "timeout", 10*time.Minute, "limit for the whole run")
	fs.BoolVar(&cfg.verify, "verify", true, "at the end, read every block back through the proxy and from each server")
	fs.StringVar(&cfg.dir, "dir", "", "work directory, new or empty, removed at the end (default: a new one under $TMPDIR)")
	fs.BoolVar(&cfg.keep, "keep", false, "keep the work directory's logs (never the images) even when all went well")
	fs.StringVar(&cfg.logLevel, "log-level", "info", "servers' and proxy's --log-level")
	fs.StringVar(&cfg.jsonOut, "json", "", "also write the results as JSON to this file")
	flag.Parse()
	if flag.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", flag.Args())
	}
	var err error
	if cfg.size, err = parseSize(cfg.sizeText); err != nil {
		return nil, fmt.Errorf("--size: %w", err)
	}
	if cfg.bs, err = parseSize(cfg.bsText); err != nil {
		return nil, fmt.Errorf("--bs: %w", err)
	}
	switch {
	case cfg.trials < 1 || cfg.trials > 1000:
		return nil, fmt.Errorf("--trials %d: must be from 1 to 1000", cfg.trials)
	case cfg.bs < 512 || cfg.bs > 1<<20 || cfg.bs%512 != 0:
		return nil, fmt.Errorf("--bs %d: must be a multiple of 512 from 512 to 1M", cfg.bs)
	case cfg.writers < 1 || cfg.writers > 64:
		return nil, fmt.Errorf("--writers %d: must be from 1 to 64", cfg.writers)
	case cfg.readers < 0 || cfg.readers > 64:
		return nil, fmt.Errorf("--readers %d: must be from 0 to 64", cfg.readers)
	case cfg.size%cfg.bs != 0 || cfg.size/cfg.bs < uint64(cfg.writers)*16:
		return nil, fmt.Errorf("--size %s: must be a multiple of --bs and hold at least 16 blocks per writer", cfg.sizeText)
	case cfg.lease > cfg.heartbeat:
		return nil, fmt.Errorf("--leader-lease-timeout %v: must be at most --heartbeat-timeout %v", cfg.lease, cfg.heartbeat)
	case cfg.settle < 100*time.Millisecond:
		return nil, fmt.Errorf("--settle %v: must be at least 100ms", cfg.settle)
	case cfg.trialTimeout < time.Second, cfg.requestTimeout < time.Second, cfg.timeout < 10*time.Second:
		return nil, errors.New("--trial-timeout and --request-timeout must be at least 1s, --timeout at least 10s")
	}
	return cfg, nil
}

const usageText = `
Measures the stall an NBD client of keel proxy sees when the Raft leader is
killed with SIGKILL: three keel servers and a proxy on 127.0.0.1, a steady
write load (plus checking readers) through the proxy, and --trials rounds of
kill the leader / restart it / wait until it has caught up.

Per trial:
  election   kill -> a surviving server reports itself Leader (10ms polls)
  recovery   kill -> the first write sent after the kill is acknowledged
  max write  longest single write latency from the kill to the end of the
             trial (the killed node back and caught up), time in flight
             before the kill included
  max gap    longest time with no write completing, over the same span,
             counted from the last completion before the kill
  max read   longest single read latency over the same span
Reported as p50, p99 and max over the trials (nearest rank).

Any client error or wrong read content is a failure (a read racing a write
to its block may hold pages of both: allowed, counted as torn); --verify reads
every block back (through the proxy and from each server) and checks it
holds its last acknowledged write. Elections: the servers' term is watched
while idle and under load between kills; a change there is spurious.
`

func parseSize(s string) (uint64, error) {
	t := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "B"), "I")
	mult := uint64(1)
	if t != "" {
		switch t[len(t)-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		}
		if mult != 1 {
			t = t[:len(t)-1]
		}
	}
	n, err := strconv.ParseUint(t, 10, 64)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%q: want a size such as 64M", s)
	}
	return n * mult, nil
}

func run() int {
	cfg, err := parseFlags()
	if err != nil {
		fmt.Fprintln(os.Stderr, "stall:", err)
		return 2
	}
	if cfg.dir == "" {
		if cfg.dir, err = os.MkdirTemp("", "keel-stall."); err != nil {
			fmt.Fprintln(os.Stderr, "stall:", err)
			return 2
		}
	} else {
		if ents, err := os.ReadDir(cfg.dir); err == nil && len(ents) > 0 {
			fmt.Fprintf(os.Stderr, "stall: --dir %s is not empty\n", cfg.dir)
			return 2
		}
		if err := os.MkdirAll(cfg.dir, 0o755); err != nil {
			fmt.Fprintln(os.Stderr, "stall:", err)
			return 2
		}
	}
	if cfg.dir, err = filepath.Abs(cfg.dir); err != nil {
		fmt.Fprintln(os.Stderr, "stall:", err)
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeoutCause(ctx, cfg.timeout, fmt.Errorf("the run took longer than --timeout %v", cfg.timeout))
	defer cancel()

	r := &runner{cfg: cfg, res: &result{Config: resultConfig(cfg)}}
	rc := r.run(ctx)
	if ctx.Err() != nil && rc != 0 {
		if context.Cause(ctx) != nil && !errors.Is(context.Cause(ctx), context.Canceled) {
			fmt.Fprintln(os.Stderr, "stall:", context.Cause(ctx))
		} else {
			fmt.Fprintln(os.Stderr, "stall: interrupted")
			rc = 130
		}
	}
	r.cleanup(rc)
	return rc
}

// runner is one run of the tool.
type runner struct {
	cfg *config
	c   *cluster
	nc  *nbd.Client
	ld  *load
	res *result
}

func (r *runner) say(format string, args ...any) {
	fmt.Printf("stall: "+format+"\n", args...)
}

func (r *runner) run(ctx context.Context) int {
	cfg := r.cfg
	if cfg.keel == "" {
		cfg.keel = filepath.Join(cfg.dir, "keel")
		r.say("building keel: go build -o %s github.com/keelstore/keel/cmd/keel", cfg.keel)
		if err := keeltest.Build(ctx, cfg.keel, false); err != nil {
			fmt.Fprintln(os.Stderr, "stall: building keel (run from inside the keel module, or give --keel):", err)
			return 2
		}
	} else if p, err := exec.LookPath(cfg.keel); err != nil {
		fmt.Fprintln(os.Stderr, "stall: --keel:", err)
		return 2
	} else {
		cfg.keel, _ = filepath.Abs(p)
	}
	c, err := newCluster(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "stall:", err)
		return 2
	}
	r.c = c
	r.say("work directory %s; volume %s, %d-byte blocks, %d writers, %d readers", cfg.dir, cfg.sizeText, cfg.bs, cfg.writers, cfg.readers)
	r.say("raft: --heartbeat-timeout %v --election-timeout %v --leader-lease-timeout %v; proxy --poll-interval %v --cache %s",
		cfg.heartbeat, cfg.election, cfg.lease, cfg.proxyPoll, cfg.proxyCache)
	t0 := time.Now()
	if err := c.start(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "stall: starting the cluster:", err)
		return 2
	}
	n1 := c.Nodes()[0]
	r.say("servers: %s %s", cfg.keel, strings.Join(n1.Args("--bootstrap", "--size", fmt.Sprint(cfg.size)), " "))
	r.say("         (n2, n3 with --join %s instead of --bootstrap --size; ports differ)", n1.HTTP)
	r.say("proxy:   %s %s", cfg.keel, strings.Join(c.proxy.Args(), " "))
	r.say("three voters and the proxy (%s) up after %.1f s", c.proxy.Listen, time.Since(t0).Seconds())

	if cfg.idle > 0 {
		r.res.IdleBefore = r.watchIdle(ctx, "before the load")
	}
	nc, err := nbd.Dial(ctx, "tcp", c.proxy.Listen, nbd.ClientConfig{MaxInFlight: cfg.writers + cfg.readers + 4, CloseTimeout: 5 * time.Second})
	if err != nil {
		fmt.Fprintln(os.Stderr, "stall: connecting to the proxy:", err)
		return 2
	}
	r.nc = nc
	if nc.Size() != cfg.size {
		fmt.Fprintf(os.Stderr, "stall: the proxy serves %d bytes, want %d\n", nc.Size(), cfg.size)
		return 2
	}
	r.ld = newLoad(nc, cfg)
	r.ld.run(ctx)
	loadStart := time.Now()

	failed := false
	for i := 1; i <= cfg.trials; i++ {
		t, err := r.trial(ctx, i)
		if t != nil {
			r.res.Trials = append(r.res.Trials, *t)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "stall: trial %d: %v\n", i, err)
			failed = true
			break
		}
	}
	r.ld.halt()
	r.res.LoadSeconds = time.Since(loadStart).Seconds()
	r.collectLoad()
	if ctx.Err() != nil {
		r.report()
		return 1
	}
	if cfg.idle > 0 {
		r.res.IdleAfter = r.watchIdle(ctx, "after the load")
	}
	if cfg.verify {
		if err := r.verify(ctx); err != nil {
			fmt.Fprintln(os.Stderr, "stall: verify:", err)
			failed = true
		}
	}
	r.countElections()
	ok := r.report()
	if failed || !ok {
		return 1
	}
	return 0
}

// watchIdle watches the servers' term with no client for --idle.
func (r *runner) watchIdle(ctx context.Context, when string) *idleResult {
	v := r.c.view(ctx)
	res := &idleResult{Seconds: r.cfg.idle.Seconds(), TermBefore: v.term, TermAfter: v.term}
	if v.leader != nil {
		res.Leader = v.leader.ID
	}
	end := time.Now().Add(r.cfg.idle)
	for time.Now().Before(end) && ctx.Err() == nil {
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
		v := r.c.view(ctx)
		res.TermAfter = max(res.TermAfter, v.term)
		if v.leader != nil && v.leader.ID != res.Leader {
			res.LeaderChanges++
			res.Leader = v.leader.ID
		}
	}
	r.say("idle %v %s: term %d -> %d, leader changes %d%s", r.cfg.idle, when, res.TermBefore, res.TermAfter,
		res.LeaderChanges, map[bool]string{true: "  SPURIOUS ELECTION", false: ""}[res.TermAfter != res.TermBefore])
	return res
}

// trial runs one kill; a nil error with a trial means it completed.
func (r *runner) trial(ctx context.Context, i int) (*trialResult, error) {
	c, cfg := r.c, r.cfg
	// Steady: every node up and caught up, then --settle of load with no
	// change of term.
	if err := c.waitCaughtUp(ctx, cfg.trialTimeout); err != nil {
		return nil, err
	}
	v0 := c.view(ctx)
	n0 := r.ld.completions()
	select {
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	case <-time.After(cfg.settle):
	}
	v := c.view(ctx)
	t := &trialResult{N: i, TermBefore: v.term}
	if v.term != v0.term {
		t.SpuriousUnderLoad = int(v.term - v0.term)
	}
	if r.ld.completions() == n0 {
		return t, fmt.Errorf("no write completed in %v of steady load before the kill", cfg.settle)
	}
	if v.leader == nil || len(v.st) != 3 {
		return t, fmt.Errorf("no single leader among three answering servers before the kill (%d answer)", len(v.st))
	}
	victim := v.leader
	t.Killed = victim.ID

	// Kill, then watch the survivors for a leader.
	type election struct {
		leader *keeltest.Node
		term   uint64
		after  time.Duration
	}
	elected := make(chan election, 1)
	ectx, ecancel := context.WithCancel(ctx)
	defer ecancel()
	win := r.ld.open(time.Now())
	if err := victim.Kill(); err != nil {
		return t, fmt.Errorf("killing %s: %w", victim.ID, err)
	}
	go func() {
		for ectx.Err() == nil {
			if v := c.view(ectx); v.leader != nil && v.leader != victim {
				elected <- election{v.leader, v.term, time.Since(win.kill)}
				return
			}
			select {
			case <-ectx.Done():
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	limit := time.NewTimer(cfg.trialTimeout)
	defer limit.Stop()
	recCh, electedCh := win.recCh, elected
	for electedCh != nil || recCh != nil {
		select {
		case <-ctx.Done():
			return t, context.Cause(ctx)
		case <-limit.C:
			return t, fmt.Errorf("after killing %s: within %v, new leader %v, client recovered %v", victim.ID, cfg.trialTimeout, t.NewLeader != "", t.Recovered != 0)
		case e := <-electedCh:
			t.NewLeader, t.TermElected, t.Elected = e.leader.ID, e.term, e.after
			electedCh = nil
		case <-recCh:
			t.Recovered = win.recovered // set before recCh was closed
			recCh = nil
		}
	}

	// Restart the killed node with its flags and wait until it has caught up.
	rs := time.Now()
	if err := victim.Restart(ctx); err != nil {
		return t, fmt.Errorf("restarting %s: %w", victim.ID, err)
	}
	if err := c.waitCaughtUp(ctx, cfg.trialTimeout); err != nil {
		return t, fmt.Errorf("after restarting %s: %w", victim.ID, err)
	}
	t.Rejoin = time.Since(rs)
	w := r.ld.close()
	t.MaxWrite, t.MaxGap, t.MaxRead, t.WindowWrites = w.maxWrite, w.maxGap, w.maxRead, w.writes
	t.TermAfter = c.view(ctx).term
	t.Complete = true
	extra := ""
	if t.TermElected > t.TermBefore+1 {
		extra += fmt.Sprintf("; %d extra election rounds", t.TermElected-t.TermBefore-1)
	}
	if t.TermAfter > t.TermElected {
		extra += fmt.Sprintf("; term moved %d -> %d while %s rejoined", t.TermElected, t.TermAfter, victim.ID)
	}
	if t.SpuriousUnderLoad > 0 {
		extra += fmt.Sprintf("; term moved by %d under steady load before the kill", t.SpuriousUnderLoad)
	}
	r.say("trial %2d/%d: %s killed %s (term %d); %s leads after %s; recovery %s; max write %s, max gap %s, max read %s; %s back in %s%s",
		i, cfg.trials, win.kill.Format("15:04:05.000"), victim.ID, t.TermBefore, t.NewLeader, ms(t.Elected), ms(t.Recovered), ms(t.MaxWrite), ms(t.MaxGap), ms(t.MaxRead),
		victim.ID, ms(t.Rejoin), extra)
	return t, nil
}

func ms(d time.Duration) string {
	if d == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0fms", d.Seconds()*1000)
}

func (r *runner) collectLoad() {
	l := r.ld
	l.mu.Lock()
	defer l.mu.Unlock()
	r.res.Writes, r.res.Reads = l.writes, l.reads
	r.res.WriteErrors, r.res.ReadErrors, r.res.ReadMismatches, r.res.TornReads = l.writeErrs, l.readErrs, l.mismatches, l.torn
	r.res.Problems = append(r.res.Problems, l.problems...)
	r.res.SteadyWrite = percentiles(l.steady.vals)
}

// verify reads every block through the proxy, then, once all servers have
// applied the same index, straight from each server's NBD.
func (r *runner) verify(ctx context.Context) error {
	t0 := time.Now()
	checked, nbad, bad, err := r.ld.verify(ctx, r.nc)
	r.res.Verify = append(r.res.Verify, verifyResult{Via: "proxy", Blocks: checked, Bad: nbad, Examples: bad, Error: errString(err)})
	r.say("verify through the proxy: %d blocks, %d wrong (%.1f s)%s", checked, nbad, time.Since(t0).Seconds(), errSuffix(err))
	if err != nil {
		return err
	}
	// Every server must have applied the last write before its image is read.
	if err := r.c.waitFor(ctx, 30*time.Second, "every server to apply the same index", func() (bool, error) {
		v := r.c.view(ctx)
		if len(v.st) != 3 || v.leader == nil {
			return false, nil
		}
		a := v.st[v.leader.ID].AppliedIndex
		for _, s := range v.st {
			if s.AppliedIndex != a {
				return false, nil
			}
		}
		return true, nil
	}); err != nil {
		return err
	}
	for _, n := range r.c.Nodes() {
		nc, err := nbd.Dial(ctx, "tcp", n.NBD, nbd.ClientConfig{CloseTimeout: 5 * time.Second})
		if err != nil {
			return fmt.Errorf("connecting to %s's NBD: %w", n.ID, err)
		}
		checked, nbad, bad, err := r.ld.verify(ctx, nc)
		nc.Close()
		r.res.Verify = append(r.res.Verify, verifyResult{Via: n.ID, Blocks: checked, Bad: nbad, Examples: bad, Error: errString(err)})
		r.say("verify on %s's NBD: %d blocks, %d wrong%s", n.ID, checked, nbad, errSuffix(err))
		if err != nil {
			return err
		}
	}
	return nil
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func errSuffix(err error) string {
	if err == nil {
		return ""
	}
	return "; ERROR: " + err.Error()
}

// countElections reads the servers' logs: elections started after a
// heartbeat timeout, and elections won.
func (r *runner) countElections() {
	for _, n := range r.c.Nodes() {
		b, err := os.ReadFile(n.LogPath)
		if err != nil {
			continue
		}
		e := logCounts{Node: n.ID}
		for _, line := range strings.Split(string(b), "\n") {
			switch {
			case strings.Contains(line, "heartbeat timeout reached, starting election"):
				e.Timeouts++
			case strings.Contains(line, "election won"):
				e.Won++
			case strings.Contains(line, "[ERROR]"):
				e.Errors++
			}
		}
		r.res.Logs = append(r.res.Logs, e)
	}
	if r.c.proxy == nil {
		return
	}
	if b, err := os.ReadFile(r.c.proxy.LogPath); err == nil {
		e := logCounts{Node: "proxy"}
		for _, line := range strings.Split(string(b), "\n") {
			switch {
			case strings.Contains(line, "[ERROR]"):
				e.Errors++
			case strings.Contains(line, "[WARN]"):
				e.Warnings++
			}
		}
		r.res.Logs = append(r.res.Logs, e)
	}
}

// cleanup stops everything, then removes the work directory (keeping the
// logs when the run failed or --keep asks).
func (r *runner) cleanup(rc int) {
	if r.nc != nil {
		done := make(chan struct{})
		go func() { r.nc.Close(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
		}
	}
	if r.c != nil {
		if err := r.c.StopAll(); err != nil {
			fmt.Fprintln(os.Stderr, "stall: stopping:", err)
		}
		r.c.Close() // whatever did not stop
	}
	if r.cfg.jsonOut != "" && r.res != nil {
		b, _ := json.MarshalIndent(r.res, "", "  ")
		if err := os.WriteFile(r.cfg.jsonOut, append(b, '\n'), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "stall: --json:", err)
		}
	}
	if rc == 0 && !r.cfg.keep {
		os.RemoveAll(r.cfg.dir)
		return
	}
	for _, n := range []string{"n1", "n2", "n3"} {
		os.RemoveAll(filepath.Join(r.cfg.dir, n))
	}
	os.Remove(filepath.Join(r.cfg.dir, "keel"))
	fmt.Fprintf(os.Stderr, "stall: kept the logs in %s (images removed)\n", r.cfg.dir)
}
