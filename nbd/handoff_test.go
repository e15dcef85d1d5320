package nbd_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"sync"
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

	c, err := nbd.Dial(ctx, "tcp", l.Addr().String(), nbd.ClientConfig{Export: "disk", MetaContext: true})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	want := make([]byte, size)
	g, gctx := errgroup.WithContext(ctx)
	stop := make(chan struct{})
	for w := range 8 {
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
				off := uint64((w*131+i*8)%(size/4096)) * 4096
				for j := range buf {
					buf[j] = byte(w + i + j)
				}
				mu.Lock() // one writer per block at a time keeps want exact
				err := c.WriteAt(gctx, buf, off, false)
				if err == nil {
					copy(want[off:], buf)
				}
				mu.Unlock()
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
	for range 30 {
		h := <-handoffs
		h.Request()
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
}
