package server

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	"github.com/thejerf/suture/v4"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/supervise"
)

// NodeHolder hands the running replica.Node to the services that use it.
// The Raft service sets it while the node runs; users wait for it.
type NodeHolder struct {
	mu      sync.Mutex // guards the following
	node    *replica.Node
	gone    error         // while set (and node is nil), Get fails at once with it
	changed chan struct{} // closed and replaced when node or gone changes
}

// ErrHandedOver: this process has handed the node over to its successor
// (an upgrade); a caller should ask again, and reaches the successor.
var ErrHandedOver = errors.New("server: the node is handed over to a new process")

// NewNodeHolder returns an empty holder.
func NewNodeHolder() *NodeHolder { return &NodeHolder{changed: make(chan struct{})} }

func (h *NodeHolder) set(n *replica.Node) {
	h.mu.Lock()
	h.node = n
	if n != nil {
		h.gone = nil
	}
	close(h.changed)
	h.changed = make(chan struct{})
	h.mu.Unlock()
}

// setGone makes Get fail at once with err while no node runs (nil: wait
// again).
func (h *NodeHolder) setGone(err error) {
	h.mu.Lock()
	h.gone = err
	close(h.changed)
	h.changed = make(chan struct{})
	h.mu.Unlock()
}

// Peek returns the node if it runs now.
func (h *NodeHolder) Peek() *replica.Node {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.node
}

// Get waits for the node to run, or for ctx to end; it fails at once
// with ErrHandedOver once the node has passed to a successor process.
func (h *NodeHolder) Get(ctx context.Context) (*replica.Node, error) {
	for {
		h.mu.Lock()
		n, gone, ch := h.node, h.gone, h.changed
		h.mu.Unlock()
		if n != nil {
			return n, nil
		}
		if gone != nil {
			return nil, gone
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, fmt.Errorf("raft node not running: %w", ctx.Err())
		}
	}
}

// RaftService runs the node's Raft as one supervised service: it opens the
// node, publishes it in the holder, watches it, and closes it (handing
// leadership over first) when stopped. If Raft shuts down on its own the
// service fails and its supervisor starts it again.
type RaftService struct {
	Config replica.NodeConfig
	// Listener, when set, is the Raft listener shared by this process's
	// transports (an upgrade passes it on); nil: the node listens on
	// Config.RaftAddr itself.
	Listener *RaftListener
	// Opened, when set, is a node already open (a process taking over
	// from its parent opens it during the handover): the first Serve runs
	// it instead of opening one.
	Opened *OpenNode
	// WaitLocked is how long opening waits for the data directory's lock
	// held by another process (after a failed upgrade, the child that
	// held it is being killed) or for the Raft listener held by this
	// process's last run (still stopping); zero: not at all, and a locked
	// directory stops the process.
	WaitLocked time.Duration
	Holder     *NodeHolder
	Log        hclog.Logger
}

func (s *RaftService) String() string { return "raft " + s.Config.ID }

func (s *RaftService) Serve(ctx context.Context) error {
	on := s.Opened
	s.Opened = nil
	if on == nil {
		var err error
		if on, err = s.open(ctx); err != nil {
			if errors.Is(err, replica.ErrDirLocked) {
				// Not something a restart fixes: stop the process.
				s.Log.Error("cannot start", "error", err)
				return terminate{err}
			}
			return err
		}
	}
	n := on.Node
	s.Holder.set(n)
	s.Log.Info("raft node running", "id", n.ID(), "raft", n.Self().Raft, "image", n.Image().Path())
	defer func() {
		s.Holder.set(nil)
		if err := on.Close(); err != nil {
			s.Log.Warn("closing raft node", "error", err)
		}
	}()
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			supervise.Point(supervise.PointRaft)
			if n.Raft().State() == raft.Shutdown {
				return errors.New("raft shut down on its own")
			}
		}
	}
}

// open opens the node, retrying while another process holds the directory
// for up to WaitLocked.
func (s *RaftService) open(ctx context.Context) (*OpenNode, error) {
	deadline := time.Now().Add(s.WaitLocked)
	for {
		on, err := Open(ctx, s.Config, s.Listener)
		if err == nil || !(errors.Is(err, replica.ErrDirLocked) || errors.Is(err, ErrLeaseHeld)) || time.Now().After(deadline) {
			return on, err
		}
		s.Log.Info("the node is still held (by a child that failed, or this process's last run); waiting", "error", err)
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// OpenNode is a replica.Node with the transport it was opened on.
type OpenNode struct {
	Node  *replica.Node
	trans *raft.NetworkTransport // nil: the node's own
	log   hclog.Logger
}

// Open opens the node of cfg: on a transport over l when l is set (cfg's
// RaftAddr is then what peers are told), else as cfg says.
func Open(ctx context.Context, cfg replica.NodeConfig, l *RaftListener) (*OpenNode, error) {
	on := &OpenNode{log: cfg.Log}
	if on.log == nil {
		on.log = hclog.NewNullLogger()
	}
	if l != nil {
		t, err := l.Transport(cfg.RaftAddr, on.log.Named("transport"))
		if err != nil {
			return nil, err
		}
		on.trans = t
		cfg.Transport = t
	}
	n, err := replica.OpenNode(ctx, cfg)
	if err != nil {
		if on.trans != nil {
			on.trans.Close()
		}
		return nil, err
	}
	on.Node = n
	return on, nil
}

// Close closes the node (raft, stores, image, the directory's lock), then
// its transport: established Raft connections close, the listener stays.
// (Raft's shutdown no longer hangs on a stuck replication pipeline:
// replica drains every pipeline, replica/pipeline.go.)
func (on *OpenNode) Close() error {
	err := on.Node.Close()
	if on.trans != nil {
		on.trans.CloseStreams()
		err = errors.Join(err, on.trans.Close())
	}
	return err
}

// terminate stops the whole supervision tree (suture's
// ErrTerminateSupervisorTree) while reading as just its cause.
type terminate struct{ err error }

func (t terminate) Error() string        { return t.err.Error() }
func (t terminate) Unwrap() error        { return t.err }
func (t terminate) Is(target error) bool { return target == suture.ErrTerminateSupervisorTree }
