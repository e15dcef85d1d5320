package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
)

// The goals suite runs the proxy suite twice, with the data on a tmpfs and
// on a disk, adding rand-write at QD1, a warm seq-read and the write jobs
// against keel serve (the CPU baseline), and the disk's own durable write
// bandwidth on the disk. It ends with one table: each of issue 9's goals,
// the figure reached in each place and whether it was met.

// Place is where one pass of the goals suite keeps its data.
type Place struct {
	Name string // "tmpfs", "disk"
	Dir  string
}

// goalWriteJobs: the proxy and the leader run the three write jobs; keel
// serve runs them for the CPU baseline.
func goalWriteJobs(target string) []Job {
	switch target {
	case "proxy", "leader", "keel-serve":
		return []Job{SeqWrite, RandWrite, RandWrite1}
	}
	return nil
}

// figures are what one pass measured beyond the table: CPU-seconds per
// GiB per process and job, latency per target and job, peak RSS per
// process.
type figures struct {
	gib  map[string]map[string][]float64 // "target job" -> process -> rounds
	p50  map[string][]float64            // "target job" -> rounds, ms
	p99  map[string][]float64
	peak map[string]int64 // process -> largest VmHWM seen, bytes
	// diskMBps is the disk's durable 1M write bandwidth (0: not measured).
	diskMBps float64
}

func newFigures() *figures {
	return &figures{gib: map[string]map[string][]float64{}, p50: map[string][]float64{},
		p99: map[string][]float64{}, peak: map[string]int64{}}
}

var roundSuffix = regexp.MustCompile(`-r[0-9]+$`)

// key is "target job": label without its round suffix.
func key(target, label string) string { return target + " " + roundSuffix.ReplaceAllString(label, "") }

func (f *figures) addGiB(target, label, proc string, v float64) {
	k := key(target, label)
	if f.gib[k] == nil {
		f.gib[k] = map[string][]float64{}
	}
	f.gib[k][proc] = append(f.gib[k][proc], v)
}

func (f *figures) addLatency(target, label string, r FioResult) {
	k := key(target, label)
	if r.ClatP50Ms > 0 {
		f.p50[k] = append(f.p50[k], r.ClatP50Ms)
	}
	if r.ClatP99Ms > 0 {
		f.p99[k] = append(f.p99[k], r.ClatP99Ms)
	}
}

func (f *figures) notePeak(proc string, hwm int64) {
	if hwm > f.peak[proc] {
		f.peak[proc] = hwm
	}
}

// medianOf is the median of vs.
func medianOf(vs []float64) (float64, bool) {
	ps := make([]*float64, len(vs))
	for i := range vs {
		ps[i] = &vs[i]
	}
	return Median(ps)
}

// GoalLine is one goal judged in each place.
type GoalLine struct {
	Goal   string
	Places map[string]string // place -> figure and verdict
}

// judge returns figure and verdict as one cell.
func judge(figure string, ok, known bool) string {
	switch {
	case !known:
		return figure + " (not measured)"
	case ok:
		return figure + " MET"
	}
	return figure + " MISSED"
}

