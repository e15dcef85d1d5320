package upgrade

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"
)

// Conn is one connection handed over: its state (opaque here) and its
// socket.
type Conn struct {
	State []byte
	File  *os.File
}

// Handover is what a process gives its child once the child is ready.
type Handover interface {
	// Quiesce stops accepting new connections (the listeners stay open)
	// and quiesces every connection at a request boundary. It returns
	// the process state for the child and the connections; the session
	// closes the file of each one the child takes.
	Quiesce(ctx context.Context) (state []byte, conns []Conn, err error)
	// Resume, after a failed upgrade, serves again the connections the
	// child did not take (nil if Quiesce failed) and accepts again.
	Resume(conns []Conn)
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

	state, conns, err := h.Quiesce(ctx)
	if err == nil {
		err = s.send(msg{kind: kindState, payload: state}, nil)
	}
	for err == nil && len(conns) > 0 {
		if err = s.send(msg{kind: kindConn, payload: conns[0].State}, conns[0].File); err != nil {
			break
		}
		select {
		case m := <-msgs:
			if m.kind != kindAck {
				err = fmt.Errorf("%w: %q instead of an ACK", ErrBadMessage, m.kind)
				break
			}
			conns[0].File.Close()
			conns = conns[1:]
		case rerr := <-recvErr:
			// The child closed its end: it is exiting; say how, if soon.
			select {
			case <-done:
				err = fmt.Errorf("%w: %w (%v)", ErrChildFailed, rerr, verdict())
			case <-time.After(2 * time.Second):
				err = fmt.Errorf("%w: %w", ErrChildFailed, rerr)
			}
		case <-done:
			err = gone(verdict())
		case <-ctx.Done():
			err = context.Cause(ctx)
		}
	}
	if err == nil {
		err = s.send(msg{kind: kindDone}, nil)
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
	h.Resume(conns)
	return child, err
}

// childSession runs the child's side: READY, the process state (given to
// resumeState), then each connection (ACK first, so that the parent knows
// the child has it before the child reads a byte of it), until DONE.
func childSession(s *sock, pid int, version string, resumeState func([]byte) error, resume func(state []byte, f *os.File) error) error {
	if err := s.send(msg{kind: kindReady, payload: readyPayload(pid, version)}, nil); err != nil {
		return err
	}
	for {
		m, f, err := s.recv()
		if err != nil {
			return err
		}
		switch m.kind {
		case kindState:
			if err := resumeState(m.payload); err != nil {
				return fmt.Errorf("upgrade: taking the process state: %w", err)
			}
		case kindConn:
			if err := s.send(msg{kind: kindAck}, nil); err != nil {
				f.Close()
				return err
			}
			if err := resume(m.payload, f); err != nil {
				return fmt.Errorf("upgrade: resuming a connection: %w", err)
			}
		case kindDone:
			return nil
		default:
			return fmt.Errorf("%w: %q from the parent", ErrBadMessage, m.kind)
		}
	}
}
