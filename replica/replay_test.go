package replica_test

import (
	"bytes"
	"testing"
	"time"

	"github.com/keelstore/keel/replica/replicatest"
)

// TestNoReadsWhileReplaying: a node opened again replays its log over an
// image that already holds every entry, so a block goes back through its
// earlier values; while Replaying says so, nothing may be read. Reads
// taken whenever it does not must all find the newest value.
func TestNoReadsWhileReplaying(t *testing.T) {
	c := replicatest.New(t, 3, replicatest.Options{})
	const writes = 1000
	last := make([]byte, 4096)
	for i := 1; i <= writes; i++ {
		last = bytes.Repeat([]byte{byte(i)}, 4096)
		mustApply(t, c, write(0, 0, 0, 0, last))
	}
	c.WaitConverged()
	follower := "n2"
	if c.WaitLeader().ID() == follower {
		follower = "n3"
	}
	c.Stop(follower)
	n := c.Start(follower, false)
	sawReplay, reads := false, 0
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if n.Replaying() {
			sawReplay = true
			continue
		}
		got := readImage(t, n, 0, 4096)
		if n.Replaying() {
			continue // a replay began during the read: not covered (Replaying's doc)
		}
		reads++
		if !bytes.Equal(got, last) {
			t.Fatalf("read while not replaying found write %d of %d", got[0], writes)
		}
		if sawReplay && n.Raft().AppliedIndex() >= c.WaitLeader().Raft().AppliedIndex() {
			break
		}
	}
	if !sawReplay {
		t.Fatal("the reopened node never said it was replaying")
	}
	t.Logf("%d reads, none stale", reads)
}
