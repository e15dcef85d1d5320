package netfault

import (
	"io"
	"time"

	"github.com/hashicorp/raft"
)

// Transport wraps a raft.Transport; every RPC it sends passes the table's
// rules first. What it receives is untouched.
type Transport struct {
	raft.Transport
	t *Table
}

// Wrap returns inner under the rules of t.
func Wrap(inner raft.Transport, t *Table) *Transport { return &Transport{Transport: inner, t: t} }

// Unwrap returns the transport under the layer.
func (x *Transport) Unwrap() raft.Transport { return x.Transport }

func (x *Transport) gate(target raft.ServerAddress) error {
	wait, err := x.t.decide(string(target))
	if wait > 0 {
		time.Sleep(wait) // the RPC is on its way: this is the network's delay
	}
	return err
}

// AppendEntriesPipeline wraps the pipeline so that its requests pass the
// rules too.
func (x *Transport) AppendEntriesPipeline(id raft.ServerID, target raft.ServerAddress) (raft.AppendPipeline, error) {
	if err := x.gate(target); err != nil {
		return nil, err
	}
	p, err := x.Transport.AppendEntriesPipeline(id, target)
	if err != nil {
		return nil, err
	}
	return &pipeline{AppendPipeline: p, x: x, target: target}, nil
}

func (x *Transport) AppendEntries(id raft.ServerID, target raft.ServerAddress, args *raft.AppendEntriesRequest, resp *raft.AppendEntriesResponse) error {
	if err := x.gate(target); err != nil {
		return err
	}
	return x.Transport.AppendEntries(id, target, args, resp)
}

func (x *Transport) RequestVote(id raft.ServerID, target raft.ServerAddress, args *raft.RequestVoteRequest, resp *raft.RequestVoteResponse) error {
	if err := x.gate(target); err != nil {
		return err
	}
	return x.Transport.RequestVote(id, target, args, resp)
}

// RequestPreVote passes through when the inner transport has pre-votes
// (raft's TCP transport does); raft asks for the interface, so the layer
// must keep it.
func (x *Transport) RequestPreVote(id raft.ServerID, target raft.ServerAddress, args *raft.RequestPreVoteRequest, resp *raft.RequestPreVoteResponse) error {
	if err := x.gate(target); err != nil {
		return err
	}
	pv, ok := x.Transport.(raft.WithPreVote)
	if !ok {
		return raft.ErrUnsupportedProtocol
	}
	return pv.RequestPreVote(id, target, args, resp)
}

func (x *Transport) InstallSnapshot(id raft.ServerID, target raft.ServerAddress, args *raft.InstallSnapshotRequest, resp *raft.InstallSnapshotResponse, data io.Reader) error {
	if err := x.gate(target); err != nil {
		return err
	}
	return x.Transport.InstallSnapshot(id, target, args, resp, data)
}

func (x *Transport) TimeoutNow(id raft.ServerID, target raft.ServerAddress, args *raft.TimeoutNowRequest, resp *raft.TimeoutNowResponse) error {
	if err := x.gate(target); err != nil {
		return err
	}
	return x.Transport.TimeoutNow(id, target, args, resp)
}

// Close closes the inner transport if it can be closed.
func (x *Transport) Close() error {
	if c, ok := x.Transport.(raft.WithClose); ok {
		return c.Close()
	}
	return nil
}

// pipeline passes each pipelined request through the rules; a failure
// breaks the pipeline, as a reset connection would, and raft falls back to
// single RPCs.
type pipeline struct {
	raft.AppendPipeline
	x      *Transport
	target raft.ServerAddress
}

func (p *pipeline) AppendEntries(args *raft.AppendEntriesRequest, resp *raft.AppendEntriesResponse) (raft.AppendFuture, error) {
	if err := p.x.gate(p.target); err != nil {
		return nil, err
	}
	return p.AppendPipeline.AppendEntries(args, resp)
}
