package statuspage

import (
	"context"
	"io"
	"math/bits"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/keelstore/keel/nbd"
)

// LatencyBuckets is the number of buckets of a latency histogram. Bucket 0
// counts requests that took under 2µs; bucket i > 0 those that took from
// 2^i to 2^(i+1) µs; the last also counts everything slower (2^31µs is
// about 36 minutes).
const LatencyBuckets = 32

// Meter counts the requests a process served: reads (an NBD export's
// ReadAt) and writes (its WriteAt, Trim and Zero, of which only WriteAt
// moves bytes, and the HTTP requests of WriteHandler), each with its
// latency, whether it succeeded or not. The zero value is ready; it is
// safe for concurrent use.
type Meter struct {
	reads, writes kindCounters
}

type kindCounters struct {
	ops, bytes atomic.Uint64
	latency    [LatencyBuckets]atomic.Uint64
}

func (k *kindCounters) observe(n int, d time.Duration) {
	k.ops.Add(1)
	k.bytes.Add(uint64(n))
	k.latency[bucketOf(d)].Add(1)
}

func (k *kindCounters) load() KindTotals {
	t := KindTotals{Ops: k.ops.Load(), Bytes: k.bytes.Load()}
	for i := range k.latency {
		t.Latency[i] = k.latency[i].Load()
	}
	return t
}

// bucketOf is the latency bucket of d (see LatencyBuckets).
func bucketOf(d time.Duration) int {
	us := uint64(max(d.Microseconds(), 0))
	if us < 2 {
		return 0
	}
	return min(bits.Len64(us)-1, LatencyBuckets-1)
}

// bucketBounds are bucket i's bounds in seconds.
func bucketBounds(i int) (lo, hi float64) {
	if i == 0 {
		return 0, 2e-6
	}
	return float64(uint64(1)<<i) * 1e-6, float64(uint64(1)<<(i+1)) * 1e-6
}

// KindTotals are one kind's counts since the meter was made.
type KindTotals struct {
	Ops, Bytes uint64
	Latency    [LatencyBuckets]uint64 // requests per bucket (see LatencyBuckets)
}

// Totals are what History samples: a meter's counts, and, for a proxy, its
// cache's block hits and misses.
type Totals struct {
	Reads, Writes          KindTotals
	CacheHits, CacheMisses uint64
}

// Totals reads the meter's counts (each counter atomically; the set is not
// one snapshot, which a rate over a second does not notice).
func (m *Meter) Totals() Totals {
	return Totals{Reads: m.reads.load(), Writes: m.writes.load()}
}

// Wrap returns b with every read and write counted by m.
func (m *Meter) Wrap(b nbd.Backend) nbd.Backend { return &metered{Backend: b, m: m} }

// metered is an nbd.Backend that counts what it passes on.
type metered struct {
	nbd.Backend
	m *Meter
}

func (b *metered) ReadAt(ctx context.Context, p []byte, off uint64) error {
	start := time.Now()
	err := b.Backend.ReadAt(ctx, p, off)
	b.m.reads.observe(len(p), time.Since(start))
	return err
}

func (b *metered) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	start := time.Now()
	err := b.Backend.WriteAt(ctx, p, off, fua)
	b.m.writes.observe(len(p), time.Since(start))
	return err
}

func (b *metered) Trim(ctx context.Context, off, length uint64, fua bool) error {
	start := time.Now()
	err := b.Backend.Trim(ctx, off, length, fua)
	b.m.writes.observe(0, time.Since(start))
	return err
}

func (b *metered) Zero(ctx context.Context, off, length uint64, f nbd.ZeroFlags) error {
	start := time.Now()
	err := b.Backend.Zero(ctx, off, length, f)
	b.m.writes.observe(0, time.Since(start))
	return err
}

// WriteHandler returns h with every request counted by m as a write of the
// bytes h read from its body, taking as long as h took to answer: a
// server's POST /v1/apply, the writes of proxies (and of followers that
// forward their clients' writes), committed while the client waits.
func (m *Meter) WriteHandler(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		body := &countingReader{r: r.Body}
		r.Body = body
		h.ServeHTTP(w, r)
		m.writes.observe(int(body.n), time.Since(start))
	})
}

// Write counts one write of n bytes that took d: what WriteHandler counts
// for a request, for the writes that come another way (a frame of the
// apply stream).
func (m *Meter) Write(n int, d time.Duration) { m.writes.observe(n, d) }

// countingReader is a request body that counts what was read from it.
type countingReader struct {
	r io.ReadCloser
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

func (c *countingReader) Close() error { return c.r.Close() }
