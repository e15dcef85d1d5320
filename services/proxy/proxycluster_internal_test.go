package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keelstore/keel/services/wire"
)

// TestClusterViewServeOwnsBarrierFetches: a barrier fetch hangs on the
// leader; when the view stops, Serve returns only after the fetch has
// ended (and answered its waiters), and a Barrier after the stop fails at
// once instead of starting work nobody waits for.
func TestClusterViewServeOwnsBarrierFetches(t *testing.T) {
	var hang atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if hang.Load() || r.URL.Path != "/v1/status" {
			<-r.Context().Done()
			return
		}
		_ = json.NewEncoder(w).Encode(wire.NodeStatus{State: "Leader", LastLogIndex: 7, AppliedIndex: 7, ImageSize: 1 << 20})
	}))
	defer srv.Close()
	v := newClusterView([]string{strings.TrimPrefix(srv.URL, "http://")}, wire.NewClient(0, nil), hclog.NewNullLogger(), time.Hour, 10*time.Millisecond)
	ctx, stop := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { defer close(served); _ = v.Serve(ctx) }()
	lctx, lcancel := context.WithTimeout(ctx, 10*time.Second)
	defer lcancel()
	if _, err := v.Leader(lctx); err != nil {
		t.Fatal(err)
	}

	hang.Store(true) // the barrier's status call to the leader now hangs
	bctx, bcancel := context.WithTimeout(context.Background(), time.Millisecond)
	_, err := v.Barrier(bctx) // starts a fetch; this caller gives up at once
	bcancel()
	if err == nil {
		t.Fatal("Barrier answered although the leader hangs")
	}
	v.mu.Lock()
	c := v.barrier
	v.mu.Unlock()
	if c == nil {
		t.Fatal("no barrier fetch running")
	}

	stop()
	<-served
	select {
	case <-c.done:
	default:
		t.Fatal("Serve returned while its barrier fetch still ran")
	}
	if _, err := v.Barrier(context.Background()); !errors.Is(err, errViewStopped) {
		t.Fatalf("Barrier after the stop: %v, want errViewStopped", err)
	}
	if l := v.snapshot()[0].lostContext(); l.Err() == nil {
		t.Error("the leader's context outlives the view")
	}
}

// TestFoundContextEndsWhenALeaderAnswers: a write relayed while no leader
// answers gives way once one does (foundContext is cancelled), and with a
// leader known it is cancelled from the start.
func TestFoundContextEndsWhenALeaderAnswers(t *testing.T) {
	v := newClusterView([]string{"a:1", "b:1"}, nil, hclog.NewNullLogger(), time.Second, time.Millisecond)
	v.mu.Lock()
	v.ctx, v.serving = context.Background(), true
	v.mu.Unlock()
	found := v.foundContext()
	if found.Err() != nil {
		t.Fatal("cancelled while no leader is known")
	}
	if v.foundContext() != found {
		t.Fatal("two relays while leaderless got different contexts")
	}
	v.mu.Lock()
	v.setLeaderLocked(v.servers["a:1"])
	v.mu.Unlock()
	if found.Err() == nil {
		t.Fatal("not cancelled when a leader answered")
	}
	if v.foundContext().Err() == nil {
		t.Fatal("a relay with a leader known got a live context")
	}
	v.mu.Lock()
	v.setLeaderLocked(nil)
	v.mu.Unlock()
	if again := v.foundContext(); again.Err() != nil || time.Since(v.leaderless) > time.Second {
		t.Fatalf("after the leader was lost: context err %v, leaderless since %v", again.Err(), v.leaderless)
	}
}

// TestTargetRelaysOnlyWhenAllowed: a follower that follows a leader is a
// relay once no leader has answered for relayAfter since the view began
// (not at once: the zero time is no leaderless moment), and never for a
// caller that asks for the leader only (relayAfter 0: claims, releases).
func TestTargetRelaysOnlyWhenAllowed(t *testing.T) {
	v := newClusterView([]string{"a:1", "b:1"}, nil, hclog.NewNullLogger(), time.Second, time.Millisecond)
	b := v.servers["b:1"]
	b.mu.Lock()
	b.up, b.role, b.leaderID = true, "Follower", "a"
	b.mu.Unlock()
	v.mu.Lock()
	v.ctx, v.serving, v.leaderless = context.Background(), true, time.Now()
	v.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if s, relayed, err := v.Target(ctx, 0); err == nil {
		t.Fatalf("leader-only Target returned %v (relayed %v) with no leader known", s.http, relayed)
	}
	start := time.Now()
	ctx2, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel2()
	s, relayed, err := v.Target(ctx2, 200*time.Millisecond)
	if err != nil || !relayed || s != b {
		t.Fatalf("Target: %v, relayed %v, %v; want b:1 relayed", s, relayed, err)
	}
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Errorf("relayed after %v, before relayAfter had passed since the view began", d)
	}
}
