package upgrade

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"
)

// Handover is what a process gives its child once the child is ready.
type Handover interface {
	// HandOver stops accepting new connections (the listeners stay
	// open), quiesces every connection at a request boundary and passes
	// its state and descriptor to send. A connection send fails for stays
	// with the process, which resumes it. send owns nothing: HandOver
	// closes its descriptor once send returns. HandOver returns the
	// process state the child gets with the last message.
	HandOver(ctx context.Context, send func(state []byte, f *os.File) error) ([]byte, error)
	// Resume accepts again after a failed upgrade.
	Resume()
}

// Child is what the parent learned of a child that took over.
type Child struct {
	Pid     int
	Version string
}

// ErrChildFailed wraps every reason an upgrade failed on the child's side.
var ErrChildFailed = errors.New("upgrade: the new process failed")

// parentSession runs the parent's side of one upgrade over s, which it
// closes. done is closed once tableflip has its verdict, which verdict
// returns: nil once the child called Ready, else why the child is gone
// (exited, killed at the deadline).
func parentSession(ctx context.Context, s *sock, done <-chan struct{}, verdict func() error, h Handover) (Child, error) {
	msgs := make(chan msg)
	recvErr := make(chan error, 1)
	stop := make(chan struct{})
	readerDone := make(chan struct{})
	defer func() { close(stop); s.Close(); <-readerDone }()
	go func() {
		defer close(readerDone)
		for {
			m, f, err := s.recv()
			if f != nil {
				f.Close() // a child never sends descriptors
			}
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case msgs <- m:
			case <-stop:
				return
			}
		}
	}()
	gone := func(err error) error {
		if err == nil {
			return fmt.Errorf("%w: it reported ready before taking over", ErrChildFailed)
		}
		return fmt.Errorf("%w: %w", ErrChildFailed, err)
	}
	var child Child
	select {
	case m := <-msgs:
		switch m.kind {
		case kindReady:
			child.Pid, child.Version = parseReady(m.payload)
		case kindFail:
			// The child exits after saying why; report both.
			select {
			case <-done:
				return child, fmt.Errorf("%w: %s (%v)", ErrChildFailed, m.payload, verdict())
			case <-ctx.Done():
				return child, fmt.Errorf("%w: %s", ErrChildFailed, m.payload)
			}
		default:
			return child, fmt.Errorf("%w: %q before ready", ErrBadMessage, m.kind)
		}
	case err := <-recvErr:
		<-done
		return child, fmt.Errorf("%w: %w (%v)", ErrChildFailed, err, verdict())
	case <-done:
		// A reason it sent just before exiting is already in the socket.
		_ = s.c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		select {
		case m := <-msgs:
			if m.kind == kindFail {
				return child, fmt.Errorf("%w: %s (%v)", ErrChildFailed, m.payload, verdict())
			}
		case <-recvErr:
		}
		return child, gone(verdict())
	case <-ctx.Done():
		return child, context.Cause(ctx)
	}

	var broken error
	send := func(state []byte, f *os.File) error {
		if broken != nil {
			return broken
		}
		if err := s.send(msg{kind: kindConn, payload: state}, f); err != nil {
			broken = err
			return err
		}
		select {
		case m := <-msgs:
			if m.kind == kindAck {
				return nil
			}
			broken = fmt.Errorf("%w: %q instead of an ACK", ErrBadMessage, m.kind)
		case err := <-recvErr:
			broken = err
		case <-done:
			broken = gone(verdict())
		case <-ctx.Done():
			broken = context.Cause(ctx)
		}
		return broken
	}
	state, err := h.HandOver(ctx, send)
	if err == nil {
		err = broken
	}
	if err == nil {
		err = s.send(msg{kind: kindDone, payload: state}, nil)
	}
	if err == nil {
		select {
		case <-done:
			if err = verdict(); err == nil {
				return child, nil
			}
			err = gone(err)
		case <-ctx.Done():
			err = context.Cause(ctx)
		}
	}
	h.Resume()
	return child, err
}

// childSession runs the child's side: READY, then each connection (ACK
// first, so that the parent knows the child has it before the child reads
// a byte of it), until DONE, whose process state it returns.
func childSession(s *sock, pid int, version string, resume func(state []byte, f *os.File) error) ([]byte, error) {
	if err := s.send(msg{kind: kindReady, payload: readyPayload(pid, version)}, nil); err != nil {
		return nil, err
	}
	for {
		m, f, err := s.recv()
		if err != nil {
			return nil, err
		}
		switch m.kind {
		case kindConn:
			if err := s.send(msg{kind: kindAck}, nil); err != nil {
				f.Close()
				return nil, err
			}
			if err := resume(m.payload, f); err != nil {
				return nil, fmt.Errorf("upgrade: resuming a connection: %w", err)
			}
		case kindDone:
			return m.payload, nil
		default:
			return nil, fmt.Errorf("%w: %q from the parent", ErrBadMessage, m.kind)
		}
	}
}
