package server_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/server/servertest"
	"github.com/keelstore/keel/services/wire"
)

// A server reports its feature level, reads apply requests in both forms,
// refuses a command of a level it does not know before proposing it, and
// (leading alone) raises its cluster level once its membership loop ran.
func TestServerLevels(t *testing.T) {
	o := servertest.StartOne(t, 0)
	c := wire.NewClient(5*time.Second, nil)
	ctx := context.Background()
	st, err := c.Status(ctx, o.HTTP)
	if err != nil || st.Level != replica.CurrentLevel {
		t.Fatalf("status %+v, %v: want level %d", st, err, replica.CurrentLevel)
	}
	w := replica.Command{Kind: replica.KindWrite, Offset: 0, Data: []byte("both forms")}
	legacy, _ := w.AppendFor(nil, replica.LevelLegacy)
	for name, body := range map[string][]byte{"legacy": legacy, "versioned": w.Encode(nil)} {
		r, err := c.Apply(ctx, o.HTTP, body)
		if err != nil || r.Refused != wire.NotRefused || r.Level != replica.CurrentLevel {
			t.Errorf("apply of a %s write: %+v, %v", name, r, err)
		}
	}

	future := (&replica.Command{Kind: 42, Level: replica.CurrentLevel + 1, Body: []byte("x")}).Encode(nil)
	before := o.Holder().Peek().Raft().LastIndex()
	r, err := c.Apply(ctx, o.HTTP, future)
	if err != nil || r.Refused != wire.RefusedUnknownCommand || !errors.Is(r.Refused.Err(r.Error), replica.ErrUnknownCommand) {
		t.Errorf("apply of a command of level %d: %+v, %v; want refusal %d", replica.CurrentLevel+1, r, err, wire.RefusedUnknownCommand)
	}
	if after := o.Holder().Peek().Raft().LastIndex(); after != before {
		t.Errorf("the unknown command was proposed: last index %d -> %d", before, after)
	}

	deadline := time.Now().Add(10 * time.Second)
	for o.Holder().Peek().ClusterLevel() != replica.CurrentLevel {
		if time.Now().After(deadline) {
			t.Fatalf("cluster level %d after 10s, want %d", o.Holder().Peek().ClusterLevel(), replica.CurrentLevel)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
