package statuspage_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/keelstore/keel/nbd/nbdtest"
	"github.com/keelstore/keel/services/statuspage"
)

func TestMeterCountsWhatPassesThrough(t *testing.T) {
	var m statuspage.Meter
	b := m.Wrap(nbdtest.NewMem(1 << 20))
	ctx := t.Context()
	data := bytes.Repeat([]byte{7}, 4096)
	if err := b.WriteAt(ctx, data, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := b.Zero(ctx, 8192, 4096, 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	for range 3 {
		if err := b.ReadAt(ctx, got, 0); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, data) {
		t.Fatal("the wrapped backend did not pass the write through")
	}
	tt := m.Totals()
	if tt.Reads.Ops != 3 || tt.Reads.Bytes != 3*4096 {
		t.Errorf("reads %d ops %d bytes, want 3 and %d", tt.Reads.Ops, tt.Reads.Bytes, 3*4096)
	}
	if tt.Writes.Ops != 2 || tt.Writes.Bytes != 4096 {
		t.Errorf("writes %d ops %d bytes, want 2 (a write and a zero) and 4096", tt.Writes.Ops, tt.Writes.Bytes)
	}
	var inBuckets uint64
	for _, c := range tt.Reads.Latency {
		inBuckets += c
	}
	if inBuckets != 3 {
		t.Errorf("%d reads in latency buckets, want 3", inBuckets)
	}
	if b.Size() != 1<<20 || b.Capabilities() != nbdtest.NewMem(1).Capabilities() {
		t.Errorf("the wrapper changed the backend's size or capabilities")
	}
}

func TestSamplerFeedsHistoryAtEachTick(t *testing.T) {
	h := statuspage.NewHistory(10)
	var m statuspage.Meter
	b := m.Wrap(nbdtest.NewMem(1 << 20))
	// The test hands the sampler each observation's time, and hears when
	// it has read the totals, so what each observation sees is decided
	// here.
	tick, times, read := make(chan time.Time), make(chan time.Time), make(chan struct{})
	s := &statuspage.Sampler{History: h, Tick: tick,
		Now:  func() time.Time { return <-times },
		Read: func() statuspage.Totals { tt := m.Totals(); read <- struct{}{}; return tt }}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t0 := time.Date(2026, 12, 2, 1, 0, 0, 0, time.UTC)
	readN := func(n int) {
		for range n {
			if err := b.ReadAt(t.Context(), make([]byte, 512), 0); err != nil {
				t.Fatal(err)
			}
		}
	}
	observe := func(at time.Time, viaTick bool) {
		if viaTick {
			tick <- at
		}
		times <- at
		<-read
	}
	observe(t0, false) // the baseline, at start
	readN(2)
	observe(t0.Add(time.Second), true)
	readN(1)
	observe(t0.Add(3*time.Second), true)
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Serve returned %v when stopped, want nil", err)
	}
	got := h.Samples()
	if len(got) != 2 || got[0].ReadOps != 2 || got[1].ReadOps != 0.5 || got[0].ReadBytes != 1024 {
		t.Fatalf("samples %+v, want 2 reads/s (1024 B/s), then 0.5 reads/s", got)
	}
}

func TestPageServesEmbeddedFilesAndHistory(t *testing.T) {
	for _, kind := range []string{statuspage.KindServer, statuspage.KindProxy} {
		t.Run(kind, func(t *testing.T) {
			s := statuspage.NewService(kind, nil)
			t0 := time.Now()
			s.History().Observe(t0, statuspage.Totals{})
			s.History().Observe(t0.Add(time.Second), statuspage.Totals{Writes: statuspage.KindTotals{Ops: 3, Bytes: 3 << 12}})
			mux := http.NewServeMux()
			s.Register(mux)
			srv := httptest.NewServer(mux)
			defer srv.Close()
			get := func(path string) (*http.Response, string) {
				t.Helper()
				resp, err := srv.Client().Get(srv.URL + path)
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
				b, err := io.ReadAll(resp.Body)
				if err != nil {
					t.Fatal(err)
				}
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("GET %s: %s: %s", path, resp.Status, b)
				}
				return resp, string(b)
			}
			resp, html := get("/")
			if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
				t.Errorf("GET /: Content-Type %q, want text/html", ct)
			}
			if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") || !strings.Contains(csp, "connect-src 'self'") {
				t.Errorf("GET /: Content-Security-Policy %q, want nothing loaded from elsewhere", csp)
			}
			if !strings.Contains(html, `data-kind="`+kind+`"`) {
				t.Errorf("GET / is not the %s page:\n%s", kind, html)
			}
			// Every file the page names is served, and none is elsewhere.
			refs := regexp.MustCompile(`(?:src|href)="([^"]+)"`).FindAllStringSubmatch(html, -1)
			if len(refs) < 3 {
				t.Fatalf("the page names %d files, want its style and scripts", len(refs))
			}
			for _, r := range refs {
				if !strings.HasPrefix(r[1], "/ui/") {
					t.Errorf("the page loads %q, not one of its own files", r[1])
					continue
				}
				_, body := get(r[1])
				if ext := regexp.MustCompile(`https?://[^"' )]+`).FindAllString(body, -1); len(ext) > 0 {
					for _, u := range ext {
						if u != "http://www.w3.org/2000/svg" {
							t.Errorf("%s refers to %s: the page must not reach outside its process", r[1], u)
						}
					}
				}
			}
			_, js := get("/v1/status/history")
			var h statuspage.HistoryResponse
			if err := json.Unmarshal([]byte(js), &h); err != nil {
				t.Fatal(err)
			}
			if h.Now < t0.UnixMilli() {
				t.Errorf("history now %d, want the process's clock (at least %d)", h.Now, t0.UnixMilli())
			}
			if h.EveryMs != 1000 || len(h.Samples) != 1 || h.Samples[0].WriteOps != 3 || h.Samples[0].WriteBytes != 3<<12 {
				t.Fatalf("history %s, want one sample of 3 writes/s (%d B/s) every 1000 ms", js, 3<<12)
			}
			_, js = get(fmt.Sprintf("/v1/status/history?since=%d", h.Samples[0].At))
			if !strings.Contains(js, `"samples":[]`) {
				t.Errorf("history since the last sample: %s, want no samples", js)
			}
			_, js = get(fmt.Sprintf("/v1/status/history?since=%d", h.Samples[0].At-1))
			if !strings.Contains(js, fmt.Sprintf(`"t":%d`, h.Samples[0].At)) {
				t.Errorf("history since just before the last sample: %s, want that sample", js)
			}
		})
	}
}

func TestWriteHandlerCountsBodyBytes(t *testing.T) {
	var m statuspage.Meter
	h := m.WriteHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Write(b[:1])
	}))
	for _, n := range []int{100, 28} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/v1/apply", bytes.NewReader(make([]byte, n))))
		if rec.Code != http.StatusOK || rec.Body.Len() != 1 {
			t.Fatalf("the wrapped handler's answer changed: %d %q", rec.Code, rec.Body)
		}
	}
	if tt := m.Totals(); tt.Writes.Ops != 2 || tt.Writes.Bytes != 128 || tt.Reads.Ops != 0 {
		t.Errorf("writes %d ops %d bytes, reads %d; want 2 writes of 128 bytes in all and no reads", tt.Writes.Ops, tt.Writes.Bytes, tt.Reads.Ops)
	}
}
