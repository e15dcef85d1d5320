package proxy

import (
	"sync"
)

// cacheBlock is the unit of the proxy's read cache: a read that misses
// fetches the aligned 4 KiB blocks it touches (clipped to the volume's
// end), so a cold 4 KiB read fetches 4 KiB. Sequential reads fetch more
// ahead (readahead.go).
const cacheBlock = 4 << 10

// poisonUnit is the granularity of poisoned ranges: coarser than a block,
// so that maxPoisoned bounds a small map.
const poisonUnit = 64 << 10

// blockCache is the proxy's read-through cache: aligned blocks of the
// volume, least recently used evicted first, bounded in bytes. Its memory
// is one slab allocated at start, cut into slots of one block; a fill
// takes a free slot or the least recently used one, so filling allocates
// nothing and the garbage collector has nothing to scan or free.
//
// It is coherent because the proxy is the volume's only writer: every
// write, trim and zero removes the blocks it touches before it is sent and
// again when it is answered, and a read that fetched a block fills the
// cache only when no write touching that block started after the read did
// (or was still running). Otherwise a read racing a write could put the
// old data back after the write removed it.
//
// Data is copied in and out of the slab under mu, so a slot is never
// reused while a reader copies from it.
type blockCache struct {
	mu    sync.Mutex // guards the following
	slab  []byte     // nil: caching off
	slots []slot
	index map[uint64]int32 // block -> slot holding it
	head  int32            // most recently used slot; -1: none
	free  []int32          // slots holding nothing
	gen   uint64           // writes started so far

	inflight map[uint64]span
	recent   [256]genSpan // writes finished lately, by gen % len
	// poisoned poisonUnits are never cached again: a write to them failed
	// in a way that leaves it free to land at any later time. Past
	// maxPoisoned units the whole cache is turned off instead.
	poisoned map[uint64]struct{}
	off      bool
}

// slot is one block's place in the slab, on a circular doubly linked
// list in order of use (head the most recent, head's prev the least).
type slot struct {
	block      uint64
	n          uint32 // bytes held: cacheBlock, or less at the volume's end
	prev, next int32
}

const maxPoisoned = 1 << 16 // 4 GiB of volume

type genSpan struct {
	gen uint64
	span
}

// newBlockCache returns a cache of at most bytes (rounded down to whole
// blocks); 0 turns caching off.
func newBlockCache(bytes uint64) *blockCache {
	c := &blockCache{inflight: map[uint64]span{}, poisoned: map[uint64]struct{}{}, head: -1}
	n := bytes / cacheBlock
	if n == 0 {
		return c
	}
	c.slab = make([]byte, n*cacheBlock) // untouched pages cost no memory until filled
	c.slots = make([]slot, n)
	c.index = make(map[uint64]int32)
	c.free = make([]int32, 0, n)
	for i := int32(n) - 1; i >= 0; i-- {
		c.free = append(c.free, i)
	}
	return c
}

func (c *blockCache) enabled() bool { return c.slab != nil }

// data is slot i's bytes in the slab. c.mu must be held.
func (c *blockCache) dataLocked(i int32) []byte {
	at := int(i) * cacheBlock
	return c.slab[at : at+int(c.slots[i].n)]
}

// copyOut copies the cached blocks of [off, off+len(b)) into b, marking
// them used, and returns the blocks of the range it did not find, in order.
func (c *blockCache) copyOut(b []byte, off uint64, missing []uint64) []uint64 {
	end := off + uint64(len(b))
	c.mu.Lock()
	defer c.mu.Unlock()
	for blk := off / cacheBlock; blk*cacheBlock < end; blk++ {
		i, ok := c.index[blk]
		if c.slab == nil || !ok {
			missing = append(missing, blk)
			continue
		}
		c.touchLocked(i)
		copyBlock(b, off, blk, c.dataLocked(i))
	}
	return missing
}

// has reports whether block b is cached (without marking it used).
func (c *blockCache) has(b uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.index[b]
	return ok
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
	c.fillRange(tok, b*cacheBlock, data)
}

// fillRange caches the blocks of data, read from a server at off (a block
// boundary) after startFill returned tok, except those a write touched at
// any time since. A short last block is cached only when it ends at the
// volume's end (the caller passes no other).
func (c *blockCache) fillRange(tok, off uint64, data []byte) {
	if c.slab == nil || len(data) == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.off {
		return
	}
	if c.gen-tok > uint64(len(c.recent)) {
		return // too many writes since to tell; skip this once
	}
	for lo := 0; lo < len(data); lo += cacheBlock {
		blk := off/cacheBlock + uint64(lo/cacheBlock)
		d := data[lo:min(lo+cacheBlock, len(data))]
		if c.fillableLocked(tok, span{blk * cacheBlock, blk*cacheBlock + uint64(len(d))}) {
			c.putLocked(blk, d)
		}
	}
}

