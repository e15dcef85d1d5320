package nbd_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/nbd/nbdtest"
)

const diskSize = 64 << 20

// testServer runs an nbd.Server on a unix socket for one test.
type testServer struct {
	t      *testing.T
	path   string
	cancel context.CancelFunc
	done   chan struct{}
	mem    *nbdtest.Mem
}

func startServer(t *testing.T, mutate func(*nbd.ServerConfig)) *testServer {
	t.Helper()
	mem := nbdtest.NewMem(diskSize)
	cfg := nbd.ServerConfig{
		Exports: []nbd.Export{
			{Name: "disk", Description: "test disk", Backend: mem},
			{Name: "ro", Backend: mem, ReadOnly: true},
		},
		Logger: hclog.New(&hclog.LoggerOptions{Output: tWriter{t}, Level: hclog.Debug}),
	}
	if mutate != nil {
		mutate(&cfg)
	}
	srv, err := nbd.NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ts := &testServer{t: t, path: path, cancel: cancel, done: make(chan struct{}), mem: mem}
	var wg sync.WaitGroup
	go func() {
		defer close(ts.done)
		defer wg.Wait()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); _ = srv.ServeConn(ctx, c) }()
		}
	}()
	context.AfterFunc(ctx, func() { l.Close() })
	t.Cleanup(func() {
		cancel()
		select {
		case <-ts.done:
		case <-time.After(10 * time.Second):
			t.Error("server connections did not end within 10s of stopping")
		}
	})
	return ts
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

func (ts *testServer) dial() *nbdtest.Client {
	ts.t.Helper()
	c, err := net.Dial("unix", ts.path)
	if err != nil {
		ts.t.Fatal(err)
	}
	ts.t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	return nbdtest.NewClient(c)
}

func (ts *testServer) connect(h nbdtest.Handshake) *nbdtest.Client {
	ts.t.Helper()
	c := ts.dial()
	if err := c.Connect(h); err != nil {
		ts.t.Fatalf("handshake %+v: %v", h, err)
	}
	return c
}

func lastType(rs []nbdtest.OptReply) uint32 { return rs[len(rs)-1].Type }

