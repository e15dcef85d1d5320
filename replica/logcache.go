package replica

import (
	"fmt"
	"sync"
	"sync/atomic"

	gometrics "github.com/hashicorp/go-metrics/compat"
	"github.com/hashicorp/raft"
)

// DefaultLogCacheBytes is NodeConfig.LogCacheBytes when it is zero. It
// covers the entries of several AppendEntries rounds of 1 MiB writes at
// QD8; 64 MiB put the live heap at the server's default 192 MiB memory
// limit and the collector ran back to back (docs/replication.md, "Log
// cache").
const DefaultLogCacheBytes = 16 << 20

// The range NodeConfig.LogCacheBytes may take (besides zero, the default,
// and -1, no cache): at least one 1 MiB write entry, at most 4 GiB.
const (
	minLogCacheBytes = 1 << 20
	maxLogCacheBytes = 4 << 30
)

// validLogCacheBytes checks NodeConfig.LogCacheBytes after defaults.
func validLogCacheBytes(n int64) error {
	if n == -1 || n >= minLogCacheBytes && n <= maxLogCacheBytes {
		return nil
	}
	return fmt.Errorf("replica: LogCacheBytes %d: want -1 (no cache) or %d to %d", n, int64(minLogCacheBytes), int64(maxLogCacheBytes))
}

// logEntryOverhead is what a cached entry costs beside its Data and
// Extensions: the raft.Log struct and its slot in the window.
const logEntryOverhead = 128

// LogCache is a raft.LogStore that keeps the most recent entries written
// through it in memory, up to a budget in bytes, in front of another
// store. The leader reads every entry back once per follower to build
// AppendEntries, and a follower reads back what it has just stored; with
// the cache these reads cost no I/O and no decoding. raft.NewLogCache does
// the same bounded by a count of entries, which is no bound on memory when
// an entry may hold a 1 MiB write.
//
// The cache is a window of consecutive indexes [first, first+len). It
// holds only what the store has acknowledged, and at every moment each
// cached entry is the one the store holds at that index: StoreLogs first
// drops the cached entries its batch will overwrite, asks the store, and
// caches the batch only when the store succeeded; DeleteRange drops the
// range from the cache before it asks the store. Only StoreLogs fills it
// (a read that misses goes to the store and is not cached: what is old
// enough to have been evicted is read rarely, by a follower catching up).
//
// The Data and Extensions of an entry given to StoreLogs are kept, not
// copied, and GetLog hands out the same slices: nobody may modify them
// after StoreLogs (raft does not; a caller of raft.Apply must not reuse
// the buffer it passed).
type LogCache struct {
	store  raft.LogStore
	budget int64

	// writeMu serializes StoreLogs and DeleteRange, the store's call and
	// the cache's update together, so that a window change cannot
	// interleave with another between the store's answer and the cache.
	// Readers do not take it; the store's own writes are serialized
	// inside it anyway.
	writeMu sync.Mutex

	hits, misses atomic.Uint64 // GetLog answered from the window, from the store

	mu      sync.RWMutex // guards the following
	first   uint64       // index of window[0]
	window  []*raft.Log  // window[i].Index == first+i
	bytes   int64        // cost of the window
	evicted uint64       // entries evicted for the budget

	reported LogCacheStats // what StoreLogs last reported to go-metrics; guarded by writeMu
}

var _ raft.MonotonicLogStore = (*LogCache)(nil)

// NewLogCache puts a cache of budget bytes in front of store. budget must
// be positive; an entry larger than the budget is not kept.
func NewLogCache(store raft.LogStore, budget int64) *LogCache {
	return &LogCache{store: store, budget: budget}
}

// LogCacheStats are a LogCache's counters.
type LogCacheStats struct {
	Hits, Misses, Evicted uint64 // GetLog answered from memory, from the store; entries evicted for the budget
	Entries               int    // in the window now
	Bytes                 int64  // cost of the window now
}

// Stats returns the cache's counters.
func (c *LogCache) Stats() LogCacheStats {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return LogCacheStats{Hits: c.hits.Load(), Misses: c.misses.Load(), Evicted: c.evicted, Entries: len(c.window), Bytes: c.bytes}
}

func entryCost(l *raft.Log) int64 { return int64(len(l.Data)+len(l.Extensions)) + logEntryOverhead }

// IsMonotonic is the store's: raft-wal cannot hold a gap, so raft must
// delete the whole log when it installs a snapshot on a node whose store
// says so; hiding it behind the cache would break that.
func (c *LogCache) IsMonotonic() bool {
	m, ok := c.store.(raft.MonotonicLogStore)
	return ok && m.IsMonotonic()
}

// FirstIndex is the store's.
func (c *LogCache) FirstIndex() (uint64, error) { return c.store.FirstIndex() }

// LastIndex is the store's.
func (c *LogCache) LastIndex() (uint64, error) { return c.store.LastIndex() }

