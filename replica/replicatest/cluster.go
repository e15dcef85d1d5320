// Package replicatest runs in-process Keel clusters for tests: real Nodes
// (real images, real log stores) over raft's in-memory transport, with
// partitions, restarts and an image-equality checker.
package replicatest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/replica/rawimage"
)

// Cluster is a set of nodes on one in-memory network.
type Cluster struct {
	t    testing.TB
	Size uint64

	mu     sync.Mutex // guards the following
	nodes  map[string]*replica.Node
	trans  map[string]*raft.InmemTransport
	dirs   map[string]string
	cut    map[[2]string]bool // partitioned pairs
	Moved  map[string]uint64  // bytes copied by in-process resyncs, per node
	config func(*replica.NodeConfig)
}

// Options tune a cluster.
type Options struct {
	Size uint64 // image size; default 8 MiB
	// Config adjusts each node's configuration before it starts.
	Config func(*replica.NodeConfig)
}

// New starts a cluster of n voters (n1..nN), n1 bootstrapping, and waits
// for a leader.
func New(t testing.TB, n int, o Options) *Cluster {
	t.Helper()
	if o.Size == 0 {
		o.Size = 8 << 20
	}
	c := &Cluster{
		t: t, Size: o.Size, config: o.Config,
		nodes: map[string]*replica.Node{}, trans: map[string]*raft.InmemTransport{},
		dirs: map[string]string{}, cut: map[[2]string]bool{}, Moved: map[string]uint64{},
	}
	t.Cleanup(c.Close)
	c.Start("n1", true)
	c.WaitLeader()
	for i := 2; i <= n; i++ {
		id := fmt.Sprintf("n%d", i)
		c.Start(id, false)
		c.AddVoter(id)
	}
	return c
}

func fastConfig(cfg *replica.NodeConfig) {
	// keel server's defaults (300/300/250 ms): shorter leases made leaders
	// step down on a loaded 2-core machine under -race.
	cfg.HeartbeatTimeout = replica.DefaultHeartbeatTimeout
	cfg.ElectionTimeout = replica.DefaultElectionTimeout
	cfg.LeaderLeaseTimeout = replica.DefaultLeaderLeaseTimeout
}

// Start (re)starts node id with its directory kept across restarts.
func (c *Cluster) Start(id string, bootstrap bool) *replica.Node {
	c.t.Helper()
	c.mu.Lock()
	dir, ok := c.dirs[id]
	if !ok {
		dir = filepath.Join(c.t.TempDir(), id)
		c.dirs[id] = dir
	}
	addr := raft.ServerAddress(id)
	_, tr := raft.NewInmemTransportWithTimeout(addr, time.Second)
	c.trans[id] = tr
	for other, ot := range c.trans {
		if other != id && !c.cut[pair(id, other)] {
			tr.Connect(raft.ServerAddress(other), ot)
			ot.Connect(addr, tr)
		}
	}
	c.mu.Unlock()

	cfg := replica.NodeConfig{
		ID: id, Dir: dir, Transport: tr, Bootstrap: bootstrap, Size: c.Size,
		Self: replica.NodeInfo{HTTP: "mem:" + id, NBD: "mem:" + id},
		Log:  hclog.New(&hclog.LoggerOptions{Name: id, Output: tLog{c.t}, Level: hclog.Info}),
		Restore: func(_ context.Context, img *rawimage.File, st replica.State) error {
			return c.restoreFromPeer(id, img, st)
		},
		OnFatal:   func(err error) { c.t.Errorf("node %s: fatal: %v", id, err) },
		Forwarder: forwarder{c: c, from: id},
	}
	fastConfig(&cfg)
	if c.config != nil {
		c.config(&cfg)
	}
	n, err := replica.OpenNode(context.Background(), cfg)
	if err != nil {
		c.t.Fatalf("starting %s: %v", id, err)
	}
	c.mu.Lock()
	c.nodes[id] = n
	c.mu.Unlock()
	return n
}

