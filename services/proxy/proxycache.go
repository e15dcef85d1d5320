package proxy

import (
	"sync"

	lru "github.com/hashicorp/golang-lru/v2"
)

// cacheBlock is the unit of the proxy's read cache. A read that misses
// fetches whole aligned blocks (clipped to the volume's end).
const cacheBlock = 64 << 10

// blockCache is the proxy's read-through cache: aligned blocks of the
// volume, least recently used evicted first, bounded in bytes.
//
// It is coherent because the proxy is the volume's only writer: every
// write, trim and zero removes the blocks it touches before it is sent and
// again when it is answered, and a read that fetched a block fills the
// cache only when no write touching that block started after the read did
// (or was still running). Otherwise a read racing a write could put the
// old data back after the write removed it.
type blockCache struct {
	lru *lru.Cache[uint64, []byte] // nil: caching off

	mu       sync.Mutex // guards the following
	gen      uint64     // writes started so far
	inflight map[uint64]span
	recent   [256]genSpan // writes finished lately, by gen % len
	// poisoned blocks are never cached again: a write to them failed in a
	// way that leaves it free to land at any later time. Past
	// maxPoisoned blocks the whole cache is turned off instead.
	poisoned map[uint64]struct{}
	off      bool
}

const maxPoisoned = 1 << 16 // 4 GiB of volume

type genSpan struct {
	gen uint64
	span
}

// newBlockCache returns a cache of at most bytes (rounded down to whole
// blocks); 0 turns caching off.
func newBlockCache(bytes uint64) *blockCache {
	c := &blockCache{inflight: map[uint64]span{}, poisoned: map[uint64]struct{}{}}
	if n := bytes / cacheBlock; n > 0 {
		l, err := lru.New[uint64, []byte](int(n))
		if err != nil {
			panic(err) // only for n <= 0
		}
		c.lru = l
	}
	return c
}

func (c *blockCache) enabled() bool { return c.lru != nil }

// get returns block b when cached.
func (c *blockCache) get(b uint64) ([]byte, bool) {
	if c.lru == nil {
		return nil, false
	}
	return c.lru.Get(b)
}

// startFill returns the token a later fill must present: every write
// after it (those running now and those still to start) is checked.
func (c *blockCache) startFill() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	tok := c.gen
	for g := range c.inflight {
		tok = min(tok, g-1)
	}
	return tok
}

// fill caches block b (data read from a server after startFill returned
// tok) unless a write touching it ran at any time since.
func (c *blockCache) fill(tok, b uint64, data []byte) {
	if c.lru == nil {
		return
	}
	blk := span{b * cacheBlock, b*cacheBlock + uint64(len(data))}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, bad := c.poisoned[b]; bad || c.off {
		return
	}
	for _, w := range c.inflight {
		if w.overlaps(blk) {
			return
		}
	}
	if c.gen-tok > uint64(len(c.recent)) {
		return // too many writes since to tell; skip this once
	}
	for g := tok + 1; g <= c.gen; g++ {
		if r := c.recent[g%uint64(len(c.recent))]; r.gen == g && r.overlaps(blk) {
			return
		}
	}
	c.lru.Add(b, data)
}

// startWrite removes the blocks of [off, off+length) and returns the
// write's id for endWrite.
func (c *blockCache) startWrite(off, length uint64) uint64 {
	c.mu.Lock()
	c.gen++
	g := c.gen
	c.inflight[g] = span{off, off + length}
	c.mu.Unlock()
	c.remove(off, length)
	return g
}

// endWrite removes the blocks again and records the write as finished.
func (c *blockCache) endWrite(g uint64) {
	c.mu.Lock()
	s := c.inflight[g]
	delete(c.inflight, g)
	c.recent[g%uint64(len(c.recent))] = genSpan{g, s}
	c.mu.Unlock()
	c.remove(s.start, s.end-s.start)
}

// poison removes the blocks of [off, off+length) and keeps them out of the
// cache from now on. It reports whether that turned the cache off.
func (c *blockCache) poison(off, length uint64) (turnedOff bool) {
	if c.lru == nil || length == 0 {
		return false
	}
	c.mu.Lock()
	first, last := off/cacheBlock, (off+length-1)/cacheBlock
	if !c.off && uint64(len(c.poisoned))+last-first+1 > maxPoisoned {
		c.off, turnedOff = true, true
		c.poisoned = nil
	}
	for b := first; !c.off && b <= last; b++ {
		c.poisoned[b] = struct{}{}
	}
	off2 := c.off
	c.mu.Unlock()
	if off2 {
		c.lru.Purge()
		return turnedOff
	}
	c.remove(off, length)
	return false
}

func (c *blockCache) remove(off, length uint64) {
	if c.lru == nil || length == 0 {
		return
	}
	first, last := off/cacheBlock, (off+length-1)/cacheBlock
	if last-first+1 > uint64(c.lru.Len()) {
		// A range wider than the cache holds: walk the cache instead.
		for _, b := range c.lru.Keys() {
			if b >= first && b <= last {
				c.lru.Remove(b)
			}
		}
		return
	}
	for b := first; b <= last; b++ {
		c.lru.Remove(b)
	}
}

// bytes is what the cache holds.
func (c *blockCache) len() int {
	if c.lru == nil {
		return 0
	}
	return c.lru.Len()
}

func (s span) overlaps(o span) bool { return s.start < o.end && o.start < s.end }

// span is the byte range [start, end).
type span struct{ start, end uint64 }
