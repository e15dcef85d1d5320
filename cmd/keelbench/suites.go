package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// nbdServerArgv is the command line of an nbd-suite target serving img on
// sock, as scripts/bench-nbd ran them.
func nbdServerArgv(name, keel, img, sock string) []string {
	switch name {
	case "keel", "keel-serve":
		return []string{keel, "serve", "--file", img, "--listen", "unix:" + sock}
	case "nbdkit":
		// file plugin defaults: cache=default, 16 threads, multi-conn
		return []string{"nbdkit", "--foreground", "--unix", sock, "file", img}
	case "qemu-nbd":
		// writeback and threads are qemu-nbd's defaults, spelled out
		return []string{"qemu-nbd", "-f", "raw", "--socket", sock, "--cache=writeback", "--aio=threads",
			"--discard=unmap", "-t", "-e", "32", img}
	}
	return nil
}

// NBDTable is the nbd suite's table: keel's ratio to each peer that runs
// and to the better of them.
func NBDTable(servers []string, size int64, b Config) *Table {
	t := &Table{Name: "nbd", Targets: servers,
		Title: fmt.Sprintf("nbd: keel serve against its peers; image %s of random data; %v per job after %v warm-up; %s, targets in turn",
			FormatSize(size), b.Runtime, b.Ramp, rounds(b.Rounds))}
	var peers []string
	for _, s := range servers {
		if s != "keel" {
			peers = append(peers, s)
		}
	}
	if contains(servers, "keel") {
		for _, p := range peers {
			t.Ratios = append(t.Ratios, Ratio{Num: "keel", Den: []string{p}})
		}
		if len(peers) > 1 {
			t.Ratios = append(t.Ratios, Ratio{Num: "keel", Den: peers, Label: "keel/best"})
		}
	}
	return t
}

// startPlain starts an NBD server on img and waits for it.
func (b *bench) startPlain(ctx context.Context, name, img, sock string) (Proc, error) {
	p, err := b.start(name, nbdServerArgv(name, b.keel, img, sock))
	if err != nil {
		return nil, err
	}
	if err := b.procs.WaitNBD(ctx, p, NBDURI(sock)); err != nil {
		return nil, fmt.Errorf("keelbench: %s did not come up (see %s): %w", name, filepath.Join(b.logDir, name+".log"), err)
	}
	return p, nil
}

// runNBD: the jobs against keel serve, nbdkit and qemu-nbd, each on a fresh
// copy of the same random image.
func (b *bench) runNBD(ctx context.Context) error {
	size := b.cfg.SizeFor("nbd")
	dir := filepath.Join(b.work, "nbd")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	servers := b.cfg.NBDServers
	b.beginSuite("nbd", servers)
	defer b.endSuite("nbd")
	b.say("nbd: %s of random data, a fresh copy per server: %s", FormatSize(size), strings.Join(servers, ", "))
	master := filepath.Join(dir, "master.img")
	if err := randomImage(master, size); err != nil {
		return err
	}
	procs := map[string]Proc{}
	sock := map[string]string{}
	for _, s := range servers {
		img := filepath.Join(dir, "img."+s)
		if err := copyImage(img, master); err != nil {
			return err
		}
		sock[s] = filepath.Join(dir, s+".sock")
		p, err := b.startPlain(ctx, s, img, sock[s])
		if err != nil {
			return err
		}
		procs[s] = p
	}
	_ = os.Remove(master)
	t := NBDTable(servers, size, b.cfg)
	b.rep.Tables = append(b.rep.Tables, t)
	for _, j := range StdJobs {
		t.Row(j.Name, j.Unit)
	}
	for _, v := range Schedule(b.cfg.Rounds, servers, func(string) []Job { return StdJobs }) {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		r, ok := b.fio(ctx, "nbd", v.Target, roundLabel(v.Job, v.Round), FioRun{Job: v.Job, URI: NBDURI(sock[v.Target]),
			Size: size, Runtime: b.cfg.Runtime, Ramp: b.cfg.Ramp}, pids(procs[v.Target]))
		t.Row(v.Job.Name, v.Job.Unit).Set(v.Target, v.Round, r.Value(v.Job.Unit), ok)
	}
	for _, s := range servers {
		b.noteMem("after the jobs", procs[s])
	}
	return nil
}

