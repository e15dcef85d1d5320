package main

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
	"github.com/keelstore/keel/services/wire"
)

// scrapeAt reads the /metrics of the HTTP API at addr into its series,
// keyed as the text format spells them: `name{label="v",...}` or the bare
// name; c reads it (keel dev's: its cluster TLS).
func scrapeAt(t *testing.T, c *wire.Client, addr string) (map[string]float64, error) {
	t.Helper()
	resp, err := c.HTTP.Get(c.BaseURL(addr) + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s/metrics: %s", addr, resp.Status)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("%s/metrics: %q: %w", addr, line, err)
		}
		out[line[:i]] = v
	}
	return out, sc.Err()
}

// checkSeries returns a line for each series of want that got lacks or
// whose value it refuses.
func checkSeries(got map[string]float64, want map[string]func(float64) bool) []string {
	var bad []string
	for name, ok := range want {
		if v, have := got[name]; !have || !ok(v) {
			bad = append(bad, fmt.Sprintf("%s = %v (present %v)", name, v, have))
		}
	}
	sort.Strings(bad)
	return bad
}

// TestDevLogAndMetrics runs keel dev and writes through its proxy, kills
// a follower (keel dev restarts it), then reads what an operator would:
// the first 20 s of its log hold no ERROR line (nodes joining and a
// restarting node are expected, not errors) and a "leader changed"
// line, the traffic adds no line per request, and the proxy's and the
// leader's /metrics carry the request, Raft and replication families
// with values the traffic implies.
func TestDevLogAndMetrics(t *testing.T) {
	tool(t, "qemu-io")
	dir := filepath.Join(t.TempDir(), "dev")
	d, base, started := mustRunDev(t, dir)
	uri := "nbd://" + keeltest.Loopback(base)

	// 200 writes and 100 reads through the proxy, counting the log lines
	// they add.
	before := len(d.Lines())
	var cmds []string
	for i := 0; i < 200; i++ {
		cmds = append(cmds, fmt.Sprintf("write -P 0x%02x %d 4k", i%256, i*4096))
	}
	for i := 0; i < 100; i++ {
		cmds = append(cmds, fmt.Sprintf("read -P 0x%02x %d 4k", i%256, i*4096))
	}
	mustQemuIO(t, uri, cmds...)
	if added := d.Lines()[before:]; len(added) > 10 {
		t.Errorf("300 requests added %d log lines at the default level, want none per request:\n%s", len(added), strings.Join(added, "\n"))
	}

	proxyHTTP := keeltest.Loopback(base + 300)
	api := devClient(t, dir)
	keeltest.MustPoll(t, clusterTimeout, "the proxy's /metrics counts the traffic", func() (bool, string) {
		got, err := scrapeAt(t, api, proxyHTTP)
		if err != nil {
			return false, err.Error()
		}
		bad := checkSeries(got, map[string]func(float64) bool{
			`keel_nbd_requests_total{kind="write",result="ok"}`:     func(v float64) bool { return v >= 200 },
			`keel_nbd_requests_total{kind="read",result="ok"}`:      func(v float64) bool { return v >= 100 },
			`keel_nbd_request_bytes_total{kind="write"}`:            func(v float64) bool { return v >= 200*4096 },
			`keel_nbd_request_duration_seconds_count{kind="write"}`: func(v float64) bool { return v >= 200 },
			`keel_proxy_cache_hits_total`:                           func(v float64) bool { return v >= 1 },
			`keel_proxy_holding`:                                    func(v float64) bool { return v == 1 },
		})
		return len(bad) == 0, strings.Join(bad, "; ")
	})
	// The leader is whichever server says so; its lags name both peers.
	keeltest.MustPoll(t, clusterTimeout, "the leader's /metrics shows its state, term and both peers' lag", func() (bool, string) {
		var state []string
		for i := 0; i < 3; i++ {
			got, err := scrapeAt(t, api, keeltest.Loopback(base+200+i))
			if err != nil {
				state = append(state, err.Error())
				continue
			}
			if got[`keel_raft_state{state="leader"}`] != 1 {
				continue
			}
			peers := []string{"n1", "n2", "n3"}
			self := peers[i]
			want := map[string]func(float64) bool{
				`keel_raft_state{state="follower"}`: func(v float64) bool { return v == 0 },
				`keel_raft_term`:                    func(v float64) bool { return v >= 1 },
				`keel_raft_commit_index`:            func(v float64) bool { return v >= 200 },
				`keel_applied_index`:                func(v float64) bool { return v >= 200 },
			}
			for _, p := range peers {
				if p != self {
					want[`keel_replication_lag_entries{peer="`+p+`"}`] = func(v float64) bool { return v < 64 }
				}
			}
			bad := checkSeries(got, want)
			return len(bad) == 0, self + ": " + strings.Join(bad, "; ")
		}
		return false, "no server reports itself leader: " + strings.Join(state, "; ")
	})

	// A follower killed under keel dev is started again: the leader's
	// failures to reach it meanwhile are expected, not errors.
	m := regexp.MustCompile(`n3 (\d+)\)`).FindStringSubmatch(d.Output())
	if m == nil {
		t.Fatalf("keel dev did not print n3's pid:\n%s", d.Output())
	}
	n3, _ := strconv.Atoi(m[1])
	if err := syscall.Kill(n3, syscall.SIGKILL); err != nil {
		t.Fatalf("kill -9 n3 (pid %d): %v", n3, err)
	}
	keeltest.MustPoll(t, clusterTimeout, "keel dev restarted n3", func() (bool, string) {
		return strings.Contains(d.Output(), "n3 restarted (pid"), "not yet"
	})
	mustQemuIO(t, uri, "write -P 0x77 1M 64k")

	// The rest of the first 20 s, then the log.
	select {
	case <-d.Done():
		t.Fatalf("keel dev exited: %v", d.Err())
	case <-time.After(time.Until(started.Add(20 * time.Second))):
	}
	var errs []string
	for _, l := range d.Lines() {
		if strings.Contains(l, "[ERROR]") {
			errs = append(errs, l)
		}
	}
	if len(errs) > 0 {
		t.Errorf("keel dev's first 20 s logged %d ERROR lines, want none:\n%s", len(errs), strings.Join(errs, "\n"))
	}
	if !strings.Contains(d.Output(), "leader changed") {
		t.Errorf("keel dev's log has no \"leader changed\" line")
	}

	// keel dev killed outright takes its children with it (each runs in
	// a process group of its own, so nothing else would stop them).
	pm := regexp.MustCompile(`pids: n1 (\d+)  n2 (\d+)  n3 (\d+)`).FindStringSubmatch(d.Output())
	if pm == nil {
		t.Fatalf("keel dev did not print its servers' pids:\n%s", d.Output())
	}
	children := []int{n3New(t, d.Output())}
	for _, s := range pm[1:3] {
		pid, _ := strconv.Atoi(s)
		children = append(children, pid)
	}
	if err := d.Kill(); err != nil {
		t.Fatal(err)
	}
	keeltest.MustPoll(t, clusterTimeout, "keel dev's servers to exit after kill -9 of keel dev", func() (bool, string) {
		for _, pid := range children {
			if running(pid) {
				return false, fmt.Sprintf("pid %d still runs", pid)
			}
		}
		return true, ""
	})
}

// running says whether pid is a live process (not gone, not a zombie
// waiting for whoever inherited it to reap it).
func running(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	_, rest, ok := strings.Cut(string(b), ") ")
	return ok && !strings.HasPrefix(rest, "Z")
}

// n3New is n3's pid after keel dev restarted it.
func n3New(t *testing.T, out string) int {
	t.Helper()
	m := regexp.MustCompile(`n3 restarted \(pid (\d+)\)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("keel dev did not print n3's new pid:\n%s", out)
	}
	pid, _ := strconv.Atoi(m[1])
	return pid
}
