package server

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
	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/nbdmetrics"
	"github.com/keelstore/keel/services/nbdserve"
	"github.com/keelstore/keel/services/statuspage"
	"github.com/keelstore/keel/services/wire"
	"github.com/keelstore/keel/supervise"
	"github.com/keelstore/keel/upgrade"
)

// Config configures one keel server process: one replica of one volume.
type Config struct {
	// Node configures the replica (directory, Raft, snapshots). Its Restore
	// (the image resync from peers) and Forwarder (writes to the leader's
	// API) are set by New; Self.HTTP and Self.NBD
	// should name the listeners below as peers reach them.
	Node replica.NodeConfig
	// HTTP serves the API (status, metrics, admin, forwarded writes, image
	// sync); NBD serves the volume. New takes ownership of both.
	HTTP, NBD net.Listener
	// VolumeSize is the size of the image in bytes.
	VolumeSize uint64
	// WriteTimeout is how long an NBD write waits for a quorum before it
	// fails with EIO. Default 10s.
	WriteTimeout time.Duration
	// DrainTimeout is how long, on stop, in-flight NBD requests may take.
	// Default 60s.
	DrainTimeout time.Duration
	// MembershipEvery is how often the leader checks for non-voters to
	// promote and registers itself. Default 500ms.
	MembershipEvery time.Duration
	// Client calls other servers' APIs. Default: a client with a 10s
	// per-request timeout.
	Client *wire.Client
	// Version is the build version the server reports (keel version).
	Version string
	// Log is the server's logger.
	Log hclog.Logger
	// Raft, when set, is the listener Raft is served on (at Node.RaftAddr,
	// which peers are told); New takes ownership of it and the node's
	// transports share it (RaftListener). Nil: the node listens on
	// Node.RaftAddr itself. Required with Upgrader.
	Raft net.Listener
	// Upgrader, when set, puts the server under upgrade control
	// (docs/upgrade.md): the listeners are inherited through it, a
	// process with a parent opens the data directory only once the
	// parent has released it and takes over the parent's NBD
	// connections, and each receive on Upgrades replaces the process by a
	// fresh start of its binary.
	Upgrader *upgrade.Upgrader
	Upgrades <-chan struct{}
	// NBDTLS and NBDTLSConfig are the NBD listener's TLS
	// (nbd.ServerConfig's TLS and TLSConfig): STARTTLS for NBD clients
	// and proxies. Default nbd.TLSOff.
	NBDTLS       nbd.TLSMode
	NBDTLSConfig *tls.Config
	// TransferTimeout bounds how long an upgrade of the leader waits for
	// another node to lead before it proceeds anyway (a one-node cluster
	// cannot hand leadership over). Default 5s; at most 1m.
	TransferTimeout time.Duration
}

func (c *Config) defaults() {
	if c.WriteTimeout == 0 {
		c.WriteTimeout = 10 * time.Second
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = 60 * time.Second
	}
	if c.Client == nil {
		c.Client = wire.NewClient(10 * time.Second)
	}
	if c.Log == nil {
		c.Log = hclog.NewNullLogger()
	}
	if c.TransferTimeout == 0 {
		c.TransferTimeout = 5 * time.Second
	}
}

// Validate checks the configuration; errors name the bad field.
func (c Config) Validate() error {
	if c.HTTP == nil || c.NBD == nil {
		return errors.New("server: HTTP and NBD listeners are required")
	}
	if c.VolumeSize == 0 {
		return errors.New("server: VolumeSize must be positive")
	}
	if c.WriteTimeout != 0 && (c.WriteTimeout < 100*time.Millisecond || c.WriteTimeout > time.Hour) {
		return fmt.Errorf("server: WriteTimeout %v: must be from 100ms to 1h", c.WriteTimeout)
	}
	if c.DrainTimeout < 0 {
		return fmt.Errorf("server: DrainTimeout %v: must not be negative", c.DrainTimeout)
	}
	if c.Upgrader != nil && c.Raft == nil {
		return errors.New("server: Raft (the listener) is required with an Upgrader, which passes it on")
	}
	if c.TransferTimeout < 0 || c.TransferTimeout > time.Minute {
		return fmt.Errorf("server: TransferTimeout %v: must be from 0 (5s) to 1m", c.TransferTimeout)
	}
	return c.Node.Validate()
}

