package supervise

import "testing"

func TestPointHook(t *testing.T) {
	Point(PointRaft) // no hook: nothing happens
	var got []string
	SetPointHook(func(name string) { got = append(got, name) })
	defer SetPointHook(nil)
	Point(PointRaft)
	Point(PointAccept)
	if len(got) != 2 || got[0] != PointRaft || got[1] != PointAccept {
		t.Fatalf("hook saw %v", got)
	}
	SetPointHook(nil)
	Point(PointRaft)
	if len(got) != 2 {
		t.Fatalf("removed hook still called: %v", got)
	}
}
