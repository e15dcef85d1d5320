package server_test

import (
	"bytes"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/keelstore/keel/nbd"
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
	want := []string{"raft_leader_dispatchLog_count", "raft_commitTime_count", "raft_fsm_apply_count", "raft_apply "}
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
