package nbdserve

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/thejerf/suture/v4"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/supervise"
	"github.com/keelstore/keel/upgrade"
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
	acc   *acceptor
	conns *suture.Supervisor
	srv   *nbd.Server
	log   hclog.Logger

	mu   sync.Mutex // guards the following
	live map[*connService]struct{}
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
	// Paused starts with accepting paused, for a process taking over
	// from its parent (Resume starts it).
	Paused bool
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
	n := &NBD{Supervisor: top, conns: conns, srv: cfg.Server, log: cfg.Log, live: map[*connService]struct{}{}}
	n.acc = &acceptor{l: cfg.Listener, n: n, log: cfg.Log, resume: make(chan struct{}, 1)}
	n.acc.paused.Store(cfg.Paused)
	top.Add(n.acc)
	return n
}

// add serves a connection (st: resumed from a handover).
func (n *NBD) add(nc net.Conn, st *nbd.ConnState) {
	c := &connService{nc: nc, n: n, resume: st, h: nbd.NewHandoff(), done: make(chan struct{})}
	n.mu.Lock()
	n.live[c] = struct{}{}
	n.mu.Unlock()
	n.conns.Add(c)
}

// Quiesce stops accepting (the listener stays open) and detaches every
// connection at a request boundary, all at once; it returns each one's
// state (nbd.AppendConnState) and socket. A connection that ends instead
// (the client left) is not returned, nor is a TLS connection: its session
// keys cannot leave this process, so it answers every request it read and
// is closed, and its client reconnects to the process that accepts next.
func (n *NBD) Quiesce(ctx context.Context) ([]upgrade.Conn, error) {
	if err := n.acc.pause(ctx); err != nil {
		return nil, err
	}
	n.mu.Lock()
	cs := make([]*connService, 0, len(n.live))
	for c := range n.live {
		cs = append(cs, c)
	}
	n.mu.Unlock()
	for _, c := range cs {
		c.h.Request()
	}
	var out []upgrade.Conn
	for _, c := range cs {
		select {
		case <-c.done:
		case <-ctx.Done():
			n.Resume(out)
			return nil, context.Cause(ctx)
		}
		if d := c.detached; d != nil {
			out = append(out, upgrade.Conn{State: nbd.AppendConnState(nil, d.State), File: d.File})
		}
	}
	n.log.Info("connections quiesced for handover", "count", len(out))
	return out, nil
}

// Resume serves conns again here (an upgrade failed) and accepts again.
func (n *NBD) Resume(conns []upgrade.Conn) {
	for _, c := range conns {
		if err := n.ResumeConn(c.State, c.File); err != nil {
			n.log.Error("could not resume a connection after a failed upgrade; the client reconnects", "error", err)
		}
	}
	n.acc.unpause()
}

// ResumeConn serves a connection handed over (state as Quiesce returns
// it); it takes f.
func (n *NBD) ResumeConn(state []byte, f *os.File) error {
	defer f.Close()
	st, err := nbd.ParseConnState(state)
	if err != nil {
		return err
	}
	nc, err := net.FileConn(f)
	if err != nil {
		return fmt.Errorf("nbdserve: resuming a connection: %w", err)
	}
	n.add(nc, &st)
	return nil
}

// acceptor is the accept loop of one listener. It can be paused (the
// listener stays open; clients wait in its backlog).
type acceptor struct {
	l      net.Listener
	n      *NBD
	log    hclog.Logger
	paused atomic.Bool
	parked chan struct{} // closed by Serve once a pause has taken effect
	resume chan struct{}
	pmu    sync.Mutex // guards parked
}

// pause stops accepting and waits until Serve has parked.
func (a *acceptor) pause(ctx context.Context) error {
	a.pmu.Lock()
	parked := make(chan struct{})
	a.parked = parked
	a.pmu.Unlock()
	a.paused.Store(true)
	if dl, ok := a.l.(interface{ SetDeadline(time.Time) error }); ok {
		_ = dl.SetDeadline(time.Now())
	}
	select {
	case <-parked:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

func (a *acceptor) unpause() {
	a.paused.Store(false)
	select {
	case a.resume <- struct{}{}:
	default:
	}
}

// park waits while paused.
func (a *acceptor) park(ctx context.Context) bool {
	a.pmu.Lock()
	if a.parked != nil {
		close(a.parked)
		a.parked = nil
	}
	a.pmu.Unlock()
	for a.paused.Load() {
		select {
		case <-a.resume:
		case <-ctx.Done():
			return false
		}
	}
	if dl, ok := a.l.(interface{ SetDeadline(time.Time) error }); ok {
		_ = dl.SetDeadline(time.Time{})
	}
	return true
}

func (a *acceptor) String() string { return "accept " + a.l.Addr().String() }

func (a *acceptor) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { a.l.Close() })
	defer stop()
	var delay time.Duration
	for {
		if a.paused.Load() && !a.park(ctx) {
			return nil
		}
		supervise.Point(supervise.PointAccept)
		nc, err := a.l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if a.paused.Load() {
				continue
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
		a.n.add(nc, nil)
	}
}

// connService serves one client connection. It runs once: a connection
// cannot be resumed after a failure, so a restart only closes it.
type connService struct {
	nc     net.Conn
	n      *NBD
	resume *nbd.ConnState // resumed from a handover, not a new client
	h      *nbd.Handoff
	ran    atomic.Bool

	done     chan struct{} // closed when Serve is over; then detached is set if handed off
	detached *nbd.Detached
}

func (c *connService) String() string { return fmt.Sprintf("conn %s", remote(c.nc)) }

func (c *connService) Serve(ctx context.Context) error {
	if c.ran.Swap(true) {
		c.nc.Close()
		return suture.ErrDoNotRestart
	}
	defer close(c.done)
	defer func() {
		c.n.mu.Lock()
		delete(c.n.live, c)
		c.n.mu.Unlock()
	}()
	var err error
	if c.resume != nil {
		c.detached, err = c.n.srv.ResumeConn(ctx, c.nc, *c.resume, c.h)
	} else {
		c.detached, err = c.n.srv.ServeConnHandoff(ctx, c.nc, c.h)
	}
	if err != nil {
		c.n.log.Warn("connection ended with an error", "remote", remote(c.nc), "error", err)
	}
	return suture.ErrDoNotRestart
}

func remote(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" && a.String() != "@" {
		return a.String()
	}
	return "unix:" + nc.LocalAddr().String()
}
