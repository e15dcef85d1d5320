package nbd_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/nbd/nbdtest"
)

// ---- Harness ----

// checkClientLeaks, deferred first in every client test, fails the test if a
// goroutine of a Client is still running once everything was closed.
func checkClientLeaks(t *testing.T) {
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			var leaked []string
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			for _, g := range strings.Split(string(buf), "\n\n") {
				if strings.Contains(g, "nbd.(*Client)") {
					leaked = append(leaked, g)
				}
			}
			if len(leaked) == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("%d client goroutines leaked:\n\n%s", len(leaked), strings.Join(leaked, "\n\n"))
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

func clientLogger(t *testing.T) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: "client", Output: tWriter{t}, Level: hclog.Debug})
}

// dialClient connects to a unix socket and closes the client when the test
// ends.
func dialClient(t *testing.T, path string, cfg nbd.ClientConfig) *nbd.Client {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = clientLogger(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := nbd.Dial(ctx, "unix", path, cfg)
	if err != nil {
		t.Fatalf("dial %s with %+v: %v", path, cfg, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// opCtx bounds one call in a test, so a hang fails instead of blocking.
func opCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// requestLog records the requests a server read, through its HeaderRead hook.
type requestLog struct {
	mu   sync.Mutex
	reqs []nbd.Request
	disc chan struct{} // closed at the first NBD_CMD_DISC, when made
}

func (l *requestLog) hook(r nbd.Request) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.reqs = append(l.reqs, r)
	if r.Type == nbd.CmdDisc && l.disc != nil {
		close(l.disc)
		l.disc = nil
	}
}

func (l *requestLog) count(typ uint16) (n int, longest uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, r := range l.reqs {
		if r.Type == typ {
			n++
			longest = max(longest, r.Length)
		}
	}
	return n, longest
}

func (l *requestLog) all() []nbd.Request {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]nbd.Request(nil), l.reqs...)
}

func (l *requestLog) total() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.reqs)
}

// clientModes are the two ways a client talks to a Keel server.
var clientModes = []struct {
	name string
	cfg  nbd.ClientConfig
}{
	{"simple", nbd.ClientConfig{Export: "disk", NoStructured: true, MetaContext: true}},
	{"structured", nbd.ClientConfig{Export: "disk", MetaContext: true}},
}

// result waits for a call started in a goroutine.
func result(t *testing.T, ch <-chan error, what string) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not return within 10s", what)
		return nil
	}
}

func wantErrno(t *testing.T, err error, want nbd.Errno, what string) {
	t.Helper()
	var got nbd.Errno
	if !errors.As(err, &got) || got != want || !errors.Is(err, want) {
		t.Errorf("%s: error %v; want one wrapping %v", what, err, want)
	}
}

func wantConnClosed(t *testing.T, err error, what string) {
	t.Helper()
	if !errors.Is(err, nbd.ErrConnClosed) {
		t.Errorf("%s: error %v; want one wrapping ErrConnClosed", what, err)
	}
}

func pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, (n+7)/8*8)
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	return b[:n]
}

// ---- Configuration ----

func TestClientConfigValidate(t *testing.T) {
	cases := []struct {
		cfg   nbd.ClientConfig
		field string
	}{
		{nbd.ClientConfig{Export: "a\x00b"}, "Export"},
		{nbd.ClientConfig{Export: strings.Repeat("x", 4097)}, "Export"},
		{nbd.ClientConfig{HandshakeTimeout: time.Millisecond}, "HandshakeTimeout"},
		{nbd.ClientConfig{HandshakeTimeout: 2 * time.Hour}, "HandshakeTimeout"},
		{nbd.ClientConfig{CloseTimeout: -1}, "CloseTimeout"},
		{nbd.ClientConfig{MaxInFlight: -1}, "MaxInFlight"},
		{nbd.ClientConfig{MaxInFlight: 4097}, "MaxInFlight"},
	}
	for _, tc := range cases {
		err := tc.cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), "ClientConfig."+tc.field) {
			t.Errorf("Validate(%+v) = %v; want an error naming %s", tc.cfg, err, tc.field)
		}
	}
	if err := (nbd.ClientConfig{}).Validate(); err != nil {
		t.Errorf("the zero config is invalid: %v", err)
	}
	if _, err := nbd.Dial(context.Background(), "udp", "x", nbd.ClientConfig{}); err == nil || !strings.Contains(err.Error(), "udp") {
		t.Errorf("Dial on udp: %v", err)
	}
}

// ---- Handshake ----

func TestClientHandshake(t *testing.T) {
	checkClientLeaks(t)
	ts := startServer(t, func(cfg *nbd.ServerConfig) {
		cfg.Exports = append(cfg.Exports,
			nbd.Export{Name: "small", Backend: nbdtest.NewMem(1 << 20), Rotational: true,
				BlockSize: nbd.BlockSize{Minimum: 4096, Preferred: 8192, Maximum: 64 << 10}},
			nbd.Export{Name: "odd", Backend: nbdtest.NewMem(1000)})
	})
	const base = nbd.TFlagHasFlags | nbd.TFlagSendFlush | nbd.TFlagSendFUA | nbd.TFlagCanMultiConn | nbd.TFlagSendCache
	const rw = base | nbd.TFlagSendTrim | nbd.TFlagSendWriteZeroes | nbd.TFlagSendFastZero
	cases := []struct {
		cfg        nbd.ClientConfig
		structured bool
		meta       bool
		flags      uint16
		size       uint64
		bs         nbd.BlockSize
	}{
		{nbd.ClientConfig{}, true, false, rw | nbd.TFlagSendDF, diskSize, nbd.BlockSize{512, 4096, 1 << 25}},
		{nbd.ClientConfig{Export: "disk", MetaContext: true}, true, true, rw | nbd.TFlagSendDF, diskSize, nbd.BlockSize{512, 4096, 1 << 25}},
		{nbd.ClientConfig{Export: "disk", NoStructured: true}, false, false, rw, diskSize, nbd.BlockSize{512, 4096, 1 << 25}},
		{nbd.ClientConfig{Export: "disk", NoStructured: true, MetaContext: true}, false, false, rw, diskSize, nbd.BlockSize{512, 4096, 1 << 25}},
		{nbd.ClientConfig{Export: "ro", MetaContext: true}, true, true, base | nbd.TFlagReadOnly | nbd.TFlagSendDF, diskSize, nbd.BlockSize{512, 4096, 1 << 25}},
		{nbd.ClientConfig{Export: "small", MetaContext: true}, true, true, rw | nbd.TFlagSendDF | nbd.TFlagRotational, 1 << 20, nbd.BlockSize{4096, 8192, 64 << 10}},
		{nbd.ClientConfig{Export: "odd", NoStructured: true}, false, false, rw, 1000, nbd.BlockSize{1, 4096, 1 << 25}},
	}
	for _, tc := range cases {
		c := dialClient(t, ts.path, tc.cfg)
		if c.Structured() != tc.structured || c.MetaContext() != tc.meta || c.Flags() != tc.flags || c.Size() != tc.size || c.BlockSize() != tc.bs {
			t.Errorf("%+v: structured %v meta %v flags %#x size %d block size %+v; want %v %v %#x %d %+v",
				tc.cfg, c.Structured(), c.MetaContext(), c.Flags(), c.Size(), c.BlockSize(),
				tc.structured, tc.meta, tc.flags, tc.size, tc.bs)
		}
		// The connection works.
		buf := make([]byte, max(512, int(tc.bs.Minimum)))
		if err := c.ReadAt(opCtx(t), buf, 0); err != nil {
			t.Errorf("%+v: read after the handshake: %v", tc.cfg, err)
		}
		if err := c.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	}

	// An unknown export: refused with the server's own words.
	_, err := nbd.Dial(opCtx(t), "unix", ts.path, nbd.ClientConfig{Export: "nope", Logger: clientLogger(t)})
	var oe *nbd.OptionError
	if err == nil || !strings.Contains(err.Error(), `nbd: server refused export "nope"`) ||
		!strings.Contains(err.Error(), `unknown export "nope"`) || !errors.As(err, &oe) || oe.Type != nbd.RepErrUnknown {
		t.Errorf("unknown export: %v", err)
	}
}

func TestClientHandshakeCancel(t *testing.T) {
	checkClientLeaks(t)
	// A "server" that accepts and says nothing.
	path := filepath.Join(t.TempDir(), "mute.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		if c, err := l.Accept(); err == nil {
			accepted <- c
		}
	}()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := nbd.Dial(ctx, "unix", path, nbd.ClientConfig{Logger: clientLogger(t)})
		done <- err
	}()
	var sc net.Conn
	select {
	case sc = <-accepted:
		defer sc.Close()
	case <-time.After(10 * time.Second):
		t.Fatal("the client did not connect")
	}
	cancel()
	if err := result(t, done, "Dial after its context was cancelled"); !errors.Is(err, context.Canceled) {
		t.Errorf("Dial: %v; want context.Canceled", err)
	}
	// The client hung up.
	_ = sc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadAll(sc); err != nil {
		t.Errorf("the client's connection was not closed: %v", err)
	}
}

// ---- Round trips against Keel's server ----

