package diskfault_test

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	"github.com/keelstore/keel/chaos/diskfault"
	"github.com/keelstore/keel/replica"
)

// TestLeaderDiesBetweenSendAndFsync: the leader sends an entry to its
// followers while its own log write is still in progress (the patched
// hashicorp/raft, third_party/KEEL-PATCH.md), and the power fails in that
// fsync. The write must not be acknowledged before the leader's fsync
// returns, the followers' quorum carries it, the writer's retry after the
// failover is refused as a duplicate (applied exactly once), and the old
// leader, restarted without the entry, catches up to identical images.
func TestLeaderDiesBetweenSendAndFsync(t *testing.T) {
	c, faultFS := faultCluster(t, 7)
	claim, err := c.Apply(&replica.Command{Kind: replica.KindClaim, Writer: "w"})
	if err != nil || claim.Err != nil {
		t.Fatalf("claim: %v %v", err, claim.Err)
	}
	write := func(req, off uint64, data []byte) *replica.Command {
		return &replica.Command{Kind: replica.KindWrite, Epoch: claim.Epoch, ReqID: req, AckedBelow: 1, Offset: off, Data: data}
	}
	for req := uint64(1); req <= 10; req++ {
		if r, err := c.Apply(write(req, req*4096, bytes.Repeat([]byte{byte(req)}, 4096))); err != nil || r.Err != nil {
			t.Fatalf("write %d: %v %v", req, err, r.Err)
		}
	}

	lead := c.WaitLeader()
	fs := faultFS(lead.ID())
	reached, release := make(chan struct{}), make(chan struct{})
	var once, releaseOnce sync.Once
	// A failure before the crash must not leave the leader's log writer
	// waiting in the hook: the cluster's cleanup stops that node.
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	lostc := make(chan int, 1)
	fs.OnCrash(func() {
		once.Do(func() {
			close(reached)
			<-release
			lostc <- fs.DropPending()
		})
	})
	if err := fs.Set(diskfault.Rules{Lazy: true, CrashAtSync: true}); err != nil {
		t.Fatal(err)
	}

	data := bytes.Repeat([]byte("in flight "), 410)[:4096]
	const off = 64 << 10
	idx := lead.Raft().LastIndex() + 1 // the write's entry
	applied := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		r, err := lead.Apply(ctx, write(11, off, data))
		if err == nil {
			err = r.Err
		}
		applied <- err
	}()
	select {
	case <-reached:
	case <-time.After(10 * time.Second):
		t.Fatal("the leader did not reach its log's fsync in 10s")
	}

	// The followers have the entry while the leader's fsync has not
	// returned: the leader sent before its own write finished.
	deadline := time.Now().Add(10 * time.Second)
	for _, id := range []string{"n1", "n2", "n3"} {
		if id == lead.ID() {
			continue
		}
		for c.Node(id).Raft().LastIndex() < idx {
			if time.Now().After(deadline) {
				t.Fatalf("follower %s has index %d, not the leader's in-flight entry %d, while the leader fsyncs: the leader did not send before its own write", id, c.Node(id).Raft().LastIndex(), idx)
			}
			time.Sleep(5 * time.Millisecond) // polling the follower's log, with a deadline
		}
	}
	// Both followers hold it, so it may be committed; but not acknowledged
	// or applied by a leader whose own log does not hold it yet.
	time.Sleep(200 * time.Millisecond) // room for a wrong acknowledgement to show
	select {
	case err := <-applied:
		t.Fatalf("the write was answered (%v) before the leader's own fsync returned", err)
	default:
	}
	if ci := lead.Raft().CommitIndex(); ci >= idx {
		t.Errorf("leader's commit index %d reached the entry %d before its own fsync returned", ci, idx)
	}
	if ai := lead.Raft().AppliedIndex(); ai >= idx {
		t.Errorf("leader applied index %d, the entry %d, before its own fsync returned", ai, idx)
	}

	// The power fails in that fsync; the node is gone.
	releaseOnce.Do(func() { close(release) })
	if lost := <-lostc; lost == 0 {
		t.Error("the crash lost nothing of the leader's log: the entry was on its disk after all")
	}
	dead := lead.ID()
	c.Stop(dead)
	select {
	case err := <-applied:
		if err == nil {
			t.Fatal("the write was acknowledged by a leader whose fsync failed")
		}
		t.Logf("the writer saw: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("the write to the dead leader was not answered in 20s")
	}

	// The writer retries on the new leader: the quorum had the entry, so
	// the retry is a duplicate and the data is there once.
	r, err := c.Apply(write(11, off, data))
	if err != nil || r.Err != nil {
		t.Fatalf("retry on the new leader: %v %v", err, r.Err)
	}
	if !r.Duplicate {
		t.Errorf("retry on the new leader was applied again (%+v): the followers' copy of the entry was lost", r)
	}
	c.Start(dead, false)
	c.WaitConverged()
	for _, id := range []string{"n1", "n2", "n3"} {
		got := make([]byte, len(data))
		if err := c.Node(id).Image().ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			t.Errorf("%s: the in-flight write is not in its image", id)
		}
	}
}
