package server

import (
	"fmt"
	"sort"
	"strings"
	"sync"

	gometrics "github.com/hashicorp/go-metrics/compat"
	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/nbdmetrics"
	"github.com/keelstore/keel/services/wire"
	"github.com/keelstore/keel/supervise"
)

// MetricSources is what a server's /metrics reads at scrape time.
type MetricSources struct {
	// Holder has the running node (required).
	Holder *NodeHolder
	// Resync is the image resync's progress (required).
	Resync *Resyncer
	// Lags, when set, is each peer's replication lag as the leader's
	// membership loop last saw it.
	Lags *PeerLags
	// Restarts, when set, counts the supervisors' service restarts.
	Restarts *supervise.Restarts
	// Requests, when set, counts the NBD requests served.
	Requests *nbdmetrics.Requests
}

// raftStates are the values of keel_raft_state's state label.
var raftStates = []raft.RaftState{raft.Follower, raft.Candidate, raft.Leader, raft.Shutdown}

// NewMetrics returns a registry with the Go and process collectors, the
// node's gauges, read at scrape time from whatever node the holder has, and
// hashicorp/raft's own go-metrics (the process's raftSink, see below).
func NewMetrics(src MetricSources) *prometheus.Registry {
	h, r := src.Holder, src.Resync
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), processRaftSink())
	if src.Requests != nil {
		reg.MustRegister(src.Requests)
	}
	reg.MustRegister(&serverCollector{src: src})
	gauge := func(name, help string, f func(n *replica.Node) float64) {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 {
			if n := h.Peek(); n != nil {
				return f(n)
			}
			return 0
		}))
	}
	gauge("keel_raft_is_leader", "1 while this node is the Raft leader.", func(n *replica.Node) float64 {
		if n.Raft().State() == raft.Leader {
			return 1
		}
		return 0
	})
	gauge("keel_raft_running", "1 while this node's Raft runs.", func(n *replica.Node) float64 { return 1 })
	gauge("keel_raft_last_log_index", "Last index in this node's Raft log.", func(n *replica.Node) float64 { return float64(n.Raft().LastIndex()) })
	gauge("keel_raft_commit_index", "Raft commit index known to this node.", func(n *replica.Node) float64 { return float64(n.Raft().CommitIndex()) })
	gauge("keel_applied_index", "Last log index applied to this node's image.", func(n *replica.Node) float64 { return float64(n.FSM().AppliedIndex()) })
	gauge("keel_applied_commands", "Commands applied to the image since the node started.", func(n *replica.Node) float64 { return float64(n.FSM().Applies()) })
	gauge("keel_image_size_bytes", "Size of the volume.", func(n *replica.Node) float64 { return float64(n.Image().Size()) })
	gauge("keel_writer_epoch", "Epoch of the current writer (0: none ever).", func(n *replica.Node) float64 { return float64(n.FSM().State().Epoch) })
	syncGauge := func(name, help string, f func(s *wire.SyncStatus) float64) {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 {
			if s := r.Status(); s != nil {
				return f(s)
			}
			return 0
		}))
	}
	syncGauge("keel_resync_active", "1 while the image is being resynced from peers.", func(s *wire.SyncStatus) float64 {
		if s.Active {
			return 1
		}
		return 0
	})
	syncGauge("keel_resync_bytes_moved", "Bytes fetched from peers by the current or last resync.", func(s *wire.SyncStatus) float64 { return float64(s.BytesMoved) })
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "keel_resync_bytes_moved_total", Help: "Bytes fetched from peers by every resync since the process started."},
		func() float64 { m, _ := r.Totals(); return float64(m) }))
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "keel_resyncs_total", Help: "Image resyncs finished (or failed) since the process started."},
		func() float64 { _, n := r.Totals(); return float64(n) }))
	syncGauge("keel_resync_bytes_compared", "Bytes compared by the current or last resync.", func(s *wire.SyncStatus) float64 { return float64(s.BytesCompared) })
	syncGauge("keel_resync_bytes_to_compare", "Bytes the current or last resync compares in all (its progress is keel_resync_bytes_compared over this).", func(s *wire.SyncStatus) float64 { return float64(s.BytesTotal) })
	gauge("keel_raft_term", "Raft term this node is in.", func(n *replica.Node) float64 { return float64(parseUint(n.Raft().Stats()["term"])) })
	return reg
}

