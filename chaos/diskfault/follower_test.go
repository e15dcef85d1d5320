package diskfault_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft-wal/types"

	"github.com/keelstore/keel/chaos/diskfault"
	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/replica/replicatest"
)

// TestFollowerCatchesUpAfterLogWritesFail: a follower whose log writes fail
// for a while (EIO) under a steady stream of writes catches up once the
// disk is healthy again.
func TestFollowerCatchesUpAfterLogWritesFail(t *testing.T) {
	var mu sync.Mutex
	fss := map[string]*diskfault.FS{}
	c := replicatest.New(t, 3, replicatest.Options{Config: func(cfg *replica.NodeConfig) {
		id := cfg.ID
		cfg.WrapWALFS = func(v types.VFS) types.VFS {
			fs := diskfault.New(v, 1)
			mu.Lock()
			fss[id] = fs
			mu.Unlock()
			return fs
		}
	}})
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
	for round := 0; round < 5; round++ {
		time.Sleep(300 * time.Millisecond)
		mu.Lock()
		fs := fss[victim]
		mu.Unlock()
		if err := fs.Set(diskfault.Rules{FailWrite: "EIO"}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(200+round*200) * time.Millisecond)
		if err := fs.Set(diskfault.Rules{}); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(500 * time.Millisecond)
	cancel()
	wg.Wait()
	t.Logf("acknowledged %d writes; victim %s", acked.Load(), victim)
	c.WaitConverged()
}
