package replica_test

import (
	"runtime"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	wal "github.com/hashicorp/raft-wal"
)

// TestLogStoreSealedSegmentsHoldNoBuffer: raft-wal keeps the Writer of
// every sealed segment as that segment's reader, and unpatched each kept
// its commit buffer, grown to the largest batch appended. With batches of
// 1 MiB writes that was 32 MiB per 64 MiB segment of log, 336 MiB of a
// follower's heap in a sequential write (third_party/KEEL-PATCH.md). With
// the patch the log's heap stays near one buffer however many segments
// it has.
func TestLogStoreSealedSegmentsHoldNoBuffer(t *testing.T) {
	const (
		entry    = 1 << 20
		batch    = 4       // entries per StoreLogs: an 8 MiB commit buffer
		segSize  = 4 << 20 // sealed after about every batch
		segments = 12
	)
	w, err := wal.Open(t.TempDir(), wal.WithLogger(hclog.NewNullLogger()), wal.WithSegmentSize(segSize))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	before := heap()
	data := make([]byte, entry)
	idx := uint64(1)
	for range segments {
		logs := make([]*raft.Log, batch)
		for i := range logs {
			logs[i] = &raft.Log{Index: idx, Term: 1, Type: raft.LogCommand, Data: data}
			idx++
		}
		if err := w.StoreLogs(logs); err != nil {
			t.Fatal(err)
		}
	}
	grew := int64(heap()) - int64(before)
	t.Logf("heap grew %d MiB over %d segments of %d MiB batches", grew>>20, segments, batch*entry>>20)
	if limit := int64(3 * 2 * batch * entry); grew > limit {
		t.Errorf("the log's heap grew by %d MiB for %d sealed segments, want under %d MiB: sealed segments keep their commit buffers", grew>>20, segments, limit>>20)
	}
	runtime.KeepAlive(data)
}