func TestClientRoundTrip(t *testing.T) {
	for _, m := range clientModes {
		t.Run(m.name, func(t *testing.T) {
			checkClientLeaks(t)
			disc := make(chan struct{})
			log := requestLog{disc: disc}
			ts := startServer(t, func(cfg *nbd.ServerConfig) { cfg.Hooks.HeaderRead = log.hook })
			c := dialClient(t, ts.path, m.cfg)
			ctx := opCtx(t)
			data := pattern(1, 64<<10)

			if err := c.WriteAt(ctx, data, 1<<20, false); err != nil {
				t.Fatal(err)
			}
			if err := c.WriteAt(ctx, data[:4096], 2<<20, true); err != nil {
				t.Fatal(err)
			}
			if err := c.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			if n, _ := log.count(nbd.CmdFlush); n != 1 {
				t.Errorf("server saw %d flushes; want 1", n)
			}
			for _, r := range log.all() {
				if r.Type == nbd.CmdWrite && (r.Flags&nbd.CmdFlagFUA != 0) != (r.Offset == 2<<20) {
					t.Errorf("write at %d sent with flags %#x", r.Offset, r.Flags)
				}
			}
			// A read spanning hole, data, hole (sent as hole chunks when
			// structured) is reassembled whole, over a dirty buffer.
			got := bytes.Repeat([]byte{0xee}, 192<<10)
			if err := c.ReadAt(ctx, got, 1<<20-64<<10); err != nil {
				t.Fatal(err)
			}
			want := make([]byte, 192<<10)
			copy(want[64<<10:], data)
			if !bytes.Equal(got, want) {
				t.Fatal("read back differs from what was written")
			}

			if c.MetaContext() {
				ex, err := c.BlockStatus(ctx, 1<<20-8192, 16384+64<<10, false)
				wantEx := []nbd.Extent{{8192, nbd.StateHole | nbd.StateZero}, {64 << 10, 0}, {8192, nbd.StateHole | nbd.StateZero}}
				if err != nil || !equalExtents(ex, wantEx) {
					t.Errorf("block status %+v, %v; want %+v", ex, err, wantEx)
				}
				ex, err = c.BlockStatus(ctx, 1<<20, 64<<10, true)
				if err != nil || !equalExtents(ex, []nbd.Extent{{64 << 10, 0}}) {
					t.Errorf("block status REQ_ONE %+v, %v", ex, err)
				}
			} else {
				before := log.total()
				_, err := c.BlockStatus(ctx, 0, 4096, false)
				wantErrno(t, err, nbd.ENOTSUP, "block status without base:allocation")
				if log.total() != before {
					t.Error("block status without base:allocation was sent")
				}
			}

			// Trim and zero make holes; NO_HOLE keeps the range allocated.
			if err := c.Trim(ctx, 1<<20, 8192, false); err != nil {
				t.Fatal(err)
			}
			if err := c.Zero(ctx, 1<<20+8192, 8192, nbd.ZeroFast); err != nil {
				t.Fatal(err)
			}
			if err := c.Zero(ctx, 1<<20+16384, 8192, nbd.ZeroNoHole|nbd.ZeroFUA); err != nil {
				t.Fatal(err)
			}
			if err := c.Cache(ctx, 0, diskSize); err != nil {
				t.Fatal(err)
			}
			mem := ts.mem.Bytes()[1<<20 : 1<<20+64<<10]
			if !bytes.Equal(mem[:24576], make([]byte, 24576)) || !bytes.Equal(mem[24576:], data[24576:]) {
				t.Error("trim/zero did not zero exactly their ranges")
			}
			if c.MetaContext() {
				ex, err := c.BlockStatus(ctx, 1<<20, 32768, false)
				wantEx := []nbd.Extent{{16384, nbd.StateHole | nbd.StateZero}, {16384, 0}}
				if err != nil || !equalExtents(ex, wantEx) {
					t.Errorf("block status after trim/zero %+v, %v; want %+v", ex, err, wantEx)
				}
			}
			for _, r := range log.all() {
				if r.Type == nbd.CmdWriteZeroes && r.Offset == 1<<20+16384 && r.Flags != nbd.CmdFlagNoHole|nbd.CmdFlagFUA {
					t.Errorf("zero with NoHole|FUA sent flags %#x", r.Flags)
				}
				if r.Type == nbd.CmdWriteZeroes && r.Offset == 1<<20+8192 && r.Flags != nbd.CmdFlagFastZero {
					t.Errorf("fast zero sent flags %#x", r.Flags)
				}
			}

			// Zero-length requests succeed without being sent.
			before := log.total()
			if err := errors.Join(c.ReadAt(ctx, nil, 4096), c.WriteAt(ctx, nil, 4096, true),
				c.Trim(ctx, 4096, 0, false), c.Zero(ctx, 4096, 0, 0), c.Cache(ctx, 4096, 0)); err != nil {
				t.Errorf("zero-length requests: %v", err)
			}
			if log.total() != before {
				t.Error("zero-length requests were sent")
			}
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			waitFor(t, disc, "the server to read NBD_CMD_DISC")
		})
	}
}

// TestClientSplit: reads, writes and zeroes larger than the server's
// maximum go out as several requests, each within it.
func TestClientSplit(t *testing.T) {
	for _, m := range clientModes {
		t.Run(m.name, func(t *testing.T) {
			checkClientLeaks(t)
			var log requestLog
			mem := nbdtest.NewMem(8 << 20)
			ts := startServer(t, func(cfg *nbd.ServerConfig) {
				cfg.Exports = []nbd.Export{{Name: "disk", Backend: mem,
					BlockSize: nbd.BlockSize{Minimum: 512, Preferred: 4096, Maximum: 64 << 10}}}
				cfg.Hooks.HeaderRead = log.hook
			})
			c := dialClient(t, ts.path, nbd.ClientConfig{Export: "disk", NoStructured: m.cfg.NoStructured, MaxInFlight: 8})
			ctx := opCtx(t)
			const off, n = 3 * 4096, 1<<20 + 512
			data := pattern(2, n)
			if err := c.WriteAt(ctx, data, off, false); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, n)
			if err := c.ReadAt(ctx, got, off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) || !bytes.Equal(mem.Bytes()[off:off+n], data) {
				t.Fatal("1 MiB read back differs from what was written")
			}
			if err := c.Zero(ctx, off, 1<<20, 0); err != nil {
				t.Fatal(err)
			}
			if err := c.Trim(ctx, 4<<20, 1<<20, false); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(mem.Bytes()[off:off+1<<20], make([]byte, 1<<20)) {
				t.Fatal("1 MiB zero did not zero")
			}
			for cmd, want := range map[uint16]int{nbd.CmdWrite: 17, nbd.CmdRead: 17, nbd.CmdWriteZeroes: 16} {
				if k, longest := log.count(cmd); k != want || longest != 64<<10 {
					t.Errorf("command %d: %d requests, longest %d; want %d of at most 64 KiB", cmd, k, longest, want)
				}
			}
			// Trims are not bound by the maximum.
			if k, longest := log.count(nbd.CmdTrim); k != 1 || longest != 1<<20 {
				t.Errorf("trim: %d requests, longest %d; want one of 1 MiB", k, longest)
			}
		})
	}
}

// TestClientNoFragment: with NoFragment every read carries
// NBD_CMD_FLAG_DF once structured replies are in use (so the server never
// looks for holes), and never without them (the server would refuse it).
func TestClientNoFragment(t *testing.T) {
	for _, m := range clientModes {
		for _, nofrag := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/nofragment=%v", m.name, nofrag), func(t *testing.T) {
				checkClientLeaks(t)
				var log requestLog
				mem := nbdtest.NewMem(1 << 20)
				ts := startServer(t, func(cfg *nbd.ServerConfig) {
					cfg.Exports = []nbd.Export{{Name: "disk", Backend: mem}}
					cfg.Hooks.HeaderRead = log.hook
				})
				cfg := m.cfg
				cfg.NoFragment = nofrag
				c := dialClient(t, ts.path, cfg)
				ctx := opCtx(t)
				data := pattern(3, 4096)
				if err := c.WriteAt(ctx, data, 64<<10, false); err != nil {
					t.Fatal(err)
				}
				got := make([]byte, 192<<10) // hole, data, hole
				if err := c.ReadAt(ctx, got, 0); err != nil {
					t.Fatal(err)
				}
				want := make([]byte, 192<<10)
				copy(want[64<<10:], data)
				if !bytes.Equal(got, want) {
					t.Fatal("read back differs from what was written")
				}
				wantDF := nofrag && !m.cfg.NoStructured
				for _, r := range log.all() {
					if r.Type == nbd.CmdRead && (r.Flags&nbd.CmdFlagDF != 0) != wantDF {
						t.Errorf("read flags %#x, want DF %v", r.Flags, wantDF)
					}
				}
			})
		}
	}
}