// Server is a keel server's supervision tree:
//
//	keel
//	├── raft (own supervisor: backs off on its own)
//	│   └── RaftService: opens the replica.Node, publishes it in the holder
//	├── API: the HTTP API
//	├── Membership: registration and promotion while leading
//	├── status history: the status page's per-second samples
//	└── NBD: the listener, one service per connection, over the Volume
//
// Run owns the stop order: NBD first (every request already read is
// answered while Raft still runs to commit it), then the rest (Raft hands
// leadership over before it stops). In an upgrade (upgrade.go) the child
// starts with the raft supervisor empty and its NBD acceptor paused.
type Server struct {
	cfg     Config
	holder  *NodeHolder
	resync  *Resyncer
	rl      *RaftListener // nil: the node listens itself
	root    *suture.Supervisor
	nbdTok  suture.ServiceToken
	nbdSvc  *nbdserve.NBD
	raftSup *suture.Supervisor
	raftTok suture.ServiceToken // the RaftService while it is in raftSup
	status  *statuspage.Service // the status page's history (statuspage.go)
}

// New builds the tree; Run starts it.
func New(cfg Config) (*Server, error) {
	cfg.defaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Log
	s := &Server{cfg: cfg, holder: NewNodeHolder(), status: newStatusPage()}
	if cfg.Raft != nil {
		var err error
		if s.rl, err = NewRaftListener(cfg.Raft, log.Named("raft-listener")); err != nil {
			return nil, err
		}
	}
	restarts, lags, requests := &supervise.Restarts{}, &PeerLags{}, nbdmetrics.New()
	s.resync = &Resyncer{Self: cfg.Node.ID, Client: cfg.Client, Log: log.Named("resync")}
	cfg.Node.Restore = s.resync.Restore
	cfg.Node.Forwarder = &Forwarder{Client: cfg.Client}
	if cfg.Node.Log == nil {
		cfg.Node.Log = log.Named("replica")
	}
	srv, err := nbd.NewServer(nbd.ServerConfig{
		Exports: []nbd.Export{{
			Name:        "keel",
			Description: "keel replicated volume (node " + cfg.Node.ID + ")",
			Backend:     requests.Wrap(s.status.Meter().Wrap(&Volume{Holder: s.holder, SizeBytes: cfg.VolumeSize, WriteTimeout: cfg.WriteTimeout, Log: log.Named("volume")})),
		}},
		Logger:           log.Named("nbd"),
		DrainTimeout:     cfg.DrainTimeout,
		MaxInFlightBytes: 64 << 20,
		TLS:              cfg.NBDTLS,
		TLSConfig:        cfg.NBDTLSConfig,
	})
	if err != nil {
		return nil, err
	}
	root := supervise.New("keel", log, supervise.Policy{StopTimeout: cfg.DrainTimeout + 15*time.Second, Restarts: restarts})
	s.cfg = cfg
	s.raftSup = supervise.New("raft", log, supervise.Policy{StopTimeout: 30 * time.Second, Restarts: restarts})
	takeOver := cfg.Upgrader != nil && cfg.Upgrader.HasParent()
	if !takeOver {
		s.raftTok = s.raftSup.Add(s.raftService(nil, 0))
	}
	root.Add(s.raftSup)
	root.Add(&API{Listener: cfg.HTTP, Holder: s.holder, Client: cfg.Client, Resync: s.resync,
		Metrics: NewMetrics(MetricSources{Holder: s.holder, Resync: s.resync, Lags: lags, Restarts: restarts, Requests: requests}), Version: cfg.Version, Level: levelOr(cfg.Node.Level), Log: log.Named("http"), Page: s.status})
	root.Add(s.status)
	root.Add(&Membership{Holder: s.holder, Client: cfg.Client, Log: log.Named("membership"), Every: cfg.MembershipEvery, Lags: lags})
	s.nbdSvc = nbdserve.NewNBD(nbdserve.NBDConfig{Listener: cfg.NBD, Server: srv, Log: log.Named("nbd"), DrainTimeout: cfg.DrainTimeout, Paused: takeOver})
	s.nbdTok = root.Add(s.nbdSvc)
	s.root = root
	return s, nil
}

