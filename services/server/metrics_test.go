package server_test

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/services/wire"
	"github.com/keelstore/keel/supervise"
)

// A committed write makes raft's stage timings appear on /metrics.
func TestMetricsRaftStages(t *testing.T) {
	o := startOneNode(t)
	c := nbdClient(t, o)
	data := bytes.Repeat([]byte{0xa5}, 64<<10)
	if res, err := c.Do(nbd.Request{Type: nbd.CmdWrite, Cookie: 1, Offset: 0, Length: uint64(len(data))}, data); err != nil || res.Err != 0 {
		t.Fatalf("write: %+v %v", res, err)
	}
	// A one-node cluster sends no AppendEntries; these are the leader's
	// stages. raft emits fsm.apply after it answers the future, so the
	// series may trail the write's reply by a moment: scrape until they
	// are there.
	want := []string{"raft_leader_dispatchLog_count", "raft_commitTime_count", "raft_fsm_applyBatch_count", "raft_apply "}
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + o.HTTP + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET /metrics: %d %v", resp.StatusCode, err)
		}
		var missing []string
		for _, w := range want {
			if !strings.Contains(string(body), "\n"+w) {
				missing = append(missing, w)
			}
		}
		if len(missing) == 0 {
			if !strings.Contains(string(body), "keel_raft_commit_index") {
				t.Error("the node's own gauges went missing beside raft's")
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after a committed write /metrics lacks %v:\n%s", missing, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// scrape reads a /metrics page into its series, keyed as the text format
// spells them: `name{label="v",...}` (labels sorted, as the handler writes
// them) or the bare name.
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

// After NBD traffic and one panic of the membership loop, a server's
// /metrics has each family an operator needs, with the values the traffic
// implies.
func TestMetricsFamiliesAfterTraffic(t *testing.T) {
	o := startOneNode(t)
	c := nbdClient(t, o)
	block := bytes.Repeat([]byte{0x5a}, 4096)
	cookie := uint64(0)
	do := func(r nbd.Request, data []byte) {
		t.Helper()
		cookie++
		r.Cookie = cookie
		if res, err := c.Do(r, data); err != nil || res.Err != 0 {
			t.Fatalf("%+v: %+v %v", r, res, err)
		}
	}
	for i := 0; i < 8; i++ {
		do(nbd.Request{Type: nbd.CmdWrite, Offset: uint64(i) * 4096, Length: 4096}, block)
	}
	do(nbd.Request{Type: nbd.CmdRead, Offset: 0, Length: 8192}, nil)
	do(nbd.Request{Type: nbd.CmdTrim, Offset: 0, Length: 4096}, nil)
	do(nbd.Request{Type: nbd.CmdWriteZeroes, Offset: 4096, Length: 4096}, nil)
	do(nbd.Request{Type: nbd.CmdFlush}, nil)

	var panicked atomic.Bool
	supervise.SetPointHook(func(name string) {
		if name == supervise.PointMembership && panicked.CompareAndSwap(false, true) {
			panic("test: membership loop panics once")
		}
	})
	t.Cleanup(func() { supervise.SetPointHook(nil) })

	want := map[string]func(v float64) bool{
		`keel_nbd_requests_total{kind="write",result="ok"}`:                      func(v float64) bool { return v == 8 },
		`keel_nbd_requests_total{kind="read",result="ok"}`:                       func(v float64) bool { return v == 1 },
		`keel_nbd_requests_total{kind="trim",result="ok"}`:                       func(v float64) bool { return v == 1 },
		`keel_nbd_requests_total{kind="zero",result="ok"}`:                       func(v float64) bool { return v == 1 },
		`keel_nbd_requests_total{kind="flush",result="ok"}`:                      func(v float64) bool { return v == 1 },
		`keel_nbd_requests_total{kind="write",result="error"}`:                   func(v float64) bool { return v == 0 },
		`keel_nbd_request_bytes_total{kind="write"}`:                             func(v float64) bool { return v == 8*4096 },
		`keel_nbd_request_bytes_total{kind="read"}`:                              func(v float64) bool { return v == 8192 },
		`keel_nbd_request_duration_seconds_count{kind="write"}`:                  func(v float64) bool { return v == 8 },
		`keel_nbd_request_duration_seconds_sum{kind="write"}`:                    func(v float64) bool { return v > 0 && v < 8*10 },
		`keel_raft_state{state="leader"}`:                                        func(v float64) bool { return v == 1 },
		`keel_raft_state{state="follower"}`:                                      func(v float64) bool { return v == 0 },
		`keel_raft_term`:                                                         func(v float64) bool { return v >= 1 },
		`keel_raft_commit_index`:                                                 func(v float64) bool { return v >= 11 },
		`keel_applied_index`:                                                     func(v float64) bool { return v >= 10 },
		`keel_resync_bytes_to_compare`:                                           func(v float64) bool { return v == 0 },
		`keel_resync_bytes_compared`:                                             func(v float64) bool { return v == 0 },
		`keel_supervisor_restarts_total{service="membership",supervisor="keel"}`: func(v float64) bool { return v == 1 },
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		got := scrape(t, "http://"+o.HTTP+"/metrics")
		var bad []string
		for name, ok := range want {
			if v, have := got[name]; !have || !ok(v) {
				bad = append(bad, fmt.Sprintf("%s = %v (present %v)", name, v, have))
			}
		}
		if len(bad) == 0 {
			return
		}
		// Only the restart comes later than the traffic: the membership
		// loop panics at its next turn.
		if time.Now().After(deadline) {
			sort.Strings(bad)
			t.Fatalf("after the traffic and one panic, /metrics has:\n%s", strings.Join(bad, "\n"))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// GET /v1/verify/progress answers at once and says no digest runs on an
// idle node, with the image's size as the total.
func TestVerifyProgressIdle(t *testing.T) {
	o := startOneNode(t)
	var p wire.DigestProgress
	if err := wire.NewClient(5*time.Second, nil).Do(t.Context(), http.MethodGet, o.HTTP, "/v1/verify/progress", nil, &p); err != nil {
		t.Fatal(err)
	}
	size := o.Holder().Peek().Image().Size()
	if p.Running || p.BytesTotal != size {
		t.Fatalf("progress on an idle node: %+v, want not running, total %d", p, size)
	}
}