var (
	raftStateDesc = prometheus.NewDesc("keel_raft_state", "1 for the Raft state this node is in (follower, candidate, leader, shutdown), 0 for the others; all 0 while no node runs.", []string{"state"}, nil)
	lagDesc       = prometheus.NewDesc("keel_replication_lag_entries", "On the leader: how many log entries each peer's applied index trails the leader's, as last polled (every 500ms).", []string{"peer"}, nil)
	restartsDesc  = prometheus.NewDesc("keel_supervisor_restarts_total", "Services restarted by their supervisor after a failure or panic.", []string{"supervisor", "service"}, nil)
)

// serverCollector reports the labelled families whose series come and go
// with the node: its Raft state, the peers' lags, the restarted services.
type serverCollector struct{ src MetricSources }

func (c *serverCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- raftStateDesc
	ch <- lagDesc
	ch <- restartsDesc
}

func (c *serverCollector) Collect(ch chan<- prometheus.Metric) {
	var state raft.RaftState = 255 // none: every state reads 0
	if n := c.src.Holder.Peek(); n != nil {
		state = n.Raft().State()
	}
	for _, s := range raftStates {
		v := 0.0
		if s == state {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(raftStateDesc, prometheus.GaugeValue, v, strings.ToLower(s.String()))
	}
	if c.src.Lags != nil {
		for peer, lag := range c.src.Lags.Snapshot() {
			ch <- prometheus.MustNewConstMetric(lagDesc, prometheus.GaugeValue, float64(lag), peer)
		}
	}
	if c.src.Restarts != nil {
		for _, rc := range c.src.Restarts.Counts() {
			ch <- prometheus.MustNewConstMetric(restartsDesc, prometheus.CounterValue, float64(rc.N), rc.Supervisor, rc.Service)
		}
	}
}

// PeerLags is each peer's replication lag in entries, as the leader's
// Membership loop last measured it: the leader's applied index minus the
// peer's. It is emptied when the node stops leading (a follower knows no
// lags). Safe for concurrent use; the zero value is ready.
type PeerLags struct {
	mu   sync.Mutex        // guards the following
	lags map[string]uint64 // by peer id
}

// Set replaces every lag.
func (l *PeerLags) Set(lags map[string]uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lags = lags
}

// Snapshot returns a copy of the lags.
func (l *PeerLags) Snapshot() map[string]uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[string]uint64, len(l.lags))
	for k, v := range l.lags {
		out[k] = v
	}
	return out
}

// hashicorp/raft reports its stage timings (raft.leader.dispatchLog,
// raft.commitTime, raft.replication.appendEntries.rpc,
// raft.rpc.appendEntries.storeLogs, raft.fsm.apply, ...) through the global
// of github.com/hashicorp/go-metrics/compat, which forwards to
// armon/go-metrics unless built with the hashicorpmetrics tag; importing
// the same compat package keeps us on whichever global raft writes to.
//
// That global is process-wide and raft's metrics carry no node label, so
// one raftSink is installed once per process (raftSinkOnce) and every
// registry NewMetrics builds collects that same sink. With one server per
// process, as `keel server` runs, /metrics shows that server's Raft alone;
// where tests run several servers in one process, each one's /metrics
// shows the sum over all of them. Installing a sink per server instead
// would make the last server started steal the others' metrics.
var (
	raftSinkOnce sync.Once
	raftSinkProc *raftSink
)