// ClusterTable is the cluster suite's table.
func ClusterTable(size int64, c Config, leader, follower string) *Table {
	return &Table{Name: "cluster",
		Title: fmt.Sprintf("cluster: volume %s; %v per job after %v warm-up; %s, targets in turn; cluster = leader %s of 3 voters, follower = %s",
			FormatSize(size), c.Runtime, c.Ramp, rounds(c.Rounds), leader, follower),
		Targets: []string{"cluster", "follower", "keel-serve", "nbdkit"},
		Ratios: []Ratio{{Num: "cluster", Den: []string{"keel-serve"}}, {Num: "cluster", Den: []string{"nbdkit"}},
			{Num: "follower", Den: []string{"cluster"}}},
	}
}

// clusterJobs: a follower forwards writes to the leader; only the write
// jobs run through it.
func clusterJobs(target string) []Job {
	if target == "follower" {
		return []Job{SeqWrite, RandWrite}
	}
	return StdJobs
}

// runCluster: the jobs against a three-node cluster's leader (and the write
// jobs through a follower), keel serve and nbdkit.
func (b *bench) runCluster(ctx context.Context) error {
	size := b.cfg.SizeFor("cluster")
	dir := filepath.Join(b.work, "cluster")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	b.beginSuite("cluster", []string{"n1", "n2", "n3", "keel-serve", "nbdkit"})
	defer b.endSuite("cluster")
	b.say("cluster: three-node cluster of %s; keel serve and nbdkit on copies of a random image", FormatSize(size))
	c, err := b.procs.StartCluster(ctx, ClusterSpec{Keel: b.keel, Dir: dir, Size: size, LogLevel: b.cfg.LogLevel, LogDir: b.logDir})
	if c != nil {
		b.adopt(nodeProcs(c)...)
	}
	if err != nil {
		return err
	}
	leader, _ := c.Node(c.Leader)
	follower := c.Follower()
	b.say("  3 voters; leader %s, follower %s", leader.ID, follower.ID)
	nodes := pids(nodeProcs(c)...)
	prefill, prefilled := b.fio(ctx, "cluster", "cluster", "prefill", FioRun{Job: Fill, URI: NBDURI(leader.Sock), Size: size}, nodes)
	master := filepath.Join(dir, "master.img")
	if err := randomImage(master, size); err != nil {
		return err
	}
	socks := map[string]string{"cluster": leader.Sock, "follower": follower.Sock}
	cpu := map[string]map[string]int{"cluster": nodes, "follower": nodes}
	var plain []Proc
	for _, s := range []string{"keel-serve", "nbdkit"} {
		img := filepath.Join(dir, "img."+s)
		if err := copyImage(img, master); err != nil {
			return err
		}
		socks[s] = filepath.Join(dir, s+".sock")
		p, err := b.startPlain(ctx, s, img, socks[s])
		if err != nil {
			return err
		}
		cpu[s] = pids(p)
		plain = append(plain, p)
	}
	t := ClusterTable(size, b.cfg, leader.ID, follower.ID)
	b.rep.Tables = append(b.rep.Tables, t)
	if prefilled {
		t.Notes = append(t.Notes, fmt.Sprintf("cluster volume first written in full through the leader: %.1f MB/s", prefill.MBps))
	}
	for _, j := range StdJobs {
		t.Row(j.Name, j.Unit)
	}
	for _, v := range Schedule(b.cfg.Rounds, t.Targets, clusterJobs) {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		r, ok := b.fio(ctx, "cluster", v.Target, roundLabel(v.Job, v.Round), FioRun{Job: v.Job, URI: NBDURI(socks[v.Target]),
			Size: size, Runtime: b.cfg.Runtime, Ramp: b.cfg.Ramp}, cpu[v.Target])
		t.Row(v.Job.Name, v.Job.Unit).Set(v.Target, v.Round, r.Value(v.Job.Unit), ok)
	}
	b.checkLeader(ctx, "cluster", c)
	for _, p := range append(nodeProcs(c), plain...) {
		b.noteMem("after the jobs", p)
	}
	t.Notes = append(t.Notes, clusterGoals(t)...)
	if b.cfg.Disk {
		t.Notes = append(t.Notes, b.diskJobs(ctx, master, size))
	}
	if b.cfg.Verify {
		t.Notes = append(t.Notes, b.verify(ctx, c))
	}
	return nil
}

