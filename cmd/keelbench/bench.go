package main

import (
	"context"
	crand "crypto/rand"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/keelstore/keel/services/wire"
)

// bench is one run of the driver: its settings, its children and the
// report it fills.
type bench struct {
	cfg    Config
	procs  Procs
	http   *wire.Client
	out    io.Writer // progress
	rep    *Report
	work   string // this run's directory under the data dir
	fioDir string // Out/fio: fio's JSON
	logDir string // Out/logs: every child's output
	keel   string // the keel binary
	// quietTick is how often waitQuiet samples the CPU (default 1s).
	quietTick time.Duration

	// goals: the proxy suite also runs the goals suite's jobs (rand-write
	// at QD1, warm seq-read, the write jobs against keel serve) and keeps
	// the figures the goals are judged by in fig.
	goals bool
	fig   *figures
	// lastDiskMBps is the last diskJobs' durable 1M write bandwidth.
	lastDiskMBps float64

	live []Proc     // the running suite's children, in start order
	cpu  *Section   // the running suite's CPU figures
	gib  *Section   // the same as CPU-seconds per GiB moved
	mem  [][]string // the running suite's memory figures
}

func (b *bench) say(format string, a ...any) {
	fmt.Fprintf(b.out, "keelbench: "+format+"\n", a...)
}

// odd records something that went wrong or looked wrong.
func (b *bench) odd(format string, a ...any) {
	s := fmt.Sprintf(format, a...)
	fmt.Fprintf(b.out, "keelbench: NOTE: %s\n", s)
	b.rep.Odd = append(b.rep.Odd, s)
}

// start starts a child of the running suite.
func (b *bench) start(name string, argv []string) (Proc, error) {
	p, err := b.procs.Start(name, argv, filepath.Join(b.logDir, name+".log"))
	if err == nil {
		b.live = append(b.live, p)
	}
	return p, err
}

// adopt makes p one of the running suite's children.
func (b *bench) adopt(ps ...Proc) { b.live = append(b.live, ps...) }

// stopLive stops the running suite's children, the newest first.
func (b *bench) stopLive() {
	for i := len(b.live) - 1; i >= 0; i-- {
		if err := b.live[i].Stop(); err != nil {
			b.odd("%v", err)
		}
	}
	b.live = nil
}

// noteMem records p's memory now (its peak is VmHWM).
func (b *bench) noteMem(when string, p Proc) {
	m, err := ReadMem(p.PID())
	if err != nil {
		b.odd("memory of %s: %v", p.Name(), err)
		return
	}
	if b.fig != nil {
		b.fig.notePeak(p.Name(), m.VmHWM)
	}
	mib := func(n int64) string { return fmt.Sprintf("%.0f", float64(n)/(1<<20)) }
	b.mem = append(b.mem, []string{p.Name(), when, mib(m.VmRSS), mib(m.VmHWM), mib(m.RssAnon), mib(m.RssFile)})
}

// beginSuite resets the per-suite figures.
func (b *bench) beginSuite(suite string, cpuNames []string) {
	b.cpu = &Section{Title: suite + ": CPU while each job ran, % of one core (machine: all processes, of " +
		strconv.Itoa(runtime.NumCPU()*100) + "%)", Grid: &Grid{Head: append(append([]string{"target", "job"}, cpuNames...), "machine")}}
	b.gib = &Section{Title: suite + ": CPU-seconds per GiB the job moved, each process (the robust figure on a noisy machine; CPU over the whole run, ramp included, over fio's bytes per second)",
		Grid: &Grid{Head: append([]string{"target", "job"}, cpuNames...)}}
	b.mem = nil
}

// endSuite stops the suite's children and files its figures.
func (b *bench) endSuite(suite string) {
	b.stopLive()
	if b.cpu != nil && len(b.cpu.Grid.Body) > 0 {
		b.rep.Sections = append(b.rep.Sections, *b.cpu)
	}
	if b.gib != nil && len(b.gib.Grid.Body) > 0 {
		b.rep.Sections = append(b.rep.Sections, *b.gib)
	}
	if len(b.mem) > 0 {
		b.rep.Sections = append(b.rep.Sections, Section{
			Title: suite + ": memory, MiB (VmHWM is the peak since the process started)",
			Grid:  &Grid{Head: []string{"process", "when", "VmRSS", "VmHWM", "RssAnon", "RssFile"}, Body: b.mem},
		})
	}
	b.cpu, b.gib, b.mem = nil, nil, nil
}

// fio is one fio run of the suite: target names the column, cpu the
// processes whose CPU is shown (name -> pid); the progress line and the
// CPU row are written as it ends.
func (b *bench) fio(ctx context.Context, suite, target, label string, run FioRun, cpu map[string]int) (FioResult, bool) {
	stem := fmt.Sprintf("%s-%s-%s", suite, target, label)
	run.Output = filepath.Join(b.fioDir, stem+".json")
	return b.fioArgs(ctx, stem, target, label, run.Args(), run.Output, cpu)
}

