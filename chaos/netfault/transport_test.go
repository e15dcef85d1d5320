package netfault

import (
	"errors"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// pair is two in-memory transports, b answering every AppendEntries.
func pair(t *testing.T) (a *Transport, tab *Table, bAddr raft.ServerAddress) {
	t.Helper()
	aAddr, ai := raft.NewInmemTransport("a")
	bAddr, bi := raft.NewInmemTransport("b")
	ai.Connect(bAddr, bi)
	bi.Connect(aAddr, ai)
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case rpc := <-bi.Consumer():
				rpc.Respond(&raft.AppendEntriesResponse{Success: true}, nil)
			case <-done:
				return
			}
		}
	}()
	t.Cleanup(func() { close(done); <-stopped; ai.Close(); bi.Close() })
	tab = NewTable(1)
	return Wrap(ai, tab), tab, bAddr
}

func send(a *Transport, to raft.ServerAddress) error {
	var resp raft.AppendEntriesResponse
	return a.AppendEntries("b", to, &raft.AppendEntriesRequest{}, &resp)
}

func TestTransportRules(t *testing.T) {
	a, tab, b := pair(t)
	if err := send(a, b); err != nil {
		t.Fatalf("no rules: %v", err)
	}
	if err := tab.Set(Rules{Drop: []string{string(b)}}); err != nil {
		t.Fatal(err)
	}
	if err := send(a, b); !errors.Is(err, ErrInjected) {
		t.Fatalf("partitioned: got %v, want ErrInjected", err)
	}
	if _, err := a.AppendEntriesPipeline("b", b); !errors.Is(err, ErrInjected) {
		t.Fatalf("partitioned pipeline: got %v", err)
	}
	if err := tab.Set(Rules{Drop: []string{"elsewhere:1"}}); err != nil {
		t.Fatal(err)
	}
	if err := send(a, b); err != nil {
		t.Fatalf("another peer dropped: %v", err)
	}
	if err := tab.Set(Rules{FailPercent: 100}); err != nil {
		t.Fatal(err)
	}
	if err := send(a, b); !errors.Is(err, ErrInjected) {
		t.Fatalf("100%% failures: got %v", err)
	}
	if err := tab.Set(Rules{FailPercent: 50}); err != nil {
		t.Fatal(err)
	}
	failed := 0
	for i := 0; i < 200; i++ {
		if send(a, b) != nil {
			failed++
		}
	}
	if failed < 50 || failed > 150 {
		t.Fatalf("50%% failures: %d of 200 failed", failed)
	}
	if err := tab.Set(Rules{Delay: 30 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := send(a, b); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 30*time.Millisecond {
		t.Fatalf("delayed RPC took %v, want at least 30ms", d)
	}
	if err := tab.Set(Rules{}); err != nil {
		t.Fatal(err)
	}
	if err := send(a, b); err != nil {
		t.Fatalf("rules cleared: %v", err)
	}
	if err := tab.Set(Rules{FailPercent: 101}); err == nil {
		t.Fatal("FailPercent 101 accepted")
	}
}

// A pipeline made before a partition obeys it.
func TestTransportPipelinePartitioned(t *testing.T) {
	a, tab, b := pair(t)
	p, err := a.AppendEntriesPipeline("b", b)
	if err != nil {
		if errors.Is(err, raft.ErrPipelineReplicationNotSupported) {
			t.Fatalf("in-memory transport has no pipeline: %v", err)
		}
		t.Fatal(err)
	}
	defer p.Close()
	if err := tab.Set(Rules{Drop: []string{string(b)}}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.AppendEntries(&raft.AppendEntriesRequest{}, &raft.AppendEntriesResponse{}); !errors.Is(err, ErrInjected) {
		t.Fatalf("pipelined append across a partition: %v", err)
	}
}