// TestClientAlignment: requests the server would refuse are refused
// client-side, unsent.
func TestClientAlignment(t *testing.T) {
	checkClientLeaks(t)
	var log requestLog
	ts := startServer(t, func(cfg *nbd.ServerConfig) {
		cfg.Exports = []nbd.Export{{Name: "disk", Backend: nbdtest.NewMem(1 << 20),
			BlockSize: nbd.BlockSize{Minimum: 4096, Preferred: 4096, Maximum: 64 << 10}}}
		cfg.Hooks.HeaderRead = log.hook
	})
	c := dialClient(t, ts.path, nbd.ClientConfig{Export: "disk", MetaContext: true})
	ctx := opCtx(t)
	buf := make([]byte, 8192)
	_, bsErr := c.BlockStatus(ctx, 0, 100, false)
	_, bsZero := c.BlockStatus(ctx, 0, 0, false)
	_, bsEnd := c.BlockStatus(ctx, 1<<20, 4096, false)
	cases := []struct {
		name string
		err  error
		want nbd.Errno
	}{
		{"read of 512 bytes", c.ReadAt(ctx, buf[:512], 0), nbd.EINVAL},
		{"read at 512", c.ReadAt(ctx, buf[:4096], 512), nbd.EINVAL},
		{"write at 512", c.WriteAt(ctx, buf[:4096], 512, false), nbd.EINVAL},
		{"write of 100 bytes", c.WriteAt(ctx, buf[:100], 0, false), nbd.EINVAL},
		{"trim of 100 bytes", c.Trim(ctx, 0, 100, false), nbd.EINVAL},
		{"zero at 1", c.Zero(ctx, 1, 4096, 0), nbd.EINVAL},
		{"cache at 2048", c.Cache(ctx, 2048, 4096), nbd.EINVAL},
		{"block status of 100 bytes", bsErr, nbd.EINVAL},
		{"block status of 0 bytes", bsZero, nbd.EINVAL},
		{"read past the end", c.ReadAt(ctx, buf, 1<<20-4096), nbd.EINVAL},
		{"read at an offset overflowing", c.ReadAt(ctx, buf[:4096], 1<<64-4096), nbd.EINVAL},
		{"write past the end", c.WriteAt(ctx, buf, 1<<20-4096, false), nbd.ENOSPC},
		{"zero past the end", c.Zero(ctx, 1<<20, 4096, 0), nbd.ENOSPC},
		{"trim past the end", c.Trim(ctx, 1<<20-4096, 8192, false), nbd.EINVAL},
		{"block status past the end", bsEnd, nbd.EINVAL},
	}
	for _, tc := range cases {
		wantErrno(t, tc.err, tc.want, tc.name)
	}
	if n := log.total(); n != 0 {
		t.Errorf("%d invalid requests were sent to the server", n)
	}
	if err := c.ReadAt(ctx, buf[:4096], 1<<20-4096); err != nil || log.total() != 1 {
		t.Errorf("a valid read: %v (server saw %d requests)", err, log.total())
	}
}

// TestClientConcurrent: many goroutines, each with its own region and a
// model of it, interleave every command; all data is verified.
func TestClientConcurrent(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  nbd.ClientConfig
	}{
		{"structured", nbd.ClientConfig{Export: "disk"}},
		{"simple", nbd.ClientConfig{Export: "disk", NoStructured: true}},
		{"few slots", nbd.ClientConfig{Export: "disk", MaxInFlight: 3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkClientLeaks(t)
			var be *concurrency
			ts := startServer(t, func(cfg *nbd.ServerConfig) {
				be = &concurrency{Mem: cfg.Exports[0].Backend.(*nbdtest.Mem)}
				cfg.Exports[0].Backend = be
			})
			c := dialClient(t, ts.path, tc.cfg)
			const workers, ops, region = 64, 100, 1 << 20
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			models := make([][]byte, workers)
			for w := 0; w < workers; w++ {
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					errs <- worker(c, uint64(w), uint64(w)*region, region, ops, &models[w])
				}(w)
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Error(err)
				}
			}
			all := ts.mem.Bytes()
			for w, m := range models {
				if !bytes.Equal(all[w*region:(w+1)*region], m) {
					t.Errorf("worker %d: the server's data differs from the model", w)
				}
			}
			limit := tc.cfg.MaxInFlight
			if limit == 0 {
				limit = 64
			}
			if peak := int(be.peak.Load()); peak > limit {
				t.Errorf("the backend saw %d requests at once; MaxInFlight is %d", peak, limit)
			}
		})
	}
}

// concurrency tracks how many requests a backend serves at once.
type concurrency struct {
	*nbdtest.Mem
	cur, peak atomic.Int32
}

func (c *concurrency) enter() func() {
	n := c.cur.Add(1)
	for p := c.peak.Load(); n > p && !c.peak.CompareAndSwap(p, n); p = c.peak.Load() {
	}
	return func() { c.cur.Add(-1) }
}

func (c *concurrency) ReadAt(ctx context.Context, p []byte, off uint64) error {
	defer c.enter()()
	return c.Mem.ReadAt(ctx, p, off)
}

func (c *concurrency) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	defer c.enter()()
	return c.Mem.WriteAt(ctx, p, off, fua)
}

func (c *concurrency) Flush(ctx context.Context) error {
	defer c.enter()()
	return c.Mem.Flush(ctx)
}

func (c *concurrency) Trim(ctx context.Context, off, length uint64, fua bool) error {
	defer c.enter()()
	return c.Mem.Trim(ctx, off, length, fua)
}

func (c *concurrency) Zero(ctx context.Context, off, length uint64, f nbd.ZeroFlags) error {
	defer c.enter()()
	return c.Mem.Zero(ctx, off, length, f)
}

func worker(c *nbd.Client, seed, base, size uint64, ops int, model *[]byte) error {
	r := rand.New(rand.NewPCG(seed, 42))
	m := make([]byte, size)
	*model = m
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for i := 0; i < ops; i++ {
		off := r.Uint64N(size/512) * 512
		n := min((1+r.Uint64N(128))*512, size-off)
		var err error
		switch op := r.IntN(10); {
		case op < 4:
			p := pattern(seed<<32|uint64(i), int(n))
			err = c.WriteAt(ctx, p, base+off, op == 0)
			copy(m[off:], p)
		case op < 8:
			p := make([]byte, n)
			if err = c.ReadAt(ctx, p, base+off); err == nil && !bytes.Equal(p, m[off:off+n]) {
				return fmt.Errorf("worker %d op %d: read of %d at %d differs from the model", seed, i, n, off)
			}
		case op == 8:
			err = c.Zero(ctx, base+off, n, nbd.ZeroFlags(r.IntN(2))*nbd.ZeroNoHole)
			clear(m[off : off+n])
		default:
			if r.IntN(2) == 0 {
				err = c.Flush(ctx)
			} else {
				// Keel's backends read trimmed ranges as zeroes.
				err = c.Trim(ctx, base+off, n, false)
				clear(m[off : off+n])
			}
		}
		if err != nil {
			return fmt.Errorf("worker %d op %d: %w", seed, i, err)
		}
	}
	return nil
}

// ---- Errors ----

// failing fails reads at one offset with EIO.
type failing struct {
	*nbdtest.Mem
	at uint64
}

func (f failing) ReadAt(ctx context.Context, p []byte, off uint64) error {
	if off == f.at {
		return fmt.Errorf("disk on fire at %d: %w", off, syscall.EIO)
	}
	return f.Mem.ReadAt(ctx, p, off)
}

func TestClientServerErrors(t *testing.T) {
	for _, m := range clientModes {
		t.Run(m.name, func(t *testing.T) {
			checkClientLeaks(t)
			ts := startServer(t, func(cfg *nbd.ServerConfig) {
				cfg.Exports = append(cfg.Exports,
					nbd.Export{Name: "slow-zero", Backend: notFast{nbdtest.NewMem(1 << 20)}},
					nbd.Export{Name: "failing", Backend: failing{nbdtest.NewMem(1 << 20), 4096}})
			})
			cfg := m.cfg
			cfg.Export = "ro"
			ro := dialClient(t, ts.path, cfg)
			cfg.Export = "slow-zero"
			slow := dialClient(t, ts.path, cfg)
			cfg.Export = "failing"
			bad := dialClient(t, ts.path, cfg)
			ctx := opCtx(t)

			err := ro.WriteAt(ctx, make([]byte, 4096), 0, false)
			wantErrno(t, err, nbd.EPERM, "write to a read-only export")
			var se *nbd.ServerError
			if !errors.As(err, &se) || se.Command != nbd.CmdWrite || se.Length != 4096 || (ro.Structured() && se.Message == "") {
				t.Errorf("write to a read-only export: %#v", se)
			}
			wantErrno(t, ro.Trim(ctx, 0, 4096, false), nbd.EPERM, "trim of a read-only export")
			wantErrno(t, ro.Zero(ctx, 0, 4096, 0), nbd.EPERM, "zero of a read-only export")
			wantErrno(t, slow.Zero(ctx, 0, 4096, nbd.ZeroFast), nbd.ENOTSUP, "fast zero that cannot be fast")
			if err := slow.Zero(ctx, 0, 4096, 0); err != nil {
				t.Errorf("slow zero: %v", err)
			}

			buf := bytes.Repeat([]byte{0xee}, 8192)
			err = bad.ReadAt(ctx, buf[:4096], 4096)
			wantErrno(t, err, nbd.EIO, "read the backend fails")
			if bad.Structured() && !strings.Contains(err.Error(), "disk on fire") {
				t.Errorf("read error %q lacks the server's message", err)
			}
			// The connections stay usable.
			for _, c := range []*nbd.Client{ro, slow, bad} {
				if err := c.ReadAt(ctx, buf, 8192); err != nil {
					t.Errorf("read after an error: %v", err)
				}
			}
		})
	}
}

