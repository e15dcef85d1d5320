package server_test

import (
	"errors"
	"net"
	"testing"
	"time"

	"github.com/keelstore/keel/services/server"
)

// A connection made while no transport holds the Raft listener waits in
// the backlog and is accepted by the next lease; a second lease is refused
// while one is held; closing a lease ends its Accept, not the listener.
func TestRaftListenerLeases(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rl, err := server.NewRaftListener(l, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rl.Close()
	addr := l.Addr().String()

	t1, err := rl.Transport(addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rl.Transport(addr, nil); !errors.Is(err, server.ErrLeaseHeld) {
		t.Fatalf("second lease while one is held: %v, want ErrLeaseHeld", err)
	}
	if got := string(t1.LocalAddr()); got != addr {
		t.Errorf("transport advertises %q, want %q", got, addr)
	}
	if err := t1.Close(); err != nil { // returns once its Accept has
		t.Fatal(err)
	}

	// No lease now: a peer's dial completes (the kernel's backlog) and
	// waits for the next transport.
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatalf("dial while no transport runs: %v", err)
	}
	defer c.Close()

	t2, err := rl.Transport(addr, nil)
	if err != nil {
		t.Fatalf("a lease after the first closed: %v", err)
	}
	defer t2.Close()
	// t2's accept loop took the queued connection: a raft RPC header that
	// is not one makes it close the connection, which we see as EOF.
	if _, err := c.Write([]byte{0xff}); err != nil {
		t.Fatal(err)
	}
	if err := c.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	_, err = c.Read(make([]byte, 1))
	var ne net.Error
	if err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the queued connection was not served by the new transport: %v", err)
	}
}

func TestRaftListenerWantsTCP(t *testing.T) {
	l, err := net.Listen("unix", t.TempDir()+"/s")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := server.NewRaftListener(l, nil, nil); err == nil {
		t.Fatal("a unix listener was taken for Raft")
	}
}