// processRaftSink installs the process's go-metrics sink on first use and
// returns it.
func processRaftSink() *raftSink {
	raftSinkOnce.Do(func() {
		raftSinkProc = newRaftSink()
		conf := gometrics.DefaultConfig("")
		conf.EnableHostname = false       // no host name inside gauge keys
		conf.EnableRuntimeMetrics = false // no collector goroutine: the Go collector has these
		if _, err := gometrics.NewGlobal(conf, raftSinkProc); err != nil {
			// NewGlobal fails only for a bad configuration, which this is not.
			panic(fmt.Sprintf("server: installing the go-metrics sink: %v", err))
		}
	})
	return raftSinkProc
}

// raftSinkBuckets are the histogram bounds of go-metrics samples. Timings
// arrive in milliseconds (go-metrics' timer granularity); the same bounds
// serve raft's count samples (entries per batch).
var raftSinkBuckets = []float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000}

// raftSink is a go-metrics MetricSink that keeps an aggregate per series
// and is a prometheus.Collector that reports them at scrape time: samples
// as histograms, counters as counters, gauges as gauges. A key becomes a
// metric name by joining its parts with '_' (raft.commitTime:
// raft_commitTime) and mapping every other character than letters, digits
// and '_' to '_' (':' is for recording rules). It starts no goroutine
// and never expires a series.
type raftSink struct {
	mu     sync.Mutex             // guards the following
	series map[string]*sinkSeries // by name and label values
	shapes map[string]sinkShape   // each name's kind and label names, fixed at first sight
	drops  uint64                 // updates whose kind or labels disagreed with their name's shape
	// known finds the series of an update seen before by its kind, key
	// and labels as raft gives them (rawID), without building its name:
	// raft reports a dozen metrics per write, so this is a hot path.
	known map[string]*sinkSeries
	raw   []byte // rawID's buffer
}

type sinkKind int

const (
	sinkSample sinkKind = iota
	sinkCounter
	sinkGauge
)

type sinkShape struct {
	kind   sinkKind
	labels string // label names joined with ','
}

type sinkSeries struct {
	name        string
	kind        sinkKind
	labelNames  []string
	labelValues []string
	count       uint64   // samples
	sum         float64  // samples: total; counters: value; gauges: last value
	buckets     []uint64 // samples: count per upper bound of raftSinkBuckets (not cumulative)
}

func newRaftSink() *raftSink {
	return &raftSink{series: map[string]*sinkSeries{}, shapes: map[string]sinkShape{}, known: map[string]*sinkSeries{}}
}

// metricName maps a go-metrics key to a Prometheus metric name.
func metricName(key []string) string {
	name := []byte(strings.Join(key, "_"))
	for i, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '_' || i > 0 && c >= '0' && c <= '9') {
			name[i] = '_'
		}
	}
	return string(name)
}

// rawID encodes an update's kind, key and labels, unmapped, into s.raw.
// The caller holds s.mu.
func (s *raftSink) rawID(kind sinkKind, key []string, labels []gometrics.Label) []byte {
	b := append(s.raw[:0], byte(kind))
	for _, k := range key {
		b = append(append(b, k...), 0)
	}
	for _, l := range labels {
		b = append(append(append(append(b, 1), l.Name...), 2), l.Value...)
	}
	s.raw = b
	return b
}

func (s *raftSink) update(kind sinkKind, key []string, val float32, labels []gometrics.Label) {
	s.mu.Lock()
	defer s.mu.Unlock()
	se := s.known[string(s.rawID(kind, key, labels))] // no allocation
	if se == nil {
		if se = s.addLocked(kind, key, labels); se == nil {
			return
		}
	}
	v := float64(val)
	switch kind {
	case sinkSample:
		se.count++
		se.sum += v
		if i := sort.SearchFloat64s(raftSinkBuckets, v); i < len(raftSinkBuckets) {
			se.buckets[i]++
		}
	case sinkCounter:
		se.sum += v
	case sinkGauge:
		se.sum = v
	}
}

