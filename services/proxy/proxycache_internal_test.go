package proxy

import (
	"bytes"
	"testing"
)

// get returns a copy of block b when cached.
func (c *blockCache) get(b uint64) ([]byte, bool) {
	if !c.has(b) {
		return nil, false
	}
	d := make([]byte, cacheBlock)
	if miss := c.copyOut(d, b*cacheBlock, nil); len(miss) > 0 {
		return nil, false
	}
	return d, true
}

func TestBlockCacheFillRules(t *testing.T) {
	blk := func(v byte) []byte { return bytes.Repeat([]byte{v}, cacheBlock) }
	c := newBlockCache(4 * cacheBlock)

	// A plain fill is cached.
	tok := c.startFill()
	c.fill(tok, 0, blk(1))
	if d, ok := c.get(0); !ok || d[0] != 1 {
		t.Fatal("block 0 not cached after a fill with no write around")
	}

	// A write to the block removes it.
	g := c.startWrite(10, 100)
	if _, ok := c.get(0); ok {
		t.Fatal("block 0 still cached while a write to it runs")
	}
	// A read that started before or during the write must not fill it
	// back: the data it fetched may predate the write.
	c.fill(tok, 0, blk(2))
	if _, ok := c.get(0); ok {
		t.Fatal("fill during an overlapping write was cached")
	}
	during := c.startFill()
	c.endWrite(g)
	c.fill(during, 0, blk(3))
	if _, ok := c.get(0); ok {
		t.Fatal("fill by a read that started while the write ran was cached")
	}
	// ...but a write elsewhere does not stop a fill.
	c.fill(tok, 1, blk(4))
	if _, ok := c.get(1); !ok {
		t.Fatal("fill of block 1 refused because of a write to block 0")
	}
	// A read that started after the write ended fills normally.
	after := c.startFill()
	c.fill(after, 0, blk(5))
	if d, ok := c.get(0); !ok || d[0] != 5 {
		t.Fatal("fill after the write ended not cached")
	}

	// A write spanning blocks removes all of them, including partial ones.
	c.fill(c.startFill(), 2, blk(6))
	g = c.startWrite(cacheBlock-1, cacheBlock+2) // last byte of 0, all of 1, first byte of 2
	c.endWrite(g)
	for b := uint64(0); b <= 2; b++ {
		if _, ok := c.get(b); ok {
			t.Errorf("block %d cached after a write that touched it", b)
		}
	}

	// More writes since the read started than the cache remembers: the
	// fill is refused rather than guessed.
	old := c.startFill()
	for i := 0; i < len(c.recent)+1; i++ {
		c.endWrite(c.startWrite(100*cacheBlock, 1))
	}
	c.fill(old, 3, blk(7))
	if _, ok := c.get(3); ok {
		t.Error("fill cached although the writes since its start are forgotten")
	}
}

func TestBlockCacheBounded(t *testing.T) {
	c := newBlockCache(3*cacheBlock + 100)
	for b := uint64(0); b < 10; b++ {
		c.fill(c.startFill(), b, make([]byte, cacheBlock))
	}
	if c.len() != 3 {
		t.Errorf("cache holds %d blocks, want 3 (its size in whole blocks)", c.len())
	}
	// The least recently used go first.
	for b := uint64(7); b < 10; b++ {
		if _, ok := c.get(b); !ok {
			t.Errorf("block %d (recent) evicted", b)
		}
	}
	// A range wider than the cache is removed by walking the cache.
	c.endWrite(c.startWrite(0, 1<<40))
	if c.len() != 0 {
		t.Errorf("%d blocks left after a write over everything", c.len())
	}
	off := newBlockCache(0)
	off.fill(off.startFill(), 0, make([]byte, cacheBlock))
	if _, ok := off.get(0); ok || off.enabled() {
		t.Error("a zero-size cache caches")
	}
}

func TestIDWindow(t *testing.T) {
	var w idWindow
	id1, below := w.take()
	id2, _ := w.take()
	id3, _ := w.take()
	if id1 != 1 || id2 != 2 || id3 != 3 || below != 1 {
		t.Fatalf("ids %d %d %d below %d", id1, id2, id3, below)
	}
	w.done(id2)
	if _, b := w.take(); b != 1 {
		t.Errorf("acked-below %d with id 1 still open, want 1", b)
	}
	w.done(id1)
	if _, b := w.take(); b != 3 {
		t.Errorf("acked-below %d after ids 1 and 2 answered, want 3", b)
	}
}

