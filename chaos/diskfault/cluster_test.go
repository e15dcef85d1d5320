package diskfault_test

import (
	"sync"
	"testing"

	"github.com/hashicorp/raft-wal/types"

	"github.com/keelstore/keel/chaos/diskfault"
	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/replica/replicatest"
)

// faultCluster starts three in-process nodes, each node's Raft log under a
// disk fault layer made with seed, and returns the cluster and a lookup of
// a node's layer (the one of its latest start).
func faultCluster(t *testing.T, seed uint64) (*replicatest.Cluster, func(id string) *diskfault.FS) {
	var mu sync.Mutex
	fss := map[string]*diskfault.FS{}
	c := replicatest.New(t, 3, replicatest.Options{Config: func(cfg *replica.NodeConfig) {
		id := cfg.ID
		cfg.WrapWALFS = func(v types.VFS) types.VFS {
			fs := diskfault.New(v, seed)
			mu.Lock()
			fss[id] = fs
			mu.Unlock()
			return fs
		}
	}})
	return c, func(id string) *diskfault.FS {
		mu.Lock()
		defer mu.Unlock()
		return fss[id]
	}
}
