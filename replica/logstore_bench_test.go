package replica

// Benchmarks that compare the two Raft log stores OpenStores can open
// (raft-wal and raft-boltdb/v2) on the workload Keel gives them: every disk
// write is one log entry carrying the written bytes, 4 KiB for random I/O and
// 1 MiB for sequential I/O, appended in batches of up to 64 (raft's
// MaxAppendEntries) from one goroutine, each append fsynced before it
// returns. Every store lives in b.TempDir(), so the numbers are those of the
// real filesystem under it.
//
// The time-based benchmarks (StoreLogs, StoreLogsCompacting,
// StoreLogsAfterCompaction, GetLog) suit -benchtime=2s. BenchmarkDeleteRange
// builds a full log, untimed, before every timed compaction, so give it a
// fixed count: with a duration the testing package would plan thousands of
// fills. The comparison was run as
//
//	go test -run '^$' -bench 'StoreLogs|GetLog' -benchtime=2s -count=3 ./replica/ >time.txt
//	go test -run '^$' -bench 'DeleteRange' -benchtime=3x -count=3 ./replica/ >compact.txt
//	go run golang.org/x/perf/cmd/benchstat@latest time.txt compact.txt

import (
	"fmt"
	"io/fs"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	"golang.org/x/sys/unix"
)

const (
	kib = 1 << 10
	mib = 1 << 20
)

var benchStoreKinds = []LogStoreKind{LogStoreWAL, LogStoreBolt}

// benchPayload is shared, read-only, incompressible entry data; entries are
// slices of it.
var benchPayload = func() []byte {
	p := make([]byte, 32*mib)
	r := rand.New(rand.NewChaCha8([32]byte{'k', 'e', 'e', 'l'}))
	for i := 0; i+8 <= len(p); i += 8 {
		v := r.Uint64()
		for j := range 8 {
			p[i+j] = byte(v >> (8 * j))
		}
	}
	return p
}()

func sizeName(n int) string {
	if n%mib == 0 {
		return fmt.Sprintf("%dMiB", n/mib)
	}
	return fmt.Sprintf("%dKiB", n/kib)
}

// openBenchStores opens a store of kind in a fresh directory that is removed,
// after the store is closed, when the benchmark (or this round of it) ends.
func openBenchStores(b *testing.B, kind LogStoreKind) (*Stores, string) {
	b.Helper()
	dir := b.TempDir()
	s, err := OpenStores(kind, dir, hclog.NewNullLogger())
	if err != nil {
		b.Fatal(err)
	}
	// Cleanups run last-registered first: the store closes before
	// TempDir's removal.
	b.Cleanup(func() { _ = s.Close() })
	return s, dir
}

// newBatch returns n entries of size bytes each; storeBatch numbers them.
func newBatch(n, size int) []*raft.Log {
	logs := make([]*raft.Log, n)
	for i := range logs {
		off := (i * 4 * kib) % (len(benchPayload) - size + 1)
		logs[i] = &raft.Log{
			Type: raft.LogCommand,
			Term: 1,
			Data: benchPayload[off : off+size],
		}
	}
	return logs
}

// storeBatch appends logs at indexes first, first+1, ... and returns the
// next index.
func storeBatch(b *testing.B, ls raft.LogStore, logs []*raft.Log, first uint64) uint64 {
	now := time.Now()
	for i, l := range logs {
		l.Index = first + uint64(i)
		l.AppendedAt = now
	}
	if err := ls.StoreLogs(logs); err != nil {
		b.Fatalf("StoreLogs at %d: %v", first, err)
	}
	return first + uint64(len(logs))
}

// fill appends n entries of size bytes from index first in batches of
// batch, returning the next index.
func fill(b *testing.B, ls raft.LogStore, first uint64, n, size, batch int) uint64 {
	logs := newBatch(batch, size)
	next := first
	for left := n; left > 0; left -= batch {
		if left < batch {
			logs = logs[:left]
		}
		next = storeBatch(b, ls, logs, next)
	}
	return next
}

