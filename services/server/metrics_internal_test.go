package server

import (
	"testing"

	gometrics "github.com/hashicorp/go-metrics/compat"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

func gather(t *testing.T, s *raftSink) map[string]*dto.MetricFamily {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(s)
	fams, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, f := range fams {
		out[f.GetName()] = f
	}
	return out
}

func TestRaftSinkSeries(t *testing.T) {
	s := newRaftSink()
	peer := []gometrics.Label{{Name: "peer_id", Value: "n2"}}
	s.AddSampleWithLabels([]string{"raft", "replication", "appendEntries", "rpc"}, 0.3, peer)
	s.AddSampleWithLabels([]string{"raft", "replication", "appendEntries", "rpc"}, 7, peer)
	s.AddSampleWithLabels([]string{"raft", "replication", "appendEntries", "rpc"}, 1, []gometrics.Label{{Name: "peer_id", Value: "n3"}})
	s.AddSample([]string{"raft", "commitTime"}, 2)
	s.IncrCounter([]string{"raft", "apply"}, 1)
	s.IncrCounter([]string{"raft", "apply"}, 2)
	s.SetGauge([]string{"raft", "peers"}, 3)
	s.SetGauge([]string{"raft", "peers"}, 2)
	// A legacy key with a peer address in it: mapped to a legal name.
	s.AddSample([]string{"raft", "replication", "heartbeat", "127.0.0.1:7000"}, 1)
	// Disagreeing with the name's shape: dropped, and the scrape still works.
	s.AddSample([]string{"raft", "replication", "appendEntries", "rpc"}, 1)
	s.IncrCounter([]string{"raft", "commitTime"}, 1)

	fams := gather(t, s)
	rpc := fams["raft_replication_appendEntries_rpc"]
	if rpc == nil || rpc.GetType() != dto.MetricType_HISTOGRAM || len(rpc.Metric) != 2 {
		t.Fatalf("appendEntries rpc: %v, want a histogram with a series per peer", rpc)
	}
	for _, m := range rpc.Metric {
		h := m.GetHistogram()
		if m.Label[0].GetValue() != "n2" {
			continue
		}
		if h.GetSampleCount() != 2 || h.GetSampleSum() < 7.29 || h.GetSampleSum() > 7.31 {
			t.Errorf("n2: count %d sum %v, want 2 and 7.3", h.GetSampleCount(), h.GetSampleSum())
		}
		// Bounds 0.5 and 10: one sample under the first, both under the second.
		for _, b := range h.Bucket {
			want := map[float64]uint64{0.5: 1, 10: 2}[b.GetUpperBound()]
			if (b.GetUpperBound() == 0.5 || b.GetUpperBound() == 10) && b.GetCumulativeCount() != want {
				t.Errorf("n2: bucket le=%v holds %d, want %d", b.GetUpperBound(), b.GetCumulativeCount(), want)
			}
		}
	}
	if c := fams["raft_apply"]; c == nil || c.Metric[0].GetCounter().GetValue() != 3 {
		t.Errorf("raft_apply: %v, want counter 3", c)
	}
	if g := fams["raft_peers"]; g == nil || g.Metric[0].GetGauge().GetValue() != 2 {
		t.Errorf("raft_peers: %v, want gauge 2 (the last value)", g)
	}
	if fams["raft_replication_heartbeat_127_0_0_1_7000"] == nil {
		t.Errorf("legacy key with an address: not found under its mapped name; have %v", keys(fams))
	}
	if d := fams["keel_raft_metrics_dropped_total"]; d == nil || d.Metric[0].GetCounter().GetValue() != 2 {
		t.Errorf("dropped: %v, want 2", d)
	}
}

func keys(m map[string]*dto.MetricFamily) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestRaftSinkKnownUpdates: the hot path that recognises an update seen
// before keeps every rule of the slow one: two keys raft spells
// differently but that map to one name share a series, an update that
// disagreed with its name's shape is dropped every time, and a repeated
// update allocates nothing.
func TestRaftSinkKnownUpdates(t *testing.T) {
	s := newRaftSink()
	s.IncrCounter([]string{"raft", "apply"}, 1)
	s.IncrCounter([]string{"raft_apply"}, 2) // the same name, raw key of another shape
	s.IncrCounter([]string{"raft", "apply"}, 4)
	for range 3 {
		s.SetGauge([]string{"raft", "apply"}, 1) // a counter's name: dropped each time
	}
	peer := []gometrics.Label{{Name: "peer_id", Value: "n2"}}
	key := []string{"raft", "replication", "appendEntries", "rpc"}
	s.AddSampleWithLabels(key, 1, peer)
	if n := testing.AllocsPerRun(100, func() { s.AddSampleWithLabels(key, 1, peer) }); n != 0 {
		t.Errorf("a known update allocates %v times, want 0", n)
	}

	fams := gather(t, s)
	if c := fams["raft_apply"]; c == nil || len(c.Metric) != 1 || c.Metric[0].GetCounter().GetValue() != 7 {
		t.Errorf("raft_apply: %v, want one counter at 7", c)
	}
	if d := fams["keel_raft_metrics_dropped_total"]; d == nil || d.Metric[0].GetCounter().GetValue() != 3 {
		t.Errorf("dropped: %v, want 3", d)
	}
	if h := fams["raft_replication_appendEntries_rpc"]; h == nil || h.Metric[0].GetHistogram().GetSampleCount() != 102 {
		t.Errorf("appendEntries rpc: %v, want 102 samples", h)
	}
}
