package server

import (
	"context"
	"fmt"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/keelstore/keel/upgrade"
)

// A server's upgrade (docs/upgrade.md). The child inherits the Raft, HTTP
// and NBD listeners; it prepares only what needs no data directory (its
// API answers "Starting", its NBD acceptor is paused, its raft supervisor
// is empty) and says READY. The parent then hands leadership over if it
// leads, quiesces its NBD connections, stops its Raft service (raft
// shutdown, the stores closed, the image synced and closed, the
// directory's lock released) and sends an empty process state; the child
// opens the node when it receives it, before it takes any connection, so
// that a child that cannot open it fails while the parent can still take
// everything back.

// Timeouts of the child's side.
const (
	// openTimeout bounds the child's opening of the node (which may
	// finish an interrupted image resync).
	openTimeout = 30 * time.Second
	// reopenWaitLocked is how long a parent whose child failed waits for
	// the child's lock on the directory to go (the session kills the
	// child once the parent has taken everything back).
	reopenWaitLocked = 30 * time.Second
	// raftStopTimeout bounds the parent's stop of its Raft service; the
	// upgrade fails after it (and the node opens again once the old run
	// has stopped).
	raftStopTimeout = 30 * time.Second
)

// stacks is every goroutine's stack, for a stop that hangs.
func stacks() string {
	var b strings.Builder
	_ = pprof.Lookup("goroutine").WriteTo(&b, 2)
	return b.String()
}

// openAfterParent is the child's resumeState: the parent has released
// the directory; open the node and run it.
func (s *Server) openAfterParent(ctx context.Context) func([]byte) error {
	return func(state []byte) error {
		if len(state) != 0 {
			return fmt.Errorf("server: parent state of %d bytes, want none", len(state))
		}
		octx, cancel := context.WithTimeout(ctx, openTimeout)
		defer cancel()
		start := time.Now()
		on, err := Open(octx, s.cfg.Node, s.rl)
		if err != nil {
			return err
		}
		s.raftTok = s.raftSup.Add(s.raftService(on, 0))
		s.cfg.Log.Info("opened the node the previous process released", "took", time.Since(start))
		return nil
	}
}

// handover is the parent's part in an upgrade.
type handover struct {
	s        *Server
	released bool           // the Raft service was stopped: Resume starts it again
	pending  []upgrade.Conn // quiesced, not passed to the session (Quiesce failed late)
}

func (h *handover) Quiesce(ctx context.Context) ([]byte, []upgrade.Conn, error) {
	s := h.s
	s.transferLeadership(ctx)
	conns, err := s.nbdSvc.Quiesce(ctx)
	if err != nil {
		return nil, nil, err
	}
	h.released = true
	start := time.Now()
	// From now on, API calls that need the node fail at once (a proxy
	// or peer asks another server, or this one again and reaches the
	// child) instead of waiting for a node this process will not run.
	s.holder.setGone(ErrHandedOver)
	if err := s.raftSup.RemoveAndWait(s.raftTok, raftStopTimeout); err != nil {
		h.pending = conns
		s.cfg.Log.Error("raft did not stop for the handover; goroutines follow", "timeout", raftStopTimeout, "stacks", stacks())
		return nil, nil, fmt.Errorf("server: stopping raft for the handover: %w", err)
	}
	s.cfg.Log.Info("raft stopped and the data directory released for the new process", "took", time.Since(start), "connections", len(conns))
	return nil, conns, nil
}

func (h *handover) Resume(conns []upgrade.Conn) {
	s := h.s
	if h.released {
		s.cfg.Log.Warn("the new process failed after this one released the node: opening it again")
		s.holder.setGone(nil)
		s.raftTok = s.raftSup.Add(s.raftService(nil, reopenWaitLocked))
	}
	s.nbdSvc.Resume(append(h.pending, conns...))
}

// transferLeadership hands leadership to another voter if this node leads,
// and waits up to TransferTimeout for another node to lead. If it cannot
// (a one-node cluster; no voter caught up), the upgrade proceeds: this
// node's successor wins the election again, or another node does.
func (s *Server) transferLeadership(ctx context.Context) {
	n := s.holder.Peek()
	if n == nil || !n.IsLeader() {
		return
	}
	log := s.cfg.Log
	start := time.Now()
	if err := n.Raft().LeadershipTransfer().Error(); err != nil {
		log.Warn("upgrade: could not hand leadership over; proceeding", "error", err)
		return
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.TransferTimeout)
	defer cancel()
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		if l, ok := n.Leader(); ok && l.ID != n.ID() {
			log.Info("upgrade: leadership handed over", "leader", l.ID, "took", time.Since(start))
			return
		}
		select {
		case <-ctx.Done():
			log.Warn("upgrade: no other node leads yet; proceeding", "waited", time.Since(start))
			return
		case <-t.C:
		}
	}
}