func TestOptions(t *testing.T) {
	ts := startServer(t, nil)
	c := ts.dial()
	if f, err := c.Greet(nbd.ClientFixedNewstyle | nbd.ClientNoZeroes); err != nil || f != nbd.FlagFixedNewstyle|nbd.FlagNoZeroes {
		t.Fatalf("greeting flags %#x, %v", f, err)
	}
	opt := func(o uint32, data []byte) []nbdtest.OptReply {
		t.Helper()
		rs, err := c.Option(o, data)
		if err != nil {
			t.Fatalf("option %d: %v", o, err)
		}
		return rs
	}
	// LIST: one SERVER per export, then ACK.
	rs := opt(nbd.OptList, nil)
	if len(rs) != 3 || rs[0].Type != nbd.RepServer || !bytes.Contains(rs[0].Data, []byte("disk")) || lastType(rs) != nbd.RepAck {
		t.Errorf("LIST replies: %+v", rs)
	}
	if lastType(opt(nbd.OptList, []byte{1})) != nbd.RepErrInvalid {
		t.Error("LIST with data was not refused with ERR_INVALID")
	}
	// Unknown options and STARTTLS: ERR_UNSUP, and the next option works.
	for _, o := range []uint32{42, nbd.OptStartTLS, nbd.OptPeekExport, 0xffffffff} {
		if lastType(opt(o, []byte("xyz"))) != nbd.RepErrUnsup {
			t.Errorf("option %d not refused with ERR_UNSUP", o)
		}
	}
	// An option too long to parse is skipped and refused.
	if lastType(opt(nbd.OptInfo, make([]byte, nbd.MaxOptionLength+1))) != nbd.RepErrInvalid {
		t.Error("overlong INFO not refused")
	}
	// INFO: unknown export, malformed, then a good one.
	if lastType(opt(nbd.OptInfo, nbd.AppendExportRequest(nil, nbd.ExportRequest{Name: "nope"}))) != nbd.RepErrUnknown {
		t.Error("INFO for unknown export not ERR_UNKNOWN")
	}
	if lastType(opt(nbd.OptInfo, []byte{0, 0, 0, 9})) != nbd.RepErrInvalid {
		t.Error("malformed INFO not ERR_INVALID")
	}
	rs = opt(nbd.OptInfo, nbd.AppendExportRequest(nil, nbd.ExportRequest{Name: "disk", Infos: []uint16{nbd.InfoName, nbd.InfoDescription, nbd.InfoBlockSize}}))
	infos := map[uint16][]byte{}
	for _, r := range rs[:len(rs)-1] {
		infos[uint16(r.Data[0])<<8|uint16(r.Data[1])] = r.Data[2:]
	}
	if lastType(rs) != nbd.RepAck || string(infos[nbd.InfoName]) != "disk" || string(infos[nbd.InfoDescription]) != "test disk" {
		t.Errorf("INFO replies: %+v", rs)
	}
	if want := nbd.AppendInfoBlockSize(nil, nbd.BlockSize{512, 4096, 1 << 25})[2:]; !bytes.Equal(infos[nbd.InfoBlockSize], want) {
		t.Errorf("block size info %x, want %x", infos[nbd.InfoBlockSize], want)
	}
	if len(infos[nbd.InfoExport]) != 10 {
		t.Errorf("export info %x", infos[nbd.InfoExport])
	}
	// Meta contexts need structured replies first.
	q := nbd.AppendMetaContextRequest(nil, nbd.MetaContextRequest{Export: "disk", Queries: []string{"base:"}})
	if lastType(opt(nbd.OptListMetaContext, q)) != nbd.RepErrInvalid {
		t.Error("LIST_META_CONTEXT before structured replies not refused")
	}
	if lastType(opt(nbd.OptStructuredReply, []byte{1})) != nbd.RepErrInvalid {
		t.Error("STRUCTURED_REPLY with data not refused")
	}
	if lastType(opt(nbd.OptStructuredReply, nil)) != nbd.RepAck {
		t.Error("STRUCTURED_REPLY refused")
	}
	rs = opt(nbd.OptListMetaContext, q)
	if len(rs) != 2 || rs[0].Type != nbd.RepMetaContext || !bytes.HasSuffix(rs[0].Data, []byte("base:allocation")) {
		t.Errorf("LIST_META_CONTEXT base: replies %+v", rs)
	}
	// SET ignores unknown namespaces and the bare namespace.
	rs = opt(nbd.OptSetMetaContext, nbd.AppendMetaContextRequest(nil, nbd.MetaContextRequest{Export: "disk", Queries: []string{"qemu:dirty-bitmap:x", "base:"}}))
	if len(rs) != 1 || rs[0].Type != nbd.RepAck {
		t.Errorf("SET of nothing known: %+v", rs)
	}
	if lastType(opt(nbd.OptExtendedHeaders, nil)) != nbd.RepAck {
		t.Error("EXTENDED_HEADERS refused")
	}
	if lastType(opt(nbd.OptStructuredReply, nil)) != nbd.RepErrExtHeaderReqd {
		t.Error("STRUCTURED_REPLY after extended headers not ERR_EXT_HEADER_REQD")
	}
	// ABORT: ACK, then the server hangs up.
	if lastType(opt(nbd.OptAbort, nil)) != nbd.RepAck {
		t.Error("ABORT not acknowledged")
	}
	if _, err := c.Conn.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("after ABORT: read err %v, want EOF", err)
	}
}

