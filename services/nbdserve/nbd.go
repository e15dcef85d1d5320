package nbdserve

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/thejerf/suture/v4"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/supervise"
)

// NBD serves one NBD listener. It is a supervisor:
//
//	nbd
//	├── accept           the accept loop
//	└── connections      one service per client connection, never restarted
//
// A panic while serving one connection closes that connection only; the
// supervisor logs it with its stack and everything else carries on.
type NBD struct {
	*suture.Supervisor
}

// NBDConfig configures an NBD service.
type NBDConfig struct {
	// Listener is where clients connect; the service closes it when stopped.
	Listener net.Listener
	// Server answers the connections.
	Server *nbd.Server
	// Log is the service's logger (named keel.nbd by convention).
	Log hclog.Logger
	// DrainTimeout is how long a stopping connection may take to answer
	// what it has read; it should match the nbd.ServerConfig's. Default 60s.
	DrainTimeout time.Duration
}

// NewNBD builds the NBD service tree.
func NewNBD(cfg NBDConfig) *NBD {
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = 60 * time.Second
	}
	top := supervise.New("nbd", cfg.Log, supervise.Policy{StopTimeout: cfg.DrainTimeout + 5*time.Second})
	conns := supervise.New("connections", cfg.Log, supervise.Policy{
		// Connections are never restarted, so failures only ever delay
		// the clean-up of a failed one; keep that short.
		FailureBackoff: time.Second,
		StopTimeout:    cfg.DrainTimeout + 5*time.Second,
	})
	top.Add(conns)
	top.Add(&acceptor{l: cfg.Listener, srv: cfg.Server, conns: conns, log: cfg.Log})
	return &NBD{Supervisor: top}
}

// acceptor is the accept loop of one listener.
type acceptor struct {
	l     net.Listener
	srv   *nbd.Server
	conns *suture.Supervisor
	log   hclog.Logger
}

func (a *acceptor) String() string { return "accept " + a.l.Addr().String() }

func (a *acceptor) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { a.l.Close() })
	defer stop()
	var delay time.Duration
	for {
		supervise.Point(supervise.PointAccept)
		nc, err := a.l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return suture.ErrDoNotRestart
			}
			// Out of file descriptors and the like: wait and go on
			// rather than spin.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			a.log.Warn("accept failed; retrying", "error", err, "delay", delay)
			select {
			case <-time.After(delay):
			case <-ctx.Done():
				return nil
			}
			continue
		}
		delay = 0
		a.conns.Add(&connService{nc: nc, srv: a.srv, log: a.log})
	}
}

// connService serves one client connection. It runs once: a connection
// cannot be resumed after a failure, so a restart only closes it.
type connService struct {
	nc  net.Conn
	srv *nbd.Server
	log hclog.Logger
	ran atomic.Bool
}

func (c *connService) String() string { return fmt.Sprintf("conn %s", remote(c.nc)) }

func (c *connService) Serve(ctx context.Context) error {
	if c.ran.Swap(true) {
		c.nc.Close()
		return suture.ErrDoNotRestart
	}
	if err := c.srv.ServeConn(ctx, c.nc); err != nil {
		c.log.Warn("connection ended with an error", "remote", remote(c.nc), "error", err)
	}
	return suture.ErrDoNotRestart
}

func remote(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" && a.String() != "@" {
		return a.String()
	}
	return "unix:" + nc.LocalAddr().String()
}
