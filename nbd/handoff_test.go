package nbd_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/nbd/nbdtest"
)

var connStateCases = []struct {
	name string
	st   nbd.ConnState
	hex  string
}{
	{"simple", nbd.ConnState{Export: "", Flags: 0x0001, BlockSize: nbd.BlockSize{1, 4096, 32 << 20}},
		"0100" + "0001" + "00000000" + "00000001" + "00001000" + "02000000" + "0000" + "00000000"},
	{"structured with read-ahead", nbd.ConnState{Export: "disk", Structured: true, BlockSizeAgreed: true, Flags: 0x0d6d,
		MetaContextID: 1, BlockSize: nbd.BlockSize{512, 4096, 1 << 20}, ReadAhead: []byte{0x25, 0x60}},
		"0105" + "0d6d" + "00000001" + "00000200" + "00001000" + "00100000" + "0004" + "6469736b" + "00000002" + "2560"},
	{"extended", nbd.ConnState{Export: "k", Structured: true, Extended: true, Flags: 1, BlockSize: nbd.BlockSize{1, 4096, 1 << 25}},
		"0103" + "0001" + "00000000" + "00000001" + "00001000" + "02000000" + "0001" + "6b" + "00000000"},
}

func TestConnStateCodec(t *testing.T) {
	for _, tc := range connStateCases {
		t.Run(tc.name, func(t *testing.T) {
			b := nbd.AppendConnState(nil, tc.st)
			if got := hex.EncodeToString(b); got != tc.hex {
				t.Fatalf("encoded %s\nwant    %s", got, tc.hex)
			}
			back, err := nbd.ParseConnState(b)
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(back) != fmt.Sprint(tc.st) {
				t.Errorf("parsed %+v, want %+v", back, tc.st)
			}
		})
	}
	bad := map[string]string{
		"short":             "0100",
		"version 2":         "0200" + "0001" + "00000000" + "00000001" + "00001000" + "02000000" + "0000" + "00000000",
		"unknown bit":       "0110" + "0001" + "00000000" + "00000001" + "00001000" + "02000000" + "0000" + "00000000",
		"extended alone":    "0102" + "0001" + "00000000" + "00000001" + "00001000" + "02000000" + "0000" + "00000000",
		"name past the end": "0100" + "0001" + "00000000" + "00000001" + "00001000" + "02000000" + "0009" + "00000000",
		"read-ahead longer": "0100" + "0001" + "00000000" + "00000001" + "00001000" + "02000000" + "0000" + "00000005" + "25",
		"trailing bytes":    "0100" + "0001" + "00000000" + "00000001" + "00001000" + "02000000" + "0000" + "00000000" + "00",
	}
	for name, h := range bad {
		b, _ := hex.DecodeString(h)
		if _, err := nbd.ParseConnState(b); !errors.Is(err, nbd.ErrMalformed) {
			t.Errorf("%s: err = %v, want ErrMalformed", name, err)
		}
	}
}

func FuzzParseConnState(f *testing.F) {
	for _, tc := range connStateCases {
		b, _ := hex.DecodeString(tc.hex)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := nbd.ParseConnState(b)
		if err != nil {
			return
		}
		if back := nbd.AppendConnState(nil, st); !bytes.Equal(back, b) {
			t.Fatalf("re-encoded % x, want % x", back, b)
		}
	})
}

// TestHandoffUnderLoad hands a connection from one server to another (and
// back) again and again while the client keeps writing and reading with
// many requests in flight: no request fails and the data is what was
// written.
func TestHandoffUnderLoad(t *testing.T) {
	const size = 4 << 20
	mem := nbdtest.NewMem(size)
	newServer := func() *nbd.Server {
		s, err := nbd.NewServer(nbd.ServerConfig{Exports: []nbd.Export{{Name: "disk", Backend: mem}}})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	servers := []*nbd.Server{newServer(), newServer()}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	handoffs := make(chan *nbd.Handoff, 1)
	served := make(chan error, 1)
	var sawReadAhead atomic.Int32
	go func() {
		nc, err := l.Accept()
		if err != nil {
			served <- err
			return
		}
		h := nbd.NewHandoff()
		handoffs <- h
		d, err := servers[0].ServeConnHandoff(ctx, nc, h)
		for i := 1; d != nil && err == nil; i++ {
			var rc net.Conn
			rc, err = net.FileConn(d.File)
			d.File.Close()
			if err != nil {
				break
			}
			if len(d.State.ReadAhead) > 0 {
				sawReadAhead.Add(1)
			}
			b := nbd.AppendConnState(nil, d.State) // what crosses the process boundary
			st, perr := nbd.ParseConnState(b)
			if perr != nil {
				err = perr
				break
			}
			h = nbd.NewHandoff()
			handoffs <- h
			d, err = servers[i%2].ResumeConn(ctx, rc, st, h)
		}
		served <- err
	}()

	c, err := nbd.Dial(ctx, "tcp", l.Addr().String(), nbd.ClientConfig{Export: "disk", MetaContext: true, MaxInFlight: 64})
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	g, gctx := errgroup.WithContext(ctx)
	stop := make(chan struct{})
	const workers = 32 // each owns the blocks b with b%workers == w
	for w := range workers {
		g.Go(func() error {
			buf := make([]byte, 4096)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return nil
				case <-gctx.Done():
					return gctx.Err()
				default:
				}
				off := uint64((i*workers+w)%(size/4096)) * 4096
				for j := range buf {
					buf[j] = byte(w + i + j)
				}
				err := c.WriteAt(gctx, buf, off, false)
				if err == nil {
					copy(want[off:], buf)
				}
				if err != nil {
					return fmt.Errorf("write at %d: %w", off, err)
				}
				got := make([]byte, 4096)
				if err := c.ReadAt(gctx, got, off); err != nil {
					return fmt.Errorf("read at %d: %w", off, err)
				}
			}
		})
	}
	for i := range 30 {
		select {
		case h := <-handoffs:
			h.Request()
		case err := <-served:
			close(stop)
			t.Fatalf("the connection ended after %d handoffs: %v (client: %v)", i, err, g.Wait())
		}
	}
	close(stop)
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if err := c.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("data read back differs from what was written")
	}
	c.Close()
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	t.Logf("%d of 30 handoffs carried read-ahead", sawReadAhead.Load())
}