func TestExportName(t *testing.T) {
	ts := startServer(t, nil)
	for _, noZeroes := range []bool{true, false} {
		c := ts.dial()
		flags := nbd.ClientFixedNewstyle
		if noZeroes {
			flags |= nbd.ClientNoZeroes
		}
		if _, err := c.Greet(flags); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Conn.Write(nbd.AppendOption(nil, nbd.OptExportName, []byte("disk"))); err != nil {
			t.Fatal(err)
		}
		want := 10
		if !noZeroes {
			want = 134
		}
		got := make([]byte, want)
		if _, err := io.ReadFull(c.Conn, got); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got[:8], binary.BigEndian.AppendUint64(nil, diskSize)) {
			t.Errorf("size bytes %x", got[:8])
		}
		// Transmission works right after.
		res, err := c.Do(nbd.Request{Type: nbd.CmdFlush, Cookie: 1}, nil)
		if err != nil || res.Err != 0 {
			t.Fatalf("flush after EXPORT_NAME: %+v %v", res, err)
		}
	}
	// An unknown name can only be answered by hanging up.
	c := ts.dial()
	c.Greet(nbd.ClientFixedNewstyle)
	c.Conn.Write(nbd.AppendOption(nil, nbd.OptExportName, []byte("nope")))
	if _, err := c.Conn.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("unknown EXPORT_NAME: read err %v, want EOF", err)
	}
	// Unknown client flags: hang up.
	c = ts.dial()
	c.Greet(1 << 7)
	if _, err := c.Conn.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("unknown client flags: read err %v, want EOF", err)
	}
}

var modes = []struct {
	name string
	h    nbdtest.Handshake
}{
	{"simple", nbdtest.Handshake{Export: "disk", BlockSize: true}},
	{"structured", nbdtest.Handshake{Export: "disk", Structured: true, Meta: true, BlockSize: true}},
	{"extended", nbdtest.Handshake{Export: "disk", Extended: true, Meta: true, BlockSize: true}},
}

func TestReadWrite(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			ts := startServer(t, nil)
			c := ts.connect(m.h)
			wantFlags := nbd.TFlagHasFlags | nbd.TFlagSendFlush | nbd.TFlagSendFUA | nbd.TFlagSendTrim |
				nbd.TFlagSendWriteZeroes | nbd.TFlagCanMultiConn | nbd.TFlagSendCache | nbd.TFlagSendFastZero
			if c.Structured {
				wantFlags |= nbd.TFlagSendDF
			}
			if c.Flags != wantFlags || c.Size != diskSize {
				t.Errorf("flags %#x size %d; want %#x %d", c.Flags, c.Size, wantFlags, diskSize)
			}
			pattern := bytes.Repeat([]byte{0xab}, 64<<10)
			do := func(r nbd.Request, payload []byte) *nbdtest.Result {
				t.Helper()
				if c.Extended && r.Type == nbd.CmdWrite {
					r.Flags |= nbd.CmdFlagPayloadLen
				}
				res, err := c.Do(r, payload)
				if err != nil {
					t.Fatalf("%+v: %v", r, err)
				}
				if res.Err != 0 {
					t.Fatalf("%+v: error %v %q", r, res.Err, res.Message)
				}
				return res
			}
			do(nbd.Request{Type: nbd.CmdWrite, Cookie: 1, Offset: 1 << 20, Length: uint64(len(pattern))}, pattern)
			do(nbd.Request{Type: nbd.CmdWrite, Flags: nbd.CmdFlagFUA, Cookie: 2, Offset: 2 << 20, Length: 4096}, pattern[:4096])
			do(nbd.Request{Type: nbd.CmdFlush, Cookie: 3}, nil)
			// A read spanning hole, data, hole.
			res := do(nbd.Request{Type: nbd.CmdRead, Cookie: 4, Offset: 1<<20 - 64<<10, Length: 192 << 10}, nil)
			want := make([]byte, 192<<10)
			copy(want[64<<10:], pattern)
			if !bytes.Equal(res.Data, want) {
				t.Fatal("read back differs from what was written")
			}
			if c.Structured {
				if res.Holes != 128<<10 {
					t.Errorf("sparse read sent %d bytes as holes, want %d (chunks %v)", res.Holes, 128<<10, res.Chunks)
				}
				// DF: one content chunk, holes as zero data.
				res = do(nbd.Request{Type: nbd.CmdRead, Flags: nbd.CmdFlagDF, Cookie: 5, Offset: 1<<20 - 64<<10, Length: 192 << 10}, nil)
				if res.Holes != 0 || len(res.Chunks) != 1 || !bytes.Equal(res.Data, want) {
					t.Errorf("DF read: holes %d chunks %v", res.Holes, res.Chunks)
				}
				// Block status sees data where written.
				res = do(nbd.Request{Type: nbd.CmdBlockStatus, Cookie: 6, Offset: 1<<20 - 8192, Length: 16384 + 64<<10}, nil)
				wantEx := []nbd.Extent{{8192, nbd.StateHole | nbd.StateZero}, {64 << 10, 0}, {8192, nbd.StateHole | nbd.StateZero}}
				if !equalExtents(res.Extents, wantEx) {
					t.Errorf("block status %+v, want %+v", res.Extents, wantEx)
				}
				res = do(nbd.Request{Type: nbd.CmdBlockStatus, Flags: nbd.CmdFlagReqOne, Cookie: 7, Offset: 1 << 20, Length: 4096}, nil)
				if !equalExtents(res.Extents, []nbd.Extent{{4096, 0}}) {
					t.Errorf("block status REQ_ONE %+v", res.Extents)
				}
			}
			// Trim and zero make holes; NO_HOLE keeps the range allocated.
			do(nbd.Request{Type: nbd.CmdTrim, Cookie: 8, Offset: 1 << 20, Length: 8192}, nil)
			do(nbd.Request{Type: nbd.CmdWriteZeroes, Flags: nbd.CmdFlagFastZero, Cookie: 9, Offset: 1<<20 + 8192, Length: 8192}, nil)
			do(nbd.Request{Type: nbd.CmdWriteZeroes, Flags: nbd.CmdFlagNoHole | nbd.CmdFlagFUA, Cookie: 10, Offset: 1<<20 + 16384, Length: 8192}, nil)
			do(nbd.Request{Type: nbd.CmdCache, Cookie: 11, Offset: 0, Length: diskSize}, nil)
			got := ts.mem.Bytes()[1<<20 : 1<<20+64<<10]
			if !bytes.Equal(got[:24576], make([]byte, 24576)) || !bytes.Equal(got[24576:], pattern[24576:]) {
				t.Error("trim/zero did not zero exactly their ranges")
			}
			if c.Structured {
				res = do(nbd.Request{Type: nbd.CmdBlockStatus, Cookie: 12, Offset: 1 << 20, Length: 32768}, nil)
				wantEx := []nbd.Extent{{16384, nbd.StateHole | nbd.StateZero}, {16384, 0}}
				if !equalExtents(res.Extents, wantEx) {
					t.Errorf("block status after trim/zero %+v, want %+v", res.Extents, wantEx)
				}
			}
			// Zero-length requests succeed and do nothing.
			do(nbd.Request{Type: nbd.CmdRead, Cookie: 13, Offset: 4096}, nil)
			do(nbd.Request{Type: nbd.CmdWrite, Cookie: 14, Offset: 4096}, []byte{})
		})
	}
}