// ---- Cancellation ----

func TestClientCancel(t *testing.T) {
	for _, m := range clientModes {
		t.Run(m.name, func(t *testing.T) {
			checkClientLeaks(t)
			g := newGate(1 << 20)
			var log requestLog
			ts := startServer(t, func(cfg *nbd.ServerConfig) {
				cfg.Exports[0].Backend = g
				cfg.Hooks.HeaderRead = log.hook
			})
			released := false
			release := func() {
				if !released {
					released = true
					close(g.release)
				}
			}
			t.Cleanup(release)
			data := bytes.Repeat([]byte{0x5a}, 8192)
			if err := g.Mem.WriteAt(context.Background(), data, 1<<20, false); err != nil {
				t.Fatal(err)
			}
			cfg := m.cfg
			cfg.MaxInFlight = 1
			c := dialClient(t, ts.path, cfg)

			// A read blocked in the server, cancelled.
			ctx, cancel := context.WithCancel(context.Background())
			victim := bytes.Repeat([]byte{0xee}, 8192)
			done := make(chan error, 1)
			go func() { done <- c.ReadAt(ctx, victim, 1<<20) }()
			waitFor(t, g.arrived, "the read to reach the backend")

			// With the only slot taken, another call waits; its context
			// ending frees it, unsent.
			ctx2, cancel2 := context.WithCancel(context.Background())
			done2 := make(chan error, 1)
			go func() { done2 <- c.ReadAt(ctx2, make([]byte, 4096), 0) }()
			cancel2()
			if err := result(t, done2, "a read waiting for a slot"); !errors.Is(err, context.Canceled) {
				t.Errorf("read waiting for a slot: %v; want context.Canceled", err)
			}

			cancel()
			if err := result(t, done, "the cancelled read"); !errors.Is(err, context.Canceled) {
				t.Errorf("cancelled read: %v; want context.Canceled", err)
			}
			release()
			// The abandoned reply is read and dropped; the connection
			// carries on.
			got := make([]byte, 8192)
			if err := c.ReadAt(opCtx(t), got, 1<<20); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("read after a cancelled one: %v", err)
			}
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			// Close waited for the abandoned reply; the caller's buffer
			// was not touched after the call returned.
			if !bytes.Equal(victim, bytes.Repeat([]byte{0xee}, 8192)) {
				t.Error("the reader wrote into the buffer of a call that had returned")
			}
			if n, _ := log.count(nbd.CmdRead); n != 2 {
				t.Errorf("server saw %d reads; want 2 (the one cancelled waiting for a slot is not sent)", n)
			}
		})
	}
}

// TestClientCancelWhileSending: a write stuck half-sent (the server stopped
// reading) returns when its context ends; the stream is then out of step,
// so the connection is closed. A call waiting for its turn to send just
// returns.
func TestClientCancelWhileSending(t *testing.T) {
	checkClientLeaks(t)
	started := make(chan struct{})
	f := &fakeServer{size: 64 << 20, script: func(fc *fakeConn) {
		// Read the first request's header and a byte of its payload,
		// then stop reading.
		b := make([]byte, nbd.RequestSize+1)
		if _, err := io.ReadFull(fc.br, b); err != nil {
			return
		}
		close(started)
		fc.drain() // only after the client hung up does this read on
	}}
	c := dialClient(t, f.start(t), nbd.ClientConfig{})
	ctx1, cancel1 := context.WithCancel(context.Background())
	big := make([]byte, 32<<20)
	first := make(chan error, 1)
	go func() { first <- c.WriteAt(ctx1, big, 0, false) }()
	waitFor(t, started, "the write to start going out")

	ctx2, cancel2 := context.WithCancel(context.Background())
	second := make(chan error, 1)
	go func() { second <- c.WriteAt(ctx2, make([]byte, 4096), 0, false) }()
	cancel2()
	if err := result(t, second, "a write waiting to be sent"); !errors.Is(err, context.Canceled) {
		t.Errorf("write waiting to be sent: %v; want context.Canceled", err)
	}
	cancel1()
	if err := result(t, first, "the write stuck half-sent"); !errors.Is(err, context.Canceled) && !errors.Is(err, nbd.ErrConnClosed) {
		t.Errorf("write stuck half-sent: %v; want context.Canceled", err)
	}
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the connection with a half-sent request was not closed")
	}
	if err := c.Err(); !errors.Is(err, nbd.ErrConnClosed) || !strings.Contains(err.Error(), "cut short") {
		t.Errorf("Err: %v", err)
	}
}

// TestClientCoalescesRequests: requests issued while another is being
// written go out together in one write once the socket takes data again,
// and every one is answered.
func TestClientCoalescesRequests(t *testing.T) {
	checkClientLeaks(t)
	const reads = 16
	started, resume := make(chan struct{}), make(chan struct{})
	f := &fakeServer{size: 64 << 20, script: func(fc *fakeConn) {
		// Stall the first request (a 32 MiB write) after a byte of its
		// payload until the reads have piled up behind it.
		b := make([]byte, nbd.RequestSize+1)
		if _, err := io.ReadFull(fc.br, b); err != nil {
			return
		}
		close(started)
		<-resume
		w, err := nbd.ParseRequest(b[:nbd.RequestSize], false)
		if err != nil {
			t.Errorf("fake server: %v", err)
			return
		}
		if _, err := io.CopyN(io.Discard, fc.br, int64(w.Length)-1); err != nil {
			return
		}
		fc.send(nbd.AppendSimpleReply(nil, 0, w.Cookie))
		for range reads {
			r, ok := fc.request()
			if !ok {
				return
			}
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeOffsetData, r.Cookie, append(fakeU64(r.Offset), make([]byte, r.Length)...)))
		}
		fc.drain()
	}}
	c := dialClient(t, f.start(t), nbd.ClientConfig{})
	write := make(chan error, 1)
	go func() { write <- c.WriteAt(opCtx(t), make([]byte, 32<<20), 0, false) }()
	waitFor(t, started, "the write to start going out")

	var wg sync.WaitGroup
	errs := make(chan error, reads)
	for i := range reads {
		wg.Go(func() { errs <- c.ReadAt(opCtx(t), make([]byte, 4096), uint64(i)*4096) })
	}
	for deadline := time.Now().Add(10 * time.Second); c.Stats().Waiting < reads; {
		if time.Now().After(deadline) {
			t.Fatalf("%d reads waiting to be written, want %d", c.Stats().Waiting, reads)
		}
		time.Sleep(time.Millisecond)
	}
	close(resume)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("read: %v", err)
		}
	}
	if err := result(t, write, "the stalled write"); err != nil {
		t.Errorf("write: %v", err)
	}
	st := c.Stats()
	if st.Requests != reads+1 || st.Batches != 2 || st.Waiting != 0 {
		t.Errorf("stats %+v: want %d requests in 2 writes (the write, then every read together), none waiting", st, reads+1)
	}
}

// ---- Connection death ----

// servePair connects a client socket to srv through a unix socket and
// returns the server's side, so a test can cut the connection.
func servePair(t *testing.T, srv *nbd.Server) (path string, serverSide <-chan net.Conn) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "pair.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ch := make(chan net.Conn, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		sc, err := l.Accept()
		l.Close()
		if err != nil {
			return
		}
		ch <- sc
		_ = srv.ServeConn(context.Background(), sc)
	}()
	t.Cleanup(func() { l.Close(); wg.Wait() })
	return path, ch
}

func TestClientConnDeath(t *testing.T) {
	for _, m := range clientModes {
		t.Run(m.name, func(t *testing.T) {
			checkClientLeaks(t)
			g := newGate(1 << 20)
			srv, err := nbd.NewServer(nbd.ServerConfig{
				Exports: []nbd.Export{{Name: "disk", Backend: g}},
				Logger:  hclog.New(&hclog.LoggerOptions{Name: "server", Output: tWriter{t}, Level: hclog.Debug}),
			})
			if err != nil {
				t.Fatal(err)
			}
			path, scs := servePair(t, srv)
			t.Cleanup(func() { close(g.release) }) // before the server is waited for
			c := dialClient(t, path, m.cfg)
			sc := <-scs

			// One read blocked in the server, many more in flight.
			ctx := opCtx(t)
			blocked := make(chan error, 1)
			go func() { blocked <- c.ReadAt(ctx, make([]byte, 4096), 1<<20) }()
			waitFor(t, g.arrived, "the read to reach the backend")
			var wg sync.WaitGroup
			busy := make(chan error, 16)
			for i := 0; i < 16; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := make([]byte, 4096)
					for {
						if err := c.ReadAt(ctx, buf, 0); err != nil {
							busy <- err
							return
						}
					}
				}()
			}

			sc.Close() // the server's side goes away
			wantConnClosed(t, result(t, blocked, "the blocked read"), "blocked read")
			wg.Wait()
			close(busy)
			for err := range busy {
				wantConnClosed(t, err, "busy reader")
			}
			select {
			case <-c.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("Done was not closed")
			}
			wantConnClosed(t, c.Err(), "Err")
			if !errors.Is(c.Err(), io.EOF) && !errors.Is(c.Err(), syscall.ECONNRESET) && !errors.Is(c.Err(), syscall.EPIPE) {
				t.Errorf("Err %v does not say the server hung up", c.Err())
			}
			// Later calls fail at once.
			wantConnClosed(t, c.WriteAt(ctx, make([]byte, 512), 0, false), "write after death")
			wantConnClosed(t, c.Flush(ctx), "flush after death")
			if err := c.Close(); err != nil {
				t.Errorf("Close after death: %v", err)
			}
		})
	}
}

