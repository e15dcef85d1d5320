package server

import (
	"sync"

	"github.com/hashicorp/raft"
)

// pipelinedTransport is a NetworkTransport that knows the replication
// pipelines it opened, so that a node's shutdown can close them.
//
// Why: hashicorp/raft v1.7.3 can leave a leader's replication goroutine
// blocked for good. When a pipelined AppendEntries answer carries a newer
// term, pipelineDecode returns (handleStaleTerm) and stops reading the
// pipeline's answers; the pipeline's reader then blocks handing over the
// next answer, and the next pipelineSend blocks handing over its request
// (both channels are unbuffered at the default of 2 RPCs in flight) before
// pipelineReplicate looks at the decoder's exit. Nothing but closing the
// pipeline unblocks it, and raft closes it only after that send returns,
// so Raft's Shutdown waits forever for the goroutine. A leadership
// transfer under load (the target's election raises the term while the
// old leader still pipelines to it) triggers it: seen as an upgrade's Raft
// stop that never ended, under -race. Closing every pipeline once Shutdown
// has begun (OpenNode.Close) ends those goroutines: their send fails with
// ErrPipelineShutdown.
type pipelinedTransport struct {
	*raft.NetworkTransport

	mu    sync.Mutex // guards pipes
	pipes map[*trackedPipeline]struct{}
}

func newPipelinedTransport(t *raft.NetworkTransport) *pipelinedTransport {
	return &pipelinedTransport{NetworkTransport: t, pipes: map[*trackedPipeline]struct{}{}}
}

func (t *pipelinedTransport) AppendEntriesPipeline(id raft.ServerID, target raft.ServerAddress) (raft.AppendPipeline, error) {
	p, err := t.NetworkTransport.AppendEntriesPipeline(id, target)
	if err != nil {
		return nil, err
	}
	tp := &trackedPipeline{AppendPipeline: p, t: t}
	t.mu.Lock()
	t.pipes[tp] = struct{}{}
	t.mu.Unlock()
	return tp, nil
}

// closePipelines closes every pipeline still open.
func (t *pipelinedTransport) closePipelines() int {
	t.mu.Lock()
	ps := make([]*trackedPipeline, 0, len(t.pipes))
	for p := range t.pipes {
		ps = append(ps, p)
	}
	t.mu.Unlock()
	for _, p := range ps {
		p.Close()
	}
	return len(ps)
}

type trackedPipeline struct {
	raft.AppendPipeline
	t *pipelinedTransport
}

// Close closes the pipeline (a second Close is a no-op in raft's).
func (p *trackedPipeline) Close() error {
	p.t.mu.Lock()
	delete(p.t.pipes, p)
	p.t.mu.Unlock()
	return p.AppendPipeline.Close()
}
