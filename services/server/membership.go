package server

import (
	"context"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/wire"
	"github.com/keelstore/keel/supervise"
)

// Membership runs on every server and acts while it leads: it keeps the
// leader's own registry entry current, polls every member's status for
// the feature level it speaks (so the leader writes only what all of them
// read; see replica.Node.RefreshLevels), and promotes a non-voter to
// voter once it has caught up (applied within PromoteLag entries of the
// leader and no resync running), so a new node never weakens the quorum
// while it is still copying. On every node it logs one line per leader
// change and per change of the volume's writer (seen at its checks).
type Membership struct {
	Holder *NodeHolder
	Client *wire.Client
	Log    hclog.Logger
	// PromoteLag is how far behind the leader's applied index a non-voter
	// may be to be promoted. Default 64.
	PromoteLag uint64
	// Every is the check interval. Default 500ms.
	Every time.Duration
	// Lags, when set, gets each polled peer's lag behind the leader's
	// applied index at every check while leading, and is emptied when
	// this node does not lead.
	Lags *PeerLags

	// Only Serve's goroutine touches the following.
	lastLeader string       // the last leader noteLeader logged
	lastWriter writerHolder // the writer noteWriter last saw
	sawWriter  bool         // lastWriter is known
}

// writerHolder is who holds the volume: a writer's name ("" none) and the
// epoch of its claim.
type writerHolder struct {
	writer string
	epoch  uint64
}

// writerEvent is the line to log when the volume's holder goes from prev
// to cur ("" for none): a claim (a new writer, or the same name claiming
// again, as a restarted proxy does), a release, or, when prev is not
// known (this node just started), who holds it now.
func writerEvent(prev writerHolder, known bool, cur writerHolder) string {
	switch {
	case !known && cur.writer != "":
		return "writer holds the volume"
	case !known, cur == prev:
		return ""
	case cur.writer == "":
		return "writer released the volume"
	case prev.writer != "" && prev.writer != cur.writer:
		return "writer took the volume over"
	default:
		return "writer claimed the volume"
	}
}

// noteWriter logs one line when the volume's writer changes, on every
// node.
func (m *Membership) noteWriter(n *replica.Node) {
	st := n.FSM().State()
	cur := writerHolder{st.Writer, st.Epoch}
	if msg := writerEvent(m.lastWriter, m.sawWriter, cur); msg != "" {
		m.Log.Info(msg, "writer", cur.writer, "epoch", cur.epoch, "previous", m.lastWriter.writer, "previous_epoch", m.lastWriter.epoch)
	}
	m.lastWriter, m.sawWriter = cur, true
}

// noteLeader logs one line when this node sees a new leader: the one
// line per leader change, on every node, an operator looks for. A time
// without a leader (an election) is not logged here; raft logs it.
func (m *Membership) noteLeader(n *replica.Node) {
	_, id := n.Raft().LeaderWithID()
	if !leaderChanged(m.lastLeader, string(id)) {
		return
	}
	m.Log.Info("leader changed", "leader", id, "previous", m.lastLeader, "term", n.Raft().Stats()["term"], "self", id == raft.ServerID(n.ID()))
	m.lastLeader = string(id)
}

// leaderChanged reports whether cur, the leader now known (empty: none),
// is a change from last, the last leader logged.
func leaderChanged(last, cur string) bool { return cur != "" && cur != last }

func (m *Membership) String() string { return "membership" }

func (m *Membership) Serve(ctx context.Context) error {
	every := m.Every
	if every == 0 {
		every = 500 * time.Millisecond
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		supervise.Point(supervise.PointMembership)
		n := m.Holder.Peek()
		if n != nil {
			m.noteLeader(n)
			m.noteWriter(n)
		}
		if n == nil || !n.IsLeader() {
			if m.Lags != nil {
				m.Lags.Set(nil)
			}
			continue
		}
		m.registerSelf(ctx, n)
		sts := m.poll(ctx, n)
		if m.Lags != nil {
			m.Lags.Set(lagsOf(n.FSM().AppliedIndex(), sts))
		}
		if _, err := n.RefreshLevels(); err != nil {
			m.Log.Warn("refreshing the cluster's feature level", "error", err)
		}
		m.promote(ctx, n, sts)
	}
}

// poll fetches every other registered member's status, concurrently, and
// notes the level each reports; members that do not answer are missing
// from the result (their last noted level stands).
func (m *Membership) poll(ctx context.Context, n *replica.Node) map[string]wire.NodeStatus {
	f := n.Raft().GetConfiguration()
	if f.Error() != nil {
		return nil
	}
	reg := n.FSM().State().Nodes
	var mu sync.Mutex
	out := map[string]wire.NodeStatus{}
	var wg sync.WaitGroup
	for _, s := range f.Configuration().Servers {
		info, ok := reg[string(s.ID)]
		if string(s.ID) == n.ID() || !ok || info.HTTP == "" {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			st, err := m.Client.Status(sctx, info.HTTP)
			if err != nil {
				return
			}
			n.NoteLevel(info.ID, st.Level)
			mu.Lock()
			out[info.ID] = st
			mu.Unlock()
		}()
	}
	wg.Wait()
	return out
}

// lagsOf is each peer's lag behind applied, the leader's applied index
// (0 for a peer ahead of it, which a status polled after the leader's
// index was read can be).
func lagsOf(applied uint64, sts map[string]wire.NodeStatus) map[string]uint64 {
	out := make(map[string]uint64, len(sts))
	for id, st := range sts {
		if st.AppliedIndex < applied {
			out[id] = applied - st.AppliedIndex
		} else {
			out[id] = 0
		}
	}
	return out
}

func (m *Membership) registerSelf(ctx context.Context, n *replica.Node) {
	self := n.Self()
	if cur, ok := n.FSM().State().Nodes[self.ID]; ok && cur == self {
		return
	}
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := n.Apply(actx, &replica.Command{Kind: replica.KindRegister, Node: self}); err != nil {
		m.Log.Warn("registering the leader's addresses", "error", err)
	}
}

func (m *Membership) promote(ctx context.Context, n *replica.Node, sts map[string]wire.NodeStatus) {
	f := n.Raft().GetConfiguration()
	if f.Error() != nil {
		return
	}
	lag := m.PromoteLag
	if lag == 0 {
		lag = 64
	}
	for _, s := range f.Configuration().Servers {
		if s.Suffrage != raft.Nonvoter {
			continue
		}
		st, ok := sts[string(s.ID)]
		if !ok || (st.Sync != nil && st.Sync.Active) {
			continue
		}
		if st.AppliedIndex+lag < n.FSM().AppliedIndex() {
			continue
		}
		if err := n.Raft().AddVoter(s.ID, s.Address, 0, 10*time.Second).Error(); err != nil {
			m.Log.Warn("promoting a caught-up non-voter failed", "id", s.ID, "error", err)
			continue
		}
		m.Log.Info("non-voter caught up; promoted to voter", "id", s.ID, "applied", st.AppliedIndex)
	}
}