// Goals judges issue 9's goals from one pass's proxy table and figures.
// The targets for the data on a tmpfs and on a disk differ where the
// issue says so; tmpfs is true for the tmpfs pass.
func Goals(t *Table, f *figures, tmpfs bool) []GoalLine {
	row := func(job string) Row {
		for _, r := range t.Rows {
			if r.Job == job {
				return r
			}
		}
		return Row{Rounds: map[string][]*float64{}}
	}
	med := func(job, target string) (float64, bool) { return row(job).Median(target) }
	ratio := func(job, num, den string) (float64, bool) {
		return RatioOf(Ratio{Num: num, Den: []string{den}}, row(job).Median)
	}
	var out []GoalLine
	add := func(goal, cell string) {
		out = append(out, GoalLine{Goal: goal, Places: map[string]string{placeName(tmpfs): cell}})
	}

	sw, swok := med(SeqWrite.Name, "proxy")
	if tmpfs {
		add("seq write 1M QD8 through the proxy: >= 300 MB/s on tmpfs, >= 0.7x the disk's ceiling (its durable 1M write bandwidth / 6) on disk",
			judge(fmt.Sprintf("%.0f MB/s", sw), sw >= 300, swok))
	} else {
		ceiling := f.diskMBps / 6
		add("seq write 1M QD8 through the proxy: >= 300 MB/s on tmpfs, >= 0.7x the disk's ceiling (its durable 1M write bandwidth / 6) on disk",
			judge(fmt.Sprintf("%.0f MB/s = %.2fx of %.0f MB/s", sw, sw/ceiling, ceiling), sw >= 0.7*ceiling, swok && f.diskMBps > 0))
	}
	rw, rwok := med(RandWrite.Name, "proxy")
	want := 8000.0
	if tmpfs {
		want = 15000
	}
	add("rand write 4k QD32 through the proxy: >= 15k IOPS on tmpfs, >= 8k on disk", judge(fmt.Sprintf("%.0f IOPS", rw), rw >= want, rwok))
	r1, r1ok := med(RandWrite1.Name, "proxy")
	add("rand write 4k QD1 through the proxy: >= 2,000 IOPS", judge(fmt.Sprintf("%.0f IOPS", r1), r1 >= 2000, r1ok))
	for _, j := range []string{RandReadCold.Name, SeqReadCold.Name} {
		v, ok := ratio(j, "proxy", "leader")
		add(j+" through the proxy (volume larger than the cache): >= 0.8x a direct connection to a replica", judge(fmt.Sprintf("%.2fx", v), v >= 0.8, ok))
	}
	v, ok := ratio(RandRead.Name, "proxy", "nbdkit")
	add("warm rand read 4k QD32 through the proxy: >= 1.0x nbdkit file", judge(fmt.Sprintf("%.2fx", v), v >= 1, ok))
	v, ok = ratio(SeqRead.Name, "proxy", "nbdkit")
	add("warm seq read 1M QD8 through the proxy, against nbdkit file (no goal; for the record)", fmt.Sprintf("%.2fx", v)+map[bool]string{true: "", false: " (not measured)"}[ok])

	// CPU per GiB written: each server through the proxy against keel serve.
	for _, j := range []Job{SeqWrite, RandWrite} {
		base, bok := medianOf(f.gib["keel-serve "+j.Name]["keel-serve"])
		worst, wname, wok := 0.0, "", false
		for _, n := range []string{"n1", "n2", "n3"} {
			if m, ok := medianOf(f.gib["proxy "+j.Name][n]); ok && m > worst {
				worst, wname, wok = m, n, true
			}
		}
		add(fmt.Sprintf("server CPU-seconds per GiB written (%s through the proxy, the busiest server): <= 4x keel serve", j.Name),
			judge(fmt.Sprintf("%s %.1f vs %.1f = %.1fx", wname, worst, base, worst/base), worst <= 4*base, wok && bok && base > 0))
	}
	// Peak RSS of every server.
	var peak int64
	var pname string
	for _, n := range []string{"n1", "n2", "n3"} {
		if f.peak[n] > peak {
			peak, pname = f.peak[n], n
		}
	}
	add("server peak RSS (VmHWM) under load: < 256 MiB", judge(fmt.Sprintf("%s %.0f MiB", pname, float64(peak)/(1<<20)), peak < 256<<20, peak > 0))

	// Latency, for the record.
	for _, j := range []Job{SeqWrite, RandWrite, RandWrite1, RandRead} {
		for _, tg := range []string{"proxy", "leader", "nbdkit", "keel-serve"} {
			p50, ok50 := medianOf(f.p50[tg+" "+j.Name])
			p99, ok99 := medianOf(f.p99[tg+" "+j.Name])
			if ok50 || ok99 {
				add(fmt.Sprintf("latency %s via %s, p50 / p99 (for the record)", j.Name, tg), fmt.Sprintf("%.2f / %.2f ms", p50, p99))
			}
		}
	}
	return out
}

