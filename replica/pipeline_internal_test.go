package replica

import (
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// TestDrainedPipelineNeverBlocksSends replays hashicorp/raft#612 on real
// TCP transports: the follower refuses an append, raft's reader of the
// pipeline stops reading (as pipelineDecode does on Success=false), and
// the leader's send loop sends on. On the bare NetworkTransport the third
// send blocks for good; through drainPipelines every send returns.
func TestDrainedPipelineNeverBlocksSends(t *testing.T) {
	newTrans := func() *raft.NetworkTransport {
		tr, err := raft.NewTCPTransportWithLogger("127.0.0.1:0", nil, 2, 10*time.Second, hclog.NewNullLogger())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tr.Close() })
		return tr
	}
	follower, leader := newTrans(), newTrans()
	stop := make(chan struct{})
	defer close(stop)
	go func() { // the follower refuses every append: its log store fails
		for {
			select {
			case rpc := <-follower.Consumer():
				rpc.Respond(&raft.AppendEntriesResponse{Term: 1, Success: false}, nil)
			case <-stop:
				return
			}
		}
	}()

	p, err := drainPipelines(leader).AppendEntriesPipeline("f", follower.LocalAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	req := func(i uint64) *raft.AppendEntriesRequest {
		return &raft.AppendEntriesRequest{RPCHeader: raft.RPCHeader{ID: []byte("l"), Addr: []byte(leader.LocalAddr())}, Term: 1,
			PrevLogEntry: i, PrevLogTerm: 1, Entries: []*raft.Log{{Index: i + 1, Term: 1, Data: []byte("x")}}}
	}
	if _, err := p.AppendEntries(req(1), new(raft.AppendEntriesResponse)); err != nil {
		t.Fatal(err)
	}
	select {
	case f := <-p.Consumer():
		if f.Response().Success {
			t.Fatal("the follower's refusal came back as a success")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no response to the first append")
	}
	// raft's reader is gone now; the send loop goes on.
	sent := make(chan error, 1)
	go func() {
		for i := uint64(2); i < 10; i++ {
			if _, err := p.AppendEntries(req(i), new(raft.AppendEntriesResponse)); err != nil {
				sent <- err
				return
			}
		}
		sent <- nil
	}()
	select {
	case err := <-sent:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a pipelined append blocked with nobody reading the responses (hashicorp/raft#612)")
	}
}
