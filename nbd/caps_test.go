package nbd_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/nbd/nbdtest"
)

// counting is a Mem that counts the calls it gets, to prove a refused
// request never reaches the backend.
type counting struct {
	*nbdtest.Mem
	caps  nbd.Caps
	calls atomic.Int32
}

func (c *counting) Capabilities() nbd.Caps { return c.caps }

func (c *counting) Flush(ctx context.Context) error {
	c.calls.Add(1)
	return c.Mem.Flush(ctx)
}

func (c *counting) Trim(ctx context.Context, off, length uint64, fua bool) error {
	c.calls.Add(1)
	return c.Mem.Trim(ctx, off, length, fua)
}

func (c *counting) Zero(ctx context.Context, off, length uint64, f nbd.ZeroFlags) error {
	c.calls.Add(1)
	return c.Mem.Zero(ctx, off, length, f)
}

func (c *counting) Cache(ctx context.Context, off, length uint64) error {
	c.calls.Add(1)
	return c.Mem.Cache(ctx, off, length)
}

func (c *counting) Extents(ctx context.Context, off, length uint64) ([]nbd.Extent, error) {
	c.calls.Add(1)
	return c.Mem.Extents(ctx, off, length)
}

// TestCapsAdvertised: what the handshake advertises follows the backend's
// Capabilities, and base:allocation is offered only with CapExtents.
func TestCapsAdvertised(t *testing.T) {
	const has = nbd.TFlagHasFlags | nbd.TFlagSendDF // structured sessions
	for _, tc := range []struct {
		name string
		caps nbd.Caps
		ro   bool
		want uint16
	}{
		{"nothing", 0, false, has},
		{"everything", nbd.CapsAll, false, has | nbd.TFlagSendFlush | nbd.TFlagSendFUA | nbd.TFlagSendTrim |
			nbd.TFlagSendWriteZeroes | nbd.TFlagSendFastZero | nbd.TFlagSendCache | nbd.TFlagCanMultiConn},
		{"everything read-only", nbd.CapsAll, true, has | nbd.TFlagReadOnly | nbd.TFlagSendFlush | nbd.TFlagSendFUA |
			nbd.TFlagSendCache | nbd.TFlagCanMultiConn},
		{"zero without fast zero", nbd.CapZero | nbd.CapExtents, false, has | nbd.TFlagSendWriteZeroes},
		{"flush and trim", nbd.CapFlush | nbd.CapTrim, false, has | nbd.TFlagSendFlush | nbd.TFlagSendTrim},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := startServer(t, func(cfg *nbd.ServerConfig) {
				cfg.Exports = []nbd.Export{{Name: "disk", Backend: nbdtest.WithCaps(nbdtest.NewMem(1<<20), tc.caps), ReadOnly: tc.ro}}
			})
			c := ts.connect(nbdtest.Handshake{Export: "disk", Structured: true, Meta: true, BlockSize: true})
			if c.Flags != tc.want {
				t.Errorf("transmission flags %#x, want %#x", c.Flags, tc.want)
			}
			if got, want := c.MetaContextID != 0, tc.caps.Has(nbd.CapExtents); got != want {
				t.Errorf("base:allocation selected: %v, want %v", got, want)
			}
			rs, err := ts.connectOptions(nbd.OptListMetaContext, nbd.AppendMetaContextRequest(nil, nbd.MetaContextRequest{Export: "disk"}))
			if err != nil {
				t.Fatal(err)
			}
			listed := len(rs) > 1 && rs[0].Type == nbd.RepMetaContext && bytes.HasSuffix(rs[0].Data, []byte(nbd.MetaContextBaseAllocation))
			if listed != tc.caps.Has(nbd.CapExtents) || lastType(rs) != nbd.RepAck {
				t.Errorf("LIST_META_CONTEXT: %+v; want base:allocation listed: %v", rs, tc.caps.Has(nbd.CapExtents))
			}
		})
	}
}

// connectOptions opens a fresh structured session and sends one option.
func (ts *testServer) connectOptions(opt uint32, data []byte) ([]nbdtest.OptReply, error) {
	c := ts.dial()
	if _, err := c.Greet(nbd.ClientFixedNewstyle | nbd.ClientNoZeroes); err != nil {
		return nil, err
	}
	if _, err := c.Option(nbd.OptStructuredReply, nil); err != nil {
		return nil, err
	}
	return c.Option(opt, data)
}

