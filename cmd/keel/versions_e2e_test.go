package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
	"github.com/keelstore/keel/replica"
)

// TestClusterMixedVersions: a rolling upgrade's middle. One node of a
// three-node cluster is restarted on a second build linked with another
// version; writes go through it (as follower, then as leader) and are read
// back through the others, keel cluster status shows both versions, and
// keel verify finds the images identical.
func TestClusterMixedVersions(t *testing.T) {
	const next = "e2e-next"
	bin := filepath.Join(t.TempDir(), "keel-"+next)
	if err := keeltest.BuildWith(t.Context(), bin, keeltest.BuildOptions{Version: next}); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("keel %s (feature level %d)", next, replica.CurrentLevel)
	if out := mustRun(t, 30*time.Second, bin, "version"); strings.TrimSpace(out) != want {
		t.Fatalf("keel version of the second build: %q, want %q", out, want)
	}

	c := newCluster(t, "64M", 3)
	lead := c.MustLeader()
	up := c.Followers(lead)[0]
	c.MustStop(up)
	up.Bin = bin
	c.MustRestart(up)
	c.MustCatchUp(up)
	if st := c.MustStatus(up); st.Version != next || st.Level != replica.CurrentLevel {
		t.Fatalf("%s reports version %q level %d, want %q level %d", up.ID, st.Version, st.Level, next, replica.CurrentLevel)
	}

	// Through the new build as a follower (forwarded to the old leader),
	// read back through the old leader.
	mustQemuIO(t, up.URI(), "write -P 0x5a 0 1M")
	c.MustConverge()
	mustQemuIO(t, lead.URI(), "read -P 0x5a 0 1M")

	// The new build leads; an old follower's writes go to it.
	mustRun(t, 60*time.Second, keeltest.MustBinary(t), "cluster", "transfer-leadership", up.ID, "--http", up.HTTP)
	if l := c.MustLeader(); l != up {
		t.Fatalf("leader is %s after the transfer, want %s", l.ID, up.ID)
	}
	old := c.Followers(up)[0]
	mustQemuIO(t, old.URI(), "write -P 0xa5 1M 1M")
	c.MustConverge()
	mustQemuIO(t, up.URI(), "read -P 0x5a 0 1M", "read -P 0xa5 1M 1M")

	out := mustRun(t, 60*time.Second, keeltest.MustBinary(t), "cluster", "status", "--http", lead.HTTP)
	t.Logf("keel cluster status:\n%s", out)
	for _, n := range c.Nodes() {
		ver := "dev"
		if n == up {
			ver = next
		}
		cell := fmt.Sprintf("%s/L%d", ver, replica.CurrentLevel)
		found := false
		for _, l := range strings.Split(out, "\n") {
			if f := strings.Fields(l); len(f) > 4 && f[0] == n.ID {
				found = f[4] == cell
			}
		}
		if !found {
			t.Errorf("keel cluster status: %s's VERSION is not %s", n.ID, cell)
		}
	}
	verifyOK(t, lead, "n1", "n2", "n3")
}
