package main

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseFio(t *testing.T) {
	for _, tc := range []struct {
		file       string
		dir        string
		mbps, iops float64
		p99        float64
	}{
		{"testdata/fio-randread.json", "read", 464.100123, 113305.694306, 0.577536},
		{"testdata/fio-seqwrite.json", "write", 1647.016286, 1570.717131, -1},
	} {
		data, err := os.ReadFile(tc.file)
		if err != nil {
			t.Fatal(err)
		}
		r, err := ParseFio(data)
		if err != nil {
			t.Fatalf("%s: %v", tc.file, err)
		}
		if r.Dir != tc.dir || math.Abs(r.MBps-tc.mbps) > 1e-6 || math.Abs(r.IOPS-tc.iops) > 1e-6 || r.Error != 0 {
			t.Errorf("%s: got %+v", tc.file, r)
		}
		if tc.p99 >= 0 && math.Abs(r.ClatP99Ms-tc.p99) > 1e-9 {
			t.Errorf("%s: clat p99 %v ms, want %v", tc.file, r.ClatP99Ms, tc.p99)
		}
		// fio may print diagnostics before its JSON.
		r2, err := ParseFio(append([]byte("fio: nbd_connect_uri: something\n"), data...))
		if err != nil || r2 != r {
			t.Errorf("%s with a leading line: %+v, %v", tc.file, r2, err)
		}
	}
	for _, bad := range []string{"", "fio: failed", `{"jobs": []}`, `{"jobs": [`} {
		if _, err := ParseFio([]byte(bad)); !errors.Is(err, ErrFioOutput) {
			t.Errorf("ParseFio(%q) = %v, want ErrFioOutput", bad, err)
		}
	}
}

func TestFioArgs(t *testing.T) {
	got := strings.Join(FioRun{Job: RandRead, URI: NBDURI("/s"), Size: 1 << 20, Runtime: 3 * time.Second,
		Ramp: 2 * time.Second, Output: "o.json"}.Args(), " ")
	want := "--name=rand-read --ioengine=nbd --uri=nbd+unix:///?socket=/s --rw=randread --bs=4k --iodepth=32 " +
		"--size=1048576 --time_based --runtime=3 --ramp_time=2 --output-format=json --output=o.json"
	if got != want {
		t.Errorf("args\n got %s\nwant %s", got, want)
	}
	got = strings.Join(FioRun{Job: Fill, URI: "u", Size: 4096, Output: "f"}.Args(), " ")
	if strings.Contains(got, "time_based") || !strings.Contains(got, "--rw=write") {
		t.Errorf("one-pass args: %s", got)
	}
}

func f(v float64) *float64 { return &v }