// TestCapsRefused: a command or flag the backend did not declare is
// answered with EINVAL without reaching the backend, and the connection
// stays usable; with the capability the same request succeeds.
func TestCapsRefused(t *testing.T) {
	for _, tc := range []struct {
		name    string
		need    nbd.Caps
		r       nbd.Request
		payload []byte
	}{
		{"flush", nbd.CapFlush, nbd.Request{Type: nbd.CmdFlush}, nil},
		{"fua write", nbd.CapFUA, nbd.Request{Type: nbd.CmdWrite, Flags: nbd.CmdFlagFUA, Length: 4096}, make([]byte, 4096)},
		{"trim", nbd.CapTrim, nbd.Request{Type: nbd.CmdTrim, Length: 4096}, nil},
		{"zero", nbd.CapZero, nbd.Request{Type: nbd.CmdWriteZeroes, Length: 4096}, nil},
		{"fast zero", nbd.CapFastZero, nbd.Request{Type: nbd.CmdWriteZeroes, Flags: nbd.CmdFlagFastZero, Length: 4096}, nil},
		{"cache", nbd.CapCache, nbd.Request{Type: nbd.CmdCache, Length: 4096}, nil},
		{"block status", nbd.CapExtents, nbd.Request{Type: nbd.CmdBlockStatus, Length: 4096}, nil},
	} {
		for _, m := range modes {
			t.Run(tc.name+"/"+m.name, func(t *testing.T) {
				// Everything but the one capability (and what needs it).
				without := nbd.CapsAll &^ tc.need
				if tc.need == nbd.CapZero {
					without &^= nbd.CapFastZero
				}
				for _, caps := range []nbd.Caps{without, nbd.CapsAll} {
					be := &counting{Mem: nbdtest.NewMem(1 << 20), caps: caps}
					ts := startServer(t, func(cfg *nbd.ServerConfig) {
						cfg.Exports = []nbd.Export{{Name: "disk", Backend: be}}
					})
					c := ts.connect(m.h)
					r := tc.r
					r.Cookie = 1
					if c.Extended && r.Type == nbd.CmdWrite {
						r.Flags |= nbd.CmdFlagPayloadLen
					}
					if r.Type == nbd.CmdBlockStatus && !c.Structured {
						continue // refused for want of a context either way
					}
					res, err := c.Do(r, tc.payload)
					if err != nil {
						t.Fatal(err)
					}
					want := nbd.Errno(0)
					if caps == without {
						want = nbd.EINVAL
					}
					if res.Err != want {
						t.Errorf("caps %#x: %s answered %v, want %v", uint16(caps), tc.name, res.Err, want)
					}
					if caps == without && be.calls.Load() != 0 {
						t.Errorf("caps %#x: a refused %s reached the backend", uint16(caps), tc.name)
					}
					// Still in step: a read works.
					res, err = c.Do(nbd.Request{Type: nbd.CmdRead, Cookie: 2, Length: 512}, nil)
					if err != nil || res.Err != 0 || res.Cookie != 2 {
						t.Fatalf("read after the %s: %+v, %v", tc.name, res, err)
					}
				}
			})
		}
	}
}

// panicky panics on Extents: a backend without CapExtents must never get
// the call, not even for a large structured read.
type panicky struct{ *nbdtest.Mem }

func (p panicky) Capabilities() nbd.Caps { return nbd.CapsAll &^ nbd.CapExtents }

func (p panicky) Extents(context.Context, uint64, uint64) ([]nbd.Extent, error) {
	panic("Extents called on a backend without CapExtents")
}

func TestSparseReadNeedsExtents(t *testing.T) {
	ts := startServer(t, func(cfg *nbd.ServerConfig) {
		cfg.Exports = []nbd.Export{{Name: "disk", Backend: panicky{nbdtest.NewMem(1 << 20)}}}
	})
	c := ts.connect(modes[1].h)
	res, err := c.Do(nbd.Request{Type: nbd.CmdRead, Cookie: 1, Length: 256 << 10}, nil)
	if err != nil || res.Err != 0 {
		t.Fatalf("read: %+v, %v", res, err)
	}
	if res.Holes != 0 || len(res.Chunks) != 1 || res.Chunks[0] != nbd.ReplyTypeOffsetData {
		t.Errorf("read of a backend without extents: chunks %v, %d hole bytes; want one data chunk", res.Chunks, res.Holes)
	}
}

func TestExportCapsValidate(t *testing.T) {
	for _, tc := range []struct {
		caps nbd.Caps
		want string
	}{
		{nbd.CapFastZero, "CapFastZero needs CapZero"},
		{nbd.CapsAll + 1<<12, "unknown bits"},
	} {
		err := nbd.Export{Name: "x", Backend: nbdtest.WithCaps(nbdtest.NewMem(1<<20), tc.caps)}.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("caps %#x: Validate: %v, want %q", uint16(tc.caps), err, tc.want)
		}
	}
}