// diskBytes is what the files under dir occupy on disk (allocated blocks,
// as du counts them), not their apparent sizes.
func diskBytes(b *testing.B, dir string) int64 {
	b.Helper()
	var total int64
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil {
			return err
		}
		total += st.Blocks * 512
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	return total
}

func reportEntriesPerSec(b *testing.B, entries int) {
	if s := b.Elapsed().Seconds(); s > 0 {
		b.ReportMetric(float64(entries)/s, "entries/s")
	}
}

// BenchmarkStoreLogs measures fsynced appends into an empty, growing log.
// One op is one StoreLogs call of batch entries.
func BenchmarkStoreLogs(b *testing.B) {
	cases := []struct{ size, batch int }{
		{4 * kib, 1}, {4 * kib, 8}, {4 * kib, 64},
		{1 * mib, 1}, {1 * mib, 8},
	}
	for _, kind := range benchStoreKinds {
		for _, c := range cases {
			name := fmt.Sprintf("store=%s/entry=%s/batch=%d", kind, sizeName(c.size), c.batch)
			b.Run(name, func(b *testing.B) {
				s, _ := openBenchStores(b, kind)
				logs := newBatch(c.batch, c.size)
				b.SetBytes(int64(c.size * c.batch))
				next, calls := uint64(1), 0
				for b.Loop() {
					next = storeBatch(b, s.Log, logs, next)
					calls++
				}
				reportEntriesPerSec(b, calls*c.batch)
			})
		}
	}
}

// BenchmarkStoreLogsCompacting is the steady state of a busy node: appends
// into a log that already holds trailing entries, dropping the oldest ones
// whenever threshold entries have accumulated beyond trailing, as raft does
// after each snapshot (its defaults: TrailingLogs 10240, SnapshotThreshold
// 8192). The compactions are inside the timed appends; ms/compaction is
// their mean duration and MiB-disk the store's size at the end.
func BenchmarkStoreLogsCompacting(b *testing.B) {
	cases := []struct{ size, batch, trailing, threshold int }{
		{4 * kib, 64, 10240, 8192},
		// Scaled down for 1 MiB entries so a run stays within a few
		// GiB of disk: 128 MiB kept, compacted every 128 MiB.
		{1 * mib, 8, 128, 128},
	}
	for _, kind := range benchStoreKinds {
		for _, c := range cases {
			name := fmt.Sprintf("store=%s/entry=%s/batch=%d/keep=%d/every=%d",
				kind, sizeName(c.size), c.batch, c.trailing, c.threshold)
			b.Run(name, func(b *testing.B) {
				s, dir := openBenchStores(b, kind)
				first := uint64(1)
				next := fill(b, s.Log, first, c.trailing, c.size, c.batch)
				logs := newBatch(c.batch, c.size)
				b.SetBytes(int64(c.size * c.batch))
				calls, compactions := 0, 0
				var compacting time.Duration
				for b.Loop() {
					next = storeBatch(b, s.Log, logs, next)
					calls++
					if next-first >= uint64(c.trailing+c.threshold) {
						newFirst := next - uint64(c.trailing)
						t0 := time.Now()
						if err := s.Log.DeleteRange(first, newFirst-1); err != nil {
							b.Fatal(err)
						}
						compacting += time.Since(t0)
						compactions++
						first = newFirst
					}
				}
				reportEntriesPerSec(b, calls*c.batch)
				b.ReportMetric(float64(compactions), "compactions")
				if compactions > 0 {
					b.ReportMetric(float64(compacting.Milliseconds())/float64(compactions), "ms/compaction")
				}
				b.ReportMetric(float64(diskBytes(b, dir))/mib, "MiB-disk")
			})
		}
	}
}