func equalExtents(a, b []nbd.Extent) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// notFast refuses fast zeroes, like a filesystem without hole punching.
type notFast struct{ *nbdtest.Mem }

func (n notFast) Zero(ctx context.Context, off, length uint64, f nbd.ZeroFlags) error {
	if f&nbd.ZeroFast != 0 {
		return nbd.ErrNotFast
	}
	return n.Mem.Zero(ctx, off, length, f)
}

// errCase is a request that must be refused with want (0: accepted).
type errCase struct {
	name    string
	c       *nbdtest.Client
	r       nbd.Request
	payload []byte
	want    nbd.Errno
}

func TestRequestErrors(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			ts := startServer(t, func(cfg *nbd.ServerConfig) {
				cfg.Exports = append(cfg.Exports, nbd.Export{Name: "slow-zero", Backend: notFast{nbdtest.NewMem(diskSize)}})
			})
			rw := ts.connect(m.h)
			roH := m.h
			roH.Export = "ro"
			ro := ts.connect(roH)
			nf := m.h
			nf.Export = "slow-zero"
			slow := ts.connect(nf)
			loose := m.h
			loose.BlockSize = false
			unaligned := ts.connect(loose)
			pl := uint16(0)
			if m.h.Extended {
				pl = nbd.CmdFlagPayloadLen
			}
			big := make([]byte, 1<<25+512)
			cases := []errCase{
				{"read past end", rw, nbd.Request{Type: nbd.CmdRead, Offset: diskSize - 512, Length: 1024}, nil, nbd.EINVAL},
				{"read offset overflow", rw, nbd.Request{Type: nbd.CmdRead, Offset: 1<<64 - 512, Length: 1024}, nil, nbd.EINVAL},
				{"write past end", rw, nbd.Request{Type: nbd.CmdWrite, Flags: pl, Offset: diskSize, Length: 512}, make([]byte, 512), nbd.ENOSPC},
				{"zero past end", rw, nbd.Request{Type: nbd.CmdWriteZeroes, Offset: diskSize, Length: 512}, nil, nbd.ENOSPC},
				{"trim past end", rw, nbd.Request{Type: nbd.CmdTrim, Offset: diskSize, Length: 512}, nil, nbd.EINVAL},
				{"cache past end", rw, nbd.Request{Type: nbd.CmdCache, Offset: diskSize, Length: 512}, nil, nbd.EINVAL},
				{"misaligned read", rw, nbd.Request{Type: nbd.CmdRead, Offset: 1, Length: 512}, nil, nbd.EINVAL},
				{"misaligned write", rw, nbd.Request{Type: nbd.CmdWrite, Flags: pl, Offset: 0, Length: 100}, make([]byte, 100), nbd.EINVAL},
				{"misaligned trim", rw, nbd.Request{Type: nbd.CmdTrim, Offset: 512, Length: 1}, nil, nbd.EINVAL},
				{"unaligned write without block size promise", unaligned, nbd.Request{Type: nbd.CmdWrite, Flags: pl, Offset: 3, Length: 5}, []byte("hello"), 0},
				{"unknown command", rw, nbd.Request{Type: 99, Offset: 0, Length: 512}, nil, nbd.EINVAL},
				{"unknown flag", rw, nbd.Request{Type: nbd.CmdRead, Flags: 1 << 9, Length: 512}, nil, nbd.EINVAL},
				{"flag of another command", rw, nbd.Request{Type: nbd.CmdRead, Flags: nbd.CmdFlagNoHole, Length: 512}, nil, nbd.EINVAL},
				{"flush with offset", rw, nbd.Request{Type: nbd.CmdFlush, Offset: 512}, nil, nbd.EINVAL},
				{"write on read-only", ro, nbd.Request{Type: nbd.CmdWrite, Flags: pl, Length: 512}, make([]byte, 512), nbd.EPERM},
				{"trim on read-only", ro, nbd.Request{Type: nbd.CmdTrim, Length: 512}, nil, nbd.EPERM},
				{"zero on read-only", ro, nbd.Request{Type: nbd.CmdWriteZeroes, Length: 512}, nil, nbd.EPERM},
				{"read on read-only", ro, nbd.Request{Type: nbd.CmdRead, Length: 512}, nil, 0},
				{"fast zero that cannot be fast", slow, nbd.Request{Type: nbd.CmdWriteZeroes, Flags: nbd.CmdFlagFastZero, Length: 4096}, nil, nbd.ENOTSUP},
				{"slow zero without the fast flag", slow, nbd.Request{Type: nbd.CmdWriteZeroes, Length: 4096}, nil, 0},
			}
			switch {
			case m.h.Extended:
				cases = append(cases,
					errCase{"oversize read", rw, nbd.Request{Type: nbd.CmdRead, Length: 1<<25 + 512}, nil, nbd.EOVERFLOW},
					errCase{"payload on a command without one", rw, nbd.Request{Type: nbd.CmdTrim, Flags: nbd.CmdFlagPayloadLen, Length: 4}, []byte("junk"), nbd.EINVAL})
			case m.h.Structured:
				cases = append(cases,
					errCase{"oversize read", rw, nbd.Request{Type: nbd.CmdRead, Length: 1<<25 + 512}, nil, nbd.EOVERFLOW},
					errCase{"oversize write", rw, nbd.Request{Type: nbd.CmdWrite, Length: uint64(len(big))}, big, nbd.EINVAL})
			default:
				cases = append(cases,
					errCase{"oversize read", rw, nbd.Request{Type: nbd.CmdRead, Length: 1<<25 + 512}, nil, nbd.EINVAL},
					errCase{"oversize write", rw, nbd.Request{Type: nbd.CmdWrite, Length: uint64(len(big))}, big, nbd.EINVAL},
					errCase{"DF without structured replies", rw, nbd.Request{Type: nbd.CmdRead, Flags: nbd.CmdFlagDF, Length: 512}, nil, nbd.EINVAL},
					errCase{"block status without a context", rw, nbd.Request{Type: nbd.CmdBlockStatus, Length: 512}, nil, nbd.EINVAL})
			}
			for i, tc := range cases {
				tc.r.Cookie = uint64(100 + i)
				res, err := tc.c.Do(tc.r, tc.payload)
				if err != nil {
					t.Fatalf("%s: %v", tc.name, err)
				}
				if res.Err != tc.want || res.Cookie != tc.r.Cookie {
					t.Errorf("%s: got error %v (cookie %d), want %v", tc.name, res.Err, res.Cookie, tc.want)
				}
				// The connection stays usable.
				res, err = tc.c.Do(nbd.Request{Type: nbd.CmdRead, Cookie: 1, Offset: 4096, Length: 512}, nil)
				if err != nil || res.Err != 0 || len(res.Data) != 512 {
					t.Fatalf("after %s: read %+v %v", tc.name, res, err)
				}
			}
		})
	}
}