// ctxGate blocks writes at one offset until released or until the call's
// context ends, and reports how each blocked call ended.
type ctxGate struct {
	*nbdtest.Mem
	at      uint64
	arrived chan struct{}
	release chan struct{}
	ended   chan error // context.Cause of the call's ctx when it returned; nil if released
}

func newCtxGate(at uint64) *ctxGate {
	return &ctxGate{Mem: nbdtest.NewMem(diskSize), at: at, arrived: make(chan struct{}, 4),
		release: make(chan struct{}), ended: make(chan error, 4)}
}

func (g *ctxGate) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	if off != g.at {
		return g.Mem.WriteAt(ctx, p, off, fua)
	}
	g.arrived <- struct{}{}
	select {
	case <-g.release:
		g.ended <- context.Cause(ctx)
		return g.Mem.WriteAt(ctx, p, off, fua)
	case <-ctx.Done():
		g.ended <- context.Cause(ctx)
		return ctx.Err()
	}
}

func waitErr(t *testing.T, ch <-chan error, what string) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		return nil
	}
}

// TestBackendContextGracefulStop: a graceful stop does not cancel the
// backend's context; the request read before it is served and answered.
func TestBackendContextGracefulStop(t *testing.T) {
	g := newCtxGate(1 << 20)
	stopping := make(chan struct{}, 1)
	ts := startServer(t, func(cfg *nbd.ServerConfig) {
		cfg.Exports[0].Backend = g
		cfg.Hooks.Stopping = func() { stopping <- struct{}{} }
	})
	c := ts.connect(modes[0].h)
	c.Send(nbd.Request{Type: nbd.CmdWrite, Cookie: 1, Offset: 1 << 20, Length: 4096}, make([]byte, 4096))
	waitFor(t, g.arrived, "the write to reach the backend")
	ts.cancel()
	waitFor(t, stopping, "the connection to start stopping")
	close(g.release)
	if err := waitErr(t, g.ended, "the write to end"); err != nil {
		t.Errorf("backend context ended during a graceful stop: %v", err)
	}
	if res, err := c.Recv(); err != nil || res.Err != 0 {
		t.Fatalf("reply: %+v, %v; want success", res, err)
	}
}

// TestBackendContextDrainTimeout: a request still in the backend when the
// drain timeout passes has its context cancelled, and the connection ends.
func TestBackendContextDrainTimeout(t *testing.T) {
	g := newCtxGate(1 << 20)
	ts := startServer(t, func(cfg *nbd.ServerConfig) {
		cfg.Exports[0].Backend = g
		cfg.DrainTimeout = time.Second
	})
	defer close(g.release)
	c := ts.connect(modes[0].h)
	c.Send(nbd.Request{Type: nbd.CmdWrite, Cookie: 1, Offset: 1 << 20, Length: 4096}, make([]byte, 4096))
	waitFor(t, g.arrived, "the write to reach the backend")
	ts.cancel()
	err := waitErr(t, g.ended, "the write's context to end")
	if err == nil || !strings.Contains(err.Error(), "drain timeout") {
		t.Errorf("backend context cause %v; want the drain timeout", err)
	}
	if _, err := c.Recv(); err == nil {
		t.Error("a reply arrived after the drain timeout closed the connection")
	}
}

// TestBackendContextConnectionLost: when the client vanishes in the middle
// of a request, calls still in the backend are cancelled: nobody can be
// answered any more.
func TestBackendContextConnectionLost(t *testing.T) {
	g := newCtxGate(1 << 20)
	ts := startServer(t, func(cfg *nbd.ServerConfig) { cfg.Exports[0].Backend = g })
	defer close(g.release)
	c := ts.connect(modes[0].h)
	c.Send(nbd.Request{Type: nbd.CmdWrite, Cookie: 1, Offset: 1 << 20, Length: 4096}, make([]byte, 4096))
	waitFor(t, g.arrived, "the write to reach the backend")
	// Half a request, then hang up.
	hdr := nbd.AppendRequest(nil, nbd.Request{Type: nbd.CmdWrite, Cookie: 2, Offset: 2 << 20, Length: 4096}, false)
	c.Conn.Write(append(hdr, make([]byte, 100)...))
	c.Conn.Close()
	err := waitErr(t, g.ended, "the write's context to end")
	if err == nil || !strings.Contains(err.Error(), "connection lost") {
		t.Errorf("backend context cause %v; want the lost connection", err)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("cause %v is a deadline", err)
	}
}
