package nbdserve

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/thejerf/suture/v4"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica/rawimage"
	"github.com/keelstore/keel/supervise"
	"github.com/keelstore/keel/upgrade"
)

// StandaloneConfig configures `keel serve`: one raw image over NBD, no
// replication.
type StandaloneConfig struct {
	// Image is served; the caller opened it and closes it after Run.
	Image *rawimage.File
	// Listener serves NBD; Run closes it.
	Listener net.Listener
	// Name and Description of the export. Name defaults to "keel".
	Name, Description string
	// ReadOnly refuses writes, trims and zeroes with EPERM.
	ReadOnly bool
	// DrainTimeout is how long, on stop, in-flight requests may take.
	// Default 60s.
	DrainTimeout time.Duration
	// TLS and TLSConfig are the listener's TLS (nbd.ServerConfig's fields
	// of the same names). Default nbd.TLSOff.
	TLS       nbd.TLSMode
	TLSConfig *tls.Config
	// Log is the process's logger.
	Log hclog.Logger
	// Upgrader, when set, puts the process under upgrade control
	// (docs/upgrade.md): a process with a parent takes over the parent's
	// connections before it accepts, and each receive on Upgrades
	// replaces the process by a fresh start of its binary. The caller
	// passes the image and the listener through it.
	Upgrader *upgrade.Upgrader
	Upgrades <-chan struct{}
}

// Standalone is `keel serve`'s supervision tree: one NBD service over a
// LocalImage. Run stops it by draining, then syncs the image.
type Standalone struct {
	cfg  StandaloneConfig
	root *suture.Supervisor
	nbd  *NBD
}

// NewStandalone builds the tree; Run starts it.
func NewStandalone(cfg StandaloneConfig) (*Standalone, error) {
	if cfg.Image == nil || cfg.Listener == nil {
		return nil, errors.New("nbdserve: Image and Listener are required")
	}
	if cfg.Name == "" {
		cfg.Name = "keel"
	}
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = 60 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = hclog.NewNullLogger()
	}
	srv, err := nbd.NewServer(nbd.ServerConfig{
		Exports: []nbd.Export{{
			Name:        cfg.Name,
			Description: cfg.Description,
			Backend:     LocalImage{Image: cfg.Image},
			ReadOnly:    cfg.ReadOnly,
		}},
		Logger:       cfg.Log.Named("nbd"),
		DrainTimeout: cfg.DrainTimeout,
		TLS:          cfg.TLS,
		TLSConfig:    cfg.TLSConfig,
	})
	if err != nil {
		return nil, err
	}
	root := supervise.New("keel", cfg.Log, supervise.Policy{StopTimeout: cfg.DrainTimeout + 10*time.Second})
	takeOver := cfg.Upgrader != nil && cfg.Upgrader.HasParent()
	n := NewNBD(NBDConfig{Listener: cfg.Listener, Server: srv, Log: cfg.Log.Named("nbd"), DrainTimeout: cfg.DrainTimeout, Paused: takeOver})
	root.Add(n)
	return &Standalone{cfg: cfg, root: root, nbd: n}, nil
}

// Run serves until ctx ends and every connection has drained, then makes
// every write durable. It returns nil after a stop by ctx, or after a
// child took over at an upgrade.
func (s *Standalone) Run(ctx context.Context) error {
	rootCtx, cancelRoot := context.WithCancel(ctx)
	defer cancelRoot()
	rootErr := s.root.ServeBackground(rootCtx)
	err := s.serve(ctx, rootErr)
	cancelRoot()
	if rerr := <-rootErr; err == nil && ctx.Err() == nil && !errors.Is(rerr, context.Canceled) {
		err = rerr
	}
	if !s.cfg.ReadOnly {
		if serr := s.cfg.Image.Sync(); serr != nil && err == nil {
			err = serr
		}
	}
	return err
}

func (s *Standalone) serve(ctx context.Context, rootErr <-chan error) error {
	u, log := s.cfg.Upgrader, s.cfg.Log
	if u != nil {
		if u.HasParent() {
			// The image and the listener came from the parent; take its
			// connections, then accept.
			if err := u.TakeOver(func([]byte) error { return nil }, s.nbd.ResumeConn); err != nil {
				return fmt.Errorf("nbdserve: taking over from the parent: %w", err)
			}
			s.nbd.Resume(nil)
		}
		if err := u.Ready(); err != nil {
			log.Warn("could not announce readiness", "error", err)
		}
	}
	for {
		select {
		case <-s.cfg.Upgrades:
			if u == nil {
				log.Warn("upgrade requested but the process is not under upgrade control")
				continue
			}
			if err := u.Upgrade(ctx, standaloneHandover{s.nbd}); err != nil {
				continue // logged and recorded; this process keeps serving
			}
			log.Info("stopped after the upgrade")
			return nil
		case <-ctx.Done():
			if u != nil {
				u.Stop()
			}
			log.Info("stopping: draining connections")
			return nil
		case err := <-rootErr:
			return err
		}
	}
}

// standaloneHandover hands keel serve's connections over; the image is
// shared (passed down at the child's start), so there is no process state.
type standaloneHandover struct{ n *NBD }

func (h standaloneHandover) Quiesce(ctx context.Context) ([]byte, []upgrade.Conn, error) {
	conns, err := h.n.Quiesce(ctx)
	return nil, conns, err
}

func (h standaloneHandover) Resume(conns []upgrade.Conn) { h.n.Resume(conns) }