func TestClientClose(t *testing.T) {
	checkClientLeaks(t)
	g := newGate(1 << 20)
	disc := make(chan struct{})
	log := requestLog{disc: disc}
	ts := startServer(t, func(cfg *nbd.ServerConfig) {
		cfg.Exports[0].Backend = g
		cfg.Hooks.HeaderRead = log.hook
	})
	released := make(chan struct{})
	t.Cleanup(func() {
		select {
		case <-released:
		default:
			close(g.release)
		}
	})

	// Close waits for a request in flight.
	c := dialClient(t, ts.path, nbd.ClientConfig{Export: "disk"})
	read := make(chan error, 1)
	go func() { read <- c.ReadAt(context.Background(), make([]byte, 4096), 1<<20) }()
	waitFor(t, g.arrived, "the read to reach the backend")
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	close(g.release)
	close(released)
	if err := result(t, read, "the read in flight at Close"); err != nil {
		t.Errorf("read in flight at Close: %v; want it answered", err)
	}
	if err := result(t, closed, "Close"); err != nil {
		t.Errorf("Close: %v", err)
	}
	wantConnClosed(t, c.ReadAt(context.Background(), make([]byte, 512), 0), "read after Close")
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	waitFor(t, disc, "the server to read NBD_CMD_DISC")
}

func TestClientCloseTimeout(t *testing.T) {
	checkClientLeaks(t)
	g := newGate(1 << 20)
	ts := startServer(t, func(cfg *nbd.ServerConfig) { cfg.Exports[0].Backend = g })
	t.Cleanup(func() { close(g.release) })
	c := dialClient(t, ts.path, nbd.ClientConfig{Export: "disk", CloseTimeout: 50 * time.Millisecond})
	read := make(chan error, 1)
	go func() { read <- c.ReadAt(context.Background(), make([]byte, 4096), 1<<20) }()
	waitFor(t, g.arrived, "the read to reach the backend")
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	if err := result(t, closed, "Close with a request stuck in the server"); err != nil {
		t.Errorf("Close: %v", err)
	}
	wantConnClosed(t, result(t, read, "the stuck read"), "read stuck at Close")
}

// ---- A hostile server ----

// fakeServer is a scripted NBD server: a correct handshake, then whatever
// its script sends.
type fakeServer struct {
	greeting  uint16            // handshake flags; default fixed newstyle + no zeroes
	refuse    map[uint32]uint32 // option -> error reply type
	blockSize *nbd.BlockSize    // sent in NBD_INFO_BLOCK_SIZE when set
	flags     uint16            // transmission flags; default a read-write export
	size      uint64            // default 1 MiB
	// script runs the transmission phase.
	script func(f *fakeConn)
	// clientFlags and options are what the client sent.
	clientFlags uint32
	options     []uint32
}

// fakeConn is the server's side of one scripted connection.
type fakeConn struct {
	t          *testing.T
	nc         net.Conn
	br         *bufio.Reader
	structured bool
	metaID     uint32
}

// start runs f on a unix socket for one connection and returns its path.
func (f *fakeServer) start(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "fake.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	conns := make(chan net.Conn, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		nc, err := l.Accept()
		if err != nil {
			return
		}
		conns <- nc
		defer nc.Close()
		_ = nc.SetDeadline(time.Now().Add(60 * time.Second))
		fc := &fakeConn{t: t, nc: nc, br: bufio.NewReader(nc)}
		if f.handshake(fc) && f.script != nil {
			f.script(fc)
		}
	}()
	t.Cleanup(func() {
		l.Close()
		select {
		case nc := <-conns:
			nc.Close()
		default:
		}
		wg.Wait()
	})
	return path
}

func (f *fakeServer) handshake(fc *fakeConn) bool {
	g := f.greeting
	if g == 0 {
		g = nbd.FlagFixedNewstyle | nbd.FlagNoZeroes
	}
	size, flags := f.size, f.flags
	if size == 0 {
		size = 1 << 20
	}
	if flags == 0 {
		flags = nbd.TFlagHasFlags | nbd.TFlagSendFlush | nbd.TFlagSendFUA | nbd.TFlagSendTrim | nbd.TFlagSendWriteZeroes
	}
	fc.nc.Write(nbd.AppendServerGreeting(nil, g))
	var cf [4]byte
	if _, err := io.ReadFull(fc.br, cf[:]); err != nil {
		return false
	}
	f.clientFlags = binary.BigEndian.Uint32(cf[:])
	for {
		var h [16]byte
		if _, err := io.ReadFull(fc.br, h[:]); err != nil {
			return false
		}
		opt := binary.BigEndian.Uint32(h[8:])
		data := make([]byte, binary.BigEndian.Uint32(h[12:]))
		if _, err := io.ReadFull(fc.br, data); err != nil {
			return false
		}
		f.options = append(f.options, opt)
		reply := func(typ uint32, data []byte) { fc.nc.Write(nbd.AppendOptionReply(nil, opt, typ, data)) }
		if typ, ok := f.refuse[opt]; ok && opt != nbd.OptExportName {
			reply(typ, []byte("refused by the test"))
			continue
		}
		switch opt {
		case nbd.OptStructuredReply:
			fc.structured = true
			reply(nbd.RepAck, nil)
		case nbd.OptSetMetaContext:
			fc.metaID = 7
			reply(nbd.RepMetaContext, nbd.AppendRepMetaContext(nil, fc.metaID, nbd.MetaContextBaseAllocation))
			reply(nbd.RepAck, nil)
		case nbd.OptGo:
			reply(nbd.RepInfo, nbd.AppendInfoExport(nil, size, flags))
			if f.blockSize != nil {
				reply(nbd.RepInfo, nbd.AppendInfoBlockSize(nil, *f.blockSize))
			}
			reply(nbd.RepAck, nil)
			return true
		case nbd.OptExportName:
			if _, ok := f.refuse[opt]; ok {
				return false
			}
			fc.nc.Write(nbd.AppendExportNameReply(nil, size, flags, f.clientFlags&nbd.ClientNoZeroes != 0))
			return true
		case nbd.OptAbort:
			reply(nbd.RepAck, nil)
			return false
		default:
			reply(nbd.RepErrUnsup, nil)
		}
	}
}

// request reads one request (and a write's payload).
func (fc *fakeConn) request() (nbd.Request, bool) {
	var h [nbd.RequestSize]byte
	if _, err := io.ReadFull(fc.br, h[:]); err != nil {
		return nbd.Request{}, false
	}
	r, err := nbd.ParseRequest(h[:], false)
	if err != nil {
		fc.t.Errorf("fake server: %v", err)
		return r, false
	}
	if r.Type == nbd.CmdWrite {
		if _, err := io.CopyN(io.Discard, fc.br, int64(r.Length)); err != nil {
			return r, false
		}
	}
	return r, true
}

func (fc *fakeConn) send(parts ...[]byte) { fc.nc.Write(bytes.Join(parts, nil)) }

func fakeChunk(flags, typ uint16, cookie uint64, payload []byte) []byte {
	return append(nbd.AppendChunkHeader(nil, false, flags, typ, cookie, 0, uint64(len(payload))), payload...)
}

func fakeU64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// drain waits for the client to hang up.
func (fc *fakeConn) drain() { _, _ = io.Copy(io.Discard, fc.br) }

