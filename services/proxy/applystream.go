package proxy

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/wire"
)

// The proxy's binary write path: one apply stream (wire.Stream) per
// server, dialled at the first write to it and kept, carrying every write
// the proxy sends that server as a frame, answered out of order. A server
// that does not offer the stream (a build before it: the upgrade is
// answered 404) gets POST /v1/apply, and the stream is tried again after
// streamRetry (the server may have been upgraded meanwhile). A stream
// that ends (the server stopped, drained or upgraded; the connection was
// cut) fails the writes it carried, which send re-sends with their
// request ids, and the next write dials a new one. Commands on a stream
// travel in the versioned form (every build with the stream reads it),
// a write's data written from the client's buffer as it is; POST carries
// the form every build reads (Command.EncodeCompat).

// streamRetry is how long a server that refused the stream is written to
// over POST /v1/apply before the stream is tried again.
const streamRetry = 10 * time.Second

// applyStreams holds the streams, one per server HTTP address.
type applyStreams struct {
	client *wire.Client
	log    hclog.Logger
	now    func() time.Time
	retry  time.Duration

	mu     sync.Mutex // guards the following
	by     map[string]*streamSlot
	closed bool
}

// streamSlot is one server's stream, or why there is none.
type streamSlot struct {
	s       *wire.Stream  // the live stream, or nil
	dialing chan struct{} // non-nil while a dial runs; closed when it ends
	httpTil time.Time     // the server refused the stream: POST until then
}

// errUseHTTP: write to this server over POST /v1/apply.
var errUseHTTP = errors.New("proxy: no apply stream to this server")

func newApplyStreams(c *wire.Client, log hclog.Logger, now func() time.Time) *applyStreams {
	return &applyStreams{client: c, log: log, now: now, retry: streamRetry, by: map[string]*streamSlot{}}
}

// apply sends a command to the leader at addr, over its stream when it
// has one, else by POST /v1/apply. streamed says which.
func (a *applyStreams) apply(ctx context.Context, addr string, o *outgoing) (r wire.ApplyResponse, streamed bool, err error) {
	s, err := a.get(ctx, addr)
	if errors.Is(err, errUseHTTP) {
		r, err = a.client.Apply(ctx, addr, o.compat())
		return r, false, err
	}
	if err != nil {
		return r, true, err
	}
	if s.Level() < replica.LevelVersioned {
		r, err = s.Apply(ctx, o.compat())
	} else {
		r, err = s.Apply(ctx, o.versioned()...)
	}
	return r, true, err
}

// outgoing is a command being sent, encoded at most once for each form
// its attempts need.
type outgoing struct {
	c    *replica.Command
	enc  []byte   // EncodeCompat: POST /v1/apply, relays
	head [][]byte // the versioned form, a write's data not copied
}

// compat is the form every build reads (Command.EncodeCompat).
func (o *outgoing) compat() []byte {
	if o.enc == nil {
		o.enc = o.c.EncodeCompat(nil)
	}
	return o.enc
}

// versioned is the versioned form (Command.Encode) as parts: for a write,
// its header and its data as they are. A leader whose cluster speaks the
// versioned form proposes the frame as it read it (Command.Encoded): no
// copy of the data on either side.
func (o *outgoing) versioned() [][]byte {
	if o.head == nil {
		if o.c.Kind == replica.KindWrite && len(o.c.Data) > 0 {
			h := *o.c
			h.Data = nil
			o.head = [][]byte{h.Encode(nil), o.c.Data}
		} else {
			o.head = [][]byte{o.c.Encode(nil)}
		}
	}
	return o.head
}

// get returns addr's live stream, dialling one if there is none (one dial
// at a time per server; the others wait for it).
func (a *applyStreams) get(ctx context.Context, addr string) (*wire.Stream, error) {
	for {
		a.mu.Lock()
		if a.closed {
			a.mu.Unlock()
			return nil, errUseHTTP
		}
		sl := a.by[addr]
		if sl == nil {
			sl = &streamSlot{}
			a.by[addr] = sl
		}
		if sl.s != nil && sl.s.Err() == nil {
			s := sl.s
			a.mu.Unlock()
			return s, nil
		}
		if a.now().Before(sl.httpTil) {
			a.mu.Unlock()
			return nil, errUseHTTP
		}
		if wait := sl.dialing; wait != nil {
			a.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return nil, fmt.Errorf("waiting for the apply stream to %s: %w", addr, context.Cause(ctx))
			}
		}
		old := sl.s
		sl.s, sl.dialing = nil, make(chan struct{})
		a.mu.Unlock()
		if old != nil {
			_ = old.Close() // ended already: this waits for its reader
		}
		return a.dial(ctx, addr, sl)
	}
}

// dial opens addr's stream for the slot whose dial this caller started.
func (a *applyStreams) dial(ctx context.Context, addr string, sl *streamSlot) (*wire.Stream, error) {
	s, err := a.client.DialStream(ctx, addr)
	a.mu.Lock()
	defer a.mu.Unlock()
	close(sl.dialing)
	sl.dialing = nil
	switch {
	case errors.Is(err, wire.ErrStreamUnsupported):
		sl.httpTil = a.now().Add(a.retry)
		a.log.Info("the server offers no apply stream (an older build): writing to it by POST /v1/apply", "server", addr, "retry_in", a.retry, "detail", err)
		return nil, errUseHTTP
	case err != nil:
		return nil, err
	case a.closed:
		_ = s.Close() // never used
		return nil, errUseHTTP
	}
	sl.s = s
	a.log.Debug("apply stream open", "server", addr, "level", s.Level())
	return s, nil
}

// Close ends every stream and waits for them; later writes use POST.
func (a *applyStreams) Close() {
	a.mu.Lock()
	a.closed = true
	var all []*wire.Stream
	for _, sl := range a.by {
		if sl.s != nil {
			all = append(all, sl.s)
			sl.s = nil
		}
	}
	a.mu.Unlock()
	for _, s := range all {
		_ = s.Close()
	}
}
