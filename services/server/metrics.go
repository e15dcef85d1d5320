package server

import (
	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/wire"
)

// NewMetrics returns a registry with the Go and process collectors and the
// node's gauges, read at scrape time from whatever node the holder has.
func NewMetrics(h *NodeHolder, r *Resyncer) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
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
	return reg
}
