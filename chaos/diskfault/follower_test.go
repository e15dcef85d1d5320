package diskfault_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keelstore/keel/chaos/diskfault"
	"github.com/keelstore/keel/replica"
)

// TestFollowerCatchesUpAfterLogWritesFail: a follower whose log writes fail
// for a while (EIO) under a steady stream of writes catches up once the
// disk is healthy again.
func TestFollowerCatchesUpAfterLogWritesFail(t *testing.T) {
	c, faultFS := faultCluster(t, 1)
	lead := c.WaitLeader()
	var victim string
	for _, id := range []string{"n1", "n2", "n3"} {
		if id != lead.ID() {
			victim = id
			break
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	var acked atomic.Int64
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			data := make([]byte, 4096)
			for i := 0; ctx.Err() == nil; i++ {
				l := c.WaitLeader()
				actx, acancel := context.WithTimeout(ctx, 5*time.Second)
				_, err := l.Apply(actx, &replica.Command{Kind: replica.KindWrite, Offset: uint64((w*1000+i)%2000) * 4096, Data: data})
				acancel()
				if err == nil {
					acked.Add(1)
				}
			}
		}()
	}
	// Each phase lasts until the writers have had n more writes
	// acknowledged (the quorum goes on without the victim).
	ackedMore := func(n int64) {
		t.Helper()
		want := acked.Load() + n
		deadline := time.Now().Add(30 * time.Second)
		for acked.Load() < want {
			if time.Now().After(deadline) {
				t.Fatalf("only %d of %d writes acknowledged in 30s", acked.Load(), want)
			}
			time.Sleep(2 * time.Millisecond) // polling the count, with a deadline
		}
	}
	for round := 0; round < 5; round++ {
		ackedMore(50)
		fs := faultFS(victim)
		if err := fs.Set(diskfault.Rules{FailWrite: "EIO"}); err != nil {
			t.Fatal(err)
		}
		ackedMore(int64(50 + round*50)) // the victim's log writes fail meanwhile
		if err := fs.Set(diskfault.Rules{}); err != nil {
			t.Fatal(err)
		}
	}
	ackedMore(100)
	cancel()
	wg.Wait()
	t.Logf("acknowledged %d writes; victim %s", acked.Load(), victim)
	c.WaitConverged()
}