// gate blocks reads and writes at one offset until released.
type gate struct {
	*nbdtest.Mem
	at      uint64
	arrived chan struct{}
	release chan struct{}
}

func newGate(at uint64) *gate {
	return &gate{Mem: nbdtest.NewMem(diskSize), at: at, arrived: make(chan struct{}, 16), release: make(chan struct{})}
}

func (g *gate) wait(off uint64) {
	if off == g.at {
		g.arrived <- struct{}{}
		<-g.release
	}
}

func (g *gate) ReadAt(ctx context.Context, p []byte, off uint64) error {
	g.wait(off)
	return g.Mem.ReadAt(ctx, p, off)
}
func (g *gate) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	g.wait(off)
	return g.Mem.WriteAt(ctx, p, off, fua)
}

func waitFor(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}

func TestRepliesOutOfOrder(t *testing.T) {
	g := newGate(1 << 20)
	ts := startServer(t, func(cfg *nbd.ServerConfig) { cfg.Exports[0].Backend = g })
	c := ts.connect(modes[1].h)
	c.Send(nbd.Request{Type: nbd.CmdRead, Cookie: 1, Offset: 1 << 20, Length: 4096}, nil)
	waitFor(t, g.arrived, "the gated read to reach the backend")
	c.Send(nbd.Request{Type: nbd.CmdRead, Cookie: 2, Offset: 0, Length: 4096}, nil)
	res, err := c.Recv()
	if err != nil || res.Cookie != 2 {
		t.Fatalf("first reply: %+v %v; want cookie 2 while 1 is blocked", res, err)
	}
	close(g.release)
	res, err = c.Recv()
	if err != nil || res.Cookie != 1 || res.Err != 0 {
		t.Fatalf("second reply: %+v %v", res, err)
	}
}

