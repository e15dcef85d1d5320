package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/keelstore/keel/services/proxy"
	"github.com/keelstore/keel/services/server/servertest"
	"github.com/keelstore/keel/services/wire"
)

// streamFault wraps the proxy's connections to the servers and, on the
// apply stream's connections only (told by their upgrade request), does
// one thing to them.
type streamFault struct {
	mode  string      // "mid", "answer", "refuse", or "" (nothing)
	armed atomic.Bool // "mid" and "answer" fire once, at the first write's data
	cuts  atomic.Int32
}

var errCut = errors.New("test: connection cut")

func (f *streamFault) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &faultConn{Conn: c, f: f}, nil
}

type faultConn struct {
	net.Conn
	f          *streamFault
	seen       bool        // the first write was looked at (one writer at a time)
	stream     bool        // this is an apply stream
	loseAnswer atomic.Bool // "answer": whatever the server says next is lost with the connection
}

var upgradeLine = []byte("POST " + wire.StreamPath + " ")

func (c *faultConn) Write(b []byte) (int, error) {
	if !c.seen {
		c.seen = true
		if c.stream = bytes.HasPrefix(b, upgradeLine); c.stream && c.f.mode == "refuse" {
			// The route of a build without the stream: the real server
			// answers 404, as an older build does.
			b = bytes.Replace(b, []byte(wire.StreamPath), []byte("/v1/apply/strean"), 1)
		}
	}
	if c.stream && len(b) >= 4096 && c.f.armed.Load() { // a write's command
		switch c.f.mode {
		case "mid":
			if c.f.armed.CompareAndSwap(true, false) {
				n, _ := c.Conn.Write(b[:len(b)/2])
				c.Conn.Close()
				c.f.cuts.Add(1)
				return n, errCut
			}
		case "answer":
			if c.f.armed.CompareAndSwap(true, false) {
				c.loseAnswer.Store(true)
			}
		}
	}
	return c.Conn.Write(b)
}

func (c *faultConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if c.loseAnswer.Load() {
		c.Conn.Close()
		c.f.cuts.Add(1)
		return 0, errCut
	}
	return n, err
}

// TestProxyWritesOverTheStream: every write goes over the apply stream
// (none by POST), in order: sequential writes to one block leave the last,
// and concurrent writes to their own blocks all land.
func TestProxyWritesOverTheStream(t *testing.T) {
	node := servertest.StartOne(t, 0)
	p, c := runProxy(t, proxy.Config{Servers: []string{node.HTTP}, Writer: "w"})
	ctx := context.Background()
	for v := byte(1); v <= 40; v++ {
		if err := c.WriteAt(ctx, fill(v, 4096), 0, false); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.WriteAt(ctx, fill(byte(i), 8192), uint64(1+i)*8192, false); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if err := c.WriteAt(ctx, fill(0xee, 3<<20), 4<<20, false); err != nil { // three 1 MiB commands
		t.Fatal(err)
	}
	d := directClient(t, node)
	got := make([]byte, 4096)
	if err := d.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, fill(40, 4096)) {
		t.Fatalf("block 0 holds %#x (%v), want the last write's 0x28", got[0], err)
	}
	for i := range 64 {
		got := make([]byte, 8192)
		if err := d.ReadAt(ctx, got, uint64(1+i)*8192); err != nil || !bytes.Equal(got, fill(byte(i), 8192)) {
			t.Fatalf("block %d holds %#x (%v)", 1+i, got[0], err)
		}
	}
	big := make([]byte, 3<<20)
	if err := d.ReadAt(ctx, big, 4<<20); err != nil || !bytes.Equal(big, fill(0xee, 3<<20)) {
		t.Fatalf("the 3 MiB write did not land (%v)", err)
	}
	st := p.Stats()
	// Every attempt (the claim and each command) went over the stream.
	if w, s := st.Writes.Load(), st.Streamed.Load(); s != w+1 || st.Retries.Load() != 0 {
		t.Errorf("%d writes, %d attempts streamed, %d retries; want every write and the claim streamed, no retry", w, s, st.Retries.Load())
	}
}

// TestProxyStreamCut: the stream's connection is cut, once halfway
// through a write's frame (the server never has it whole) and once after
// the server has applied it but before its answer reaches the proxy. The
// proxy dials a new stream and re-sends with the same request id: the
// write is applied once, and the second re-send is answered as a
// duplicate.
func TestProxyStreamCut(t *testing.T) {
	for _, tc := range []struct {
		mode       string
		duplicates uint64
	}{{"mid", 0}, {"answer", 1}} {
		t.Run(tc.mode, func(t *testing.T) {
			node := servertest.StartOne(t, 0)
			f := &streamFault{mode: tc.mode}
			p, c := runProxy(t, proxy.Config{Servers: []string{node.HTTP}, Writer: "w", Dial: f.dial})
			ctx := context.Background()
			if err := c.WriteAt(ctx, fill(1, 4096), 0, false); err != nil {
				t.Fatal(err)
			}
			f.armed.Store(true)
			if err := c.WriteAt(ctx, fill(2, 4096), 4096, false); err != nil {
				t.Fatalf("write across the cut: %v", err)
			}
			if err := c.WriteAt(ctx, fill(3, 4096), 8192, false); err != nil {
				t.Fatalf("write after the cut: %v", err)
			}
			st := p.Stats()
			if f.cuts.Load() != 1 || st.Retries.Load() == 0 {
				t.Fatalf("%d cuts, %d retries: the fault did not fire", f.cuts.Load(), st.Retries.Load())
			}
			if got := st.Duplicates.Load(); got != tc.duplicates {
				t.Errorf("%d writes answered as duplicates, want %d", got, tc.duplicates)
			}
			if st.Streamed.Load() != st.Writes.Load()+1+st.Retries.Load() {
				t.Errorf("%d attempts streamed of %d writes, the claim and %d retries: some went by POST", st.Streamed.Load(), st.Writes.Load(), st.Retries.Load())
			}
			got := make([]byte, 3*4096)
			if err := directClient(t, node).ReadAt(ctx, got, 0); err != nil ||
				!bytes.Equal(got, append(append(fill(1, 4096), fill(2, 4096)...), fill(3, 4096)...)) {
				t.Fatalf("the server holds %x... (%v)", got[:8], err)
			}
		})
	}
}

// TestProxyStreamRefused: a server that answers the upgrade 404 (a build
// without the stream) is written to by POST /v1/apply.
func TestProxyStreamRefused(t *testing.T) {
	node := servertest.StartOne(t, 0)
	f := &streamFault{mode: "refuse"}
	p, c := runProxy(t, proxy.Config{Servers: []string{node.HTTP}, Writer: "w", Dial: f.dial})
	ctx := context.Background()
	for i := range 20 {
		if err := c.WriteAt(ctx, fill(byte(i), 4096), uint64(i)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	got := make([]byte, 4096)
	if err := directClient(t, node).ReadAt(ctx, got, 19*4096); err != nil || !bytes.Equal(got, fill(19, 4096)) {
		t.Fatalf("the server holds %#x (%v)", got[0], err)
	}
	if st := p.Stats(); st.Streamed.Load() != 0 || st.Writes.Load() != 20 || st.Retries.Load() != 0 {
		t.Errorf("%d attempts streamed, %d writes, %d retries; want none streamed, 20 writes by POST, no retry",
			st.Streamed.Load(), st.Writes.Load(), st.Retries.Load())
	}
}