func (b *bench) fioArgs(ctx context.Context, stem, target, label string, args []string, output string, cpu map[string]int) (FioResult, bool) {
	fmt.Fprintf(b.out, "keelbench:   %-14s %-16s ", target, label)
	before, _ := ReadCPU(cpu)
	err := b.procs.Run(ctx, append([]string{"fio"}, args...), filepath.Join(b.logDir, "fio-"+stem+".out"))
	after, _ := ReadCPU(cpu)
	if err != nil {
		fmt.Fprintln(b.out, "fio failed")
		if ctx.Err() == nil {
			b.odd("fio %s against %s failed: %v", label, target, err)
		}
		return FioResult{}, false
	}
	data, err := os.ReadFile(output)
	if err != nil {
		fmt.Fprintln(b.out, "no output")
		b.odd("fio %s against %s: %v", label, target, err)
		return FioResult{}, false
	}
	r, err := ParseFio(data)
	if err != nil {
		fmt.Fprintln(b.out, "unreadable output")
		b.odd("fio %s against %s: %s: %v", label, target, output, err)
		return FioResult{}, false
	}
	use := CPUBetween(before, after, runtime.NumCPU())
	fmt.Fprintf(b.out, "%s  | %s\n", r, cpuLine(use))
	if b.cpu != nil && len(cpu) > 0 {
		row := []string{target, label}
		for _, n := range b.cpu.Grid.Head[2 : len(b.cpu.Grid.Head)-1] {
			if v, ok := use.Procs[n]; ok {
				row = append(row, fmt.Sprintf("%.0f", v))
			} else {
				row = append(row, "-")
			}
		}
		b.cpu.Grid.Body = append(b.cpu.Grid.Body, append(row, fmt.Sprintf("%.0f", use.Machine)))
	}
	if b.gib != nil && len(cpu) > 0 && r.MBps > 0 {
		row := []string{target, label}
		for _, n := range b.gib.Grid.Head[2:] {
			if v, ok := use.Procs[n]; ok {
				if b.fig != nil && r.Error == 0 {
					b.fig.addGiB(target, label, n, CPUSecondsPerGiB(v, r.MBps))
				}
				row = append(row, fmt.Sprintf("%.1f", CPUSecondsPerGiB(v, r.MBps)))
			} else {
				row = append(row, "-")
			}
		}
		b.gib.Grid.Body = append(b.gib.Grid.Body, row)
	}
	if r.Error != 0 {
		b.odd("fio %s against %s reported error %d", label, target, r.Error)
		return r, false
	}
	if b.fig != nil {
		b.fig.addLatency(target, label, r)
	}
	return r, true
}

func cpuLine(u CPUUse) string {
	var names []string
	for n := range u.Procs {
		names = append(names, n)
	}
	sort.Strings(names)
	var parts []string
	for _, n := range names {
		parts = append(parts, fmt.Sprintf("%s %.0f%%", n, u.Procs[n]))
	}
	machine := fmt.Sprintf("machine %.0f%% of %d00%%", u.Machine, runtime.NumCPU())
	if len(parts) == 0 {
		return machine
	}
	return "CPU " + strings.Join(parts, " ") + "; " + machine
}

// roundLabel names a job's run in round r (0-based).
func roundLabel(j Job, r int) string { return fmt.Sprintf("%s-r%d", j.Name, r+1) }

// randomImage writes size bytes of pseudo-random data (incompressible,
// never zero pages) to path and syncs it.
func randomImage(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("keelbench: image: %w", err)
	}
	var seed [32]byte
	_, _ = crand.Read(seed[:]) // never fails on Linux
	src := rand.NewChaCha8(seed)
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		n := min(int64(len(buf)), size-off)
		_, _ = src.Read(buf[:n])
		if _, err := f.Write(buf[:n]); err != nil {
			f.Close()
			return fmt.Errorf("keelbench: image: %w", err)
		}
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("keelbench: image: %w", err)
	}
	return f.Close()
}

// copyImage copies src to dst in full (no holes) and syncs dst, so that no
// server starts with a warmer or sparser file than another.
func copyImage(dst, src string) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("keelbench: copy: %w", err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return fmt.Errorf("keelbench: copy: %w", err)
	}
	if _, err := io.CopyBuffer(struct{ io.Writer }{out}, in, make([]byte, 1<<20)); err != nil {
		out.Close()
		return fmt.Errorf("keelbench: copy: %w", err)
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return fmt.Errorf("keelbench: copy: %w", err)
	}
	return out.Close()
}

// pids maps names to the processes' ids.
func pids(ps ...Proc) map[string]int {
	m := map[string]int{}
	for _, p := range ps {
		if p != nil {
			m[p.Name()] = p.PID()
		}
	}
	return m
}

func nodeProcs(c *Cluster) []Proc {
	var ps []Proc
	for _, n := range c.Nodes {
		ps = append(ps, n.Proc)
	}
	return ps
}

// leaderNow asks n1 who leads.
func (b *bench) leaderNow(ctx context.Context, c *Cluster) string {
	cs, err := b.http.Cluster(ctx, c.Nodes[0].HTTP)
	if err != nil {
		return "? (" + err.Error() + ")"
	}
	return cs.Leader
}

// checkLeader notes a leader change during a suite.
func (b *bench) checkLeader(ctx context.Context, suite string, c *Cluster) {
	if now := b.leaderNow(ctx, c); now != c.Leader {
		b.odd("%s: the leader changed from %s to %s during the jobs", suite, c.Leader, now)
	}
}

// goal is a goal line: what, the figure, MET or MISSED ("-" without a figure).
func goal(what, figure string, ok, known bool) string {
	verdict := "-"
	if known && ok {
		verdict = "MET"
	} else if known {
		verdict = "MISSED"
	}
	return fmt.Sprintf("goal: %s: %s %s", what, figure, verdict)
}