// addLocked finds or makes the series of an update not seen before in
// this form, checking its shape against its name's; nil when they
// disagree (the update is dropped and counted). The caller holds s.mu.
func (s *raftSink) addLocked(kind sinkKind, key []string, labels []gometrics.Label) *sinkSeries {
	name := metricName(key)
	names := make([]string, len(labels))
	values := make([]string, len(labels))
	for i, l := range labels {
		names[i], values[i] = metricName([]string{l.Name}), l.Value
	}
	shape := sinkShape{kind: kind, labels: strings.Join(names, ",")}
	id := name + "\xff" + strings.Join(values, "\xff")
	if have, ok := s.shapes[name]; !ok {
		s.shapes[name] = shape
	} else if have != shape {
		s.drops++
		return nil
	}
	se := s.series[id]
	if se == nil {
		se = &sinkSeries{name: name, kind: kind, labelNames: names, labelValues: values}
		if kind == sinkSample {
			se.buckets = make([]uint64, len(raftSinkBuckets))
		}
		s.series[id] = se
	}
	s.known[string(s.rawID(kind, key, labels))] = se
	return se
}

// The go-metrics MetricSink methods.

func (s *raftSink) SetGauge(key []string, val float32) { s.update(sinkGauge, key, val, nil) }
func (s *raftSink) SetGaugeWithLabels(key []string, val float32, labels []gometrics.Label) {
	s.update(sinkGauge, key, val, labels)
}
func (s *raftSink) EmitKey(key []string, val float32)     { s.update(sinkSample, key, val, nil) }
func (s *raftSink) IncrCounter(key []string, val float32) { s.update(sinkCounter, key, val, nil) }
func (s *raftSink) IncrCounterWithLabels(key []string, val float32, labels []gometrics.Label) {
	s.update(sinkCounter, key, val, labels)
}
func (s *raftSink) AddSample(key []string, val float32) { s.update(sinkSample, key, val, nil) }
func (s *raftSink) AddSampleWithLabels(key []string, val float32, labels []gometrics.Label) {
	s.update(sinkSample, key, val, labels)
}

// Describe sends nothing: the series are known only as raft emits them,
// which makes this an unchecked collector.
func (s *raftSink) Describe(chan<- *prometheus.Desc) {}

// Collect reports every series. The metrics are built under the lock and
// sent after it, so a slow scrape does not hold up raft.
func (s *raftSink) Collect(ch chan<- prometheus.Metric) {
	for _, m := range s.metrics() {
		ch <- m
	}
}

func (s *raftSink) metrics() []prometheus.Metric {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]prometheus.Metric, 0, len(s.series)+1)
	for _, se := range s.series {
		switch se.kind {
		case sinkSample:
			desc := prometheus.NewDesc(se.name, "hashicorp/raft go-metrics sample (timings in milliseconds).", se.labelNames, nil)
			cum := make(map[float64]uint64, len(raftSinkBuckets))
			var n uint64
			for i, b := range raftSinkBuckets {
				n += se.buckets[i]
				cum[b] = n
			}
			out = append(out, prometheus.MustNewConstHistogram(desc, se.count, se.sum, cum, se.labelValues...))
		case sinkCounter:
			desc := prometheus.NewDesc(se.name, "hashicorp/raft go-metrics counter.", se.labelNames, nil)
			out = append(out, prometheus.MustNewConstMetric(desc, prometheus.CounterValue, se.sum, se.labelValues...))
		case sinkGauge:
			desc := prometheus.NewDesc(se.name, "hashicorp/raft go-metrics gauge.", se.labelNames, nil)
			out = append(out, prometheus.MustNewConstMetric(desc, prometheus.GaugeValue, se.sum, se.labelValues...))
		}
	}
	desc := prometheus.NewDesc("keel_raft_metrics_dropped_total", "go-metrics updates dropped because their kind or labels disagreed with an earlier update of the same name.", nil, nil)
	return append(out, prometheus.MustNewConstMetric(desc, prometheus.CounterValue, float64(s.drops)))
}
