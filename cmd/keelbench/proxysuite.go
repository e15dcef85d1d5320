package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// ProxyTargets are the proxy suite's columns.
var ProxyTargets = []string{"proxy", "leader", "nbdkit", "keel-serve"}

// ProxyTable is the proxy suite's table: the write jobs through the proxy
// and straight to the leader, warm-cache rand-read through all four, and
// (when the volume is larger than the cache) the cold reads of the whole
// volume through the proxy and straight from the leader.
func ProxyTable(size int64, c Config, leader string) *Table {
	t := &Table{Name: "proxy",
		Title: fmt.Sprintf("proxy: volume %s, proxy --cache %s; rand-read on the first %s, warm; *-cold over the whole volume, proxy restarted first; %v per job after %v warm-up; %s, targets in turn; leader %s of 3 voters",
			FormatSize(size), FormatSize(c.Cache), FormatSize(c.WSet), c.Runtime, c.Ramp, rounds(c.Rounds), leader),
		Targets: ProxyTargets,
		Ratios: []Ratio{{Num: "proxy", Den: []string{"leader"}}, {Num: "proxy", Den: []string{"nbdkit"}},
			{Num: "proxy", Den: []string{"keel-serve"}}},
	}
	t.Row(SeqWrite.Name, SeqWrite.Unit)
	t.Row(RandWrite.Name, RandWrite.Unit)
	t.Row(RandRead.Name, RandRead.Unit)
	if coldReads(size, c) {
		t.Row(RandReadCold.Name, RandReadCold.Unit)
		t.Row(SeqReadCold.Name, SeqReadCold.Unit)
	}
	return t
}

// coldReads: the cold jobs run only when the volume is larger than the
// cache (else the proxy would end up serving them from memory).
func coldReads(size int64, c Config) bool { return size > c.Cache }

// proxyColdJobs: the cold reads compare the proxy with a direct
// connection to a replica (the leader).
func proxyColdJobs(target string) []Job {
	if target == "proxy" || target == "leader" {
		return []Job{RandReadCold, SeqReadCold}
	}
	return nil
}

// proxyColdGoals are issue 9's goals for the cold reads: through the
// proxy at least 0.8x of a direct connection to a replica.
func proxyColdGoals(t *Table) []string {
	var out []string
	for _, r := range t.Rows {
		if r.Job != RandReadCold.Name && r.Job != SeqReadCold.Name {
			continue
		}
		ratio, ok := RatioOf(Ratio{Num: "proxy", Den: []string{"leader"}}, r.Median)
		out = append(out, goal(r.Job+" through the proxy (volume larger than the cache) >= 0.8x a direct connection to the leader",
			FormatRatio(ratio, ok)+"x", ratio >= 0.8, ok))
	}
	return out
}

// proxyWriteJobs: while the proxy holds the volume the servers refuse
// other writers, so only the proxy and the leader (the proxy stopped) run
// the write jobs.
func proxyWriteJobs(target string) []Job {
	if target == "proxy" || target == "leader" {
		return []Job{SeqWrite, RandWrite}
	}
	return nil
}

// CacheUse is the proxy's cache counters over one run.
type CacheUse struct {
	Hits, Misses, RemoteReads uint64
}

// CacheBetween is the change of the proxy's counters from a to b.
func CacheBetween(a, b map[string]uint64) CacheUse {
	return CacheUse{Hits: b["cache_hits"] - a["cache_hits"], Misses: b["cache_misses"] - a["cache_misses"],
		RemoteReads: b["remote_reads"] - a["remote_reads"]}
}

func (c CacheUse) String() string {
	looked := c.Hits + c.Misses
	pct := 0.0
	if looked > 0 {
		pct = 100 * float64(c.Hits) / float64(looked)
	}
	return fmt.Sprintf("%.2f%% hits of %d blocks looked up, %d remote reads", pct, looked, c.RemoteReads)
}

func (b *bench) proxyCounters(ctx context.Context, p *ProxyProc) map[string]uint64 {
	var st struct {
		Counters map[string]uint64 `json:"counters"`
	}
	if err := b.http.Do(ctx, "GET", p.HTTP, "/v1/status", nil, &st); err != nil {
		b.odd("proxy counters: %v", err)
	}
	return st.Counters
}