func TestClientFallbacks(t *testing.T) {
	checkClientLeaks(t)
	readReply := func(fc *fakeConn) {
		r, ok := fc.request()
		if !ok {
			return
		}
		fc.send(nbd.AppendSimpleReply(nil, 0, r.Cookie), bytes.Repeat([]byte{0x42}, int(r.Length)))
		fc.drain()
	}
	cases := []struct {
		name       string
		f          *fakeServer
		structured bool
		options    []uint32
		clientFl   uint32
	}{
		{"no structured replies, no GO", &fakeServer{
			refuse: map[uint32]uint32{nbd.OptStructuredReply: nbd.RepErrUnsup, nbd.OptGo: nbd.RepErrUnsup},
		}, false, []uint32{nbd.OptStructuredReply, nbd.OptGo, nbd.OptExportName}, 3},
		// Meta context refused: BlockStatus just fails.
		{"no base:allocation", &fakeServer{
			refuse: map[uint32]uint32{nbd.OptSetMetaContext: nbd.RepErrPolicy},
		}, true, []uint32{nbd.OptStructuredReply, nbd.OptSetMetaContext, nbd.OptGo}, 3},
		// Zeroes after EXPORT_NAME when the server cannot skip them.
		{"no NO_ZEROES", &fakeServer{
			greeting: nbd.FlagFixedNewstyle,
			refuse:   map[uint32]uint32{nbd.OptGo: nbd.RepErrUnsup, nbd.OptStructuredReply: nbd.RepErrInvalid},
		}, false, []uint32{nbd.OptStructuredReply, nbd.OptGo, nbd.OptExportName}, 1},
		// Plain (not fixed) newstyle: EXPORT_NAME only.
		{"plain newstyle", &fakeServer{greeting: nbd.FlagNoZeroes}, false, []uint32{nbd.OptExportName}, 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.f.script == nil {
				tc.f.script = readReply
			}
			if tc.structured {
				tc.f.script = func(fc *fakeConn) {
					r, ok := fc.request()
					if !ok {
						return
					}
					fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeOffsetData, r.Cookie, append(fakeU64(r.Offset), bytes.Repeat([]byte{0x42}, int(r.Length))...)))
					fc.drain()
				}
			}
			path := tc.f.start(t)
			c := dialClient(t, path, nbd.ClientConfig{MetaContext: true})
			if c.Structured() != tc.structured || c.MetaContext() || c.Size() != 1<<20 || c.BlockSize() != (nbd.BlockSize{1, 4096, 1 << 25}) {
				t.Errorf("structured %v meta %v size %d block size %+v", c.Structured(), c.MetaContext(), c.Size(), c.BlockSize())
			}
			if fmt.Sprint(tc.f.options) != fmt.Sprint(tc.options) || tc.f.clientFlags != tc.clientFl {
				t.Errorf("client sent options %v with flags %d; want %v with %d", tc.f.options, tc.f.clientFlags, tc.options, tc.clientFl)
			}
			buf := make([]byte, 1000)
			if err := c.ReadAt(opCtx(t), buf, 3); err != nil || !bytes.Equal(buf, bytes.Repeat([]byte{0x42}, 1000)) {
				t.Errorf("read: %v", err)
			}
			_, err := c.BlockStatus(opCtx(t), 0, 4096, false)
			wantErrno(t, err, nbd.ENOTSUP, "block status")
		})
	}

	// A refused EXPORT_NAME can only be a hang-up.
	f := &fakeServer{refuse: map[uint32]uint32{nbd.OptGo: nbd.RepErrUnsup, nbd.OptExportName: 0}}
	_, err := nbd.Dial(opCtx(t), "unix", f.start(t), nbd.ClientConfig{Export: "x", Logger: clientLogger(t)})
	if err == nil || !strings.Contains(err.Error(), `nbd: server refused export "x"`) {
		t.Errorf("EXPORT_NAME refused: %v", err)
	}
	// TLS required: a clear error, and a soft disconnect.
	f = &fakeServer{refuse: map[uint32]uint32{nbd.OptStructuredReply: nbd.RepErrTLSReqd}}
	_, err = nbd.Dial(opCtx(t), "unix", f.start(t), nbd.ClientConfig{Logger: clientLogger(t)})
	if err == nil || !strings.Contains(err.Error(), "requires TLS") {
		t.Errorf("TLS required: %v", err)
	}
	// Invalid block sizes.
	f = &fakeServer{blockSize: &nbd.BlockSize{Minimum: 3, Preferred: 4096, Maximum: 1 << 20}}
	_, err = nbd.Dial(opCtx(t), "unix", f.start(t), nbd.ClientConfig{Logger: clientLogger(t)})
	var pe *nbd.ProtocolError
	if !errors.As(err, &pe) || !strings.Contains(err.Error(), "minimum block size 3") {
		t.Errorf("minimum block size 3: %v", err)
	}
}

// TestClientServerErrorChunks: error replies of every shape from a
// structured server.
func TestClientServerErrorChunks(t *testing.T) {
	checkClientLeaks(t)
	f := &fakeServer{script: func(fc *fakeConn) {
		for {
			r, ok := fc.request()
			if !ok || r.Type == nbd.CmdDisc {
				return
			}
			if r.Type == nbd.CmdFlush { // an error value the protocol does not define
				fc.send(nbd.AppendSimpleReply(nil, 30, r.Cookie))
				continue
			}
			switch r.Offset {
			case 0: // an error chunk with a message
				fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeError, r.Cookie, nbd.AppendErrorChunk(nil, nbd.EPERM, "go away")))
			case 4096: // data, then an error at an offset
				fc.send(fakeChunk(0, nbd.ReplyTypeOffsetData, r.Cookie, append(fakeU64(r.Offset), make([]byte, 512)...)),
					fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeErrorOffset, r.Cookie, append(nbd.AppendErrorChunk(nil, nbd.EIO, "bad sector"), fakeU64(r.Offset+512)...)))
			default: // hole then data, out of order
				fc.send(fakeChunk(0, nbd.ReplyTypeOffsetData, r.Cookie, append(fakeU64(r.Offset+512), bytes.Repeat([]byte{1}, int(r.Length-512))...)),
					fakeChunk(0, nbd.ReplyTypeOffsetHole, r.Cookie, binary.BigEndian.AppendUint32(fakeU64(r.Offset), 512)),
					fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeNone, r.Cookie, nil))
			}
		}
	}}
	c := dialClient(t, f.start(t), nbd.ClientConfig{})
	ctx := opCtx(t)
	buf := bytes.Repeat([]byte{0xee}, 1024)
	err := c.ReadAt(ctx, buf, 0)
	wantErrno(t, err, nbd.EPERM, "error chunk")
	if err == nil || !strings.Contains(err.Error(), "go away") {
		t.Errorf("error chunk message lost: %v", err)
	}
	err = c.ReadAt(ctx, buf, 4096)
	wantErrno(t, err, nbd.EIO, "error offset chunk")
	if err == nil || !strings.Contains(err.Error(), "bad sector") || !strings.Contains(err.Error(), "4608") {
		t.Errorf("error offset chunk: %v", err)
	}
	err = c.Flush(ctx)
	wantErrno(t, err, nbd.EINVAL, "error value 30")
	if err == nil || !strings.Contains(err.Error(), "30") {
		t.Errorf("error value 30: %v", err)
	}
	if err := c.ReadAt(ctx, buf, 65536); err != nil || !bytes.Equal(buf[:512], make([]byte, 512)) || !bytes.Equal(buf[512:], bytes.Repeat([]byte{1}, 512)) {
		t.Errorf("hole and data out of order: %v", err)
	}
}

// TestClientShutdownReply: ESHUTDOWN makes the client stop sending, let
// what is in flight finish, and disconnect softly.
func TestClientShutdownReply(t *testing.T) {
	checkClientLeaks(t)
	sawDisc := make(chan struct{})
	f := &fakeServer{script: func(fc *fakeConn) {
		r1, ok1 := fc.request()
		r2, ok2 := fc.request()
		if !ok1 || !ok2 {
			return
		}
		fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeError, r1.Cookie, nbd.AppendErrorChunk(nil, nbd.ESHUTDOWN, "stopping")))
		fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeNone, r2.Cookie, nil))
		if r, ok := fc.request(); ok && r.Type == nbd.CmdDisc {
			close(sawDisc)
		}
	}}
	c := dialClient(t, f.start(t), nbd.ClientConfig{})
	ctx := opCtx(t)
	errs := make(chan error, 2)
	go func() { errs <- c.Flush(ctx) }()
	go func() { errs <- c.Flush(ctx) }()
	e1, e2 := result(t, errs, "first flush"), result(t, errs, "second flush")
	if e1 != nil {
		e1, e2 = e2, e1
	}
	if e1 != nil || !errors.Is(e2, nbd.ESHUTDOWN) || !errors.Is(e2, nbd.ErrConnClosed) {
		t.Errorf("flushes: %v, %v; want one success and one ESHUTDOWN", e1, e2)
	}
	waitFor(t, sawDisc, "NBD_CMD_DISC after ESHUTDOWN")
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("Done not closed after ESHUTDOWN")
	}
	wantConnClosed(t, c.Flush(ctx), "flush after ESHUTDOWN")
}