// fillableLocked reports whether a fill of s, fetched after tok, may be
// cached: not poisoned, and no write touching it since tok.
func (c *blockCache) fillableLocked(tok uint64, s span) bool {
	if _, bad := c.poisoned[s.start/poisonUnit]; bad {
		return false
	}
	for _, w := range c.inflight {
		if w.overlaps(s) {
			return false
		}
	}
	for g := tok + 1; g <= c.gen; g++ {
		if r := c.recent[g%uint64(len(c.recent))]; r.gen == g && r.overlaps(s) {
			return false
		}
	}
	return true
}

// putLocked stores d as block blk, in a free slot or in place of the
// least recently used block.
func (c *blockCache) putLocked(blk uint64, d []byte) {
	i, ok := c.index[blk]
	if !ok {
		if n := len(c.free); n > 0 {
			i = c.free[n-1]
			c.free = c.free[:n-1]
		} else {
			i = c.slots[c.head].prev // the least recently used
			c.unlinkLocked(i)
			delete(c.index, c.slots[i].block)
		}
		c.slots[i].block = blk
		c.index[blk] = i
		c.linkFrontLocked(i)
	} else {
		c.touchLocked(i)
	}
	c.slots[i].n = uint32(len(d))
	copy(c.dataLocked(i), d)
}

func (c *blockCache) touchLocked(i int32) {
	if c.head == i {
		return
	}
	c.unlinkLocked(i)
	c.linkFrontLocked(i)
}

func (c *blockCache) unlinkLocked(i int32) {
	s := &c.slots[i]
	if s.next == i { // the only one
		c.head = -1
		return
	}
	c.slots[s.prev].next = s.next
	c.slots[s.next].prev = s.prev
	if c.head == i {
		c.head = s.next
	}
}

func (c *blockCache) linkFrontLocked(i int32) {
	s := &c.slots[i]
	if c.head < 0 {
		s.prev, s.next = i, i
	} else {
		h := &c.slots[c.head]
		s.next, s.prev = c.head, h.prev
		c.slots[h.prev].next = i
		h.prev = i
	}
	c.head = i
}

// startWrite removes the blocks of [off, off+length) and returns the
// write's id for endWrite.
func (c *blockCache) startWrite(off, length uint64) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	g := c.gen
	c.inflight[g] = span{off, off + length}
	c.removeLocked(off, length)
	return g
}

// endWrite removes the blocks again and records the write as finished.
func (c *blockCache) endWrite(g uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.inflight[g]
	delete(c.inflight, g)
	c.recent[g%uint64(len(c.recent))] = genSpan{g, s}
	c.removeLocked(s.start, s.end-s.start)
}

// poison removes the blocks of [off, off+length) and keeps the poisonUnits
// it touches out of the cache from now on. It reports whether that turned
// the cache off.
func (c *blockCache) poison(off, length uint64) (turnedOff bool) {
	if c.slab == nil || length == 0 {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	first, last := off/poisonUnit, (off+length-1)/poisonUnit
	if !c.off && uint64(len(c.poisoned))+last-first+1 > maxPoisoned {
		c.off, turnedOff = true, true
		c.poisoned = nil
	}
	if c.off {
		c.removeAllLocked()
		return turnedOff
	}
	for u := first; u <= last; u++ {
		c.poisoned[u] = struct{}{}
	}
	c.removeLocked(off, length)
	return false
}

func (c *blockCache) removeLocked(off, length uint64) {
	if c.slab == nil || length == 0 {
		return
	}
	first, last := off/cacheBlock, (off+length-1)/cacheBlock
	if last-first+1 > uint64(len(c.index)) {
		// A range wider than the cache holds: walk the cache instead.
		for b, i := range c.index {
			if b >= first && b <= last {
				c.dropLocked(b, i)
			}
		}
		return
	}
	for b := first; b <= last; b++ {
		if i, ok := c.index[b]; ok {
			c.dropLocked(b, i)
		}
	}
}

func (c *blockCache) dropLocked(b uint64, i int32) {
	c.unlinkLocked(i)
	delete(c.index, b)
	c.free = append(c.free, i)
}

func (c *blockCache) removeAllLocked() {
	for b, i := range c.index {
		c.dropLocked(b, i)
	}
}

// len is the number of blocks the cache holds.
func (c *blockCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.index)
}

func (s span) overlaps(o span) bool { return s.start < o.end && o.start < s.end }

// span is the byte range [start, end).
type span struct{ start, end uint64 }