func pair(a, b string) [2]string {
	if a > b {
		a, b = b, a
	}
	return [2]string{a, b}
}

// restoreFromPeer is the in-process stand-in for the HTTP image sync: it
// copies differing 64 KiB chunks from a running peer that has applied at
// least st.Index.
func (c *Cluster) restoreFromPeer(id string, dstImg *rawimage.File, st replica.State) error {
	c.mu.Lock()
	var src *replica.Node
	for pid, n := range c.nodes {
		if pid != id && n.FSM().AppliedIndex() >= st.Index && !c.cut[pair(id, pid)] {
			src = n
			break
		}
	}
	c.mu.Unlock()
	if src == nil {
		return fmt.Errorf("no up-to-date peer to restore %s from", id)
	}
	const chunk = 64 << 10
	a, b := make([]byte, chunk), make([]byte, chunk)
	var moved uint64
	for off := uint64(0); off < c.Size; off += chunk {
		if err := src.Image().ReadAt(a, off); err != nil {
			return err
		}
		if err := dstImg.ReadAt(b, off); err != nil {
			return err
		}
		if !bytes.Equal(a, b) {
			if err := dstImg.WriteAt(a, off, false); err != nil {
				return err
			}
			moved += chunk
		}
	}
	c.mu.Lock()
	c.Moved[id] += moved
	c.mu.Unlock()
	return nil
}

// forwarder is the in-process stand-in for the server's HTTP forwarding:
// it applies on the leader node directly, unless a partition cuts the two.
type forwarder struct {
	c    *Cluster
	from string
}

// ErrUnreachable: a forwarded command could not reach the leader.
var ErrUnreachable = errors.New("replicatest: leader unreachable")

func (f forwarder) Forward(ctx context.Context, leader replica.NodeInfo, cmd *replica.Command) (replica.Result, error) {
	f.c.mu.Lock()
	l, cut := f.c.nodes[leader.ID], f.c.cut[pair(f.from, leader.ID)]
	f.c.mu.Unlock()
	if l == nil || cut {
		return replica.Result{}, fmt.Errorf("%w: %s from %s", ErrUnreachable, leader.ID, f.from)
	}
	return l.Apply(ctx, cmd)
}

// Node returns node id.
func (c *Cluster) Node(id string) *replica.Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodes[id]
}

// Stop stops node id cleanly (it can be started again).
func (c *Cluster) Stop(id string) {
	c.t.Helper()
	c.mu.Lock()
	n := c.nodes[id]
	delete(c.nodes, id)
	tr := c.trans[id]
	delete(c.trans, id)
	for _, ot := range c.trans {
		ot.Disconnect(raft.ServerAddress(id))
	}
	c.mu.Unlock()
	if n != nil {
		if err := n.Close(); err != nil {
			c.t.Logf("stopping %s: %v", id, err)
		}
	}
	if tr != nil {
		tr.Close()
	}
}

// Partition cuts every link between the nodes of a and those of b.
func (c *Cluster) Partition(a, b []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, x := range a {
		for _, y := range b {
			c.cut[pair(x, y)] = true
			if tx, ok := c.trans[x]; ok {
				tx.Disconnect(raft.ServerAddress(y))
			}
			if ty, ok := c.trans[y]; ok {
				ty.Disconnect(raft.ServerAddress(x))
			}
		}
	}
}

// Heal restores every link.
func (c *Cluster) Heal() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cut = map[[2]string]bool{}
	for x, tx := range c.trans {
		for y, ty := range c.trans {
			if x != y {
				tx.Connect(raft.ServerAddress(y), ty)
			}
		}
	}
}

// WaitLeader waits for a leader among the running nodes and returns it.
func (c *Cluster) WaitLeader() *replica.Node {
	c.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		c.mu.Lock()
		for _, n := range c.nodes {
			if n.IsLeader() {
				c.mu.Unlock()
				return n
			}
		}
		c.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
	}
	c.t.Fatal("no leader within 10s")
	return nil
}

