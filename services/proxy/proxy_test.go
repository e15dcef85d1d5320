package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/services/proxy"
	"github.com/keelstore/keel/services/server/servertest"
)

// runProxy starts a Proxy in front of the servers and serves it over NBD
// on a unix socket; it returns the proxy and a connected client.
func runProxy(t testing.TB, cfg proxy.Config) (*proxy.Proxy, *nbd.Client) {
	t.Helper()
	if cfg.Log == nil {
		cfg.Log = servertest.Logger(t, cfg.Writer)
	}
	p, err := proxy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = p.Serve(ctx) }()
	rctx, rcancel := context.WithTimeout(ctx, 15*time.Second)
	defer rcancel()
	if _, err := p.Ready(rctx); err != nil {
		cancel()
		t.Fatal(err)
	}
	srv, err := nbd.NewServer(nbd.ServerConfig{Exports: []nbd.Export{{Name: "keel", Backend: p}}, Logger: cfg.Log})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "proxy.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); _ = srv.ServeConn(ctx, nc) }()
		}
	}()
	c, err := nbd.Dial(ctx, "unix", sock, nbd.ClientConfig{MetaContext: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		cancel()
		l.Close()
		wg.Wait()
		<-done
	})
	return p, c
}

// directClient connects to the server itself, bypassing the proxy.
func directClient(t testing.TB, o *servertest.Node) *nbd.Client {
	t.Helper()
	c, err := nbd.Dial(context.Background(), "tcp", o.NBD, nbd.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func fill(v byte, n int) []byte { return bytes.Repeat([]byte{v}, n) }

// TestProxyCoherentUnderConcurrency runs writers, zeroes, trims and reads
// through one proxy with a small cache, from many goroutines at once. Each
// goroutine owns every 8th 1 KiB slot, so each 4 KiB cache block is shared
// by four goroutines and fills race with writes to neighbouring slots;
// every read must return what its goroutine last wrote.
func TestProxyCoherentUnderConcurrency(t *testing.T) {
	node := servertest.StartOne(t, 0)
	p, c := runProxy(t, proxy.Config{Servers: []string{node.HTTP}, Writer: "w1", CacheBytes: 1 << 20})
	const slot, slots, workers = 1024, 2048, 8 // 2 MiB: twice the cache
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 7))
			model := map[int]byte{} // slot -> value (0: zeroes)
			for i := 0; i < 150; i++ {
				s := w + workers*r.IntN(slots/workers)
				off := uint64(s * slot)
				var err error
				switch op := r.IntN(10); {
				case op < 4:
					v := byte(1 + r.IntN(250))
					if err = c.WriteAt(ctx, fill(v, slot), off, false); err == nil {
						model[s] = v
					}
				case op == 4:
					if err = c.Zero(ctx, off, slot, 0); err == nil {
						model[s] = 0
					}
				case op == 5:
					if err = c.Trim(ctx, off, slot, false); err == nil {
						model[s] = 0
					}
				default:
					got := make([]byte, slot)
					if err = c.ReadAt(ctx, got, off); err == nil && !bytes.Equal(got, fill(model[s], slot)) {
						err = fmt.Errorf("slot %d: read %#x..., want %#x", s, got[0], model[s])
					}
				}
				if err != nil {
					errs <- fmt.Errorf("worker %d op %d: %w", w, i, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	st := p.Stats()
	t.Logf("reads %d, cache hits %d, misses %d, remote reads %d, writes %d, retries %d",
		st.Reads.Load(), st.CacheHits.Load(), st.CacheMisses.Load(), st.RemoteReads.Load(), st.Writes.Load(), st.Retries.Load())
	if st.CacheHits.Load() == 0 {
		t.Error("no read was served from the cache")
	}
	// The server holds what the proxy acknowledged: read it directly.
	direct := directClient(t, node)
	for s := 0; s < 8; s++ {
		want := make([]byte, slot)
		if err := c.ReadAt(ctx, want, uint64(s*slot)); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, slot)
		if err := direct.ReadAt(ctx, got, uint64(s*slot)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("slot %d differs between the proxy and the server", s)
		}
	}
}

// TestProxyOneWriter: a second proxy reads but may not write; a takeover
// fences the first, whose later writes fail and never land.
func TestProxyOneWriter(t *testing.T) {
	node := servertest.StartOne(t, 0)
	ctx := context.Background()
	pa, a := runProxy(t, proxy.Config{Servers: []string{node.HTTP}, Writer: "a", CacheBytes: 1 << 20})
	if err := a.WriteAt(ctx, fill(0xaa, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if err := a.ReadAt(ctx, got, 0); err != nil || got[0] != 0xaa {
		t.Fatalf("read back through a: %v %#x", err, got[0])
	}

	pb, b := runProxy(t, proxy.Config{Servers: []string{node.HTTP}, Writer: "b", CacheBytes: 1 << 20})
	if err := b.ReadAt(ctx, got, 0); err != nil || got[0] != 0xaa {
		t.Fatalf("read through the second proxy: %v %#x", err, got[0])
	}
	if err := b.WriteAt(ctx, fill(0xbb, 4096), 0, false); !errors.Is(err, nbd.EPERM) {
		t.Fatalf("write through the second proxy: %v, want EPERM", err)
	}
	if st := pb.Status(); st.Holding || st.Fenced != "" {
		t.Errorf("second proxy's status: holding %v fenced %q, want neither", st.Holding, st.Fenced)
	}
	if st := pa.Status(); !st.Holding || st.Leader != node.HTTP || len(st.Servers) != 1 || !st.Servers[0].Up {
		t.Errorf("first proxy's status: %+v", st)
	}

	pc, c := runProxy(t, proxy.Config{Servers: []string{node.HTTP}, Writer: "c", Takeover: true})
	// The takeover waits for c's first write: until then a keeps writing
	// (a live migration's source runs until it is paused).
	if pc.Status().Holding {
		t.Error("the --takeover proxy holds the volume before writing")
	}
	if err := a.WriteAt(ctx, fill(0xab, 4096), 8192, false); err != nil {
		t.Fatalf("write through a after c started: %v", err)
	}
	// c reads what a acknowledged, before c has written anything.
	if err := c.ReadAt(ctx, got, 8192); err != nil || got[0] != 0xab {
		t.Fatalf("read through c of a's last write: %v %#x", err, got[0])
	}
	if err := c.WriteAt(ctx, fill(0xcc, 4096), 0, false); err != nil {
		t.Fatalf("write through the proxy that took over: %v", err)
	}
	for i := 0; i < 3; i++ {
		if err := a.WriteAt(ctx, fill(0xa1, 4096), 0, false); !errors.Is(err, nbd.EPERM) {
			t.Fatalf("write %d through the fenced proxy: %v, want EPERM", i, err)
		}
		if err := a.Zero(ctx, 0, 4096, 0); !errors.Is(err, nbd.EPERM) {
			t.Fatalf("zero through the fenced proxy: %v, want EPERM", err)
		}
	}
	if st := pa.Status(); st.Holding || !strings.Contains(st.Fenced, "fenced") {
		t.Errorf("fenced proxy's status: holding %v fenced %q", st.Holding, st.Fenced)
	}
	// The fenced proxy no longer answers from its (now stale) cache.
	if err := a.ReadAt(ctx, got, 0); err != nil || got[0] != 0xcc {
		t.Fatalf("read through the fenced proxy: %v %#x, want the new writer's 0xcc", err, got[0])
	}
	d := make([]byte, 4096)
	if err := directClient(t, node).ReadAt(ctx, d, 0); err != nil || !bytes.Equal(d, fill(0xcc, 4096)) {
		t.Fatalf("server holds %#x (%v), want only the new writer's data", d[0], err)
	}
}

// TestProxyRestartReclaims: a proxy restarted under the same writer name
// takes the volume back without a takeover, and its request ids (numbered
// from 1 again) are not mistaken for the old ones.
func TestProxyRestartReclaims(t *testing.T) {
	node := servertest.StartOne(t, 0)
	ctx := context.Background()
	cfg := proxy.Config{Servers: []string{node.HTTP}, Writer: "same"}
	p1, c1 := runProxy(t, cfg)
	for i := range 20 {
		if err := c1.WriteAt(ctx, fill(1, 4096), uint64(i*4096), false); err != nil {
			t.Fatal(err)
		}
	}
	_ = p1
	_, c2 := runProxy(t, cfg) // the first one is still running: same name, no takeover
	for i := range 20 {
		if err := c2.WriteAt(ctx, fill(2, 4096), uint64(i*4096), false); err != nil {
			t.Fatalf("write %d after re-claim: %v", i, err)
		}
	}
	d := make([]byte, 20*4096)
	if err := directClient(t, node).ReadAt(ctx, d, 0); err != nil || !bytes.Equal(d, fill(2, 20*4096)) {
		t.Fatalf("server does not hold the restarted proxy's writes (%v)", err)
	}
}

func TestProxyConfigRefused(t *testing.T) {
	for _, tc := range []struct {
		cfg  proxy.Config
		want string
	}{
		{proxy.Config{Writer: "w"}, "Servers"},
		{proxy.Config{Servers: []string{""}, Writer: "w"}, "Servers"},
		{proxy.Config{Servers: []string{"a:1"}}, "Writer"},
		{proxy.Config{Servers: []string{"a:1"}, Writer: "w", WriteTimeout: time.Millisecond}, "WriteTimeout"},
		{proxy.Config{Servers: []string{"a:1"}, Writer: "w", WriteTimeout: time.Second, AttemptTimeout: 2 * time.Second}, "AttemptTimeout"},
		{proxy.Config{Servers: []string{"a:1"}, Writer: "w", PollInterval: time.Hour}, "PollInterval"},
	} {
		if _, err := proxy.New(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want an error naming %s", tc.cfg, err, tc.want)
		}
	}
}

// TestProxyBadServer: a "server" answering garbage is never taken for a
// member; the proxy says so and keeps running.
func TestProxyBadServer(t *testing.T) {
	for name, h := range map[string]http.HandlerFunc{
		"garbage":  func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("\x00\xffnot json")) },
		"wrong":    func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte(`{"state": 7}`)) },
		"error500": func(w http.ResponseWriter, r *http.Request) { http.Error(w, "boom", 500) },
		"hang":     func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() },
	} {
		t.Run(name, func(t *testing.T) {
			s := httptest.NewServer(h)
			defer s.Close()
			p, err := proxy.New(proxy.Config{Servers: []string{strings.TrimPrefix(s.URL, "http://")}, Writer: "w"})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { defer close(done); _ = p.Serve(ctx) }()
			rctx, rcancel := context.WithTimeout(ctx, 500*time.Millisecond)
			_, err = p.Ready(rctx)
			rcancel()
			cancel()
			<-done
			if err == nil || !strings.Contains(err.Error(), "no keel server answered") {
				t.Errorf("Ready: %v, want no keel server answered", err)
			}
		})
	}
}
