package statuspage

import (
	"math"
	"testing"
	"time"
)

var t0 = time.Date(2026, 12, 2, 1, 0, 0, 0, time.UTC)

// at returns totals with reads and writes of the given ops and bytes, every
// op of a kind in the latency bucket given.
func totals(readOps, readBytes uint64, readBucket int, writeOps, writeBytes uint64, writeBucket int) Totals {
	var t Totals
	t.Reads.Ops, t.Reads.Bytes = readOps, readBytes
	t.Reads.Latency[readBucket] = readOps
	t.Writes.Ops, t.Writes.Bytes = writeOps, writeBytes
	t.Writes.Latency[writeBucket] = writeOps
	return t
}

func near(a, b float64) bool { return math.Abs(a-b) <= 1e-9*math.Max(1, math.Abs(b)) }

func TestHistoryRates(t *testing.T) {
	h := NewHistory(10)
	h.Observe(t0, Totals{})
	if got := h.Samples(); len(got) != 0 {
		t.Fatalf("after the baseline: %d samples, want 0", len(got))
	}
	// 100 reads of 4 KiB in bucket 10 (1.024 to 2.048 ms), 50 writes in
	// bucket 12 (4.096 to 8.192 ms), over two seconds.
	h.Observe(t0.Add(2*time.Second), totals(100, 409600, 10, 50, 204800, 12))
	s := h.Samples()
	if len(s) != 1 {
		t.Fatalf("%d samples, want 1", len(s))
	}
	got := s[0]
	for _, c := range []struct {
		name      string
		got, want float64
	}{
		{"read ops/s", got.ReadOps, 50},
		{"write ops/s", got.WriteOps, 25},
		{"read bytes/s", got.ReadBytes, 204800},
		{"write bytes/s", got.WriteBytes, 102400},
		// every read is in [1.024, 2.048) ms: the median is halfway
		{"read p50", got.ReadP50, 1.024 + 0.5*1.024},
		{"read p99", got.ReadP99, 1.024 + 0.99*1.024},
		{"write p50", got.WriteP50, 4.096 + 0.5*4.096},
	} {
		if !near(c.got, c.want) {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	if got.At != t0.Add(2*time.Second).UnixMilli() {
		t.Errorf("At = %d, want the end of the interval %d", got.At, t0.Add(2*time.Second).UnixMilli())
	}
	if got.CacheHitRate != nil {
		t.Errorf("CacheHitRate = %v without cache lookups, want absent", *got.CacheHitRate)
	}
}

func TestHistoryQuantileAcrossBuckets(t *testing.T) {
	h := NewHistory(10)
	h.Observe(t0, Totals{})
	var tt Totals
	tt.Reads.Ops = 100
	tt.Reads.Latency[3] = 98 // 8 to 16 µs
	tt.Reads.Latency[20] = 2 // about 1 to 2 s
	h.Observe(t0.Add(time.Second), tt)
	s := h.Samples()[0]
	if s.ReadP50 < 0.008 || s.ReadP50 >= 0.016 {
		t.Errorf("p50 = %v ms, want within the fast bucket [0.008, 0.016)", s.ReadP50)
	}
	if s.ReadP99 < 1048.576 || s.ReadP99 >= 2097.152 {
		t.Errorf("p99 = %v ms, want within the slow bucket [1048.576, 2097.152)", s.ReadP99)
	}
	if s.WriteP50 != 0 || s.WriteP99 != 0 {
		t.Errorf("write quantiles %v, %v without writes, want 0", s.WriteP50, s.WriteP99)
	}
}

func TestHistoryCacheHitRate(t *testing.T) {
	h := NewHistory(10)
	h.Observe(t0, Totals{CacheHits: 10, CacheMisses: 10})
	h.Observe(t0.Add(time.Second), Totals{CacheHits: 40, CacheMisses: 20})
	s := h.Samples()[0]
	if s.CacheHitRate == nil || !near(*s.CacheHitRate, 0.75) {
		t.Fatalf("hit rate %v, want 0.75 (30 hits, 10 misses in the second)", s.CacheHitRate)
	}
}

func TestHistoryBaselines(t *testing.T) {
	h := NewHistory(10)
	h.Observe(t0, totals(10, 10, 1, 0, 0, 0))
	// The clock went back: a new baseline, no sample.
	h.Observe(t0.Add(-time.Second), totals(20, 20, 1, 0, 0, 0))
	// The same instant again: no sample (no interval to divide by).
	h.Observe(t0.Add(-time.Second), totals(30, 30, 1, 0, 0, 0))
	// Counts went down (new counters): a new baseline, no sample.
	h.Observe(t0.Add(time.Second), totals(5, 5, 1, 0, 0, 0))
	if got := h.Samples(); len(got) != 0 {
		t.Fatalf("%d samples, want none: %+v", len(got), got)
	}
	h.Observe(t0.Add(2*time.Second), totals(8, 8, 1, 0, 0, 0))
	if got := h.Samples(); len(got) != 1 || got[0].ReadOps != 3 {
		t.Fatalf("samples %+v, want one of 3 reads/s from the last baseline", got)
	}
}

func TestHistoryRingKeepsTheLatest(t *testing.T) {
	h := NewHistory(3)
	for i := range 6 { // a baseline, then 5 samples of i reads/s
		h.Observe(t0.Add(time.Duration(i)*time.Second), totals(uint64(i*(i+1)/2), 0, 0, 0, 0, 0))
	}
	got := h.Samples()
	if len(got) != 3 {
		t.Fatalf("%d samples, want 3 (the ring's size)", len(got))
	}
	for j, want := range []float64{3, 4, 5} {
		if got[j].ReadOps != want || got[j].At != t0.Add(time.Duration(want)*time.Second).UnixMilli() {
			t.Errorf("sample %d: %v reads/s at %d, want %v at %d (oldest first)", j, got[j].ReadOps, got[j].At, want, t0.Add(time.Duration(want)*time.Second).UnixMilli())
		}
	}
}

func TestBucketOf(t *testing.T) {
	for _, c := range []struct {
		d    time.Duration
		want int
	}{
		{0, 0}, {-time.Second, 0}, {time.Microsecond, 0}, {2 * time.Microsecond, 1}, {3 * time.Microsecond, 1},
		{4 * time.Microsecond, 2}, {time.Millisecond, 9}, {1024 * time.Microsecond, 10}, {time.Hour, LatencyBuckets - 1},
	} {
		if got := bucketOf(c.d); got != c.want {
			t.Errorf("bucketOf(%v) = %d, want %d", c.d, got, c.want)
		}
		if lo, hi := bucketBounds(c.want); c.d > 0 && c.d < time.Minute && (c.d.Seconds() < lo || c.d.Seconds() >= hi) {
			t.Errorf("%v is outside its bucket %d's bounds [%v, %v)", c.d, c.want, lo, hi)
		}
	}
}
