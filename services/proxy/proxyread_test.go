package proxy_test

import (
	"bytes"
	"context"
	"math/rand/v2"
	"testing"

	"github.com/keelstore/keel/services/proxy"
	"github.com/keelstore/keel/services/server/servertest"
)

// readSetup is a one-node cluster whose first 4 MiB hold a known pattern,
// written through a proxy with a 1 MiB cache; the pattern and the proxy's
// counters before the reads are returned.
func readSetup(t *testing.T) (*proxy.Proxy, func(b []byte, off uint64), []byte) {
	t.Helper()
	node := servertest.StartOne(t, 0)
	p, c := runProxy(t, proxy.Config{Servers: []string{node.HTTP}, Writer: "r", CacheBytes: 1 << 20})
	ctx := context.Background()
	data := make([]byte, 4<<20)
	r := rand.New(rand.NewPCG(3, 4))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	if err := c.WriteAt(ctx, data, 0, false); err != nil {
		t.Fatal(err)
	}
	read := func(b []byte, off uint64) {
		t.Helper()
		if err := c.ReadAt(ctx, b, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, data[off:off+uint64(len(b))]) {
			t.Fatalf("read of %d at %d differs from what was written", len(b), off)
		}
	}
	return p, read, data
}

// TestProxyColdReadFetchesWhatItNeeds: a cold 4 KiB read fetches 4 KiB
// (not a larger block), and random reads never fetch ahead.
func TestProxyColdReadFetchesWhatItNeeds(t *testing.T) {
	p, read, _ := readSetup(t)
	st := p.Stats()
	bytes0, reads0 := st.RemoteReadBytes.Load(), st.RemoteReads.Load()
	r := rand.New(rand.NewPCG(5, 6))
	seen := map[uint64]bool{}
	const n = 200
	for len(seen) < n {
		blk := r.Uint64N(1024) // 4 MiB of 4 KiB blocks
		if seen[blk] || seen[blk-1] {
			continue // a repeat would hit; a successor would be sequential
		}
		seen[blk] = true
		read(make([]byte, 4096), blk*4096)
	}
	if got := st.RemoteReadBytes.Load() - bytes0; got != n*4096 {
		t.Errorf("%d cold random 4 KiB reads fetched %d bytes, want %d", n, got, n*4096)
	}
	if got := st.RemoteReads.Load() - reads0; got != n {
		t.Errorf("%d cold random 4 KiB reads made %d remote reads, want %d", n, got, n)
	}
	// Read again: all hits, nothing fetched.
	bytes1 := st.RemoteReadBytes.Load()
	for blk := range seen {
		read(make([]byte, 4096), blk*4096)
	}
	if got := st.RemoteReadBytes.Load() - bytes1; got != 0 {
		t.Errorf("cached blocks read again fetched %d bytes, want 0", got)
	}
	// An unaligned small read fetches the block(s) it touches, no more.
	bytes2 := st.RemoteReadBytes.Load()
	read(make([]byte, 512), 3<<20+1024)
	if got := st.RemoteReadBytes.Load() - bytes2; got != 4096 {
		t.Errorf("a cold unaligned 512-byte read fetched %d bytes, want 4096", got)
	}
}

// TestProxySequentialReadAhead: small sequential reads fetch ahead, so
// most of them are served from the cache, and the read-ahead fetches
// little beyond what is read.
func TestProxySequentialReadAhead(t *testing.T) {
	p, read, _ := readSetup(t)
	st := p.Stats()
	bytes0, reads0, hits0 := st.RemoteReadBytes.Load(), st.RemoteReads.Load(), st.CacheHits.Load()
	const total = 512 << 10
	for off := uint64(1 << 20); off < 1<<20+total; off += 4096 {
		read(make([]byte, 4096), off)
	}
	reads := st.RemoteReads.Load() - reads0
	if reads > total/(64<<10) {
		t.Errorf("%d sequential 4 KiB reads made %d remote reads, want at most %d (read-ahead)", total/4096, reads, total/(64<<10))
	}
	if hits := st.CacheHits.Load() - hits0; hits < total/4096*3/4 {
		t.Errorf("%d sequential 4 KiB reads hit the cache %d times, want most of them", total/4096, hits)
	}
	if got := st.RemoteReadBytes.Load() - bytes0; got > total+128<<10 {
		t.Errorf("sequential reads of %d bytes fetched %d, want at most one read-ahead window more", total, got)
	}
}

// TestProxyReadAroundCachedBlocks: a read over cached and missing blocks
// (several runs fetched at once, edges unaligned) returns the right
// bytes, and one that fits no pooled buffer too.
func TestProxyReadAroundCachedBlocks(t *testing.T) {
	p, read, _ := readSetup(t)
	for _, blk := range []uint64{9, 6, 5, 2} { // descending: no read-ahead
		read(make([]byte, 4096), blk*4096)
	}
	st := p.Stats()
	bytes0 := st.RemoteReadBytes.Load()
	read(make([]byte, 10*4096-1024), 512) // blocks 0..9: 6 missing in 3 runs
	if got := st.RemoteReadBytes.Load() - bytes0; got != 6*4096 {
		t.Errorf("read around 4 cached blocks fetched %d bytes, want %d (the 6 missing blocks)", got, 6*4096)
	}
	read(make([]byte, 3<<20+512), 512) // unaligned, larger than any pooled buffer
}
