package main

import (
	"strings"
	"testing"
)

func TestGoalsJudged(t *testing.T) {
	tb := &Table{Name: "proxy"}
	set := func(job string, u Unit, target string, vs ...float64) {
		for i, v := range vs {
			tb.Row(job, u).Set(target, i, v, true)
		}
	}
	set(SeqWrite.Name, UnitMBps, "proxy", 310, 290, 320) // median 310: tmpfs goal met
	set(RandWrite.Name, UnitIOPS, "proxy", 9000)         // tmpfs missed, disk met
	set(RandWrite1.Name, UnitIOPS, "proxy", 1500)        // missed
	set(RandReadCold.Name, UnitIOPS, "proxy", 900)       // 0.9x: met
	set(RandReadCold.Name, UnitIOPS, "leader", 1000)     //
	set(RandRead.Name, UnitIOPS, "proxy", 50)            // 0.5x nbdkit: missed
	set(RandRead.Name, UnitIOPS, "nbdkit", 100)          //
	f := newFigures()
	f.addGiB("keel-serve", "seq-write-r1", "keel-serve", 2)
	for _, n := range []string{"n1", "n2", "n3"} {
		f.addGiB("proxy", "seq-write-r1", n, 5)
	}
	f.addGiB("proxy", "seq-write-r2", "n1", 9) // n1's median: 7 = 3.5x, met
	f.notePeak("n2", 300<<20)                  // over 256 MiB: missed
	f.diskMBps = 600                           // ceiling 100 MB/s: 310 is met on disk

	check := func(lines []GoalLine, place, goal, want string) {
		t.Helper()
		for _, l := range lines {
			if strings.HasPrefix(l.Goal, goal) {
				if got := l.Places[place]; !strings.Contains(got, want) {
					t.Errorf("%s on %s: %q, want it to say %q", goal, place, got, want)
				}
				return
			}
		}
		t.Errorf("no goal %q", goal)
	}
	tm := Goals(tb, f, true)
	check(tm, "tmpfs", "seq write 1M QD8", "310 MB/s MET")
	check(tm, "tmpfs", "rand write 4k QD32", "9000 IOPS MISSED")
	check(tm, "tmpfs", "rand write 4k QD1", "1500 IOPS MISSED")
	check(tm, "tmpfs", "rand-read-cold", "0.90x MET")
	check(tm, "tmpfs", "seq-read-cold", "not measured")
	check(tm, "tmpfs", "warm rand read", "0.50x MISSED")
	check(tm, "tmpfs", "server CPU-seconds per GiB written (seq-write", "n1 7.0 vs 2.0 = 3.5x MET")
	check(tm, "tmpfs", "server CPU-seconds per GiB written (rand-write", "not measured")
	check(tm, "tmpfs", "server peak RSS", "n2 300 MiB MISSED")
	dk := Goals(tb, f, false)
	check(dk, "disk", "seq write 1M QD8", "3.10x of 100 MB/s MET")
	check(dk, "disk", "rand write 4k QD32", "9000 IOPS MET")

	all := MergeGoals(tm, dk)
	if len(all) != len(tm) {
		t.Fatalf("merged %d goals, want %d", len(all), len(tm))
	}
	sec := GoalsSection(all, []Place{{Name: "tmpfs"}, {Name: "disk"}})
	if sec.Grid.Head[1] != "tmpfs" || sec.Grid.Head[2] != "disk" || len(sec.Grid.Body) != len(all) {
		t.Fatalf("section %+v", sec.Grid.Head)
	}
	if key("proxy", "rand-write-qd1-r12") != "proxy rand-write-qd1" {
		t.Errorf("key strips the round: %q", key("proxy", "rand-write-qd1-r12"))
	}
}
