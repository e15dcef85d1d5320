// Package nbdmetrics counts the NBD requests a process serves, by kind,
// for Prometheus: Requests wraps an nbd.Backend and is the collector of
// what passes through it. keel server and keel proxy both serve NBD
// through one, so their /metrics carry the same families:
//
//	keel_nbd_requests_total{kind,result}   requests answered (result ok or error)
//	keel_nbd_request_bytes_total{kind}     bytes read, written, trimmed or zeroed
//	keel_nbd_request_duration_seconds{kind} time from the call into the backend to its return
//
// kind is read, write, trim, zero, flush, extents or cache.
//
// It imports nbd only; never services/server, services/proxy, cmd or chaos.
package nbdmetrics

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keelstore/keel/nbd"
)

// The request kinds, as the kind label spells them.
const (
	KindRead    = "read"
	KindWrite   = "write"
	KindTrim    = "trim"
	KindZero    = "zero"
	KindFlush   = "flush"
	KindExtents = "extents"
	KindCache   = "cache"
)

var kinds = []string{KindRead, KindWrite, KindTrim, KindZero, KindFlush, KindExtents, KindCache}

// DurationBuckets are the latency histogram's upper bounds in seconds:
// from 50µs (a cached read) to 10s (a write waiting out a failover).
var DurationBuckets = []float64{50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1, 2.5, 5, 10}

// Requests is the request metrics of one process. The zero value is not
// usable; call New. It is safe for concurrent use.
type Requests struct {
	total   *prometheus.CounterVec
	bytes   *prometheus.CounterVec
	seconds *prometheus.HistogramVec
	now     func() time.Time
}

// New returns request metrics with every kind's series present at zero,
// so a scrape shows the families before the first request.
func New() *Requests {
	r := &Requests{
		total: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_nbd_requests_total", Help: "NBD requests answered, by kind and result (ok, error).",
		}, []string{"kind", "result"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keel_nbd_request_bytes_total", Help: "Bytes read, written, trimmed or zeroed by NBD requests, by kind.",
		}, []string{"kind"}),
		seconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "keel_nbd_request_duration_seconds", Help: "Time NBD requests spent in the backend, by kind.", Buckets: DurationBuckets,
		}, []string{"kind"}),
		now: time.Now,
	}
	for _, k := range kinds {
		r.total.WithLabelValues(k, "ok")
		r.total.WithLabelValues(k, "error")
		r.bytes.WithLabelValues(k)
		r.seconds.WithLabelValues(k)
	}
	return r
}

// Describe and Collect make Requests a prometheus.Collector.
func (r *Requests) Describe(ch chan<- *prometheus.Desc) {
	r.total.Describe(ch)
	r.bytes.Describe(ch)
	r.seconds.Describe(ch)
}

func (r *Requests) Collect(ch chan<- prometheus.Metric) {
	r.total.Collect(ch)
	r.bytes.Collect(ch)
	r.seconds.Collect(ch)
}

// observe records one request of kind that moved n bytes, started at
// start and ended with err.
func (r *Requests) observe(kind string, n uint64, start time.Time, err error) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	r.total.WithLabelValues(kind, result).Inc()
	if err == nil && n > 0 {
		r.bytes.WithLabelValues(kind).Add(float64(n))
	}
	r.seconds.WithLabelValues(kind).Observe(r.now().Sub(start).Seconds())
}

// Wrap returns b with every request counted in r.
func (r *Requests) Wrap(b nbd.Backend) nbd.Backend { return metered{b: b, r: r} }

type metered struct {
	b nbd.Backend
	r *Requests
}

func (m metered) Size() uint64           { return m.b.Size() }
func (m metered) Capabilities() nbd.Caps { return m.b.Capabilities() }

func (m metered) ReadAt(ctx context.Context, p []byte, off uint64) error {
	start := m.r.now()
	err := m.b.ReadAt(ctx, p, off)
	m.r.observe(KindRead, uint64(len(p)), start, err)
	return err
}

func (m metered) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	start := m.r.now()
	err := m.b.WriteAt(ctx, p, off, fua)
	m.r.observe(KindWrite, uint64(len(p)), start, err)
	return err
}

func (m metered) Flush(ctx context.Context) error {
	start := m.r.now()
	err := m.b.Flush(ctx)
	m.r.observe(KindFlush, 0, start, err)
	return err
}

func (m metered) Trim(ctx context.Context, off, length uint64, fua bool) error {
	start := m.r.now()
	err := m.b.Trim(ctx, off, length, fua)
	m.r.observe(KindTrim, length, start, err)
	return err
}

func (m metered) Zero(ctx context.Context, off, length uint64, flags nbd.ZeroFlags) error {
	start := m.r.now()
	err := m.b.Zero(ctx, off, length, flags)
	m.r.observe(KindZero, length, start, err)
	return err
}

func (m metered) Extents(ctx context.Context, off, length uint64) ([]nbd.Extent, error) {
	start := m.r.now()
	ex, err := m.b.Extents(ctx, off, length)
	m.r.observe(KindExtents, 0, start, err)
	return ex, err
}

func (m metered) Cache(ctx context.Context, off, length uint64) error {
	start := m.r.now()
	err := m.b.Cache(ctx, off, length)
	m.r.observe(KindCache, 0, start, err)
	return err
}
