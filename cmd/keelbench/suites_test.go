package main

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keelstore/keel/services/wire"
)

// fakeProcs runs no process: fio "runs" by writing a JSON answer whose
// figure tells the target (from its socket's name) apart, and every call
// is logged in order, so that a suite's schedule can be checked.
type fakeProcs struct {
	t      *testing.T
	http   string // the fake servers' and proxy's HTTP address
	mu     sync.Mutex
	events []string
	all    []*fakeProc
}

type fakeProc struct {
	f       *fakeProcs
	name    string
	stopped bool
}

func (p *fakeProc) Name() string { return p.name }
func (p *fakeProc) PID() int     { return os.Getpid() } // /proc reads work
func (p *fakeProc) Stop() error {
	p.f.mu.Lock()
	defer p.f.mu.Unlock()
	if !p.stopped {
		p.stopped = true
		p.f.events = append(p.f.events, "stop "+p.name)
	}
	return nil
}

func (f *fakeProcs) log(e string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.events = append(f.events, e)
}

func (f *fakeProcs) proc(name string) *fakeProc {
	p := &fakeProc{f: f, name: name}
	f.mu.Lock()
	f.all = append(f.all, p)
	f.mu.Unlock()
	return p
}

func (f *fakeProcs) Start(name string, argv []string, log string) (Proc, error) {
	f.log("start " + name)
	return f.proc(name), nil
}

// figures per socket (or file) name: what the fake fio reports.
var fakeFigures = map[string]float64{"keel": 100, "nbdkit": 200, "qemu-nbd": 300, "n1": 400, "n2": 50,
	"proxy": 500, "keel-serve": 600, "disk": 700}

func arg(argv []string, key string) string {
	for _, a := range argv {
		if v, ok := strings.CutPrefix(a, key+"="); ok {
			return v
		}
	}
	return ""
}

func (f *fakeProcs) Run(ctx context.Context, argv []string, log string) error {
	if argv[0] != "fio" {
		f.log(strings.Join(argv[1:2], " ")) // "verify"
		return nil
	}
	target := "disk"
	if uri := arg(argv, "--uri"); uri != "" {
		target = strings.TrimSuffix(filepath.Base(uri), ".sock")
	}
	f.log("fio " + target + " " + arg(argv, "--name") + " " + filepath.Base(arg(argv, "--output")))
	v := fakeFigures[target]
	dir := `"read": {"io_bytes": 1, "bw_bytes": %[1]g, "iops": %[2]g}, "write": {"io_bytes": 0}`
	if !strings.Contains(arg(argv, "--rw"), "read") {
		dir = `"read": {"io_bytes": 0}, "write": {"io_bytes": 1, "bw_bytes": %[1]g, "iops": %[2]g}`
	}
	out := fmt.Sprintf(`{"jobs": [{"jobname": "x", "error": 0, `+dir+`}]}`, v*1e6, v)
	return os.WriteFile(arg(argv, "--output"), []byte(out), 0o644)
}

func (f *fakeProcs) Output(ctx context.Context, argv []string) (string, error) {
	return "File: keel\n      flat  flat%   sum%        cum   cum%\n     1s 100% 100% 1s 100%  nbd.(*conn).send\n", nil
}

func (f *fakeProcs) WaitNBD(ctx context.Context, p Proc, uri string) error { return nil }

func (f *fakeProcs) StartCluster(ctx context.Context, spec ClusterSpec) (*Cluster, error) {
	f.log("cluster")
	c := &Cluster{Leader: "n1"}
	for _, id := range []string{"n1", "n2", "n3"} {
		c.Nodes = append(c.Nodes, Node{ID: id, HTTP: f.http, Sock: filepath.Join(spec.Dir, id+".sock"), Proc: f.proc(id)})
	}
	return c, nil
}

func (f *fakeProcs) StartProxy(ctx context.Context, c *Cluster, spec ProxySpec) (*ProxyProc, error) {
	name := "proxy"
	if spec.CPUProfile != "" {
		name = "proxy-profiling"
	}
	f.log("start " + name)
	return &ProxyProc{Proc: f.proc(name), HTTP: f.http, Sock: spec.Sock}, nil
}

func (f *fakeProcs) StopAll() {}