// TestHandoffCarriesReadAhead: requests the reader had already buffered
// when the handoff stopped it travel in the state and are answered by the
// server that resumes the connection, in the same stream.
func TestHandoffCarriesReadAhead(t *testing.T) {
	for _, h := range modes {
		t.Run(h.name, func(t *testing.T) {
			mem := nbdtest.NewMem(1 << 20)
			handoff := nbd.NewHandoff()
			var first sync.Once
			a, err := nbd.NewServer(nbd.ServerConfig{
				Exports: []nbd.Export{{Name: "disk", Backend: mem}},
				Hooks:   nbd.Hooks{HeaderRead: func(nbd.Request) { first.Do(handoff.Request) }},
			})
			if err != nil {
				t.Fatal(err)
			}
			b, err := nbd.NewServer(nbd.ServerConfig{Exports: []nbd.Export{{Name: "disk", Backend: mem}}})
			if err != nil {
				t.Fatal(err)
			}
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			served := make(chan error, 1)
			readAhead := make(chan int, 1)
			go func() {
				nc, err := l.Accept()
				if err != nil {
					served <- err
					return
				}
				d, err := a.ServeConnHandoff(ctx, nc, handoff)
				if err != nil || d == nil {
					served <- fmt.Errorf("not detached: %v", err)
					return
				}
				readAhead <- len(d.State.ReadAhead)
				rc, err := net.FileConn(d.File)
				d.File.Close()
				if err != nil {
					served <- err
					return
				}
				_, err = b.ResumeConn(ctx, rc, d.State, nil)
				served <- err
			}()
			nc, err := net.Dial("tcp", l.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			c := nbdtest.NewClient(nc)
			if err := c.Connect(h.h); err != nil {
				t.Fatal(err)
			}
			// Three writes in one segment: the first header read requests
			// the handoff, the other two are already in the reader's buffer.
			var out []byte
			for i := range 3 {
				r := nbd.Request{Type: nbd.CmdWrite, Cookie: uint64(i + 1), Offset: uint64(i) * 4096, Length: 4096}
				if h.h.Extended {
					r.Flags |= nbd.CmdFlagPayloadLen
				}
				out = append(nbd.AppendRequest(out, r, h.h.Extended), bytes.Repeat([]byte{byte(0xa0 + i)}, 4096)...)
			}
			if _, err := nc.Write(out); err != nil {
				t.Fatal(err)
			}
			res, err := c.RecvAll(3)
			if err != nil {
				t.Fatalf("replies: %v", err)
			}
			for _, r := range res {
				if r.Err != 0 {
					t.Errorf("request %d: %v", r.Cookie, r.Err)
				}
			}
			if n := <-readAhead; n == 0 {
				t.Error("the handoff carried no read-ahead; the test did not exercise it")
			}
			rd, err := c.Do(nbd.Request{Type: nbd.CmdRead, Cookie: 9, Offset: 0, Length: 3 * 4096}, nil)
			if err != nil || rd.Err != 0 {
				t.Fatalf("read after resume: %v %v", err, rd)
			}
			for i := range 3 {
				if !bytes.Equal(rd.Data[i*4096:(i+1)*4096], bytes.Repeat([]byte{byte(0xa0 + i)}, 4096)) {
					t.Errorf("block %d not what was written", i)
				}
			}
			nc.Close()
			if err := <-served; err != nil {
				t.Fatal(err)
			}
		})
	}
}
