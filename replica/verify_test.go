package replica_test

import (
	"context"
	"testing"

	"github.com/keelstore/keel/replica/replicatest"
)

// A digest reports its progress through DigestProgress: none running
// before and after, and every byte of the image fingerprinted by its end.
func TestDigestProgress(t *testing.T) {
	c := replicatest.New(t, 1, replicatest.Options{})
	n := c.Node("n1")
	if _, _, running := n.DigestProgress(); running {
		t.Fatal("a digest runs before any was asked for")
	}
	if _, err := n.Digest(context.Background(), 0); err != nil {
		t.Fatal(err)
	}
	done, total, running := n.DigestProgress()
	if running || total != c.Size || done != c.Size {
		t.Fatalf("after a digest: done %d of %d, running %v; want all %d done and none running", done, total, running, c.Size)
	}
}