// TestClientHostileServer: every protocol violation kills the connection
// with a clear error; nothing panics or hangs.
func TestClientHostileServer(t *testing.T) {
	type script func(fc *fakeConn, r nbd.Request)
	cases := []struct {
		name       string
		structured bool
		op         string // "read" (4096 bytes at 0), "status"
		script     script
		protocol   bool // the error must be a *ProtocolError
		callOK     bool // the call itself succeeds before the violation
	}{
		{"garbage", false, "read", func(fc *fakeConn, r nbd.Request) { fc.send(bytes.Repeat([]byte{0xff}, 64)) }, true, false},
		{"unknown cookie", false, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(nbd.AppendSimpleReply(nil, 0, r.Cookie+1000))
		}, true, false},
		{"hang-up in the data", false, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(nbd.AppendSimpleReply(nil, 0, r.Cookie), make([]byte, 100))
		}, false, false},
		{"hang-up in a header", true, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeNone, r.Cookie, nil)[:10])
		}, false, false},
		{"structured chunk not negotiated", false, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeNone, r.Cookie, nil))
		}, true, false},
		{"extended header not negotiated", true, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(nbd.AppendChunkHeader(nil, true, nbd.ReplyFlagDone, nbd.ReplyTypeNone, r.Cookie, 0, 0))
		}, true, false},
		{"oversize chunk", true, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(nbd.AppendChunkHeader(nil, false, nbd.ReplyFlagDone, nbd.ReplyTypeOffsetData, r.Cookie, 0, 1<<31))
		}, true, false},
		{"chunk outside the read", true, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeOffsetData, r.Cookie, append(fakeU64(r.Offset+8192), make([]byte, 4096)...)))
		}, true, false},
		{"chunk running past the read", true, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeOffsetData, r.Cookie, append(fakeU64(r.Offset+512), make([]byte, 4096)...)))
		}, true, false},
		{"chunk before the read", true, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeOffsetHole, r.Cookie, binary.BigEndian.AppendUint32(fakeU64(1<<64-512), 4096)))
		}, true, false},
		{"overlapping chunks", true, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(0, nbd.ReplyTypeOffsetData, r.Cookie, append(fakeU64(r.Offset), make([]byte, 2048)...)),
				fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeOffsetHole, r.Cookie, binary.BigEndian.AppendUint32(fakeU64(r.Offset+1024), 3072)))
		}, true, false},
		{"read not covered", true, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeOffsetData, r.Cookie, append(fakeU64(r.Offset), make([]byte, 2048)...)))
		}, true, false},
		{"simple reply with data when structured", true, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(nbd.AppendSimpleReply(nil, 0, r.Cookie), make([]byte, 4096))
		}, true, false},
		{"empty data chunk", true, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeOffsetData, r.Cookie, fakeU64(r.Offset)))
		}, true, false},
		{"empty hole", true, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeOffsetHole, r.Cookie, binary.BigEndian.AppendUint32(fakeU64(r.Offset), 0)))
		}, true, false},
		{"NONE without DONE", true, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(0, nbd.ReplyTypeNone, r.Cookie, nil))
		}, true, false},
		{"unknown chunk type", true, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, 77, r.Cookie, []byte("hello")))
		}, true, false},
		{"error value 0", true, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeError, r.Cookie, nbd.AppendErrorChunk(nil, 0, "fine")))
		}, true, false},
		{"error message longer than its chunk", true, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeError, r.Cookie, []byte{0, 0, 0, 5, 0xff, 0xff, 'x'}))
		}, true, false},
		{"second reply to one cookie", true, "read", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeOffsetHole, r.Cookie, binary.BigEndian.AppendUint32(fakeU64(r.Offset), 4096)),
				fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeNone, r.Cookie, nil))
		}, true, true},
		{"data chunk for a block status", true, "status", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeOffsetData, r.Cookie, append(fakeU64(r.Offset), 1)))
		}, true, false},
		{"block status for another context", true, "status", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeBlockStatus, r.Cookie, nbd.AppendBlockStatus(nil, fc.metaID+1, []nbd.Extent{{4096, 0}})))
		}, true, false},
		{"block status with an empty extent", true, "status", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeBlockStatus, r.Cookie, nbd.AppendBlockStatus(nil, fc.metaID, []nbd.Extent{{0, 0}})))
		}, true, false},
		{"block status without status", true, "status", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeNone, r.Cookie, nil))
		}, true, false},
		{"block status chunk of odd length", true, "status", func(fc *fakeConn, r nbd.Request) {
			fc.send(fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeBlockStatus, r.Cookie, make([]byte, 13)))
		}, true, false},
		{"block status chunk too long", true, "status", func(fc *fakeConn, r nbd.Request) {
			fc.send(nbd.AppendChunkHeader(nil, false, nbd.ReplyFlagDone, nbd.ReplyTypeBlockStatus, r.Cookie, 0, 1<<30))
		}, true, false},
		{"simple reply to a block status", true, "status", func(fc *fakeConn, r nbd.Request) {
			fc.send(nbd.AppendSimpleReply(nil, 0, r.Cookie))
		}, true, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			checkClientLeaks(t)
			f := &fakeServer{
				flags: nbd.TFlagHasFlags | nbd.TFlagSendFlush,
				script: func(fc *fakeConn) {
					r, ok := fc.request()
					if !ok {
						return
					}
					tc.script(fc, r)
				},
			}
			if !tc.structured {
				f.refuse = map[uint32]uint32{nbd.OptStructuredReply: nbd.RepErrUnsup}
			}
			c := dialClient(t, f.start(t), nbd.ClientConfig{MetaContext: true})
			if c.Structured() != tc.structured {
				t.Fatalf("structured %v", c.Structured())
			}
			done := make(chan error, 1)
			buf := make([]byte, 4096)
			go func() {
				if tc.op == "status" {
					_, err := c.BlockStatus(context.Background(), 0, 4096, false)
					done <- err
					return
				}
				done <- c.ReadAt(context.Background(), buf, 0)
			}()
			err := result(t, done, "the call")
			var pe *nbd.ProtocolError
			switch {
			case tc.callOK:
				if err != nil {
					t.Errorf("the call: %v", err)
				}
			case !errors.Is(err, nbd.ErrConnClosed):
				t.Errorf("the call: error %v; want one wrapping ErrConnClosed", err)
			case tc.protocol && !errors.As(err, &pe):
				t.Errorf("error %v is not a *ProtocolError", err)
			}
			select {
			case <-c.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("Done was not closed")
			}
			if !errors.Is(c.Err(), nbd.ErrConnClosed) || (tc.protocol && !errors.As(c.Err(), &pe)) {
				t.Errorf("Err: %v", c.Err())
			}
			wantConnClosed(t, c.Flush(context.Background()), "flush after the violation")
			t.Logf("error: %v", err)
		})
	}
}

// TestClientRandomReplies throws random bytes (after a plausible header)
// at the client: whatever it makes of them, it must not panic or hang.
func TestClientRandomReplies(t *testing.T) {
	checkClientLeaks(t)
	for seed := uint64(0); seed < 64; seed++ {
		r := rand.New(rand.NewPCG(seed, 7))
		f := &fakeServer{
			refuse: map[uint32]uint32{},
			script: func(fc *fakeConn) {
				req, ok := fc.request()
				if !ok {
					return
				}
				var b []byte
				switch r.IntN(3) {
				case 0:
					b = nbd.AppendSimpleReply(nil, 0, req.Cookie)
				case 1:
					b = nbd.AppendChunkHeader(nil, false, uint16(r.IntN(2)), uint16(r.IntN(3)), req.Cookie, 0, uint64(r.IntN(5000)))
				}
				junk := make([]byte, r.IntN(9000))
				for i := range junk {
					junk[i] = byte(r.Uint32())
				}
				fc.send(b, junk)
			},
		}
		if seed%2 == 0 {
			f.refuse[nbd.OptStructuredReply] = nbd.RepErrUnsup
		}
		path := f.start(t)
		c, err := nbd.Dial(opCtx(t), "unix", path, nbd.ClientConfig{MetaContext: true})
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- c.ReadAt(context.Background(), make([]byte, 4096), 0) }()
		result(t, done, fmt.Sprintf("read with seed %d", seed))
		// The fake server hangs up after its junk: the client must
		// notice whatever it made of the junk.
		select {
		case <-c.Done():
		case <-time.After(10 * time.Second):
			t.Fatalf("seed %d: Done was not closed", seed)
		}
		c.Close()
	}
}

// FuzzClientReplies feeds arbitrary bytes to the client as the replies to
// a read and a block status request: it must neither panic nor hang, and a
// connection it gives up on fails with ErrConnClosed.
func FuzzClientReplies(f *testing.F) {
	f.Add(false, nbd.AppendSimpleReply(nil, 0, 1))
	f.Add(false, append(nbd.AppendSimpleReply(nil, 0, 1), make([]byte, 4096)...))
	f.Add(true, fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeOffsetHole, 1, binary.BigEndian.AppendUint32(fakeU64(0), 4096)))
	f.Add(true, fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeOffsetData, 1, append(fakeU64(0), make([]byte, 4096)...)))
	f.Add(true, fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeError, 2, nbd.AppendErrorChunk(nil, nbd.EIO, "x")))
	f.Add(true, fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeBlockStatus, 2, nbd.AppendBlockStatus(nil, 7, []nbd.Extent{{512, 3}, {8192, 0}})))
	f.Add(true, append(fakeChunk(0, nbd.ReplyTypeOffsetData, 1, append(fakeU64(2048), make([]byte, 2048)...)),
		fakeChunk(nbd.ReplyFlagDone, nbd.ReplyTypeOffsetHole, 1, binary.BigEndian.AppendUint32(fakeU64(0), 2048))...))
	f.Fuzz(func(t *testing.T, structured bool, replies []byte) {
		cs, ss := net.Pipe()
		fs := &fakeServer{script: func(fc *fakeConn) {
			// Without structured replies BLOCK_STATUS is not sent.
			for i := 0; i < 1+int(fc.metaID/7); i++ {
				if _, ok := fc.request(); !ok {
					return
				}
			}
			fc.send(replies)
		}}
		if !structured {
			fs.refuse = map[uint32]uint32{nbd.OptStructuredReply: nbd.RepErrUnsup}
		}
		served := make(chan struct{})
		go func() {
			defer close(served)
			defer ss.Close()
			fc := &fakeConn{t: t, nc: ss, br: bufio.NewReader(ss)}
			if fs.handshake(fc) {
				fs.script(fc)
			}
		}()
		c, err := nbd.NewClient(context.Background(), cs, nbd.ClientConfig{MetaContext: true})
		if err != nil {
			t.Fatal(err)
		}
		errs := make(chan error, 2)
		go func() { errs <- c.ReadAt(context.Background(), make([]byte, 4096), 0) }()
		go func() {
			_, err := c.BlockStatus(context.Background(), 0, 8192, false)
			errs <- err
		}()
		for i := 0; i < 2; i++ {
			select {
			case <-errs:
			case <-time.After(10 * time.Second):
				t.Fatal("a call did not return after the server hung up")
			}
		}
		<-served
		select {
		case <-c.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("the client did not notice the server hung up")
		}
		if err := c.Flush(context.Background()); !errors.Is(err, nbd.ErrConnClosed) {
			t.Fatalf("flush on a dead connection: %v", err)
		}
		c.Close()
	})
}

