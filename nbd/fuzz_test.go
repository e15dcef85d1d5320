package nbd

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"testing"
	"time"
)

// Fuzz targets for everything that parses bytes from a client, seeded from
// the codec tables. `go test -fuzz=FuzzX ./nbd` runs one; the test script
// runs each for a bounded time.

func FuzzParseRequest(f *testing.F) {
	for _, tc := range requestTable {
		f.Add(unhex(f, tc.hex), tc.extended)
	}
	f.Fuzz(func(t *testing.T, b []byte, extended bool) {
		r, err := ParseRequest(b, extended)
		if err != nil {
			return
		}
		if back := AppendRequest(nil, r, extended); !bytes.Equal(back, b) {
			t.Fatalf("parse/append not inverse: %x -> %+v -> %x", b, r, back)
		}
	})
}

func FuzzParseExportRequest(f *testing.F) {
	for _, tc := range exportRequestTable {
		f.Add(unhex(f, tc.hex))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseExportRequest(b)
		if err != nil {
			return
		}
		if back := AppendExportRequest(nil, r); !bytes.Equal(back, b) {
			t.Fatalf("parse/append not inverse: %x -> %+v -> %x", b, r, back)
		}
	})
}

func FuzzParseMetaContextRequest(f *testing.F) {
	for _, tc := range metaRequestTable {
		f.Add(unhex(f, tc.hex))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseMetaContextRequest(b)
		if err != nil {
			return
		}
		if back := AppendMetaContextRequest(nil, r); !bytes.Equal(back, b) {
			t.Fatalf("parse/append not inverse: %x -> %+v -> %x", b, r, back)
		}
	})
}

// handshakeSeeds are client byte streams for the option phase.
func handshakeSeeds(tb testing.TB) [][]byte {
	flags := []byte{0, 0, 0, 3}
	var seeds [][]byte
	for _, tc := range exportRequestTable {
		d := unhex(tb, tc.hex)
		seeds = append(seeds, cat(flags, AppendOption(nil, OptInfo, d), AppendOption(nil, OptGo, d)))
	}
	for _, tc := range metaRequestTable {
		d := unhex(tb, tc.hex)
		seeds = append(seeds, cat(flags, AppendOption(nil, OptStructuredReply, nil),
			AppendOption(nil, OptListMetaContext, d), AppendOption(nil, OptSetMetaContext, d),
			AppendOption(nil, OptGo, AppendExportRequest(nil, ExportRequest{}))))
	}
	seeds = append(seeds,
		cat(flags, AppendOption(nil, OptList, nil), AppendOption(nil, 42, []byte("junk")), AppendOption(nil, OptExportName, []byte("disk"))),
		cat(flags, AppendOption(nil, OptExtendedHeaders, nil), AppendOption(nil, OptStructuredReply, nil), AppendOption(nil, OptAbort, nil)),
		cat([]byte{0, 0, 0, 1}, AppendOption(nil, OptExportName, nil)),
		[]byte("GET / HTTP/1.1\r\n\r\n"),
	)
	return seeds
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func fuzzServer(tb testing.TB) *Server {
	s, err := NewServer(ServerConfig{Exports: []Export{{Name: "disk", Backend: newTestMem(1 << 20)}}})
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

// FuzzHandshake feeds arbitrary client bytes to the option phase: it must
// end (with a session or an error) without panicking, and a session it
// returns must be consistent.
func FuzzHandshake(f *testing.F) {
	for _, s := range handshakeSeeds(f) {
		f.Add(s)
	}
	s := fuzzServer(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := s.handshake(context.Background(), &hsConn{br: bufio.NewReader(bytes.NewReader(b)), bw: bufio.NewWriter(io.Discard)})
		if err != nil {
			return
		}
		if st.export == nil || st.flags&TFlagHasFlags == 0 {
			t.Fatalf("session without export or flags: %+v", st)
		}
		if st.metaContextID != 0 && !st.structured {
			t.Fatalf("meta context without structured replies")
		}
	})
}

// FuzzTransmission feeds arbitrary request streams to a connection after a
// handshake: the server must answer or hang up, never panic or hang.
func FuzzTransmission(f *testing.F) {
	for _, tc := range requestTable {
		for _, mode := range []byte{0, 1, 2} {
			f.Add(mode, unhex(f, tc.hex))
		}
	}
	w := AppendRequest(nil, Request{Type: CmdWrite, Cookie: 1, Offset: 512, Length: 4}, false)
	f.Add(byte(0), cat(w, []byte("data")))
	f.Add(byte(1), AppendRequest(nil, Request{Type: CmdBlockStatus, Cookie: 2, Length: 1 << 20}, false))
	f.Add(byte(2), AppendRequest(nil, Request{Type: CmdBlockStatus, Flags: CmdFlagReqOne, Cookie: 2, Length: 1 << 40}, true))
	f.Add(byte(1), cat(w[:10]))
	s := fuzzServer(f)
	f.Fuzz(func(t *testing.T, mode byte, b []byte) {
		st := &session{export: s.exports[0], blockSizeAgreed: mode&4 != 0}
		switch mode % 3 {
		case 1:
			st.structured, st.metaContextID = true, baseAllocationID
		case 2:
			st.structured, st.extended, st.metaContextID = true, true, baseAllocationID
		}
		st.flags = s.transmissionFlags(st.export, st)
		nc := &fakeConn{r: bytes.NewReader(b)}
		c := newConn(s, nc, bufio.NewReader(nc), st, s.cfg.Logger)
		done := make(chan error, 1)
		go func() { _, err := c.serve(context.Background(), nil); done <- err }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("connection did not end after its input did")
		}
	})
}

// fakeConn reads from r and discards writes.
type fakeConn struct {
	r io.Reader
}

func (c *fakeConn) Read(p []byte) (int, error)         { return c.r.Read(p) }
func (c *fakeConn) Write(p []byte) (int, error)        { return len(p), nil }
func (c *fakeConn) Close() error                       { return nil }
func (c *fakeConn) LocalAddr() net.Addr                { return &net.UnixAddr{Name: "fake", Net: "unix"} }
func (c *fakeConn) RemoteAddr() net.Addr               { return &net.UnixAddr{Name: "fake", Net: "unix"} }
func (c *fakeConn) SetDeadline(t time.Time) error      { return nil }
func (c *fakeConn) SetReadDeadline(t time.Time) error  { return nil }
func (c *fakeConn) SetWriteDeadline(t time.Time) error { return nil }
