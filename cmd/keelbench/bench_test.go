package main

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"errors"
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
