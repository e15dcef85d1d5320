package statuspage

import (
	"sync"
	"time"
)

// HistoryLen is how many samples a History keeps by default: ten minutes of
// one a second.
const HistoryLen = 600

// Sample is what a process served between two observations (a second, as
// Sampler runs them), as rates.
type Sample struct {
	// At is the end of the interval, in Unix milliseconds.
	At int64 `json:"t"`
	// ReadOps and WriteOps are requests per second (writes count trims
	// and zeroes too); ReadBytes and WriteBytes bytes per second.
	ReadOps    float64 `json:"read_ops"`
	WriteOps   float64 `json:"write_ops"`
	ReadBytes  float64 `json:"read_bytes"`
	WriteBytes float64 `json:"write_bytes"`
	// The latency quantiles of the requests of the interval, in
	// milliseconds, interpolated within a histogram bucket (a factor of
	// two wide); 0 when there were none.
	ReadP50  float64 `json:"read_p50_ms"`
	ReadP99  float64 `json:"read_p99_ms"`
	WriteP50 float64 `json:"write_p50_ms"`
	WriteP99 float64 `json:"write_p99_ms"`
	// CacheHitRate is the share of cache lookups that hit, from 0 to 1;
	// absent when there were none (a server, or a proxy without reads).
	CacheHitRate *float64 `json:"cache_hit_rate,omitempty"`
}

// HistoryResponse is what GET /v1/status/history answers.
type HistoryResponse struct {
	// Now is the process's clock when it answered, in Unix milliseconds
	// (the page draws its charts up to it, whatever the browser's clock).
	Now int64 `json:"now"`
	// EveryMs is the interval samples are taken at.
	EveryMs int64 `json:"every_ms"`
	// Samples are oldest first.
	Samples []Sample `json:"samples"`
}

// History is a ring of the latest Samples, each computed by Observe from
// the Totals it is given and those of the observation before. It decides
// nothing by itself: time comes in as Observe's argument. It is safe for
// concurrent use.
type History struct {
	mu     sync.Mutex // guards the following
	ring   []Sample
	next   int  // where the next sample goes
	full   bool // the ring has wrapped
	last   Totals
	lastAt time.Time
	primed bool // last and lastAt hold an observation
}

// NewHistory returns a History keeping the latest size samples (HistoryLen
// when size is not positive).
func NewHistory(size int) *History {
	if size <= 0 {
		size = HistoryLen
	}
	return &History{ring: make([]Sample, size)}
}

// Observe records the totals seen at now. The first observation, one not
// later than the one before (a clock that went back), and one whose
// counts went down (the counters were replaced) only set the baseline;
// every other adds the sample of the interval since the one before.
func (h *History) Observe(now time.Time, t Totals) {
	h.mu.Lock()
	defer h.mu.Unlock()
	prev, prevAt, primed := h.last, h.lastAt, h.primed
	h.last, h.lastAt, h.primed = t, now, true
	if !primed || !now.After(prevAt) || !covers(t, prev) {
		return
	}
	h.ring[h.next] = sampleOf(prev, t, now.Sub(prevAt), now)
	h.next++
	if h.next == len(h.ring) {
		h.next, h.full = 0, true
	}
}

// Samples returns the samples kept, oldest first.
func (h *History) Samples() []Sample {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.full {
		return append([]Sample(nil), h.ring[:h.next]...)
	}
	return append(append([]Sample(nil), h.ring[h.next:]...), h.ring[:h.next]...)
}

// covers reports whether no count of t is below prev's.
func covers(t, prev Totals) bool {
	if t.CacheHits < prev.CacheHits || t.CacheMisses < prev.CacheMisses {
		return false
	}
	for _, k := range [][2]KindTotals{{t.Reads, prev.Reads}, {t.Writes, prev.Writes}} {
		if k[0].Ops < k[1].Ops || k[0].Bytes < k[1].Bytes {
			return false
		}
		for i := range k[0].Latency {
			if k[0].Latency[i] < k[1].Latency[i] {
				return false
			}
		}
	}
	return true
}

// sampleOf is the sample of the interval of length d ending at end, from
// the totals at its start and at its end (which covers them).
func sampleOf(from, to Totals, d time.Duration, end time.Time) Sample {
	sec := d.Seconds()
	r, w := delta(from.Reads, to.Reads), delta(from.Writes, to.Writes)
	s := Sample{
		At:      end.UnixMilli(),
		ReadOps: float64(r.Ops) / sec, WriteOps: float64(w.Ops) / sec,
		ReadBytes: float64(r.Bytes) / sec, WriteBytes: float64(w.Bytes) / sec,
		ReadP50: quantileMs(&r, 0.5), ReadP99: quantileMs(&r, 0.99),
		WriteP50: quantileMs(&w, 0.5), WriteP99: quantileMs(&w, 0.99),
	}
	hits, misses := to.CacheHits-from.CacheHits, to.CacheMisses-from.CacheMisses
	if hits+misses > 0 {
		rate := float64(hits) / float64(hits+misses)
		s.CacheHitRate = &rate
	}
	return s
}

func delta(from, to KindTotals) KindTotals {
	d := KindTotals{Ops: to.Ops - from.Ops, Bytes: to.Bytes - from.Bytes}
	for i := range d.Latency {
		d.Latency[i] = to.Latency[i] - from.Latency[i]
	}
	return d
}

// quantileMs is the q-quantile of k's latency histogram in milliseconds:
// the bucket holding the request of that rank, interpolated linearly
// within the bucket's bounds; 0 for an empty histogram.
func quantileMs(k *KindTotals, q float64) float64 {
	var total uint64
	for _, c := range k.Latency {
		total += c
	}
	if total == 0 {
		return 0
	}
	rank := q * float64(total) // the rank-th request, counted from 0
	var below uint64
	for i, c := range k.Latency {
		if c == 0 || float64(below+c) <= rank {
			below += c
			continue
		}
		lo, hi := bucketBounds(i)
		frac := (rank - float64(below)) / float64(c)
		return (lo + frac*(hi-lo)) * 1e3
	}
	lo, hi := bucketBounds(LatencyBuckets - 1) // not reached: rank < total
	return (lo + hi) / 2 * 1e3
}