// BenchmarkStoreLogsAfterCompaction appends 4 KiB entries in batches of 64
// to a log that has just dropped freedMiB of 1 MiB entries (keeping the
// newest 128), as after a burst of sequential writes, or after a follower
// that was away comes back and the leader may compact again. Compare with
// BenchmarkStoreLogs/.../entry=4KiB/batch=64, which appends to a fresh log:
// bolt keeps the freed pages in a freelist that it rewrites on every commit.
func BenchmarkStoreLogsAfterCompaction(b *testing.B) {
	const freedMiB, kept, batch = 2048, 128, 64
	for _, kind := range benchStoreKinds {
		name := fmt.Sprintf("store=%s/freed=%dMiB/entry=4KiB/batch=%d", kind, freedMiB, batch)
		b.Run(name, func(b *testing.B) {
			s, dir := openBenchStores(b, kind)
			next := fill(b, s.Log, 1, freedMiB+kept, mib, 8)
			if err := s.Log.DeleteRange(1, next-kept-1); err != nil {
				b.Fatal(err)
			}
			logs := newBatch(batch, 4*kib)
			b.SetBytes(batch * 4 * kib)
			calls := 0
			for b.Loop() {
				next = storeBatch(b, s.Log, logs, next)
				calls++
			}
			reportEntriesPerSec(b, calls*batch)
			b.ReportMetric(float64(diskBytes(b, dir))/mib, "MiB-disk")
		})
	}
}

// BenchmarkGetLog measures what the leader does to replicate: read back
// entries it has just appended. One op is one GetLog, cycling backwards over
// the newest window entries of a log of n entries.
func BenchmarkGetLog(b *testing.B) {
	cases := []struct{ size, n, window int }{
		{4 * kib, 4096, 1024},
		{1 * mib, 192, 64},
	}
	for _, kind := range benchStoreKinds {
		for _, c := range cases {
			name := fmt.Sprintf("store=%s/entry=%s", kind, sizeName(c.size))
			b.Run(name, func(b *testing.B) {
				s, _ := openBenchStores(b, kind)
				batch := 64
				if c.size >= mib {
					batch = 8
				}
				last := fill(b, s.Log, 1, c.n, c.size, batch) - 1
				b.SetBytes(int64(c.size))
				var l raft.Log
				i := 0
				for b.Loop() {
					idx := last - uint64(i%c.window)
					if err := s.Log.GetLog(idx, &l); err != nil {
						b.Fatalf("GetLog(%d): %v", idx, err)
					}
					if l.Index != idx || len(l.Data) != c.size {
						b.Fatalf("GetLog(%d) = index %d, %d bytes", idx, l.Index, len(l.Data))
					}
					i++
				}
			})
		}
	}
}

// BenchmarkDeleteRange measures compaction after a snapshot: in a log of n
// entries, delete the oldest del. Each op builds its own log untimed (so run
// it with a fixed -benchtime=Nx) and times only DeleteRange. Reported with
// it, as means over the ops: the store's disk usage before the delete, right
// after it, and after appending del entries again (does freed space get
// reused, or returned?).
func BenchmarkDeleteRange(b *testing.B) {
	cases := []struct{ size, n, del, batch int }{
		{4 * kib, 20000, 10000, 64},
		{4 * kib, 50240, 40000, 64},
		{1 * mib, 512, 256, 8},
	}
	for _, kind := range benchStoreKinds {
		for _, c := range cases {
			name := fmt.Sprintf("store=%s/entry=%s/n=%d/delete=%d", kind, sizeName(c.size), c.n, c.del)
			b.Run(name, func(b *testing.B) {
				var before, after, refill int64
				ops := 0
				for b.Loop() {
					b.StopTimer()
					s, dir := openBenchStores(b, kind)
					next := fill(b, s.Log, 1, c.n, c.size, c.batch)
					before += diskBytes(b, dir)
					b.StartTimer()
					if err := s.Log.DeleteRange(1, uint64(c.del)); err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					if fi, err := s.Log.FirstIndex(); err != nil || fi != uint64(c.del)+1 {
						b.Fatalf("FirstIndex after delete = %d, %v; want %d", fi, err, c.del+1)
					}
					after += diskBytes(b, dir)
					fill(b, s.Log, next, c.del, c.size, c.batch)
					refill += diskBytes(b, dir)
					_ = s.Close()
					ops++
					b.StartTimer()
				}
				n := float64(ops) * mib
				b.ReportMetric(float64(before)/n, "MiB-before")
				b.ReportMetric(float64(after)/n, "MiB-after")
				b.ReportMetric(float64(refill)/n, "MiB-refill")
			})
		}
	}
}
