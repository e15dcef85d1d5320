package upgrade

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"
)

// fakeHandover hands over n pipe read ends as "connections", each with
// its index as state, and records those it takes back.
type fakeHandover struct {
	n       int
	resumed []string
	paused  bool
}

func (h *fakeHandover) Quiesce(ctx context.Context) ([]byte, []Conn, error) {
	h.paused = true
	var conns []Conn
	for i := range h.n {
		r, w, err := os.Pipe()
		if err != nil {
			return nil, nil, err
		}
		w.Close()
		conns = append(conns, Conn{State: []byte{byte('a' + i)}, File: r})
	}
	return []byte("proc-state"), conns, nil
}

func (h *fakeHandover) Resume(conns []Conn) {
	for _, c := range conns {
		h.resumed = append(h.resumed, string(c.State))
		c.File.Close()
	}
	h.paused = false
}

// pair runs the parent's side of a session against child, which plays
// the child over the other end; verdict is what tableflip would say once
// child returns.
func pair(t *testing.T, h Handover, child func(*sock) error) (Child, error) {
	t.Helper()
	ps, cf, err := socketpair()
	if err != nil {
		t.Fatal(err)
	}
	cs, err := fileSock(cf)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var cerr error
	go func() { defer close(done); cerr = child(cs); cs.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := parentSession(ctx, ps, done, func() error { return cerr }, h)
	<-done
	return c, err
}

func TestSessionHandsEveryConnectionOver(t *testing.T) {
	h := &fakeHandover{n: 3}
	var got []string
	var state []byte
	c, err := pair(t, h, func(s *sock) error {
		return childSession(s, 42, "v2", func(b []byte) error { state = b; return nil }, func(st []byte, f *os.File) error {
			got = append(got, string(st))
			return f.Close()
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	if c.Pid != 42 || c.Version != "v2" {
		t.Errorf("child = %+v, want pid 42 version v2", c)
	}
	if strings.Join(got, ",") != "a,b,c" || len(h.resumed) != 0 || string(state) != "proc-state" {
		t.Errorf("child resumed %v, parent kept %v, state %q", got, h.resumed, state)
	}
}

func TestSessionChildDiesMidwayParentResumes(t *testing.T) {
	h := &fakeHandover{n: 3}
	_, err := pair(t, h, func(s *sock) error {
		if err := s.send(msg{kind: kindReady, payload: readyPayload(7, "v2")}, nil); err != nil {
			return err
		}
		// Take the first connection, then die before acknowledging the second.
		if m, _, err := s.recv(); err != nil || m.kind != kindState {
			return errors.New("no state")
		}
		m, f, err := s.recv()
		if err != nil || m.kind != kindConn {
			return errors.New("no connection")
		}
		f.Close()
		if err := s.send(msg{kind: kindAck}, nil); err != nil {
			return err
		}
		_, f, _ = s.recv()
		f.Close()
		return errors.New("exit status 3")
	})
	if !errors.Is(err, ErrChildFailed) || !strings.Contains(err.Error(), "exit status 3") {
		t.Fatalf("err = %v, want ErrChildFailed with the exit status", err)
	}
	if strings.Join(h.resumed, ",") != "b,c" || h.paused {
		t.Errorf("parent resumed %v (paused %v), want b,c and accepting again", h.resumed, h.paused)
	}
}

func TestSessionChildFailsToPrepare(t *testing.T) {
	h := &fakeHandover{n: 1}
	_, err := pair(t, h, func(s *sock) error {
		_ = s.send(msg{kind: kindFail, payload: []byte("no server answered")}, nil)
		return errors.New("exit status 1")
	})
	if !errors.Is(err, ErrChildFailed) || !strings.Contains(err.Error(), "no server answered") || !strings.Contains(err.Error(), "exit status 1") {
		t.Fatalf("err = %v, want the child's reason and exit status", err)
	}
	if h.paused {
		t.Error("parent paused for a child that never got ready")
	}
}

func TestSessionChildExitsBeforeReady(t *testing.T) {
	h := &fakeHandover{n: 1}
	_, err := pair(t, h, func(*sock) error { return errors.New("exit status 2") })
	if !errors.Is(err, ErrChildFailed) || !strings.Contains(err.Error(), "exit status 2") {
		t.Fatalf("err = %v", err)
	}
}

func TestMsgCodec(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    []byte
		ok   bool
	}{
		{"ready", []byte{1, 'R', 0, 0, 0, 42, 'v'}, true},
		{"ready short", []byte{1, 'R', 0, 0}, false},
		{"ack", []byte{1, 'A'}, true},
		{"ack with payload", []byte{1, 'A', 0}, false},
		{"conn", []byte{1, 'C', 9, 9}, true},
		{"done", []byte{1, 'D'}, true},
		{"done with payload", []byte{1, 'D', 0}, false},
		{"state", []byte{1, 'S', 7}, true},
		{"fail", append([]byte{1, 'F'}, "why"...), true},
		{"version 2", []byte{2, 'A'}, false},
		{"unknown kind", []byte{1, 'Z'}, false},
		{"empty", nil, false},
	} {
		m, err := parseMsg(tc.b)
		if (err == nil) != tc.ok {
			t.Errorf("%s: err = %v, want ok=%v", tc.name, err, tc.ok)
			continue
		}
		if err == nil {
			if back := appendMsg(nil, m); string(back) != string(tc.b) {
				t.Errorf("%s: re-encoded % x, want % x", tc.name, back, tc.b)
			}
		}
	}
}

func FuzzParseMsg(f *testing.F) {
	f.Add([]byte{1, 'R', 0, 0, 0, 42, 'v'})
	f.Add([]byte{1, 'A'})
	f.Add([]byte{1, 'C', 9})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := parseMsg(b)
		if err != nil {
			return
		}
		if back := appendMsg(nil, m); string(back) != string(b) {
			t.Fatalf("re-encoded % x, want % x", back, b)
		}
	})
}