func TestMedian(t *testing.T) {
	for _, tc := range []struct {
		in   []*float64
		want float64
		ok   bool
	}{
		{nil, 0, false},
		{[]*float64{nil, nil}, 0, false},
		{[]*float64{f(3)}, 3, true},
		{[]*float64{f(5), f(1), f(3)}, 3, true},
		{[]*float64{f(4), nil, f(1), f(2), f(10)}, 3, true},
	} {
		got, ok := Median(tc.in)
		if got != tc.want || ok != tc.ok {
			t.Errorf("Median(%v) = %v, %v; want %v, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func sampleTable() *Table {
	t := &Table{
		Name: "nbd", Title: "nbd: test",
		Targets: []string{"keel", "nbdkit", "qemu-nbd"},
		Ratios: []Ratio{{Num: "keel", Den: []string{"nbdkit"}}, {Num: "keel", Den: []string{"qemu-nbd"}},
			{Num: "keel", Den: []string{"nbdkit", "qemu-nbd"}, Label: "keel/best"}},
	}
	r := t.Row("seq-write", UnitMBps)
	r.Set("keel", 0, 100, true)
	r.Set("keel", 1, 300, true)
	r.Set("nbdkit", 0, 200, true)
	r.Set("nbdkit", 1, 200, true)
	r.Set("qemu-nbd", 0, 0, false)
	r.Set("qemu-nbd", 1, 400, true)
	r = t.Row("rand-read", UnitIOPS)
	r.Set("keel", 0, 1000, true)
	r.Set("nbdkit", 0, 500, true)
	r.Set("qemu-nbd", 1, 2000, true) // round 0 missing altogether
	return t
}

func TestRatios(t *testing.T) {
	tb := sampleTable()
	seq := tb.Rows[0]
	for i, want := range []string{"1.00", "0.50", "0.50"} {
		v, ok := RatioOf(tb.Ratios[i], seq.Median)
		if got := FormatRatio(v, ok); got != want {
			t.Errorf("median ratio %s = %s, want %s", tb.Ratios[i].Head(), got, want)
		}
	}
	// Round 1: qemu-nbd failed, so keel/best is over nbdkit only.
	at0 := func(tg string) (float64, bool) { return seq.At(tg, 0) }
	if v, ok := RatioOf(tb.Ratios[2], at0); FormatRatio(v, ok) != "0.50" {
		t.Errorf("round 1 keel/best = %v %v", v, ok)
	}
	if _, ok := RatioOf(tb.Ratios[1], at0); ok {
		t.Errorf("round 1 keel/qemu-nbd exists though qemu-nbd failed")
	}
	if _, ok := RatioOf(Ratio{Num: "a", Den: []string{"b"}}, func(tg string) (float64, bool) { return 0, true }); ok {
		t.Errorf("a ratio over zero exists")
	}
}

func TestGrids(t *testing.T) {
	tb := sampleTable()
	wantText := `  job        unit   keel  nbdkit  qemu-nbd  keel/nbdkit  keel/qemu-nbd  keel/best
  seq-write  MB/s  200.0   200.0     400.0         1.00           0.50       0.50
  rand-read  IOPS   1000     500      2000         2.00           0.50       0.50
`
	if got := tb.MedianGrid().Text("  "); got != wantText {
		t.Errorf("median text\n%s\nwant\n%s", got, wantText)
	}
	wantRounds := `job           unit   keel  nbdkit  qemu-nbd  keel/nbdkit  keel/qemu-nbd  keel/best
seq-write r1  MB/s  100.0   200.0         -         0.50              -       0.50
seq-write r2  MB/s  300.0   200.0     400.0         1.50           0.75       0.75
rand-read r1  IOPS   1000     500         -         2.00              -       2.00
rand-read r2  IOPS      -       -      2000            -              -          -
`
	if got := tb.RoundsGrid().Text(""); got != wantRounds {
		t.Errorf("rounds text\n%s\nwant\n%s", got, wantRounds)
	}
	wantMD := `| job | unit | keel | nbdkit | qemu-nbd | keel/nbdkit | keel/qemu-nbd | keel/best |
| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |
| seq-write | MB/s | 200.0 | 200.0 | 400.0 | 1.00 | 0.50 | 0.50 |
| rand-read | IOPS | 1000 | 500 | 2000 | 2.00 | 0.50 | 0.50 |
`
	if got := tb.MedianGrid().Markdown(); got != wantMD {
		t.Errorf("markdown\n%s\nwant\n%s", got, wantMD)
	}
}

// svgTexts checks that data is well-formed XML with an <svg> root and
// returns the character data of its text elements.
func svgTexts(t *testing.T, data []byte) []string {
	t.Helper()
	d := xml.NewDecoder(bytes.NewReader(data))
	var texts []string
	root, inText := "", false
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("SVG is not well-formed XML: %v", err)
		}
		switch e := tok.(type) {
		case xml.StartElement:
			if root == "" {
				root = e.Name.Local
			}
			inText = e.Name.Local == "text"
		case xml.CharData:
			if inText {
				texts = append(texts, strings.TrimSpace(string(e)))
			}
		case xml.EndElement:
			inText = false
		}
	}
	if root != "svg" {
		t.Fatalf("root element %q, want svg", root)
	}
	return texts
}

func TestChart(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteChart(&buf, sampleTable()); err != nil {
		t.Fatal(err)
	}
	texts := strings.Join(svgTexts(t, buf.Bytes()), "\n")
	// Panel titles, the targets under the bars and the medians above them.
	for _, want := range []string{"seq-write", "rand-read", "keel", "nbdkit", "qemu-nbd", "200.0", "400.0", "1000", "2000", "MB/s (median)", "IOPS (median)"} {
		if !strings.Contains(texts, want) {
			t.Errorf("chart has no text %q; texts:\n%s", want, texts)
		}
	}
	if err := WriteChart(io.Discard, &Table{Name: "empty"}); err == nil {
		t.Errorf("a chart of no rows drew")
	}
	// An interrupted run: rows that no target ran yet still draw.
	tb := &Table{Name: "cut", Targets: []string{"keel", "nbdkit"}}
	tb.Row("seq-write", UnitMBps)
	buf.Reset()
	if err := WriteChart(&buf, tb); err != nil {
		t.Fatalf("a chart of an interrupted run: %v", err)
	}
	if texts := strings.Join(svgTexts(t, buf.Bytes()), "\n"); !strings.Contains(texts, "nbdkit") {
		t.Errorf("an empty panel has no target names: %s", texts)
	}
}

func TestReportWriteDir(t *testing.T) {
	dir := t.TempDir()
	r := &Report{Suite: "nbd", Header: []string{"2 CPUs"}, Tables: []*Table{sampleTable()},
		Sections: []Section{{Title: "CPU", Grid: &Grid{Head: []string{"target", "job"}, Body: [][]string{{"keel", "seq-write"}}}}},
		Odd:      []string{"qemu-nbd failed once"}}
	if err := r.WriteDir(dir); err != nil {
		t.Fatal(err)
	}
	md, err := os.ReadFile(filepath.Join(dir, "results.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"![nbd](nbd.svg)", "| seq-write | MB/s | 200.0 |", "| seq-write r2 | MB/s | 300.0 |",
		"## CPU", "| keel | seq-write |", "* qemu-nbd failed once"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("results.md has no %q:\n%s", want, md)
		}
	}
	svg, err := os.ReadFile(filepath.Join(dir, "nbd.svg"))
	if err != nil {
		t.Fatal(err)
	}
	svgTexts(t, svg)
	js, err := os.ReadFile(filepath.Join(dir, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	var back struct {
		Tables []struct {
			Rows []struct {
				Job    string
				Rounds map[string][]*float64
			}
			Medians []struct {
				Job     string
				Targets map[string]*float64
				Ratios  map[string]*float64
			}
		}
	}
	if err := json.Unmarshal(js, &back); err != nil {
		t.Fatal(err)
	}
	m := back.Tables[0].Medians[0]
	if m.Job != "seq-write" || *m.Targets["keel"] != 200 || *m.Ratios["keel/best"] != 0.5 {
		t.Errorf("medians in JSON: %+v", m)
	}
	if back.Tables[0].Rows[0].Rounds["qemu-nbd"][0] != nil {
		t.Errorf("a failed round is not null in JSON")
	}
}

func TestProcStat(t *testing.T) {
	total, idle, err := ParseMachineStat("cpu  100 5 50 800 40 0 5 0 0 0\ncpu0 1 2 3\n")
	if err != nil || total != 1000 || idle != 840 {
		t.Errorf("machine: %d %d %v", total, idle, err)
	}
	if _, _, err := ParseMachineStat("intr 1 2"); err == nil {
		t.Errorf("a stat without a cpu line parsed")
	}
	v, err := ParseProcStat("4242 (keel (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 12 0 1")
	if err != nil || v != 300 {
		t.Errorf("proc stat: %d %v", v, err)
	}
	m := ParseStatus("Name:\tkeel\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nRssAnon:\t 512 kB\nRssFile:\t 512 kB\n")
	if m != (Mem{VmRSS: 1 << 20, VmHWM: 2 << 20, RssAnon: 512 << 10, RssFile: 512 << 10}) {
		t.Errorf("status: %+v", m)
	}
	// 2 CPUs, 10 s of wall time = 2000 jiffies; the machine was idle for
	// 1000 of them (50% of 200%); n1 used 500 jiffies = 5 s = 50% of a core.
	a := CPUSnap{Total: 0, Idle: 0, Procs: map[string]uint64{"n1": 100, "gone": 1}}
	b := CPUSnap{Total: 2000, Idle: 1000, Procs: map[string]uint64{"n1": 600, "new": 5}}
	u := CPUBetween(a, b, 2)
	if u.Machine != 100 || u.Procs["n1"] != 50 || len(u.Procs) != 1 {
		t.Errorf("CPU: %+v", u)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"512": 512, "4k": 4096, "256M": 256 << 20, "1G": 1 << 30, "1GiB": 1 << 30, "2T": 2 << 40} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "M", "-1G", "1.5G", "1X"} {
		if _, err := ParseSize(in); !errors.Is(err, ErrConfig) {
			t.Errorf("ParseSize(%q) = %v, want ErrConfig", in, err)
		}
	}
	if FormatSize(384<<20) != "384M" || FormatSize(1<<30) != "1G" || FormatSize(1000) != "1000" {
		t.Errorf("FormatSize: %s %s %s", FormatSize(384<<20), FormatSize(1<<30), FormatSize(1000))
	}
}

func validConfig() Config {
	return Config{Runtime: 3 * time.Second, Ramp: time.Second, Rounds: 1, Out: "o", LogLevel: "info",
		NBDServers: KnownNBDServers, Cache: 256 << 20, WSet: 192 << 20}
}

func TestConfigValidate(t *testing.T) {
	all := []string{"nbd", "cluster", "proxy"}
	if err := validConfig().Validate(all); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	for name, mod := range map[string]func(*Config){
		"--size":        func(c *Config) { c.Size = 1000 },
		"--runtime":     func(c *Config) { c.Runtime = 0 },
		"--ramp":        func(c *Config) { c.Ramp = -time.Second },
		"--rounds":      func(c *Config) { c.Rounds = 0 },
		"--out":         func(c *Config) { c.Out = "" },
		"--nbd-servers": func(c *Config) { c.NBDServers = []string{"nbd-server"} },
		"--wset":        func(c *Config) { c.WSet = c.Cache },
	} {
		c := validConfig()
		mod(&c)
		err := c.Validate(all)
		if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: %v", name, err)
		}
	}
	// The working set may exceed a small size only if the proxy suite does not run.
	c := validConfig()
	c.Size = 128 << 20
	if c.Validate([]string{"nbd"}) != nil || c.Validate([]string{"proxy"}) == nil {
		t.Errorf("--wset above --size: the proxy suite should refuse it, the nbd suite not")
	}
}

func TestSchedule(t *testing.T) {
	jobs := func(tg string) []Job {
		if tg == "follower" {
			return []Job{SeqWrite}
		}
		return []Job{SeqWrite, RandRead}
	}
	var got []string
	for _, v := range Schedule(2, []string{"cluster", "follower", "nbdkit"}, jobs) {
		got = append(got, fmt.Sprintf("%d:%s:%s", v.Round, v.Target, v.Job.Name))
	}
	want := "0:cluster:seq-write 0:cluster:rand-read 0:follower:seq-write 0:nbdkit:seq-write 0:nbdkit:rand-read " +
		"1:cluster:seq-write 1:cluster:rand-read 1:follower:seq-write 1:nbdkit:seq-write 1:nbdkit:rand-read"
	if strings.Join(got, " ") != want {
		t.Errorf("schedule\n got %s\nwant %s", strings.Join(got, " "), want)
	}
}

func TestSuiteTables(t *testing.T) {
	c := validConfig()
	heads := func(tb *Table) string {
		var h []string
		for _, r := range tb.Ratios {
			h = append(h, r.Head())
		}
		return strings.Join(h, " ")
	}
	for servers, want := range map[string]string{
		"keel,nbdkit,qemu-nbd": "keel/nbdkit keel/qemu-nbd keel/best",
		"keel,qemu-nbd":        "keel/qemu-nbd",
		"nbdkit,qemu-nbd":      "",
	} {
		if got := heads(NBDTable(strings.Split(servers, ","), 1<<30, c)); got != want {
			t.Errorf("nbd ratios for %s: %q, want %q", servers, got, want)
		}
	}
	if got := heads(ClusterTable(1<<30, c, "n1", "n2")); got != "cluster/keel-serve cluster/nbdkit follower/cluster" {
		t.Errorf("cluster ratios: %s", got)
	}
	pt := ProxyTable(384<<20, c, "n1")
	if got := heads(pt); got != "proxy/leader proxy/nbdkit proxy/keel-serve" || len(pt.Rows) != 5 {
		t.Errorf("proxy table: %s, %d rows, want 5 (with the cold reads: the volume is larger than the cache)", got, len(pt.Rows))
	}
	if pt := ProxyTable(256<<20, c, "n1"); len(pt.Rows) != 3 {
		t.Errorf("proxy table of a volume no larger than the cache: %d rows, want 3 (no cold reads)", len(pt.Rows))
	}
	if got := proxyColdJobs("nbdkit"); got != nil {
		t.Errorf("nbdkit runs the cold jobs: %v", got)
	}
	if got := len(clusterJobs("follower")); got != 2 {
		t.Errorf("the follower runs %d jobs, want the 2 write jobs", got)
	}
	if proxyWriteJobs("nbdkit") != nil {
		t.Errorf("nbdkit runs write jobs in the proxy suite")
	}

	ct := ClusterTable(1<<30, c, "n1", "n2")
	ct.Row(SeqWrite.Name, UnitMBps).Set("cluster", 0, 320, true)
	ct.Row(SeqWrite.Name, UnitMBps).Set("keel-serve", 0, 800, true)
	ct.Row(RandWrite.Name, UnitIOPS).Set("cluster", 0, 4000, true)
	g := strings.Join(clusterGoals(ct), "\n")
	for _, want := range []string{">= 300 MB/s: 320.0 MB/s MET", ">= 0.5x keel serve: 0.40x MISSED", "three replicas: 4000 (via a follower -;"} {
		if !strings.Contains(g, want) {
			t.Errorf("cluster goals lack %q:\n%s", want, g)
		}
	}
}

func TestCacheUse(t *testing.T) {
	u := CacheBetween(map[string]uint64{"cache_hits": 10, "cache_misses": 5},
		map[string]uint64{"cache_hits": 109, "cache_misses": 6, "remote_reads": 1})
	if got := u.String(); got != "99.00% hits of 100 blocks looked up, 1 remote reads" {
		t.Errorf("cache use: %s", got)
	}
	if got := (CacheUse{}).String(); got != "0.00% hits of 0 blocks looked up, 0 remote reads" {
		t.Errorf("no lookups: %s", got)
	}
}

func TestTopLines(t *testing.T) {
	out := "File: keel\nType: cpu\n      flat  flat%   sum%        cum   cum%\n     0.5s 50% 50% 0.5s 50%  a\n     0.2s 20% 70% 0.2s 20%  b\n     0.1s 10% 80% 0.1s 10%  c\n"
	got := TopLines(out, 2)
	if len(got) != 5 || !strings.HasSuffix(got[4], " b") {
		t.Errorf("TopLines: %q", got)
	}
}

func TestImages(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	const size = 3<<20 + 5
	if err := randomImage(src, size); err != nil {
		t.Fatal(err)
	}
	if err := copyImage(dst, src); err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(src)
	b, _ := os.ReadFile(dst)
	if len(a) != size || !bytes.Equal(a, b) {
		t.Fatalf("image %d bytes, copy equal %v", len(a), bytes.Equal(a, b))
	}
	if zero := make([]byte, 4096); bytes.Equal(a[1<<20:1<<20+4096], zero) {
		t.Errorf("a random image holds a zero page")
	}
}

func TestCPUSecondsPerGiB(t *testing.T) {
	for _, tc := range []struct{ pct, mbps, want float64 }{
		{100, 1073.741824, 1}, // one core while moving one GiB a second
		{50, 1073.741824, 0.5},
		{200, 107.3741824, 20},
		{80, 0, 0},
	} {
		if got := CPUSecondsPerGiB(tc.pct, tc.mbps); math.Abs(got-tc.want) > 1e-9 {
			t.Errorf("CPUSecondsPerGiB(%v, %v) = %v, want %v", tc.pct, tc.mbps, got, tc.want)
		}
	}
}
