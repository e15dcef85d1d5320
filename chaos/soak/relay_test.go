package soak

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
)

// TestProxyWritesThroughAFollower: while the proxy cannot reach the leader
// (proxy-cut-leader), and a quorum exists, writes keep being acknowledged
// through a follower (wire.RelayHeader): the first write issued after a
// cut is acknowledged before the cut heals. Before the relay, every write
// waited for the heal (and a cut longer than --write-timeout failed them).
func TestProxyWritesThroughAFollower(t *testing.T) {
	bin := os.Getenv("KEEL_CHAOS_BIN")
	if bin == "" {
		bin = filepath.Join(t.TempDir(), "keel")
		if err := BuildChaos(context.Background(), bin, os.Getenv(keeltest.EnvRace) == "1"); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := Run(ctx, Config{Bin: bin, Dir: t.TempDir(), Duration: 16 * time.Second, Seed: 11, Faults: []string{FaultProxyCutLeader}, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + res.Summary())
	if !res.OK() {
		t.Fatal("the soak failed")
	}
	long := 0
	for i, f := range res.Faults {
		held := f.Healed - f.Start
		if held < 1500*time.Millisecond {
			continue // shorter than the relay's start plus a write
		}
		long++
		if r := res.Recovery[i]; r < 0 || r >= held {
			t.Errorf("cut from the leader at %v for %v: the first write after it was acknowledged %v after it, not before the heal", f.Start, held, r)
		}
	}
	if long == 0 {
		t.Fatal("no cut lasted 1.5s: pick a seed with longer holds")
	}
}