// waitQuiet waits until each process uses under 10% of a core for 2
// seconds in a row, at most timeout (idle servers use a few %: heartbeats,
// the proxy's polls), so that a follower's backlog after the writes does
// not land on the first read job.
func (b *bench) waitQuiet(ctx context.Context, procs map[string]int, timeout time.Duration) string {
	start := time.Now()
	every := b.quietTick
	if every == 0 {
		every = time.Second
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	prev, err := ReadCPU(procs)
	if err != nil {
		return err.Error()
	}
	calm := 0 // ticks in a row under 10%
	for time.Since(start) < timeout {
		select {
		case <-ctx.Done():
			return ctx.Err().Error()
		case <-tick.C:
		}
		cur, err := ReadCPU(procs)
		if err != nil {
			return err.Error()
		}
		busiest := 0.0
		for _, v := range CPUBetween(prev, cur, runtime.NumCPU()).Procs {
			busiest = max(busiest, v)
		}
		prev = cur
		if busiest < 10 {
			calm++
		} else {
			calm = 0
		}
		if calm >= 2 {
			return fmt.Sprintf("quiet after %.1f s", time.Since(start).Seconds())
		}
	}
	return fmt.Sprintf("still busy after %v", timeout)
}

// runProxy: a three-node cluster, keel proxy --cache in front of it, and
// nbdkit and keel serve on a plain image (all running at once).
func (b *bench) runProxy(ctx context.Context) error {
	size, cfg := b.cfg.SizeFor("proxy"), b.cfg
	dir := filepath.Join(b.work, "proxy")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	b.beginSuite("proxy", []string{"proxy", "n1", "n2", "n3", "nbdkit", "keel-serve"})
	defer b.endSuite("proxy")
	b.say("proxy: three-node cluster of %s, proxy --cache %s; nbdkit and keel serve on a plain image", FormatSize(size), FormatSize(cfg.Cache))
	img := filepath.Join(dir, "plain.img")
	if err := randomImage(img, size); err != nil {
		return err
	}
	c, err := b.procs.StartCluster(ctx, ClusterSpec{Keel: b.keel, Dir: dir, Size: size, LogLevel: cfg.LogLevel, LogDir: b.logDir})
	if c != nil {
		b.adopt(nodeProcs(c)...)
	}
	if err != nil {
		return err
	}
	leader, _ := c.Node(c.Leader)
	spec := ProxySpec{Sock: filepath.Join(dir, "proxy.sock"), Cache: cfg.Cache, Writer: "keelbench",
		Log: filepath.Join(b.logDir, "proxy.log")}
	var proxy *ProxyProc
	startProxy := func() error {
		p, err := b.procs.StartProxy(ctx, c, spec)
		if err != nil {
			return err
		}
		spec.HTTP = p.HTTP // the same address across restarts
		proxy = p
		b.adopt(p)
		return nil
	}
	stopProxy := func() {
		if proxy != nil {
			if err := proxy.Stop(); err != nil {
				b.odd("%v", err)
			}
			proxy = nil
		}
	}
	if err := startProxy(); err != nil {
		return err
	}
	socks := map[string]string{"proxy": spec.Sock, "leader": leader.Sock}
	plain := map[string]Proc{}
	for _, s := range []string{"nbdkit", "keel-serve"} { // the read jobs never write the plain image
		socks[s] = filepath.Join(dir, s+".sock")
		p, err := b.startPlain(ctx, s, img, socks[s])
		if err != nil {
			return err
		}
		plain[s] = p
	}
	b.say("  3 voters; leader %s; proxy on %s", leader.ID, spec.Sock)
	servers := pids(nodeProcs(c)...)
	cpu := func(target string) map[string]int {
		m := pids(plain["nbdkit"], plain["keel-serve"])
		for k, v := range servers {
			m[k] = v
		}
		if proxy != nil {
			m["proxy"] = proxy.PID()
		}
		return m
	}
	t := ProxyTable(size, cfg, leader.ID)
	b.rep.Tables = append(b.rep.Tables, t)
	if r, ok := b.fio(ctx, "proxy", "proxy", "prefill", FioRun{Job: Fill, URI: NBDURI(spec.Sock), Size: size}, cpu("proxy")); ok {
		t.Notes = append(t.Notes, fmt.Sprintf("volume first written in full through the proxy: %.1f MB/s", r.MBps))
	}

	// Writes: the proxy is stopped (SIGTERM releases the volume) for the
	// leader's jobs and started again (it claims the volume back under the
	// same --writer).
	writers, writeJobs := []string{"proxy", "leader"}, proxyWriteJobs
	if b.goals {
		writers, writeJobs = []string{"proxy", "leader", "keel-serve"}, goalWriteJobs
	}
	for _, v := range Schedule(cfg.Rounds, writers, writeJobs) {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		switch {
		case v.Target == "leader" && proxy != nil:
			stopProxy()
		case v.Target == "proxy" && proxy == nil:
			if err := startProxy(); err != nil {
				return err
			}
		}
		r, ok := b.fio(ctx, "proxy", v.Target, roundLabel(v.Job, v.Round), FioRun{Job: v.Job, URI: NBDURI(socks[v.Target]),
			Size: size, Runtime: cfg.Runtime, Ramp: cfg.Ramp}, cpu(v.Target))
		t.Row(v.Job.Name, v.Job.Unit).Set(v.Target, v.Round, r.Value(v.Job.Unit), ok)
	}
	if proxy == nil {
		if err := startProxy(); err != nil {
			return err
		}
	}

	// Warm-cache random reads of the first WSet bytes, targets in turn,
	// after one full read pass over WSet through each.
	b.say("  servers after the writes: %s", b.waitQuiet(ctx, servers, time.Minute))
	for _, tg := range ProxyTargets {
		b.fio(ctx, "proxy", tg, "warm", FioRun{Job: Warm, URI: NBDURI(socks[tg]), Size: cfg.WSet}, cpu(tg))
	}
	var cache []string
	warmJobs := []Job{RandRead}
	if b.goals {
		warmJobs = append(warmJobs, SeqRead)
	}
	for _, v := range Schedule(cfg.Rounds, ProxyTargets, func(string) []Job { return warmJobs }) {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var before map[string]uint64
		if v.Target == "proxy" {
			before = b.proxyCounters(ctx, proxy)
		}
		label := roundLabel(v.Job, v.Round)
		r, ok := b.fio(ctx, "proxy", v.Target, label, FioRun{Job: v.Job, URI: NBDURI(socks[v.Target]),
			Size: cfg.WSet, Runtime: cfg.Runtime, Ramp: cfg.Ramp}, cpu(v.Target))
		t.Row(v.Job.Name, v.Job.Unit).Set(v.Target, v.Round, r.Value(v.Job.Unit), ok)
		if v.Target == "proxy" {
			u := CacheBetween(before, b.proxyCounters(ctx, proxy))
			b.say("    proxy cache: %s", u)
			cache = append(cache, fmt.Sprintf("proxy cache during %s: %s", label, u))
		}
	}
	t.Notes = append(t.Notes, cache...)
	rr := t.Row(RandRead.Name, RandRead.Unit)
	ratio, ok := RatioOf(Ratio{Num: "proxy", Den: []string{"nbdkit"}}, rr.Median)
	t.Notes = append(t.Notes, goal("warm-cache random 4k read through the proxy >= nbdkit file", FormatRatio(ratio, ok)+"x", ratio >= 1, ok))

	// Cold reads of the whole volume: each proxy job on a proxy started
	// afresh, so its cache starts empty.
	if coldReads(size, cfg) {
		for _, v := range Schedule(cfg.Rounds, []string{"proxy", "leader"}, proxyColdJobs) {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if v.Target == "proxy" {
				stopProxy()
				if err := startProxy(); err != nil {
					return err
				}
			}
			var before map[string]uint64
			if v.Target == "proxy" {
				before = b.proxyCounters(ctx, proxy)
			}
			label := roundLabel(v.Job, v.Round)
			r, ok := b.fio(ctx, "proxy", v.Target, label, FioRun{Job: v.Job, URI: NBDURI(socks[v.Target]),
				Size: size, Runtime: cfg.Runtime, Ramp: cfg.Ramp}, cpu(v.Target))
			t.Row(v.Job.Name, v.Job.Unit).Set(v.Target, v.Round, r.Value(v.Job.Unit), ok)
			if v.Target == "proxy" {
				u := CacheBetween(before, b.proxyCounters(ctx, proxy))
				b.say("    proxy cache: %s", u)
				t.Notes = append(t.Notes, fmt.Sprintf("proxy cache during %s: %s", label, u))
			}
		}
		t.Notes = append(t.Notes, proxyColdGoals(t)...)
	} else {
		t.Notes = append(t.Notes, fmt.Sprintf("cold reads not run: the volume (%s) is not larger than the cache (%s)", FormatSize(size), FormatSize(cfg.Cache)))
	}

	// Memory with a full cache: read the whole volume (size > cache).
	b.fio(ctx, "proxy", "proxy", "fill-read", FioRun{Job: Warm, URI: NBDURI(spec.Sock), Size: size}, cpu("proxy"))
	b.noteMem("after a full read (cache full)", proxy)
	if m, err := ReadMem(proxy.PID()); err == nil {
		limit := cfg.Cache + 64<<20
		mib := func(n int64) string { return fmt.Sprintf("%.0f MiB", float64(n)/(1<<20)) }
		t.Notes = append(t.Notes,
			goal("the proxy's VmRSS after a full read (cache full) < cache + 64 MiB", mib(m.VmRSS), m.VmRSS < limit, true),
			goal("the proxy's peak RSS (VmHWM) < cache + 64 MiB", mib(m.VmHWM), m.VmHWM < limit, true))
	}
	for _, p := range nodeProcs(c) {
		b.noteMem("after the jobs", p)
	}
	b.checkLeader(ctx, "proxy", c)
	if !cfg.Profile {
		return nil
	}
	// A proxy that profiles only the warm read: SIGTERM releases the
	// volume and writes the profile; the new one claims it back.
	stopProxy()
	prof := filepath.Join(cfg.Out, "proxy.pprof")
	b.say("  profile: the proxy again, under --cpu-profile %s", prof)
	spec.CPUProfile = prof
	if err := startProxy(); err != nil {
		return err
	}
	b.fio(ctx, "proxy", "proxy-profiled", "warm", FioRun{Job: Warm, URI: NBDURI(spec.Sock), Size: cfg.WSet}, cpu("proxy"))
	pr, pok := b.fio(ctx, "proxy", "proxy-profiled", "rand-read", FioRun{Job: RandRead, URI: NBDURI(spec.Sock),
		Size: cfg.WSet, Runtime: cfg.Runtime, Ramp: cfg.Ramp}, cpu("proxy"))
	nr, nok := b.fio(ctx, "proxy", "nbdkit", "rand-read-profiled", FioRun{Job: RandRead, URI: NBDURI(socks["nbdkit"]),
		Size: cfg.WSet, Runtime: cfg.Runtime, Ramp: cfg.Ramp}, cpu("nbdkit"))
	stopProxy()
	ratio, rok := RatioOf(Ratio{Num: "p", Den: []string{"n"}}, func(tg string) (float64, bool) {
		if tg == "p" {
			return pr.IOPS, pok
		}
		return nr.IOPS, nok
	})
	t.Notes = append(t.Notes, fmt.Sprintf("rand-read through the proxy under --cpu-profile: %s IOPS; nbdkit right after: %s IOPS; ratio %s",
		FormatValue(pr.IOPS, pok, UnitIOPS), FormatValue(nr.IOPS, nok, UnitIOPS), FormatRatio(ratio, rok)))
	sec := Section{Title: "proxy: CPU profile during warm rand-read (go tool pprof -top, hottest 25 by flat, then by cum)", Pre: true}
	for _, cum := range []bool{false, true} {
		argv := []string{"go", "tool", "pprof", "-top", "-nodecount=25"}
		if cum {
			argv = append(argv, "-cum")
		}
		out, err := b.procs.Output(ctx, append(argv, b.keel, prof))
		if err != nil {
			b.odd("go tool pprof on %s: %v", prof, err)
			break
		}
		sec.Lines = append(append(sec.Lines, TopLines(out, 25)...), "")
	}
	b.rep.Sections = append(b.rep.Sections, sec)
	return nil
}

// TopLines keeps the head of go tool pprof -top's listing: its header and
// the first n function lines.
func TopLines(out string, n int) []string {
	var lines []string
	fn := 0
	started := false
	for _, l := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), "flat") {
			started = true
			lines = append(lines, l)
			continue
		}
		if started {
			if fn >= n {
				break
			}
			fn++
		}
		lines = append(lines, l)
	}
	return lines
}
