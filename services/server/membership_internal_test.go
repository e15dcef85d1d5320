package server

import (
	"reflect"
	"testing"

	"github.com/keelstore/keel/services/wire"
)

func TestLagsOf(t *testing.T) {
	got := lagsOf(100, map[string]wire.NodeStatus{
		"n2": {AppliedIndex: 100}, // caught up
		"n3": {AppliedIndex: 37},  // behind
		"n4": {AppliedIndex: 104}, // polled after the leader's index was read
	})
	want := map[string]uint64{"n2": 0, "n3": 63, "n4": 0}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("lagsOf = %v, want %v", got, want)
	}
	var l PeerLags
	l.Set(got)
	snap := l.Snapshot()
	snap["n3"] = 0
	if l.Snapshot()["n3"] != 63 {
		t.Fatal("Snapshot shares the map it returns")
	}
	l.Set(nil)
	if len(l.Snapshot()) != 0 {
		t.Fatal("Set(nil) kept lags")
	}
}

func TestLeaderChanged(t *testing.T) {
	for _, c := range []struct {
		last, cur string
		want      bool
	}{{"", "", false}, {"", "n1", true}, {"n1", "n1", false}, {"n1", "", false}, {"n1", "n2", true}} {
		if got := leaderChanged(c.last, c.cur); got != c.want {
			t.Errorf("leaderChanged(%q, %q) = %v, want %v", c.last, c.cur, got, c.want)
		}
	}
}

func TestWriterEvent(t *testing.T) {
	none, a1, a2, b3 := writerHolder{}, writerHolder{"a", 1}, writerHolder{"a", 2}, writerHolder{"b", 3}
	for _, c := range []struct {
		prev  writerHolder
		known bool
		cur   writerHolder
		want  string
	}{
		{none, false, none, ""},
		{none, false, a1, "writer holds the volume"},
		{a1, true, a1, ""},
		{none, true, a1, "writer claimed the volume"},
		{a1, true, a2, "writer claimed the volume"}, // the same name claims again
		{a2, true, b3, "writer took the volume over"},
		{b3, true, writerHolder{"", 3}, "writer released the volume"},
	} {
		if got := writerEvent(c.prev, c.known, c.cur); got != c.want {
			t.Errorf("writerEvent(%v, %v, %v) = %q, want %q", c.prev, c.known, c.cur, got, c.want)
		}
	}
}
