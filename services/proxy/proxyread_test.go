package proxy_test

import (
	"bytes"
	"context"
	"math/rand/v2"
	"sync/atomic"
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

// BenchmarkProxyRandomRead: random 4 KiB reads at queue depth 32 over a
// 256 MiB volume, straight from the server, through a proxy without a
// cache and through one whose 32 MiB cache holds an eighth of the volume.
// For profiles of the read path (go test -bench ProxyRandomRead
// -cpuprofile); keelbench proxy is the benchmark.
func BenchmarkProxyRandomRead(b *testing.B) {
	const size = 256 << 20
	node := servertest.StartOne(b, size)
	_, w := runProxy(b, proxy.Config{Servers: []string{node.HTTP}, Writer: "bench"})
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i)
	}
	for off := uint64(0); off < size; off += 1 << 20 {
		if err := w.WriteAt(context.Background(), data, off, false); err != nil {
			b.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name  string
		cache uint64
	}{{"direct", 0}, {"proxy-nocache", 0}, {"proxy-cache-32M", 32 << 20}} {
		b.Run(tc.name, func(b *testing.B) {
			c := directClient(b, node)
			if tc.name != "direct" {
				_, c = runProxy(b, proxy.Config{Servers: []string{node.HTTP}, Writer: "bench", CacheBytes: tc.cache})
			}
			b.SetBytes(4096)
			b.SetParallelism(16) // 32 readers on 2 cores
			var seed atomic.Uint64
			b.RunParallel(func(pb *testing.PB) {
				r := rand.New(rand.NewPCG(seed.Add(1), 1))
				buf := make([]byte, 4096)
				for pb.Next() {
					if err := c.ReadAt(context.Background(), buf, r.Uint64N(size/4096)*4096); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
