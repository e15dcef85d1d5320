package main

import (
	"strings"
	"testing"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/wire"
)

// row returns the fields of the table row of member id, and the header's.
func row(t *testing.T, out, id string) (header, fields []string) {
	t.Helper()
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) == 0 {
			continue
		}
		if f[0] == "ID" {
			header = f
		}
		if f[0] == id && header != nil {
			return header, f
		}
	}
	t.Fatalf("no row for %s:\n%s", id, out)
	return nil, nil
}

// cell is the value of column name in member id's row.
func cell(t *testing.T, out, id, name string) string {
	t.Helper()
	h, f := row(t, out, id)
	for i, c := range h {
		if c == name && i < len(f) {
			return f[i]
		}
	}
	t.Fatalf("no column %s in %v:\n%s", name, h, out)
	return ""
}

// The VERSION column: a member's build version and feature level; a build
// from before versions reports neither and shows as "?/L1"; an unreachable
// member as "-". VERSION stays the fifth column (scripts and tests read it).
func TestPrintClusterVersions(t *testing.T) {
	cs := wire.ClusterStatus{Leader: "n1", Members: []wire.Member{
		{NodeInfo: replica.NodeInfo{ID: "n1"}, Suffrage: "Voter", Status: &wire.NodeStatus{State: "Leader", Version: "1.2.3", Level: 2}},
		{NodeInfo: replica.NodeInfo{ID: "n2"}, Suffrage: "Voter", Status: &wire.NodeStatus{State: "Follower"}},
		{NodeInfo: replica.NodeInfo{ID: "n3"}, Suffrage: "Voter", Error: "connection refused"},
	}}
	var b strings.Builder
	printCluster(&b, cs)
	for id, want := range map[string]string{"n1": "1.2.3/L2", "n2": "?/L1", "n3": "-"} {
		h, f := row(t, b.String(), id)
		if h[4] != "VERSION" || f[4] != want {
			t.Errorf("%s: column 5 %s = %q, want VERSION %q\n%s", id, h[4], f[4], want, b.String())
		}
	}
}

// A person sees the leader with its term, the writer with its epoch, each
// member's lag behind the leader and whether it is healthy (and why not),
// and a progress bar for a resync that runs.
func TestPrintClusterForPeople(t *testing.T) {
	cs := wire.ClusterStatus{Leader: "n2", Members: []wire.Member{
		{NodeInfo: replica.NodeInfo{ID: "n1", NBD: "10.0.0.1:10809"}, Suffrage: "Voter", Status: &wire.NodeStatus{State: "Follower", AppliedIndex: 990}},
		{NodeInfo: replica.NodeInfo{ID: "n2"}, Suffrage: "Voter", Status: &wire.NodeStatus{State: "Leader", Term: 7, CommitIndex: 1001, AppliedIndex: 1000, Writer: "vm-17", Epoch: 412}},
		{NodeInfo: replica.NodeInfo{ID: "n3"}, Suffrage: "Voter", Error: "dial tcp 10.0.0.3:7201: connection refused"},
		{NodeInfo: replica.NodeInfo{ID: "n4"}, Suffrage: "Nonvoter", Status: &wire.NodeStatus{State: "Follower", AppliedIndex: 12,
			Sync: &wire.SyncStatus{Active: true, BytesTotal: 4 << 30, BytesCompared: 1 << 30, BytesMoved: 512 << 20, Peers: 2}}},
	}}
	var b strings.Builder
	printCluster(&b, cs)
	out := b.String()
	t.Logf("keel cluster status:\n%s", out)
	for _, want := range []string{"Leader:  n2, term 7", "Writer:  vm-17, epoch 412",
		"n3: not answering: dial tcp 10.0.0.3:7201: connection refused", "n4: resyncing its image from peers",
		"Resync on n4: [#######-----------------------]  25%  1.0GiB of 4.0GiB compared, 512.0MiB moved"} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in:\n%s", want, out)
		}
	}
	for _, c := range []struct{ id, col, want string }{
		{"n1", "LAG", "10"}, {"n1", "HEALTHY", "yes"}, {"n1", "ROLE", "follower"}, {"n1", "NBD", "10.0.0.1:10809"},
		{"n2", "LAG", "0"}, {"n2", "ROLE", "leader"}, {"n2", "HEALTHY", "yes"},
		{"n3", "ROLE", "unreachable"}, {"n3", "HEALTHY", "no"}, {"n3", "LAG", "-"},
		{"n4", "LAG", "988"}, {"n4", "HEALTHY", "no"}, {"n4", "SUFFRAGE", "Nonvoter"},
	} {
		if got := cell(t, out, c.id, c.col); got != c.want {
			t.Errorf("%s %s = %q, want %q\n%s", c.id, c.col, got, c.want, out)
		}
	}

	b.Reset()
	printCluster(&b, wire.ClusterStatus{Members: cs.Members[:1]})
	if !strings.Contains(b.String(), "Leader:  none") {
		t.Errorf("without a leader:\n%s", b.String())
	}
}

func TestProgressBar(t *testing.T) {
	for _, c := range []struct {
		done, total uint64
		want        string
	}{{0, 100, "[----------]   0%"}, {50, 100, "[#####-----]  50%"}, {100, 100, "[##########] 100%"}, {7, 0, "[----------]   0%"}, {200, 100, "[##########] 100%"}} {
		if got := progressBar(c.done, c.total, 10); got != c.want {
			t.Errorf("progressBar(%d, %d) = %q, want %q", c.done, c.total, got, c.want)
		}
	}
}