// GetLog answers from the window when it holds index, from the store
// otherwise.
func (c *LogCache) GetLog(index uint64, log *raft.Log) error {
	c.mu.RLock()
	if index >= c.first && index-c.first < uint64(len(c.window)) {
		*log = *c.window[index-c.first]
		c.mu.RUnlock()
		c.hits.Add(1)
		return nil
	}
	c.mu.RUnlock()
	c.misses.Add(1)
	return c.store.GetLog(index, log)
}

// StoreLog stores one entry.
func (c *LogCache) StoreLog(log *raft.Log) error { return c.StoreLogs([]*raft.Log{log}) }

// StoreLogs stores the entries, then caches them.
func (c *LogCache) StoreLogs(logs []*raft.Log) error {
	if len(logs) == 0 {
		return c.store.StoreLogs(logs)
	}
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	min := logs[0].Index
	for _, l := range logs {
		if l.Index < min {
			min = l.Index
		}
	}
	// What the batch overwrites leaves the cache first: whether or not the
	// store succeeds, it may no longer hold what the cache does.
	c.mu.Lock()
	c.dropFromLocked(min)
	c.mu.Unlock()
	if err := c.store.StoreLogs(logs); err != nil {
		return err
	}
	c.mu.Lock()
	for _, l := range logs {
		c.appendLocked(l)
	}
	c.mu.Unlock()
	c.reportWriteLocked()
	return nil
}

// reportWriteLocked reports the counters to go-metrics, once per batch
// stored rather than on every read: keel.logcache.hit, .miss and .evicted
// (counters), .bytes and .entries (gauges). Needs writeMu.
func (c *LogCache) reportWriteLocked() {
	st := c.Stats()
	gometrics.IncrCounter([]string{"keel", "logcache", "hit"}, float32(st.Hits-c.reported.Hits))
	gometrics.IncrCounter([]string{"keel", "logcache", "miss"}, float32(st.Misses-c.reported.Misses))
	gometrics.IncrCounter([]string{"keel", "logcache", "evicted"}, float32(st.Evicted-c.reported.Evicted))
	gometrics.SetGauge([]string{"keel", "logcache", "bytes"}, float32(st.Bytes))
	gometrics.SetGauge([]string{"keel", "logcache", "entries"}, float32(st.Entries))
	c.reported = st
}

// DeleteRange drops [min, max] from the cache, then from the store.
func (c *LogCache) DeleteRange(min, max uint64) error {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	c.mu.Lock()
	c.deleteLocked(min, max)
	c.mu.Unlock()
	return c.store.DeleteRange(min, max)
}

// appendLocked puts a stored entry in the window, keeping the window
// consecutive: an entry that follows the window extends it, one inside it
// replaces the tail from its index, one after a gap starts a new window,
// and one before the window is not kept. Then the oldest entries go until
// the window fits the budget.
func (c *LogCache) appendLocked(l *raft.Log) {
	end := c.first + uint64(len(c.window))
	switch {
	case len(c.window) == 0 || l.Index > end:
		c.dropFromLocked(0)
		c.first = l.Index
	case l.Index < c.first:
		return
	case l.Index < end:
		c.dropFromLocked(l.Index)
	}
	e := *l // raft may reuse the struct; the slices it points to are kept
	c.window = append(c.window, &e)
	c.bytes += entryCost(&e)
	for c.bytes > c.budget && len(c.window) > 0 {
		c.bytes -= entryCost(c.window[0])
		c.window[0] = nil
		c.window = c.window[1:]
		c.first++
		c.evicted++
	}
}

// dropFromLocked removes the entries at index and after from the window.
func (c *LogCache) dropFromLocked(index uint64) {
	if index < c.first {
		index = c.first
	}
	for i := index - c.first; i < uint64(len(c.window)); i++ {
		c.bytes -= entryCost(c.window[i])
		c.window[i] = nil
	}
	if keep := index - c.first; keep < uint64(len(c.window)) {
		c.window = c.window[:keep]
	}
	if len(c.window) == 0 {
		c.window = nil // let the backing array go
	}
}

// deleteLocked removes [min, max] from the window. raft deletes a prefix
// (compaction) or a suffix (a follower's conflicting entries); a range in
// the middle drops everything from min, so the window stays consecutive.
func (c *LogCache) deleteLocked(min, max uint64) {
	end := c.first + uint64(len(c.window)) // one past the window
	if max < c.first || min >= end || min > max {
		return
	}
	if min > c.first {
		c.dropFromLocked(min)
		return
	}
	n := max - c.first + 1 // the prefix to drop
	if n >= uint64(len(c.window)) {
		c.dropFromLocked(c.first)
		return
	}
	for i := uint64(0); i < n; i++ {
		c.bytes -= entryCost(c.window[i])
		c.window[i] = nil
	}
	c.window = c.window[n:]
	c.first += n
}