func TestManyInFlight(t *testing.T) {
	ts := startServer(t, nil)
	for _, m := range modes {
		c := ts.connect(m.h)
		const n = 200
		for i := 0; i < n; i++ {
			buf := bytes.Repeat([]byte{byte(i)}, 4096)
			r := nbd.Request{Type: nbd.CmdWrite, Cookie: uint64(i), Offset: uint64(i) * 4096, Length: 4096}
			if c.Extended {
				r.Flags = nbd.CmdFlagPayloadLen
			}
			if err := c.Send(r, buf); err != nil {
				t.Fatal(err)
			}
		}
		rs, err := c.RecvAll(n)
		if err != nil {
			t.Fatal(err)
		}
		seen := map[uint64]bool{}
		for _, r := range rs {
			if r.Err != 0 || seen[r.Cookie] {
				t.Fatalf("%s: reply %+v (dup %v)", m.name, r, seen[r.Cookie])
			}
			seen[r.Cookie] = true
		}
		for i := 0; i < n; i++ {
			c.Send(nbd.Request{Type: nbd.CmdRead, Cookie: uint64(1000 + i), Offset: uint64(i) * 4096, Length: 4096}, nil)
		}
		rs, err = c.RecvAll(n)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			i := byte(r.Cookie - 1000)
			if !bytes.Equal(r.Data, bytes.Repeat([]byte{i}, 4096)) {
				t.Fatalf("%s: read %d returned wrong data", m.name, i)
			}
		}
	}
}

