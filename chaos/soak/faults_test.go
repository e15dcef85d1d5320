package soak

import (
	"slices"
	"testing"
	"time"
)

// The same seed plans the same faults; every round deals every kind.
func TestPlannerReplays(t *testing.T) {
	kinds := AllFaults()
	a, b := newPlanner(42, kinds, 3), newPlanner(42, kinds, 3)
	seen := map[string]int{}
	for i := 0; i < 2*len(kinds); i++ {
		pa, pb := a.next(), b.next()
		if pa.kind != pb.kind || pa.hold != pb.hold || pa.gap != pb.gap || pa.leader != pb.leader || !slices.Equal(pa.victims, pb.victims) {
			t.Fatalf("plan %d differs for one seed: %+v vs %+v", i, pa, pb)
		}
		if pa.victims[0] == pa.victims[1] {
			t.Fatalf("plan %d: the same victim twice: %v", i, pa.victims)
		}
		seen[pa.kind]++
	}
	for _, k := range kinds {
		if seen[k] != 2 {
			t.Errorf("two rounds dealt %s %d times, want 2", k, seen[k])
		}
	}
	c := newPlanner(43, kinds, 3)
	same := true
	for i := 0; i < len(kinds); i++ {
		if c.next().kind != newPlanner(42, kinds, 3).next().kind {
			same = false
		}
	}
	if same {
		t.Error("seeds 42 and 43 deal the same kinds")
	}
}

// Errors are allowed inside an unavailable fault's window only: from its
// start to the first acknowledged write after it was healed.
func TestClientErrorWindows(t *testing.T) {
	s := time.Second
	ops := []Op{
		w(0, 1, a1, 0, s),
		unknown(w(1, 1, b1, 11*s, 12*s)),              // inside the window
		unknown(w(1, 1, MakeValue(2, 2), 30*s, 31*s)), // long after it
		w(0, 1, a2, 21*s, 22*s),                       // first write after the heal at 20s
	}
	faults := []Fault{{Kind: FaultQuorumLoss, Start: 10 * s, Healed: 20 * s, Unavailable: true}, {Kind: FaultKill, Start: 29 * s, Healed: 32 * s}}
	errs, unexpected := clientErrors(ops, faults)
	if len(errs) != 2 || !errs[0].Allowed || errs[1].Allowed || unexpected != 1 {
		t.Fatalf("errors %+v, unexpected %d; want the first allowed, the second not", errs, unexpected)
	}
	rec := recovery(ops, faults)
	if rec[0] != 12*s || rec[1] != -1 {
		t.Fatalf("recovery %v, want [12s -1]", rec)
	}
}
