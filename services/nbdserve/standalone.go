package nbdserve

import (
	"context"
	"errors"
	"net"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/thejerf/suture/v4"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica/rawimage"
	"github.com/keelstore/keel/supervise"
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
	// Log is the process's logger.
	Log hclog.Logger
}

// Standalone is `keel serve`'s supervision tree: one NBD service over a
// LocalImage. Run stops it by draining, then syncs the image.
type Standalone struct {
	cfg  StandaloneConfig
	root *suture.Supervisor
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
	})
	if err != nil {
		return nil, err
	}
	root := supervise.New("keel", cfg.Log, supervise.Policy{StopTimeout: cfg.DrainTimeout + 10*time.Second})
	root.Add(NewNBD(NBDConfig{Listener: cfg.Listener, Server: srv, Log: cfg.Log.Named("nbd"), DrainTimeout: cfg.DrainTimeout}))
	return &Standalone{cfg: cfg, root: root}, nil
}

// Run serves until ctx ends and every connection has drained, then makes
// every write durable. It returns nil after a stop by ctx.
func (s *Standalone) Run(ctx context.Context) error {
	err := s.root.Serve(ctx)
	if ctx.Err() != nil {
		s.cfg.Log.Info("stopping: connections drained")
		err = nil
	}
	if !s.cfg.ReadOnly {
		if serr := s.cfg.Image.Sync(); serr != nil && err == nil {
			err = serr
		}
	}
	return err
}