// newFakeBench is a bench on fake processes and a fake HTTP API (cluster
// led by n1; a proxy whose cache hits grow by 100 per status call).
func newFakeBench(t *testing.T, cfg Config) (*bench, *fakeProcs) {
	var mu sync.Mutex
	hits := uint64(0)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/cluster":
			fmt.Fprint(w, `{"leader": "n1", "members": []}`)
		case "/v1/status":
			mu.Lock()
			hits += 100
			fmt.Fprintf(w, `{"holding": true, "counters": {"cache_hits": %d, "cache_misses": 0}}`, hits)
			mu.Unlock()
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	f := &fakeProcs{t: t, http: srv.Listener.Addr().String()}
	out := t.TempDir()
	cfg.Out = out
	for _, d := range []string{"fio", "logs"} {
		if err := os.MkdirAll(filepath.Join(out, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	b := &bench{cfg: cfg, procs: f, http: wire.NewClient(time.Second, nil), out: &testWriter{t}, rep: &Report{Suite: "test"},
		work: t.TempDir(), fioDir: filepath.Join(out, "fio"), logDir: filepath.Join(out, "logs"), keel: "keel",
		quietTick: time.Millisecond}
	return b, f
}

type testWriter struct{ t *testing.T }

func (w *testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func fakeConfig() Config {
	c := validConfig()
	c.Size, c.Cache, c.WSet, c.Rounds, c.Verify, c.Disk = 1<<20, 1<<20, 512<<10, 2, true, true
	return c
}

// allStopped fails the test if a fake child is still running.
func (f *fakeProcs) allStopped(t *testing.T) {
	t.Helper()
	for _, p := range f.all {
		if !p.stopped {
			t.Errorf("%s still running after the suite", p.name)
		}
	}
}

// fios lists "target job" of each fio run, only those of the rounds when
// rounds is set.
func (f *fakeProcs) fios(rounds bool) []string {
	var fs []string
	for _, e := range f.events {
		if strings.HasPrefix(e, "fio ") && (!rounds || strings.HasSuffix(e, "-r1.json") || strings.HasSuffix(e, "-r2.json")) {
			fs = append(fs, strings.Fields(e)[1]+" "+strings.Fields(e)[2])
		}
	}
	return fs
}

func TestNBDSuite(t *testing.T) {
	b, f := newFakeBench(t, fakeConfig())
	if err := b.runNBD(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.allStopped(t)
	if len(b.rep.Odd) != 0 {
		t.Errorf("odd: %v", b.rep.Odd)
	}
	got := strings.Join(f.fios(false), ", ")
	var want []string
	for range 2 {
		for _, s := range KnownNBDServers {
			for _, j := range StdJobs {
				want = append(want, s+" "+j.Name)
			}
		}
	}
	if got != strings.Join(want, ", ") {
		t.Errorf("fio runs\n got %s\nwant %s", got, strings.Join(want, ", "))
	}
	tb := b.rep.Tables[0]
	md := tb.MedianGrid().Markdown()
	for _, w := range []string{"| seq-write | MB/s | 100.0 | 200.0 | 300.0 | 0.50 | 0.33 | 0.33 |", "| rand-read | IOPS | 100 | 200 | 300 | 0.50 | 0.33 | 0.33 |"} {
		if !strings.Contains(md, w) {
			t.Errorf("nbd table lacks %q:\n%s", w, md)
		}
	}
	if tb.NRounds() != 2 || len(b.rep.Sections) != 3 {
		t.Errorf("%d rounds, %d sections (want CPU, CPU-seconds per GiB and memory)", tb.NRounds(), len(b.rep.Sections))
	}
}

func TestClusterSuite(t *testing.T) {
	c := fakeConfig()
	c.Rounds = 1
	b, f := newFakeBench(t, c)
	if err := b.runCluster(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.allStopped(t)
	if len(b.rep.Odd) != 0 {
		t.Errorf("odd: %v", b.rep.Odd)
	}
	// The leader (n1) prefilled, then every target took its turn; the
	// follower (n2) ran the write jobs only; then the disk jobs.
	want := "n1 fill, n1 seq-write, n1 seq-read, n1 rand-read, n1 rand-write, n2 seq-write, n2 rand-write, " +
		"keel-serve seq-write, keel-serve seq-read, keel-serve rand-read, keel-serve rand-write, " +
		"nbdkit seq-write, nbdkit seq-read, nbdkit rand-read, nbdkit rand-write, disk disk-seq-write, disk disk-rand-write"
	if got := strings.Join(f.fios(false), ", "); got != want {
		t.Errorf("fio runs\n got %s\nwant %s", got, want)
	}
	tb := b.rep.Tables[0]
	md := tb.MedianGrid().Markdown()
	if w := "| seq-write | MB/s | 400.0 | 50.0 | 600.0 | 200.0 | 0.67 | 2.00 | 0.12 |"; !strings.Contains(md, w) {
		t.Errorf("cluster table lacks %q:\n%s", w, md)
	}
	notes := strings.Join(tb.Notes, "\n")
	for _, w := range []string{"written in full through the leader: 400.0 MB/s", ">= 300 MB/s: 400.0 MB/s MET",
		"0.5x keel serve: 0.67x MET", "fdatasync every 8: 700.0 MB/s", "every voter byte-identical"} {
		if !strings.Contains(notes, w) {
			t.Errorf("cluster notes lack %q:\n%s", w, notes)
		}
	}
}

func TestProxySuite(t *testing.T) {
	c := fakeConfig()
	c.Profile = true
	c.Size = 2 << 20 // larger than the cache: the cold reads run
	b, f := newFakeBench(t, c)
	if err := b.runProxy(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.allStopped(t)
	if len(b.rep.Odd) != 0 {
		t.Errorf("odd: %v", b.rep.Odd)
	}
	// The leader's writes run only while no proxy holds the volume.
	up := false
	for _, e := range f.events {
		switch {
		case e == "start proxy" || e == "start proxy-profiling":
			up = true
		case e == "stop proxy" || e == "stop proxy-profiling":
			up = false
		case strings.HasPrefix(e, "fio n1 ") && strings.Contains(e, "write") && up:
			t.Errorf("%s while the proxy holds the volume; events %v", e, f.events)
		case strings.HasPrefix(e, "fio proxy ") && !up:
			t.Errorf("%s without a proxy; events %v", e, f.events)
		}
	}
	// Each cold job through the proxy starts on a fresh proxy (empty cache).
	for i, e := range f.events {
		if strings.HasPrefix(e, "fio proxy ") && strings.Contains(e, "-cold") && (i == 0 || f.events[i-1] != "start proxy") {
			t.Errorf("%s not right after a proxy start (after %q)", e, f.events[max(i-1, 0)])
		}
	}
	got := strings.Join(f.fios(true), ", ")
	want := "proxy seq-write, proxy rand-write, n1 seq-write, n1 rand-write, proxy seq-write, proxy rand-write, n1 seq-write, n1 rand-write, " +
		"proxy rand-read, n1 rand-read, nbdkit rand-read, keel-serve rand-read, proxy rand-read, n1 rand-read, nbdkit rand-read, keel-serve rand-read, " +
		"proxy rand-read-cold, proxy seq-read-cold, n1 rand-read-cold, n1 seq-read-cold, proxy rand-read-cold, proxy seq-read-cold, n1 rand-read-cold, n1 seq-read-cold"
	if got != want {
		t.Errorf("fio runs of the rounds\n got %s\nwant %s", got, want)
	}
	tb := b.rep.Tables[0]
	md := tb.MedianGrid().Markdown()
	for _, w := range []string{"| seq-write | MB/s | 500.0 | 400.0 | - | - | 1.25 | - | - |",
		"| rand-read | IOPS | 500 | 400 | 200 | 600 | 1.25 | 2.50 | 0.83 |",
		"| rand-read-cold | IOPS | 500 | 400 | - | - | 1.25 | - | - |",
		"| seq-read-cold | MB/s | 500.0 | 400.0 | - | - | 1.25 | - | - |"} {
		if !strings.Contains(md, w) {
			t.Errorf("proxy table lacks %q:\n%s", w, md)
		}
	}
	notes := strings.Join(tb.Notes, "\n")
	for _, w := range []string{"proxy cache during rand-read-r1: 100.00% hits of 100 blocks", "through the proxy >= nbdkit file: 2.50x MET",
		"under --cpu-profile: 500 IOPS; nbdkit right after: 200 IOPS; ratio 2.50", "cache + 64 MiB",
		"proxy cache during rand-read-cold-r1:", "rand-read-cold through the proxy (volume larger than the cache) >= 0.8x a direct connection to the leader: 1.25x MET",
		"seq-read-cold through the proxy (volume larger than the cache) >= 0.8x a direct connection to the leader: 1.25x MET"} {
		if !strings.Contains(notes, w) {
			t.Errorf("proxy notes lack %q:\n%s", w, notes)
		}
	}
	var prof *Section
	for i := range b.rep.Sections {
		if strings.Contains(b.rep.Sections[i].Title, "CPU profile") {
			prof = &b.rep.Sections[i]
		}
	}
	if prof == nil || !strings.Contains(strings.Join(prof.Lines, "\n"), "nbd.(*conn).send") {
		t.Errorf("no profile section: %+v", b.rep.Sections)
	}
}
