package proxy_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/services/proxy"
	"github.com/keelstore/keel/services/server/servertest"
)

// scrape reads a /metrics page into its series, keyed as the text format
// spells them: `name{label="v",...}` or the bare name.
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %v", url, resp.StatusCode, err)
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("series line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

// A proxy process's /metrics, after writes and repeated reads through its
// NBD socket, counts the requests by kind with their bytes and latencies,
// and the read cache's hits and misses.
func TestProcessMetricsAfterTraffic(t *testing.T) {
	node := servertest.StartOne(t, 0)
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "proxy.sock")
	serving := make(chan string, 1)
	pr, err := proxy.NewProcess(proxy.ProcessConfig{
		Proxy:     proxy.Config{Servers: []string{node.HTTP}, Writer: "metrics", CacheBytes: 1 << 20},
		Listen:    "unix:" + sock,
		HTTP:      hl,
		Log:       servertest.Logger(t, "proxy"),
		OnServing: func(uri string) { serving <- uri },
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- pr.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("proxy process: %v", err)
		}
	})
	select {
	case <-serving:
	case err := <-done:
		t.Fatalf("proxy process ended before serving: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("proxy process not serving after 30s")
	}
	c, err := nbd.Dial(ctx, "unix", sock, nbd.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := 0; i < 4; i++ {
		if err := c.WriteAt(ctx, fill(byte(i+1), 4096), uint64(i)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 4096)
	for i := 0; i < 3; i++ { // one miss, then hits
		if err := c.ReadAt(ctx, buf, 1<<20); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}

	got := scrape(t, "http://"+hl.Addr().String()+"/metrics")
	want := map[string]func(v float64) bool{
		`keel_nbd_requests_total{kind="write",result="ok"}`:     func(v float64) bool { return v == 4 },
		`keel_nbd_requests_total{kind="read",result="ok"}`:      func(v float64) bool { return v == 3 },
		`keel_nbd_requests_total{kind="flush",result="ok"}`:     func(v float64) bool { return v == 1 },
		`keel_nbd_request_bytes_total{kind="write"}`:            func(v float64) bool { return v == 4*4096 },
		`keel_nbd_request_bytes_total{kind="read"}`:             func(v float64) bool { return v == 3*4096 },
		`keel_nbd_request_duration_seconds_count{kind="read"}`:  func(v float64) bool { return v == 3 },
		`keel_nbd_request_duration_seconds_count{kind="write"}`: func(v float64) bool { return v == 4 },
		`keel_proxy_cache_hits_total`:                           func(v float64) bool { return v >= 2 },
		`keel_proxy_cache_misses_total`:                         func(v float64) bool { return v >= 1 },
		`keel_proxy_holding`:                                    func(v float64) bool { return v == 1 },
		`keel_proxy_epoch`:                                      func(v float64) bool { return v >= 1 },
	}
	var bad []string
	for name, ok := range want {
		if v, have := got[name]; !have || !ok(v) {
			bad = append(bad, fmt.Sprintf("%s = %v (present %v)", name, v, have))
		}
	}
	if len(bad) > 0 {
		sort.Strings(bad)
		t.Fatalf("after the traffic, the proxy's /metrics has:\n%s", strings.Join(bad, "\n"))
	}
}