// TestGracefulStop: a stopping server answers what it has read, never with
// ESHUTDOWN, then closes the connection.
func TestGracefulStop(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			g := newGate(1 << 20)
			stopping := make(chan struct{}, 4)
			halfRead := make(chan struct{}, 4)
			ts := startServer(t, func(cfg *nbd.ServerConfig) {
				cfg.Exports[0].Backend = g
				cfg.Hooks.Stopping = func() { stopping <- struct{}{} }
				cfg.Hooks.HeaderRead = func(r nbd.Request) {
					if r.Cookie == 2 {
						halfRead <- struct{}{}
					}
				}
			})
			c := ts.connect(m.h)
			half := ts.connect(m.h)
			pl := uint16(0)
			if c.Extended {
				pl = nbd.CmdFlagPayloadLen
			}
			data := bytes.Repeat([]byte{7}, 8192)
			// c: a write blocked in the backend. half: a write whose
			// payload has only half arrived.
			c.Send(nbd.Request{Type: nbd.CmdWrite, Flags: pl, Cookie: 1, Offset: 1 << 20, Length: 8192}, data)
			waitFor(t, g.arrived, "the write to reach the backend")
			hdr := nbd.AppendRequest(nil, nbd.Request{Type: nbd.CmdWrite, Flags: pl, Cookie: 2, Offset: 2 << 20, Length: 8192}, c.Extended)
			half.Conn.Write(append(hdr, data[:4096]...))
			waitFor(t, halfRead, "the server to read the half-sent request's header")

			ts.cancel()
			waitFor(t, stopping, "connection 1 to start stopping")
			waitFor(t, stopping, "connection 2 to start stopping")
			half.Conn.Write(data[4096:])
			close(g.release)
			for i, cl := range []*nbdtest.Client{c, half} {
				res, err := cl.Recv()
				if err != nil || res.Err != 0 || res.Cookie != uint64(i+1) {
					t.Fatalf("connection %d: reply %+v, %v; want success", i+1, res, err)
				}
				if _, err := cl.Conn.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
					t.Fatalf("connection %d: after the reply, read err %v; want EOF", i+1, err)
				}
			}
			if got := g.Mem.Bytes()[2<<20 : 2<<20+8192]; !bytes.Equal(got, data) {
				t.Error("the half-read write did not land whole")
			}
		})
	}
}

// With extended headers a payload above the advertised maximum is a
// protocol violation the server answers by hanging up (the protocol says it
// SHOULD); compact clients get EINVAL instead (TestRequestErrors).
func TestExtendedOversizePayloadHangsUp(t *testing.T) {
	ts := startServer(t, nil)
	c := ts.connect(modes[2].h)
	hdr := nbd.AppendRequest(nil, nbd.Request{Type: nbd.CmdWrite, Flags: nbd.CmdFlagPayloadLen, Cookie: 1, Length: 1<<25 + 512}, true)
	c.Conn.Write(hdr)
	if _, err := c.Conn.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read err %v, want EOF", err)
	}
}

func TestDiscAnswersPending(t *testing.T) {
	g := newGate(1 << 20)
	ts := startServer(t, func(cfg *nbd.ServerConfig) { cfg.Exports[0].Backend = g })
	c := ts.connect(modes[0].h)
	c.Send(nbd.Request{Type: nbd.CmdRead, Cookie: 1, Offset: 1 << 20, Length: 512}, nil)
	waitFor(t, g.arrived, "the read to reach the backend")
	c.Send(nbd.Request{Type: nbd.CmdDisc, Cookie: 2}, nil)
	close(g.release)
	res, err := c.Recv()
	if err != nil || res.Cookie != 1 || res.Err != 0 {
		t.Fatalf("pending read after DISC: %+v %v", res, err)
	}
	if _, err := c.Conn.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after DISC: %v, want EOF", err)
	}
}