// raftService is the Raft service of this server: running opened, if
// set, else opening the node, waiting up to waitLocked for the data
// directory's lock.
func (s *Server) raftService(opened *OpenNode, waitLocked time.Duration) *RaftService {
	return &RaftService{Config: s.cfg.Node, Listener: s.rl, Opened: opened, WaitLocked: waitLocked, Holder: s.holder, Log: s.cfg.Log.Named("raft-service")}
}

// Holder hands out the running replica.Node (tests, tools).
func (s *Server) Holder() *NodeHolder { return s.holder }

// Run serves until ctx ends, then stops in order (see Server) and returns
// nil; or it returns the error that ended the tree, or why a process
// taking over from its parent could not.
func (s *Server) Run(ctx context.Context) error {
	log, u := s.cfg.Log, s.cfg.Upgrader
	if s.rl != nil {
		defer s.rl.Close() // after the tree, whose transports lease it
	}
	rootCtx, cancelRoot := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelRoot()
	rootErr := s.root.ServeBackground(rootCtx)
	if u != nil && u.HasParent() {
		if err := u.TakeOver(s.openAfterParent(ctx), s.nbdSvc.ResumeConn); err != nil {
			// Release the directory before the parent hears of the
			// failure: it opens the directory again at once.
			cancelRoot()
			<-rootErr
			u.Fail(err)
			return fmt.Errorf("server: taking over from the previous process: %w", err)
		}
		s.nbdSvc.Resume(nil)
		log.Info("took over from the previous process")
	}
	if u != nil {
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
			if err := u.Upgrade(ctx, &handover{s: s}); err != nil {
				continue // logged and recorded; this process keeps serving
			}
			// The child runs the node and serves every connection.
			if err := s.root.RemoveAndWait(s.nbdTok, s.cfg.DrainTimeout+5*time.Second); err != nil {
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
			log.Info("stopping: draining NBD connections, then Raft")
			if err := s.root.RemoveAndWait(s.nbdTok, s.cfg.DrainTimeout+5*time.Second); err != nil {
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
}

// levelOr is a NodeConfig.Level with its default.
func levelOr(l replica.Level) replica.Level {
	if l == 0 {
		return replica.CurrentLevel
	}
	return l
}

// Join asks the member at addr (its HTTP address) to add self, which
// speaks level and runs build version, as a non-voter, retrying for up to
// two minutes while the cluster has no leader, and returns the volume
// size.
func Join(ctx context.Context, c *wire.Client, addr string, self replica.NodeInfo, level replica.Level, version string, log hclog.Logger) (uint64, error) {
	deadline := time.Now().Add(2 * time.Minute)
	for attempt := 1; ; attempt++ {
		var resp wire.JoinResponse
		err := c.Do(ctx, "POST", addr, "/v1/cluster/join", wire.JoinRequest{Node: self, Level: level, Version: version}, &resp)
		if err == nil {
			log.Info("joined the cluster as a non-voter", "via", addr, "leader", resp.Leader, "size", resp.Size)
			return resp.Size, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return 0, fmt.Errorf("joining via %s: %w", addr, err)
		}
		log.Warn("join failed; retrying", "via", addr, "attempt", attempt, "error", err)
		t := time.NewTimer(time.Second)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
	}
}
