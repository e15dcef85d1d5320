package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/thejerf/suture/v4"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/services/nbdserve"
	"github.com/keelstore/keel/supervise"
)

// ProcessConfig configures a `keel proxy` process: the Proxy, the NBD
// listener in front of it and the optional HTTP API.
type ProcessConfig struct {
	// Proxy configures the backend.
	Proxy Config
	// Listen is where NBD is served: HOST:PORT or unix:PATH. It is opened
	// only once the proxy knows the volume (so a client never connects to
	// a proxy that cannot answer yet).
	Listen string
	// ExportName is the NBD export's name. Default "keel".
	ExportName string
	// HTTP, when not nil, serves /v1/status and /metrics. The process
	// takes ownership of it.
	HTTP net.Listener
	// ConnectTimeout bounds the wait at start for a server to tell the
	// volume's size. Default 60s.
	ConnectTimeout time.Duration
	// DrainTimeout is how long, on stop, in-flight NBD requests may take.
	// Default 60s.
	DrainTimeout time.Duration
	// Log is the process's logger.
	Log hclog.Logger
	// OnServing, when set, is called with the NBD URI once clients can
	// connect.
	OnServing func(uri string)
}

// Process is a keel proxy's supervision tree:
//
//	keel
//	├── Proxy: polls the servers, claims the volume, releases it at stop
//	├── API (with --http)
//	└── NBD: the listener, one service per connection, over the Proxy
//
// Run owns the stop order: NBD first (every request already read is
// committed while the proxy can still reach the servers), then the proxy,
// which releases the volume.
type Process struct {
	cfg   ProcessConfig
	proxy *Proxy
}

// NewProcess checks the configuration and builds the proxy.
func NewProcess(cfg ProcessConfig) (*Process, error) {
	if cfg.ExportName == "" {
		cfg.ExportName = "keel"
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 60 * time.Second
	}
	if cfg.ConnectTimeout < 0 {
		return nil, fmt.Errorf("proxy: ConnectTimeout %v: must be positive", cfg.ConnectTimeout)
	}
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = 60 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = hclog.NewNullLogger()
	}
	if cfg.Listen == "" {
		return nil, errors.New("proxy: Listen is required")
	}
	if cfg.Proxy.Log == nil {
		cfg.Proxy.Log = cfg.Log.Named("proxy")
	}
	p, err := New(cfg.Proxy)
	if err != nil {
		return nil, err
	}
	return &Process{cfg: cfg, proxy: p}, nil
}

// Proxy is the process's backend (status, tests).
func (pr *Process) Proxy() *Proxy { return pr.proxy }

// Run serves until ctx ends, then stops in order (see Process) and
// returns nil; or it returns what ended the tree, or why it could not
// start.
func (pr *Process) Run(ctx context.Context) error {
	cfg, log := pr.cfg, pr.cfg.Log
	rootCtx, cancelRoot := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelRoot()
	root := supervise.New("keel", log, supervise.Policy{StopTimeout: cfg.DrainTimeout + 15*time.Second})
	root.Add(pr.proxy)
	if cfg.HTTP != nil {
		root.Add(&API{Listener: cfg.HTTP, Proxy: pr.proxy, Log: log.Named("http")})
	}
	rootErr := root.ServeBackground(rootCtx)
	abort := func(err error) error {
		cancelRoot()
		<-rootErr
		if ctx.Err() != nil {
			return nil
		}
		return err
	}

	rctx, cancel := context.WithTimeout(ctx, cfg.ConnectTimeout)
	size, err := pr.proxy.Ready(rctx)
	cancel()
	if err != nil {
		return abort(err)
	}
	srv, err := nbd.NewServer(nbd.ServerConfig{
		Exports: []nbd.Export{{
			Name:        cfg.ExportName,
			Description: "keel replicated volume via proxy (servers " + strings.Join(cfg.Proxy.Servers, ",") + ")",
			Backend:     pr.proxy,
		}},
		Logger:           log.Named("nbd"),
		DrainTimeout:     cfg.DrainTimeout,
		MaxInFlightBytes: 64 << 20,
	})
	if err != nil {
		return abort(err)
	}
	l, uri, err := nbdserve.Listen(cfg.Listen)
	if err != nil {
		return abort(err)
	}
	var nbdTok suture.ServiceToken = root.Add(nbdserve.NewNBD(nbdserve.NBDConfig{Listener: l, Server: srv, Log: log.Named("nbd"), DrainTimeout: cfg.DrainTimeout}))
	log.Info("proxy serving", "uri", uri, "size", size, "writer", cfg.Proxy.Writer, "cache", cfg.Proxy.CacheBytes, "servers", strings.Join(cfg.Proxy.Servers, ","))
	if cfg.OnServing != nil {
		cfg.OnServing(uri)
	}

	select {
	case <-ctx.Done():
		log.Info("stopping: draining NBD connections, then releasing the volume")
		if err := root.RemoveAndWait(nbdTok, cfg.DrainTimeout+5*time.Second); err != nil {
			log.Warn("NBD did not drain in time", "error", err)
		}
		cancelRoot()
		<-rootErr
		log.Info("stopped")
		return nil
	case err := <-rootErr:
		return err
	}
}