// clusterGoals are the cluster's goals, from the medians.
func clusterGoals(t *Table) []string {
	var sw, rw Row
	for _, r := range t.Rows {
		switch r.Job {
		case SeqWrite.Name:
			sw = r
		case RandWrite.Name:
			rw = r
		}
	}
	c, cok := sw.Median("cluster")
	ratio, rok := RatioOf(Ratio{Num: "cluster", Den: []string{"keel-serve"}}, sw.Median)
	fmtv := func(r Row, tg string) string { v, ok := r.Median(tg); return FormatValue(v, ok, r.Unit) }
	return []string{
		goal("seq write through three replicas >= 300 MB/s", FormatValue(c, cok, UnitMBps)+" MB/s", c >= 300, cok),
		goal("seq write through three replicas >= 0.5x keel serve", FormatRatio(ratio, rok)+"x", ratio >= 0.5, rok),
		fmt.Sprintf("rand 4k write IOPS through three replicas: %s (via a follower %s; keel serve %s; nbdkit %s)",
			fmtv(rw, "cluster"), fmtv(rw, "follower"), fmtv(rw, "keel-serve"), fmtv(rw, "nbdkit")),
	}
}

// diskJobs: what the disk gives one plain fio writer that fdatasyncs every
// 8 MiB (1M writes) or every 32 writes (4k); all replicas share that disk.
func (b *bench) diskJobs(ctx context.Context, master string, size int64) string {
	img := master + ".disk"
	defer os.Remove(img)
	if err := copyImage(img, master); err != nil {
		b.odd("disk jobs: %v", err)
		return "disk jobs: not run"
	}
	res := map[string]string{}
	for _, d := range []struct {
		job  Job
		sync int
	}{{SeqWrite, 8}, {RandWrite, 32}} {
		out := filepath.Join(b.fioDir, "cluster-disk-"+d.job.Name+".json")
		run := DiskRun{Job: d.job, File: img, Size: size, Sync: d.sync, Runtime: b.cfg.Runtime, Ramp: b.cfg.Ramp, Output: out}
		r, ok := b.fioArgs(ctx, "cluster-disk-"+d.job.Name, "disk", d.job.Name, run.Args(), out, nil)
		res[d.job.Name] = FormatValue(r.Value(d.job.Unit), ok, d.job.Unit)
		if d.job == SeqWrite && ok {
			b.lastDiskMBps = r.MBps
		}
	}
	return fmt.Sprintf("disk, one fio writer on a file (psync, no NBD): 1M writes with fdatasync every 8: %s MB/s; "+
		"4k random writes with fdatasync every 32: %s IOPS", res[SeqWrite.Name], res[RandWrite.Name])
}

// verify runs keel verify: is every voter byte-identical?
func (b *bench) verify(ctx context.Context, c *Cluster) string {
	log := filepath.Join(b.logDir, "verify.log")
	b.say("  keel verify")
	if err := b.procs.Run(ctx, []string{b.keel, "verify", "--http", c.Nodes[0].HTTP, "--timeout", "2m"}, log); err != nil {
		b.odd("keel verify: %v", err)
		return "keel verify after the jobs: FAILED (" + log + ")"
	}
	return "keel verify after the jobs: every voter byte-identical"
}
