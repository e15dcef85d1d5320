package replica_test

import (
	"context"
	"errors"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/replica/rawimage"
	"github.com/keelstore/keel/replica/replicatest"
)

// A cluster with one member of a lower feature level: the leader writes
// the form that member reads, and refuses (before proposing) a command it
// could not read; once the member is upgraded, the cluster's level rises.
func TestMixedLevels(t *testing.T) {
	n3Level := replica.LevelLegacy
	c := replicatest.New(t, 3, replicatest.Options{Config: func(cfg *replica.NodeConfig) {
		if cfg.ID == "n3" {
			cfg.Level = n3Level
		}
	}})
	if got := c.ShareLevels(); got != replica.LevelLegacy {
		t.Fatalf("cluster level %d with n3 at level 1", got)
	}
	// n3 reads the log at level 1: a versioned entry would halt it (its
	// OnFatal fails the test), so converging proves the legacy form.
	mustApply(t, c, write(0, 0, 0, 0, []byte("legacy")))
	c.WaitConverged()

	future := &replica.Command{Kind: 42, Level: replica.LevelVersioned, Ignorable: true, Body: []byte("new")}
	lead := c.WaitLeader()
	before := lead.Raft().LastIndex()
	follower := c.Node("n2")
	if follower == lead {
		follower = c.Node("n1")
	}
	res, err := follower.Propose(context.Background(), future)
	if err != nil || !errors.Is(res.Err, replica.ErrFeatureLevel) {
		t.Fatalf("a level-2 command proposed in a level-1 cluster: %+v, %v; want ErrFeatureLevel", res, err)
	}
	if after := lead.Raft().LastIndex(); after != before {
		t.Errorf("the refused command was proposed: last index %d -> %d", before, after)
	}

	// Upgrade n3: the cluster speaks level 2 once every member says so.
	c.Stop("n3")
	n3Level = replica.CurrentLevel
	c.Start("n3", false)
	if got := c.ShareLevels(); got != replica.CurrentLevel {
		t.Fatalf("cluster level %d after the upgrade, want %d", got, replica.CurrentLevel)
	}
	mustApply(t, c, write(0, 0, 0, 512, []byte("versioned")))
	// Known to no member, but ignorable: committed and skipped alike.
	res = mustApply(t, c, future)
	if !errors.Is(res.Err, replica.ErrUnknownCommand) {
		t.Errorf("ignorable unknown command answered %+v, want ErrUnknownCommand", res)
	}
	c.WaitConverged()
	tooNew := &replica.Command{Kind: 43, Level: replica.CurrentLevel + 1}
	if res := mustApply(t, c, tooNew); !errors.Is(res.Err, replica.ErrFeatureLevel) {
		t.Errorf("a command above every member's level: %+v, want ErrFeatureLevel", res)
	}

	// A new leader trusts no level from before its term.
	old := c.WaitLeader()
	if err := old.Raft().LeadershipTransfer().Error(); err != nil {
		t.Fatal(err)
	}
	nl := c.WaitLeader()
	if nl == old {
		t.Fatal("leadership did not move")
	}
	if got := nl.ClusterLevel(); got != replica.LevelLegacy {
		t.Errorf("new leader's cluster level %d before any refresh, want %d", got, replica.LevelLegacy)
	}
	if got := c.ShareLevels(); got != replica.CurrentLevel {
		t.Errorf("new leader's cluster level %d after a refresh", got)
	}

	// A joining node of a build from before levels (its join request says
	// none): noted before it is registered and added, it lowers the level
	// at once, and keeps it low while it is registered.
	nl.NoteLevel("n9", 0)
	if got := nl.ClusterLevel(); got != replica.LevelLegacy {
		t.Errorf("cluster level %d right after a level-1 joiner was noted", got)
	}
	mustApply(t, c, &replica.Command{Kind: replica.KindRegister, Node: replica.NodeInfo{ID: "n9", Raft: "n9"}})
	if got, err := nl.RefreshLevels(); err != nil || got != replica.LevelLegacy {
		t.Errorf("cluster level %d, %v with a registered level-1 node", got, err)
	}
	mustApply(t, c, &replica.Command{Kind: replica.KindForget, Node: replica.NodeInfo{ID: "n9"}})
	if got, err := nl.RefreshLevels(); err != nil || got != replica.CurrentLevel {
		t.Errorf("cluster level %d, %v once the level-1 node is forgotten", got, err)
	}
}

// The FSM meets entries a newer build wrote: it skips an ignorable one and
// halts on any other, never counting it as applied.
func TestFSMUnknownEntry(t *testing.T) {
	img, err := rawimage.Open(t.TempDir()+"/img", rawimage.Options{Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	fatal := make(chan error, 1)
	f := replica.NewFSM(context.Background(), replica.FSMConfig{Image: img, Log: hclog.NewNullLogger(), OnFatal: func(e error) { fatal <- e }}, replica.State{})
	legacy, err := write(0, 0, 0, 0, []byte("x")).AppendFor(nil, replica.LevelLegacy)
	if err != nil {
		t.Fatal(err)
	}
	if res := f.Apply(&raft.Log{Index: 1, Data: legacy}).(replica.Result); res.Err != nil {
		t.Fatalf("legacy write: %+v", res)
	}
	skip := (&replica.Command{Kind: 42, Level: replica.CurrentLevel + 1, Ignorable: true}).Encode(nil)
	if res := f.Apply(&raft.Log{Index: 2, Data: skip}).(replica.Result); !errors.Is(res.Err, replica.ErrUnknownCommand) || f.AppliedIndex() != 2 {
		t.Fatalf("ignorable unknown entry: %+v, applied index %d", res, f.AppliedIndex())
	}
	halt := (&replica.Command{Kind: 42, Level: replica.CurrentLevel + 1}).Encode(nil)
	returned := make(chan any, 1)
	go func() { returned <- f.Apply(&raft.Log{Index: 3, Data: halt}) }()
	if err := <-fatal; !errors.Is(err, replica.ErrUnknownCommand) {
		t.Errorf("OnFatal(%v), want ErrUnknownCommand", err)
	}
	if f.AppliedIndex() != 2 {
		t.Errorf("unknown entry counted as applied: index %d", f.AppliedIndex())
	}
	if _, err := f.Snapshot(); !errors.Is(err, replica.ErrImageFailed) {
		t.Errorf("snapshot after a halt: %v, want ErrImageFailed", err)
	}
	f.Stop()
	if res := (<-returned).(replica.Result); !errors.Is(res.Err, replica.ErrStopping) {
		t.Errorf("halted Apply answered %+v after Stop, want ErrStopping", res)
	}
	if f.AppliedIndex() != 2 {
		t.Error("unknown entry counted as applied after Stop")
	}
}
