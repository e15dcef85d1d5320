package proxy

import (
	"context"
	"net"
	"net/http"
	"sort"

	"github.com/hashicorp/go-hclog"
	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/statuspage"
	"github.com/keelstore/keel/services/wire"
	"github.com/keelstore/keel/supervise"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Status is what GET /v1/status on a proxy's --http answers.
type Status struct {
	Writer         string            `json:"writer"`
	Holding        bool              `json:"holding"` // this proxy is the volume's writer now
	Epoch          uint64            `json:"epoch,omitempty"`
	Fenced         string            `json:"fenced,omitempty"`  // why writes are refused for good
	Version        string            `json:"version,omitempty"` // the build's (Config.Version)
	Level          replica.Level     `json:"level"`             // the feature level it speaks
	Leader         string            `json:"leader,omitempty"`  // the leader's HTTP address
	LastAckedIndex uint64            `json:"last_acked_index"`
	Size           uint64            `json:"size"`
	CacheBytes     uint64            `json:"cache_bytes"`
	CachedBytes    uint64            `json:"cached_bytes"`
	Servers        []ServerStatus    `json:"servers"`
	Counters       map[string]uint64 `json:"counters"`
}

// ServerStatus is one server as the proxy sees it.
type ServerStatus struct {
	HTTP    string `json:"http"`
	ID      string `json:"id,omitempty"`
	NBD     string `json:"nbd,omitempty"`
	Up      bool   `json:"up"`
	State   string `json:"state,omitempty"`
	Applied uint64 `json:"applied_index"`
	Syncing bool   `json:"syncing,omitempty"`
	Reads   uint64 `json:"reads"` // reads this server answered for the proxy
}

// Status describes the proxy now.
func (p *Proxy) Status() Status {
	st := Status{
		Writer: p.cfg.Writer, LastAckedIndex: p.lastAcked.Load(), Version: p.cfg.Version, Level: replica.CurrentLevel,
		Size: p.size, CacheBytes: p.cfg.CacheBytes, CachedBytes: uint64(p.cache.len()) * cacheBlock,
		Counters: p.counters(),
	}
	st.Epoch, st.Fenced = p.writerStatus()
	st.Holding = st.Epoch != 0
	p.view.mu.Lock()
	if l := p.view.leader; l != nil {
		st.Leader = l.http
	}
	p.view.mu.Unlock()
	for _, s := range p.view.snapshot() {
		s.mu.Lock()
		st.Servers = append(st.Servers, ServerStatus{HTTP: s.http, ID: s.id, NBD: s.nbdAddr, Up: s.up, State: s.role, Syncing: s.syncing, Applied: s.applied.Load(), Reads: s.reads.Load()})
		s.mu.Unlock()
	}
	sort.Slice(st.Servers, func(i, j int) bool { return st.Servers[i].HTTP < st.Servers[j].HTTP })
	return st
}

func (p *Proxy) counters() map[string]uint64 {
	s := &p.stats
	return map[string]uint64{
		"reads": s.Reads.Load(), "cache_hits": s.CacheHits.Load(), "cache_misses": s.CacheMisses.Load(),
		"remote_reads": s.RemoteReads.Load(), "remote_read_bytes": s.RemoteReadBytes.Load(), "writes": s.Writes.Load(), "retries": s.Retries.Load(), "relayed": s.Relayed.Load(),
		"duplicates": s.Duplicates.Load(), "refused": s.Refused.Load(),
	}
}

// API serves a proxy's status and metrics over HTTP (keel proxy
// --http):
//
//	GET /v1/status   Status
//	GET /metrics     Prometheus metrics
//	GET /            the status page (with Page)
type API struct {
	Listener net.Listener
	Proxy    *Proxy
	Log      hclog.Logger
	// Page, when set, is the status page (GET /) with its history.
	Page *statuspage.Service
}

func (a *API) String() string { return "proxy http " + a.Listener.Addr().String() }

func (a *API) Serve(ctx context.Context) error {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		wire.WriteJSON(w, http.StatusOK, a.Proxy.Status())
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.Proxy.metrics(), promhttp.HandlerOpts{}))
	if a.Page != nil {
		a.Page.Register(mux)
	}
	return wire.ServeHTTP(ctx, a.Listener, mux, a.Log)
}

var restartsDesc = prometheus.NewDesc("keel_supervisor_restarts_total", "Services restarted by their supervisor after a failure or panic.", []string{"supervisor", "service"}, nil)

// restartCollector reports a process's supervisor restarts.
type restartCollector struct{ r *supervise.Restarts }

func (c restartCollector) Describe(ch chan<- *prometheus.Desc) { ch <- restartsDesc }

func (c restartCollector) Collect(ch chan<- prometheus.Metric) {
	for _, rc := range c.r.Counts() {
		ch <- prometheus.MustNewConstMetric(restartsDesc, prometheus.CounterValue, float64(rc.N), rc.Supervisor, rc.Service)
	}
}

// metrics returns a registry reading the proxy's counters at scrape time.
func (p *Proxy) metrics() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), p.requests, restartCollector{&p.restarts})
	counter := func(name, help string, f func() uint64) {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 { return float64(f()) }))
	}
	gauge := func(name, help string, f func() float64) {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f))
	}
	s := &p.stats
	counter("keel_proxy_reads_total", "Read requests served.", s.Reads.Load)
	counter("keel_proxy_cache_hits_total", "Cache blocks (4 KiB) read from the cache.", s.CacheHits.Load)
	counter("keel_proxy_cache_misses_total", "Cache blocks (4 KiB) a read found missing and fetched from a replica.", s.CacheMisses.Load)
	counter("keel_proxy_remote_reads_total", "Reads sent to a replica.", s.RemoteReads.Load)
	counter("keel_proxy_remote_read_bytes_total", "Bytes read from replicas (read-ahead included).", s.RemoteReadBytes.Load)
	counter("keel_proxy_writes_total", "Write, trim and zero commands sent (a large write is several).", s.Writes.Load)
	counter("keel_proxy_retries_total", "Commands re-sent after a failed attempt (failover, timeout).", s.Retries.Load)
	counter("keel_proxy_relayed_total", "Commands sent through a follower because no leader answered this proxy.", s.Relayed.Load)
	counter("keel_proxy_duplicates_total", "Re-sent commands the cluster had already applied.", s.Duplicates.Load)
	counter("keel_proxy_refused_total", "Commands refused because this proxy was fenced.", s.Refused.Load)
	gauge("keel_proxy_holding", "1 while this proxy is the volume's writer.", func() float64 {
		if p.holding() {
			return 1
		}
		return 0
	})
	gauge("keel_proxy_epoch", "This proxy's writer epoch (0: not holding).", func() float64 { return float64(p.epoch.Load()) })
	gauge("keel_proxy_cached_bytes", "Bytes in the read cache.", func() float64 { return float64(p.cache.len() * cacheBlock) })
	gauge("keel_proxy_leader_known", "1 while a leader is known.", func() float64 {
		p.view.mu.Lock()
		defer p.view.mu.Unlock()
		if p.view.leader != nil {
			return 1
		}
		return 0
	})
	return reg
}
