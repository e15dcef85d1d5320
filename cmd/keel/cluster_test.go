package main

import (
	"strings"
	"testing"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/wire"
)

// The VERSION column: a member's build version and feature level; a build
// from before versions reports neither and shows as "?/L1"; an unreachable
// member as "-".
func TestPrintClusterVersions(t *testing.T) {
	cs := wire.ClusterStatus{Members: []wire.Member{
		{NodeInfo: replica.NodeInfo{ID: "n1"}, Suffrage: "Voter", Status: &wire.NodeStatus{State: "Leader", Version: "1.2.3", Level: 2}},
		{NodeInfo: replica.NodeInfo{ID: "n2"}, Suffrage: "Voter", Status: &wire.NodeStatus{State: "Follower"}},
		{NodeInfo: replica.NodeInfo{ID: "n3"}, Suffrage: "Voter", Error: "connection refused"},
	}}
	var b strings.Builder
	printCluster(&b, cs)
	want := map[string]string{"n1": "1.2.3/L2", "n2": "?/L1", "n3": "-"}
	lines := strings.Split(b.String(), "\n")
	if f := strings.Fields(lines[0]); len(f) < 5 || f[4] != "VERSION" {
		t.Fatalf("header %q: want VERSION in the fifth column", lines[0])
	}
	seen := 0
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		if len(f) < 5 {
			continue
		}
		if w, ok := want[f[0]]; ok {
			seen++
			if f[4] != w {
				t.Errorf("%s: VERSION %q, want %q\n%s", f[0], f[4], w, b.String())
			}
		}
	}
	if seen != len(want) {
		t.Errorf("saw %d member rows, want %d:\n%s", seen, len(want), b.String())
	}
}
