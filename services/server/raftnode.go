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
	changed chan struct{} // closed and replaced when node changes
}

// NewNodeHolder returns an empty holder.
func NewNodeHolder() *NodeHolder { return &NodeHolder{changed: make(chan struct{})} }

func (h *NodeHolder) set(n *replica.Node) {
	h.mu.Lock()
	h.node = n
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

// Get waits for the node to run, or for ctx to end.
func (h *NodeHolder) Get(ctx context.Context) (*replica.Node, error) {
	for {
		h.mu.Lock()
		n, ch := h.node, h.changed
		h.mu.Unlock()
		if n != nil {
			return n, nil
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
	Holder *NodeHolder
	Log    hclog.Logger
}

func (s *RaftService) String() string { return "raft " + s.Config.ID }

func (s *RaftService) Serve(ctx context.Context) error {
	n, err := replica.OpenNode(ctx, s.Config)
	if err != nil {
		if errors.Is(err, replica.ErrDirLocked) {
			// Not something a restart fixes: stop the process.
			s.Log.Error("cannot start", "error", err)
			return terminate{err}
		}
		return err
	}
	s.Holder.set(n)
	s.Log.Info("raft node running", "id", n.ID(), "raft", n.Self().Raft, "image", n.Image().Path())
	defer func() {
		s.Holder.set(nil)
		if err := n.Close(); err != nil {
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

// terminate stops the whole supervision tree (suture's
// ErrTerminateSupervisorTree) while reading as just its cause.
type terminate struct{ err error }

func (t terminate) Error() string        { return t.err.Error() }
func (t terminate) Unwrap() error        { return t.err }
func (t terminate) Is(target error) bool { return target == suture.ErrTerminateSupervisorTree }
