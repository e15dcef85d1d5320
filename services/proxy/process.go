package proxy

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/thejerf/suture/v4"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/services/nbdserve"
	"github.com/keelstore/keel/services/statuspage"
	"github.com/keelstore/keel/supervise"
	"github.com/keelstore/keel/upgrade"
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
	// HTTP, when not nil, serves /v1/status, /metrics and the status
	// page (GET /). The process takes ownership of it.
	HTTP net.Listener
	// ConnectTimeout bounds the wait at start for a server to tell the
	// volume's size. Default 60s.
	ConnectTimeout time.Duration
	// DrainTimeout is how long, on stop, in-flight NBD requests may take.
	// Default 60s.
	DrainTimeout time.Duration
	// Log is the process's logger.
	Log hclog.Logger
	// TLS and TLSConfig are the NBD listener's TLS (nbd.ServerConfig's
	// fields of the same names): the proxy's own clients, such as qemu.
	// Default nbd.TLSOff. The links to the servers are Proxy.UpstreamTLS.
	TLS       nbd.TLSMode
	TLSConfig *tls.Config
	// OnServing, when set, is called with the NBD URI once clients can
	// connect.
	OnServing func(uri string)
	// Upgrader, when set, puts the process under upgrade control
	// (docs/upgrade.md): listeners are inherited through it, a process
	// with a parent takes over the parent's connections once ready, and
	// each receive on Upgrades replaces the process by a fresh start of
	// its binary. Proxy.Inherited must be Upgrader.HasParent().
	Upgrader *upgrade.Upgrader
	Upgrades <-chan struct{}
}

// Process is a keel proxy's supervision tree:
//
//	keel
//	├── Proxy: polls the servers, claims the volume, releases it at stop
//	├── status history and API (with --http)
//	└── NBD: the listener, one service per connection, over the Proxy
//
// Run owns the stop order: NBD first (every request already read is
// committed while the proxy can still reach the servers), then the proxy,
// which releases the volume.
type Process struct {
	cfg    ProcessConfig
	proxy  *Proxy
	status *statuspage.Service // the status page's history (statuspage.go)
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
	return &Process{cfg: cfg, proxy: p, status: newStatusPage(p)}, nil
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
	root := supervise.New("keel", log, supervise.Policy{StopTimeout: cfg.DrainTimeout + 15*time.Second, Restarts: &pr.proxy.restarts})
	root.Add(pr.proxy)
	if cfg.HTTP != nil {
		root.Add(pr.status)
		root.Add(&API{Listener: cfg.HTTP, Proxy: pr.proxy, Log: log.Named("http"), Page: pr.status})
	}
	rootErr := root.ServeBackground(rootCtx)
	u := cfg.Upgrader
	abort := func(err error) error {
		if u != nil {
			u.Fail(err) // a child tells its parent, which keeps serving
		}
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
			Backend:     pr.proxy.requests.Wrap(pr.status.Meter().Wrap(pr.proxy)),
		}},
		Logger:           log.Named("nbd"),
		DrainTimeout:     cfg.DrainTimeout,
		MaxInFlightBytes: 64 << 20,
		TLS:              cfg.TLS,
		TLSConfig:        cfg.TLSConfig,
	})
	if err != nil {
		return abort(err)
	}
	var ls nbdserve.Listeners
	if u != nil {
		ls = u
	}
	l, uri, err := nbdserve.ListenWith(cfg.Listen, ls)
	if err != nil {
		return abort(err)
	}
	takeOver := u != nil && u.HasParent()
	nbdSvc := nbdserve.NewNBD(nbdserve.NBDConfig{Listener: l, Server: srv, Log: log.Named("nbd"), DrainTimeout: cfg.DrainTimeout, Paused: takeOver})
	var nbdTok suture.ServiceToken = root.Add(nbdSvc)
	if takeOver {
		// Prepared (the leader is known, the volume's size too): take
		// the parent's connections, then accept.
		err := u.TakeOver(func(b []byte) error {
			if len(b) != 8 {
				return fmt.Errorf("proxy: parent state of %d bytes, want 8", len(b))
			}
			pr.proxy.Adopt(binary.BigEndian.Uint64(b))
			return nil
		}, nbdSvc.ResumeConn)
		if err != nil {
			return abort(err)
		}
		nbdSvc.Resume(nil)
	}
	if u != nil {
		if err := u.Ready(); err != nil {
			log.Warn("could not announce readiness", "error", err)
		}
	}
	if cfg.TLS == nbd.TLSRequire {
		uri = nbdserve.TLSURI(uri)
	}
	log.Info("proxy serving", "uri", uri, "tls", cfg.TLS.String(), "upstream_tls", cfg.Proxy.UpstreamTLS != nil, "size", size, "writer", cfg.Proxy.Writer, "cache", cfg.Proxy.CacheBytes, "servers", strings.Join(cfg.Proxy.Servers, ","), "took_over", takeOver)
	if cfg.OnServing != nil {
		cfg.OnServing(uri)
	}

	for {
		select {
		case <-cfg.Upgrades:
			if u == nil {
				log.Warn("upgrade requested but the process is not under upgrade control")
				continue
			}
			if err := u.Upgrade(ctx, &handover{nbd: nbdSvc, proxy: pr.proxy}); err != nil {
				continue // logged and recorded; this process keeps serving
			}
			// The child serves every connection; the volume stays claimed
			// under the writer name it shares (see Proxy.HandOff).
			if err := root.RemoveAndWait(nbdTok, cfg.DrainTimeout+5*time.Second); err != nil {
				log.Warn("NBD did not stop in time", "error", err)
			}
			cancelRoot()
			<-rootErr
			log.Info("stopped after the upgrade")
			return nil
		case <-ctx.Done():
			if u != nil {
				u.Stop()
			}
			return pr.stop(root, nbdTok, cancelRoot, rootErr)
		case err := <-rootErr:
			return err
		}
	}
}

// stop drains NBD, then stops the rest (the proxy releases the volume).
func (pr *Process) stop(root *suture.Supervisor, nbdTok suture.ServiceToken, cancelRoot func(), rootErr <-chan error) error {
	cfg, log := pr.cfg, pr.cfg.Log
	log.Info("stopping: draining NBD connections, then releasing the volume")
	if err := root.RemoveAndWait(nbdTok, cfg.DrainTimeout+5*time.Second); err != nil {
		log.Warn("NBD did not drain in time", "error", err)
	}
	cancelRoot()
	<-rootErr
	log.Info("stopped")
	return nil
}

// handover is the proxy process's part in an upgrade: the NBD
// connections, and the index the child's reads must wait for.
type handover struct {
	nbd   *nbdserve.NBD
	proxy *Proxy
}

func (h *handover) Quiesce(ctx context.Context) ([]byte, []upgrade.Conn, error) {
	conns, err := h.nbd.Quiesce(ctx)
	if err != nil {
		return nil, nil, err
	}
	return binary.BigEndian.AppendUint64(nil, h.proxy.HandOff(true)), conns, nil
}

func (h *handover) Resume(conns []upgrade.Conn) {
	h.proxy.HandOff(false)
	h.nbd.Resume(conns)
}
