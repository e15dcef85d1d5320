package server

import (
	"context"
	"errors"
	"time"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/wire"
)

// The leader's side of the apply stream (wire.StreamServer, stream.go in
// services/wire): the proxy's writes arrive as frames on one long-lived
// connection upgraded from the API listener, and each is answered as
// handleApply answers a POST /v1/apply. Relayed writes (wire.RelayHeader)
// stay on POST /v1/apply: the stream goes to the leader only.

// streamNodeWait bounds how long a frame waits for the node to be running
// (a server starting, or between an upgrade's parent and child).
const streamNodeWait = 5 * time.Second

// applyStream commits one frame's command: decoded once (its buffer
// becomes the command's data, and, in the versioned form the proxy sends
// on a stream, the log entry itself: Command.Encoded), then Node.Propose
// within the frame's deadline (ctx).
func (a *API) applyStream(ctx context.Context, data []byte) wire.StreamAnswer {
	gctx, cancel := context.WithTimeout(ctx, streamNodeWait)
	n, err := a.Holder.Get(gctx)
	cancel()
	if err != nil {
		return wire.StreamAnswer{Status: wire.StreamFailed, Response: wire.ApplyResponse{Error: err.Error()}}
	}
	c, err := replica.DecodeAt(data, n.Level())
	if errors.Is(err, replica.ErrUnknownCommand) {
		return wire.StreamAnswer{Response: wire.ApplyResponse{Level: n.Level(), Refused: wire.RefusedUnknownCommand, Error: err.Error()}}
	}
	if err != nil {
		return wire.StreamAnswer{Response: wire.ApplyResponse{Level: n.Level(), Refused: wire.RefusedBadCommand, Error: err.Error()}}
	}
	if !n.IsLeader() {
		l, _ := n.Leader()
		return wire.StreamAnswer{Status: wire.StreamNotLeader, Leader: l.HTTP, Response: wire.ApplyResponse{Error: "not the leader"}}
	}
	c.Encoded = data // a write in the form the cluster reads goes into the log as this buffer
	res, err := n.Propose(ctx, &c)
	if errors.Is(err, replica.ErrNotLeader) {
		l, _ := n.Leader()
		return wire.StreamAnswer{Status: wire.StreamNotLeader, Leader: l.HTTP, Response: wire.ApplyResponse{Error: err.Error()}}
	}
	if err != nil {
		return wire.StreamAnswer{Status: wire.StreamFailed, Response: wire.ApplyResponse{Error: err.Error()}}
	}
	out := wire.ApplyResponse{Level: n.Level(), Index: res.Index, Epoch: res.Epoch, Duplicate: res.Duplicate, Holder: res.Writer}
	if res.Err != nil {
		out.Refused, out.Error = wire.RefusalOf(res.Err), res.Err.Error()
	}
	return wire.StreamAnswer{Response: out}
}

// streamServer returns the API's apply-stream server and a stop that
// closes its connections when ctx ends (the server's drain or upgrade)
// and, called at the end of Serve, waits until they have.
func (a *API) streamServer(ctx context.Context) (*wire.StreamServer, func()) {
	apply := a.applyStream
	if a.Page != nil { // counted on the status page as POST /v1/apply's are
		m := a.Page.Meter()
		apply = func(ctx context.Context, data []byte) wire.StreamAnswer {
			start := time.Now()
			ans := a.applyStream(ctx, data)
			m.Write(len(data), time.Since(start))
			return ans
		}
	}
	s := &wire.StreamServer{Apply: apply, Level: a.Level, Log: a.Log.Named("apply-stream")}
	closed := make(chan struct{})
	stop := context.AfterFunc(ctx, func() { defer close(closed); s.Close() })
	return s, func() {
		if stop() {
			s.Close()
		} else {
			<-closed
		}
	}
}