// TestBlockCachePoison: a range whose write may land at any later time is
// never cached again; too many such ranges turn the cache off.
func TestBlockCachePoison(t *testing.T) {
	c := newBlockCache(8 * cacheBlock)
	c.fill(c.startFill(), 1, make([]byte, cacheBlock))
	g := c.startWrite(cacheBlock+10, 10)
	if c.poison(cacheBlock+10, 10) {
		t.Fatal("one poisoned block turned the cache off")
	}
	c.endWrite(g)
	if _, ok := c.get(1); ok {
		t.Fatal("poisoned block still cached")
	}
	c.fill(c.startFill(), 1, make([]byte, cacheBlock))
	if _, ok := c.get(1); ok {
		t.Fatal("poisoned block cached again by a later read")
	}
	// Poisoning is by poisonUnit: the rest of the unit goes too...
	c.fill(c.startFill(), 2, make([]byte, cacheBlock))
	if _, ok := c.get(2); ok {
		t.Fatal("a block in the poisoned unit is cached")
	}
	// ...its neighbours do not.
	next := uint64(poisonUnit / cacheBlock)
	c.fill(c.startFill(), next, make([]byte, cacheBlock))
	if _, ok := c.get(next); !ok {
		t.Fatal("the block after the poisoned unit is not cached")
	}
	if !c.poison(0, maxPoisoned*poisonUnit) {
		t.Fatal("poisoning more than maxPoisoned blocks did not turn the cache off")
	}
	c.fill(c.startFill(), 5, make([]byte, cacheBlock))
	if c.len() != 0 {
		t.Errorf("cache holds %d blocks after it was turned off", c.len())
	}
}

// TestBlockCacheReusesSlots: a full cache evicts its least recently used
// block into the slot the new one takes, allocating nothing; a block read
// (copyOut) counts as a use.
func TestBlockCacheReusesSlots(t *testing.T) {
	blk := func(v byte) []byte { return bytes.Repeat([]byte{v}, cacheBlock) }
	c := newBlockCache(3 * cacheBlock)
	for b := uint64(0); b < 3; b++ {
		c.fill(c.startFill(), b, blk(byte(b+1)))
	}
	if _, ok := c.get(0); !ok { // 0 is now the most recent; 1 the least
		t.Fatal("block 0 not cached")
	}
	c.fill(c.startFill(), 3, blk(4))
	if c.has(1) || !c.has(0) || !c.has(2) || !c.has(3) {
		t.Fatalf("after a fill into a full cache: 0 %v 1 %v 2 %v 3 %v; want block 1 (least recently used) evicted",
			c.has(0), c.has(1), c.has(2), c.has(3))
	}
	if d, _ := c.get(3); !bytes.Equal(d, blk(4)) {
		t.Error("block 3 holds the wrong bytes")
	}
	if d, _ := c.get(0); !bytes.Equal(d, blk(1)) {
		t.Error("block 0 was overwritten by the fill of block 3")
	}
	data := blk(9)
	tok := c.startFill()
	b := uint64(10)
	if n := testing.AllocsPerRun(100, func() { c.fill(tok, b, data); b++ }); n != 0 {
		t.Errorf("a fill into a full cache allocates %.1f times, want 0", n)
	}
	// A range read copies out hits and lists the misses, in order.
	c.fillRange(c.startFill(), 200*cacheBlock, append(blk(7), blk(8)...))
	got := make([]byte, 4*cacheBlock)
	miss := c.copyOut(got, 199*cacheBlock, nil)
	if len(miss) != 2 || miss[0] != 199 || miss[1] != 202 {
		t.Errorf("misses %v, want [199 202]", miss)
	}
	if !bytes.Equal(got[cacheBlock:3*cacheBlock], append(blk(7), blk(8)...)) {
		t.Error("copyOut did not copy the cached blocks 200 and 201")
	}
}

// TestBlockCacheShortLastBlock: the volume's last block may be short; it
// is cached with its length and read back as such.
func TestBlockCacheShortLastBlock(t *testing.T) {
	c := newBlockCache(4 * cacheBlock)
	c.fillRange(c.startFill(), 5*cacheBlock, append(bytes.Repeat([]byte{1}, cacheBlock), 2, 2, 2))
	got := make([]byte, 3)
	if miss := c.copyOut(got, 6*cacheBlock, nil); len(miss) != 0 || !bytes.Equal(got, []byte{2, 2, 2}) {
		t.Errorf("short block: misses %v, bytes %v", miss, got)
	}
}