// AddVoter adds a started node to the configuration as a voter.
func (c *Cluster) AddVoter(id string) {
	c.t.Helper()
	n := c.Node(id)
	// On a loaded machine the leader may lose its lease in between: try
	// again on the next leader (both steps are idempotent).
	deadline := time.Now().Add(20 * time.Second)
	for {
		l := c.WaitLeader()
		err := l.Raft().AddVoter(raft.ServerID(id), raft.ServerAddress(id), 0, 5*time.Second).Error()
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err = l.Apply(ctx, &replica.Command{Kind: replica.KindRegister, Node: n.Self()})
			cancel()
		}
		if err == nil {
			return
		}
		if !leadershipLost(err) || time.Now().After(deadline) {
			c.t.Fatalf("adding %s: %v", id, err)
		}
		c.t.Logf("adding %s: %v; trying again", id, err)
	}
}

// leadershipLost reports whether err means the leader changed under the
// call, which a caller may simply retry.
func leadershipLost(err error) bool {
	return errors.Is(err, replica.ErrNotLeader) || errors.Is(err, raft.ErrNotLeader) ||
		errors.Is(err, raft.ErrLeadershipLost) || errors.Is(err, raft.ErrLeadershipTransferInProgress)
}

// ShareLevels tells every running node the feature level of every other
// one (what a keel server learns from its peers' status), then refreshes
// the leader's cluster level and returns it.
func (c *Cluster) ShareLevels() replica.Level {
	c.t.Helper()
	c.mu.Lock()
	for _, n := range c.nodes {
		for _, o := range c.nodes {
			if o != n {
				n.NoteLevel(o.ID(), o.Level())
			}
		}
	}
	c.mu.Unlock()
	l, err := c.WaitLeader().RefreshLevels()
	if err != nil {
		c.t.Fatalf("refreshing levels: %v", err)
	}
	return l
}

// Apply applies a command through the current leader, retrying leadership
// changes for up to 10s.
func (c *Cluster) Apply(cmd *replica.Command) (replica.Result, error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		l := c.WaitLeader()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		res, err := l.Apply(ctx, cmd)
		cancel()
		if err == nil || time.Now().After(deadline) {
			return res, err
		}
	}
}

// WaitConverged waits until every running node has applied the leader's
// last index, then checks their images are byte-identical.
func (c *Cluster) WaitConverged() {
	c.t.Helper()
	l := c.WaitLeader()
	if err := l.Raft().Barrier(5 * time.Second).Error(); err != nil {
		c.t.Fatalf("barrier: %v", err)
	}
	want := l.FSM().AppliedIndex()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ok := true
		c.mu.Lock()
		for _, n := range c.nodes {
			if n.FSM().AppliedIndex() < want {
				ok = false
			}
		}
		c.mu.Unlock()
		if ok {
			break
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("nodes did not apply index %d within 10s", want)
		}
		time.Sleep(10 * time.Millisecond)
	}
	c.CheckIdentical()
}

// CheckIdentical compares every running node's image byte for byte.
func (c *Cluster) CheckIdentical() {
	c.t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	var ref []byte
	var refID string
	for id, n := range c.nodes {
		b, err := os.ReadFile(n.Image().Path())
		if err != nil {
			c.t.Fatal(err)
		}
		if ref == nil {
			ref, refID = b, id
			continue
		}
		if !bytes.Equal(ref, b) {
			c.t.Errorf("images of %s and %s differ", refID, id)
		}
	}
}

// Close stops every node.
func (c *Cluster) Close() {
	c.mu.Lock()
	ids := make([]string, 0, len(c.nodes))
	for id := range c.nodes {
		ids = append(ids, id)
	}
	c.mu.Unlock()
	for _, id := range ids {
		c.Stop(id)
	}
}

type tLog struct{ t testing.TB }

func (w tLog) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

var _ io.Writer = tLog{}