// ---- Real peers ----

// syncBuffer collects a subprocess's output.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startPeer runs an NBD server nobody here wrote, killed when the test ends,
// and waits until it listens on sock. probe false waits for the socket file
// only (a server that serves a single connection must not see a probe).
func startPeer(t *testing.T, sock string, probe bool, name string, args ...string) {
	t.Helper()
	bin, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is not installed (%v): the client's interoperability tests need it; scripts/test installs it from Debian's packages", name, err)
	}
	cmd := exec.Command(bin, args...)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			t.Errorf("%s (pid %d) did not exit within 10s of being killed", name, cmd.Process.Pid)
		}
		if t.Failed() {
			t.Logf("%s output:\n%s", name, out.String())
		}
	})
	deadline := time.After(30 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			if !probe {
				return
			}
			if c, err := net.Dial("unix", sock); err == nil {
				c.Close()
				return
			}
		}
		select {
		case err := <-exited:
			t.Fatalf("%s exited before listening on %s: %v\n%s", name, sock, err, out.String())
		case <-deadline:
			t.Fatalf("%s did not listen on %s within 30s\n%s", name, sock, out.String())
		case <-tick.C:
		}
	}
}

// peer describes one real server.
type peer struct {
	name  string
	start func(t *testing.T, dir, sock string) (image string) // image: the raw file served, or ""
	// export the client asks for.
	export string
	// oneShot: the server serves a single connection.
	oneShot bool
}

var peers = []peer{
	{name: "nbdkit-memory", start: func(t *testing.T, dir, sock string) string {
		startPeer(t, sock, true, "nbdkit", "--unix", sock, "--foreground", "memory", "64M")
		return ""
	}},
	{name: "nbdkit-blocksize-policy", start: func(t *testing.T, dir, sock string) string {
		// Enforces 4 KiB alignment and a 64 KiB maximum with errors.
		startPeer(t, sock, true, "nbdkit", "--unix", sock, "--foreground", "--filter=blocksize-policy", "memory", "64M",
			"blocksize-minimum=4096", "blocksize-preferred=4096", "blocksize-maximum=65536", "blocksize-error-policy=error")
		return ""
	}},
	{name: "qemu-nbd", start: func(t *testing.T, dir, sock string) string {
		img := filepath.Join(dir, "disk.img")
		if err := os.WriteFile(img, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(img, 64<<20); err != nil {
			t.Fatal(err)
		}
		startPeer(t, sock, true, "qemu-nbd", "-f", "raw", "--socket", sock, "-t", "--discard=unmap", img)
		return img
	}},
	{name: "nbd-server", export: "disk", oneShot: true, start: func(t *testing.T, dir, sock string) string {
		img := filepath.Join(dir, "disk.img")
		if err := os.WriteFile(img, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(img, 64<<20); err != nil {
			t.Fatal(err)
		}
		conf := filepath.Join(dir, "nbd-server.conf")
		text := fmt.Sprintf("[generic]\n\tunixsock = %s\n\tallowlist = true\n[disk]\n\texportname = %s\n\ttrim = true\n\tflush = true\n\tfua = true\n", sock, img)
		if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		startPeer(t, sock, false, "nbd-server", "-C", conf, "-d")
		return img
	}},
}

// TestClientRealPeers runs the same round trip through the client against
// servers nobody here wrote.
func TestClientRealPeers(t *testing.T) {
	for _, p := range peers {
		for _, noStructured := range []bool{false, true} {
			name := p.name
			if noStructured {
				name += "/simple"
			}
			t.Run(name, func(t *testing.T) {
				checkClientLeaks(t)
				dir := t.TempDir()
				sock := filepath.Join(dir, "nbd.sock")
				img := p.start(t, dir, sock)
				cfg := nbd.ClientConfig{Export: p.export, NoStructured: noStructured, MetaContext: true}
				var c *nbd.Client
				if p.oneShot {
					c = dialRetry(t, sock, cfg)
				} else {
					c = dialClient(t, sock, cfg)
				}
				t.Logf("%s: size %d flags %#x block size %+v structured %v base:allocation %v",
					p.name, c.Size(), c.Flags(), c.BlockSize(), c.Structured(), c.MetaContext())
				peerRoundTrip(t, c, img)
			})
		}
	}
}

// dialRetry dials a server whose socket may exist a moment before it
// listens.
func dialRetry(t *testing.T, sock string, cfg nbd.ClientConfig) *nbd.Client {
	t.Helper()
	cfg.Logger = clientLogger(t)
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := nbd.Dial(opCtx(t), "unix", sock, cfg)
		if err == nil {
			t.Cleanup(func() { c.Close() })
			return c
		}
		if !errors.Is(err, syscall.ECONNREFUSED) || time.Now().After(deadline) {
			t.Fatalf("dial %s: %v", sock, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func peerRoundTrip(t *testing.T, c *nbd.Client, img string) {
	ctx := opCtx(t)
	if c.Size() != 64<<20 {
		t.Fatalf("size %d, want 64 MiB", c.Size())
	}
	const off = 4 << 20
	data := pattern(3, 1<<20+64<<10)
	if err := c.WriteAt(ctx, data, off, false); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(ctx, data[:4096], 8<<20, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if err := c.ReadAt(ctx, got, off); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("read back differs from what was written")
	}
	// A read over never-written space, in a dirty buffer: zeroes (holes
	// when the server sends them as such).
	got = bytes.Repeat([]byte{0xee}, 256<<10)
	if err := c.ReadAt(ctx, got, 32<<20); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
		t.Fatalf("read of never-written space: %v", err)
	}
	if bs := c.BlockSize(); bs.Minimum == 1 {
		// Unaligned access where the server allows it.
		got = make([]byte, 1000)
		if err := c.ReadAt(ctx, got, off+3); err != nil || !bytes.Equal(got, data[3:1003]) {
			t.Errorf("unaligned read: %v", err)
		}
	} else {
		wantErrno(t, c.ReadAt(ctx, make([]byte, 1000), off+3), nbd.EINVAL, "unaligned read")
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if c.MetaContext() {
		ex, err := c.BlockStatus(ctx, off, 64<<10, false)
		if err != nil || len(ex) == 0 || ex[0].Flags&nbd.StateZero != 0 || sumExtents(ex) > 64<<10 {
			t.Errorf("block status of written data: %+v, %v", ex, err)
		}
		ex, err = c.BlockStatus(ctx, 32<<20, 1<<20, true)
		if err != nil || len(ex) != 1 || ex[0].Flags&nbd.StateZero == 0 || sumExtents(ex) > 1<<20 {
			t.Errorf("block status of never-written space: %+v, %v", ex, err)
		}
	} else {
		_, err := c.BlockStatus(ctx, 0, 4096, false)
		wantErrno(t, err, nbd.ENOTSUP, "block status without base:allocation")
	}
	if err := c.Zero(ctx, off, 64<<10, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Zero(ctx, off+64<<10, 64<<10, nbd.ZeroNoHole|nbd.ZeroFUA); err != nil {
		t.Fatal(err)
	}
	if err := c.Trim(ctx, off+128<<10, 64<<10, false); err != nil {
		t.Fatal(err)
	}
	if c.Flags()&nbd.TFlagSendCache != 0 {
		if err := c.Cache(ctx, off, 1<<20); err != nil {
			t.Error(err)
		}
	} else {
		wantErrno(t, c.Cache(ctx, off, 1<<20), nbd.ENOTSUP, "cache on a server without it")
	}
	got = make([]byte, 256<<10)
	if err := c.ReadAt(ctx, got, off); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:128<<10], make([]byte, 128<<10)) || !bytes.Equal(got[192<<10:], data[192<<10:256<<10]) {
		t.Error("zeroes did not land exactly on their ranges")
	}

	// Several goroutines at once, each verifying its own data.
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			base := uint64(16<<20 + w<<20)
			p := pattern(uint64(100+w), 256<<10)
			for i := 0; i < 8; i++ {
				at := base + uint64(i)*(64<<10)
				if err := c.WriteAt(ctx, p[:64<<10], at, false); err != nil {
					t.Error(err)
					return
				}
				q := make([]byte, 64<<10)
				if err := c.ReadAt(ctx, q, at); err != nil || !bytes.Equal(q, p[:64<<10]) {
					t.Errorf("goroutine %d: read back: %v", w, err)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}

	// The server's own file holds what went through the client.
	if img != "" {
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		raw, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(raw[off+192<<10:off+len(data)], data[192<<10:]) || !bytes.Equal(raw[off:off+128<<10], make([]byte, 128<<10)) ||
			!bytes.Equal(raw[8<<20:8<<20+4096], data[:4096]) {
			t.Error("the server's image file does not hold what was written through the client")
		}
	}
}

func sumExtents(ex []nbd.Extent) uint64 {
	var n uint64
	for _, e := range ex {
		n += e.Length
	}
	return n
}