func placeName(tmpfs bool) string {
	if tmpfs {
		return "tmpfs"
	}
	return "disk"
}

// MergeGoals joins passes' lines goal by goal, in first-seen order.
func MergeGoals(passes ...[]GoalLine) []GoalLine {
	var out []GoalLine
	idx := map[string]int{}
	for _, p := range passes {
		for _, l := range p {
			i, ok := idx[l.Goal]
			if !ok {
				idx[l.Goal] = len(out)
				out = append(out, GoalLine{Goal: l.Goal, Places: map[string]string{}})
				i = len(out) - 1
			}
			for k, v := range l.Places {
				out[i].Places[k] = v
			}
		}
	}
	return out
}

// GoalsSection is the goals table as a report section.
func GoalsSection(lines []GoalLine, places []Place) Section {
	head := []string{"goal"}
	for _, p := range places {
		head = append(head, p.Name)
	}
	g := &Grid{Head: head}
	for _, l := range lines {
		row := []string{l.Goal}
		for _, p := range places {
			c := l.Places[p.Name]
			if c == "" {
				c = "-"
			}
			row = append(row, c)
		}
		g.Body = append(g.Body, row)
	}
	return Section{Title: "goals (issue 9): the figure reached in each place, from the medians", Grid: g}
}

// runGoals runs the proxy suite in each place (goals jobs on), the disk's
// ceiling where the data is on a disk, and files the goals table.
func (b *bench) runGoals(ctx context.Context, places []Place) error {
	var passes [][]GoalLine
	for _, p := range places {
		if ctx.Err() != nil {
			break
		}
		fs := fsType(p.Dir)
		b.say("goals: data on %s (%s, %s)", p.Name, p.Dir, fs)
		if (p.Name == "tmpfs") != (fs == "tmpfs") {
			b.odd("goals: --%s-dir %s is on %s", p.Name, p.Dir, fs)
		}
		work, err := os.MkdirTemp(p.Dir, "keelbench-")
		if err != nil {
			return fmt.Errorf("keelbench: --%s-dir: %w", p.Name, err)
		}
		if len(work) > 70 {
			os.RemoveAll(work)
			return fmt.Errorf("%w: --%s-dir %s is too long for unix socket paths", ErrConfig, p.Name, work)
		}
		b.work, b.goals, b.fig = work, true, newFigures()
		if p.Name != "tmpfs" {
			master := filepath.Join(work, "ceiling.img")
			if err := randomImage(master, b.cfg.SizeFor("proxy")); err == nil {
				b.say("  the disk's own durable write bandwidth")
				b.diskJobs(ctx, master, b.cfg.SizeFor("proxy"))
				os.Remove(master)
			} else {
				b.odd("goals: the disk's ceiling: %v", err)
			}
			b.fig.diskMBps = b.lastDiskMBps
		}
		n := len(b.rep.Tables)
		err = b.runProxy(ctx)
		os.RemoveAll(work)
		if len(b.rep.Tables) > n {
			t := b.rep.Tables[n]
			t.Name = "proxy-" + p.Name
			t.Title = "data on " + p.Name + " (" + fs + "): " + t.Title
			passes = append(passes, Goals(t, b.fig, p.Name == "tmpfs"))
		}
		if err != nil {
			b.odd("goals: the pass on %s stopped early: %v; its figures are partial", p.Name, err)
		}
		b.say("load average after the pass on %s: %s", p.Name, loadavg())
	}
	sec := GoalsSection(MergeGoals(passes...), places)
	b.rep.Sections = append([]Section{sec}, b.rep.Sections...)
	return nil
}
