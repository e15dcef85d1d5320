package replica

import (
	"io"
	"sync"

	"github.com/hashicorp/raft"
)

// hashicorp/raft v1.7.3 can stop replicating to a follower for good while
// heartbeats to it go on (hashicorp/raft#612, open): when a pipelined
// AppendEntries is answered Success=false (the follower's log store failed
// a write, as the chaos soak's disk faults make it do), raft's
// pipelineDecode returns and nobody reads the pipeline's Consumer any more.
// The send loop can still issue one more request before it notices. Its
// NetworkTransport pipeline (MaxRPCsInFlight 2: unbuffered channels) then
// parks its response decoder on the unread done channel and the send on
// the in-progress channel, forever: pipeline.Close, which would free both,
// runs only when the send loop returns. The follower keeps getting
// heartbeats, so it never calls an election, and stays at its last index
// until the leader restarts. The soak caught it as a follower stuck for
// minutes after disk-eio and disk-sync-eio.
//
// drainPipelines works around it from outside raft: every pipeline's
// responses are taken off the transport at once and queued for raft, so
// the transport's decoder never waits on raft's reader. The queue holds
// at most the requests in flight (the transport's in-progress channel
// still bounds them), and it is dropped with the pipeline.

// drainPipelines wraps t so that its pipelines are drained (see above).
func drainPipelines(t raft.Transport) raft.Transport { return &drainingTransport{Transport: t} }

type drainingTransport struct{ raft.Transport }

func (t *drainingTransport) AppendEntriesPipeline(id raft.ServerID, target raft.ServerAddress) (raft.AppendPipeline, error) {
	p, err := t.Transport.AppendEntriesPipeline(id, target)
	if err != nil {
		return nil, err
	}
	return newDrainedPipeline(p), nil
}

// RequestPreVote keeps raft's pre-vote: raft asks the transport for the
// interface, so the wrapper must have it.
func (t *drainingTransport) RequestPreVote(id raft.ServerID, target raft.ServerAddress, args *raft.RequestPreVoteRequest, resp *raft.RequestPreVoteResponse) error {
	pv, ok := t.Transport.(raft.WithPreVote)
	if !ok {
		return raft.ErrUnsupportedProtocol
	}
	return pv.RequestPreVote(id, target, args, resp)
}

// Close closes the inner transport when it can be closed.
func (t *drainingTransport) Close() error {
	if c, ok := t.Transport.(raft.WithClose); ok {
		return c.Close()
	}
	return nil
}

// Unwrap returns the transport under the wrapper.
func (t *drainingTransport) Unwrap() raft.Transport { return t.Transport }

var _ interface {
	raft.Transport
	raft.WithPreVote
	raft.WithClose
} = (*drainingTransport)(nil)

// drainedPipeline moves the inner pipeline's finished requests to its own
// Consumer channel through an unbounded queue, owned by one goroutine that
// ends at Close.
type drainedPipeline struct {
	raft.AppendPipeline
	out     chan raft.AppendFuture
	closing chan struct{}
	done    chan struct{}
	once    sync.Once
}

func newDrainedPipeline(p raft.AppendPipeline) *drainedPipeline {
	d := &drainedPipeline{AppendPipeline: p, out: make(chan raft.AppendFuture), closing: make(chan struct{}), done: make(chan struct{})}
	go d.drain(p.Consumer())
	return d
}

func (d *drainedPipeline) drain(in <-chan raft.AppendFuture) {
	defer close(d.done)
	var queue []raft.AppendFuture
	for {
		// Offer the head of the queue only when there is one (a nil
		// channel never sends).
		var out chan raft.AppendFuture
		var head raft.AppendFuture
		if len(queue) > 0 {
			out, head = d.out, queue[0]
		}
		select {
		case f, ok := <-in:
			if !ok {
				in = nil // the transport closed it: only the queue is left
				continue
			}
			queue = append(queue, f)
		case out <- head:
			queue[0] = nil
			queue = queue[1:]
		case <-d.closing:
			return
		}
	}
}

// Consumer returns the finished requests, in the order the transport
// finished them.
func (d *drainedPipeline) Consumer() <-chan raft.AppendFuture { return d.out }

// Close closes the inner pipeline and ends the drain.
func (d *drainedPipeline) Close() error {
	err := d.AppendPipeline.Close()
	d.once.Do(func() { close(d.closing) })
	<-d.done
	return err
}

var _ io.Closer = (*drainedPipeline)(nil)
