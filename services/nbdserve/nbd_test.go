package nbdserve_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"go.uber.org/goleak"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica/rawimage"
	"github.com/keelstore/keel/services/nbdserve"
	"github.com/keelstore/keel/supervise"
)

// ---- Harness: a root supervisor serving one NBD listener ----

// logSink is the output of the test's hclog logger: every line goes to t.Log
// and into a buffer the test can search.
type logSink struct {
	t    *testing.T
	mu   sync.Mutex // guards the following
	buf  bytes.Buffer
	done bool // the test has ended; t.Log would panic
}

func (s *logSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.buf.Write(p)
	if !s.done {
		s.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (s *logSink) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

func newLogger(t *testing.T) (hclog.Logger, *logSink) {
	sink := &logSink{t: t}
	t.Cleanup(func() {
		sink.mu.Lock()
		sink.done = true
		sink.mu.Unlock()
	})
	return hclog.New(&hclog.LoggerOptions{Name: "keel", Level: hclog.Debug, Output: sink}), sink
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// goroutines returns the stacks of every goroutine but the caller's.
func goroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	all := strings.Split(string(buf), "\n\n")
	return all[1:] // the first is the caller's
}

func running(frame string) bool {
	for _, g := range goroutines() {
		if strings.Contains(g, frame) {
			return true
		}
	}
	return false
}

// checkNoLeaks fails the test if any goroutine started by it is still
// running once everything was stopped (goleak retries for a while).
func checkNoLeaks(t *testing.T) {
	t.Helper()
	goleak.VerifyNone(t)
}

type harness struct {
	t      *testing.T
	sock   string
	log    *logSink
	cancel context.CancelFunc
	served chan error

	once    sync.Once
	stopErr error
}

const exportName = "test"

// startNBD serves backend on a unix socket the way `keel serve` does: an
// nbd.Server behind nbdserve.NBD under a root supervisor.
func startNBD(t *testing.T, backend nbd.Backend, hooks nbd.Hooks) *harness {
	t.Helper()
	logger, sink := newLogger(t)
	srv, err := nbd.NewServer(nbd.ServerConfig{
		Exports:      []nbd.Export{{Name: exportName, Backend: backend}},
		Logger:       logger.Named("nbd"),
		DrainTimeout: 10 * time.Second,
		Hooks:        hooks,
	})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, _, err := nbdserve.Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	// As in `keel serve`: the root waits longer than the drain.
	root := supervise.New("keel", logger, supervise.Policy{StopTimeout: 20 * time.Second})
	root.Add(nbdserve.NewNBD(nbdserve.NBDConfig{
		Listener: l, Server: srv, Log: logger.Named("nbd"), DrainTimeout: 10 * time.Second,
	}))
	ctx, cancel := context.WithCancel(context.Background())
	h := &harness{t: t, sock: sock, log: sink, cancel: cancel, served: make(chan error, 1)}
	go func() { h.served <- root.Serve(ctx) }()
	t.Cleanup(func() { h.stop() })
	return h
}

// stop cancels the root context and waits, bounded, for Serve to return.
func (h *harness) stop() error {
	h.t.Helper()
	h.once.Do(func() {
		h.cancel()
		h.stopErr = h.wait()
	})
	return h.stopErr
}

func (h *harness) wait() error {
	h.t.Helper()
	select {
	case err := <-h.served:
		return err
	case <-time.After(30 * time.Second):
		h.t.Fatal("the root supervisor's Serve did not return within 30s of its context ending")
		return nil
	}
}

// ---- A raw NBD client: fixed newstyle, NBD_OPT_GO, simple replies ----

type client struct {
	t      *testing.T
	nc     net.Conn
	size   uint64
	cookie uint64
}

func dial(t *testing.T, sock string) *client {
	t.Helper()
	nc, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("connecting to %s: %v", sock, err)
	}
	t.Cleanup(func() { nc.Close() })
	// A bound on everything the client does: a server that stops
	// answering fails the test instead of hanging it.
	_ = nc.SetDeadline(time.Now().Add(30 * time.Second))
	c := &client{t: t, nc: nc}
	c.handshake()
	return c
}

func (c *client) readN(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.nc, b); err != nil {
		c.t.Fatalf("reading %d bytes from the server: %v", n, err)
	}
	return b
}

func (c *client) write(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("writing to the server: %v", err)
	}
}

func (c *client) handshake() {
	c.t.Helper()
	flags, err := nbd.ParseServerGreeting(c.readN(18))
	if err != nil {
		c.t.Fatal(err)
	}
	if flags&nbd.FlagFixedNewstyle == 0 {
		c.t.Fatalf("handshake flags %#x lack FIXED_NEWSTYLE", flags)
	}
	msg := binary.BigEndian.AppendUint32(nil, nbd.ClientFixedNewstyle|nbd.ClientNoZeroes)
	msg = nbd.AppendOption(msg, nbd.OptGo, nbd.AppendExportRequest(nil, nbd.ExportRequest{Name: exportName}))
	c.write(msg)
	for {
		h, err := nbd.ParseOptionReplyHeader(c.readN(20))
		if err != nil {
			c.t.Fatal(err)
		}
		if h.Length > 64<<10 {
			c.t.Fatalf("option reply of %d bytes", h.Length)
		}
		data := c.readN(int(h.Length))
		if h.Option != nbd.OptGo {
			c.t.Fatalf("reply for option %d, want NBD_OPT_GO", h.Option)
		}
		if nbd.IsRepErr(h.Type) {
			c.t.Fatalf("NBD_OPT_GO refused (%#x): %s", h.Type, data)
		}
		switch h.Type {
		case nbd.RepInfo:
			if len(data) == 12 && binary.BigEndian.Uint16(data) == nbd.InfoExport {
				c.size = binary.BigEndian.Uint64(data[2:])
			}
		case nbd.RepAck:
			if c.size == 0 {
				c.t.Fatal("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
			}
			return
		}
	}
}

// send writes one request and returns its cookie without waiting.
func (c *client) send(typ uint16, off uint64, length int, payload []byte) uint64 {
	c.t.Helper()
	c.cookie++
	b := nbd.AppendRequest(nil, nbd.Request{Type: typ, Cookie: c.cookie, Offset: off, Length: uint64(length)}, false)
	c.write(append(b, payload...))
	return c.cookie
}

// reply reads one simple reply header, which must answer cookie.
func (c *client) reply(cookie uint64) nbd.Reply {
	c.t.Helper()
	r, err := nbd.ParseReply(c.readN(nbd.SimpleReplySize))
	if err != nil {
		c.t.Fatal(err)
	}
	if r.Cookie != cookie {
		c.t.Fatalf("reply for cookie %d, want %d", r.Cookie, cookie)
	}
	return r
}

func (c *client) writeAt(p []byte, off uint64) {
	c.t.Helper()
	if r := c.reply(c.send(nbd.CmdWrite, off, len(p), p)); r.Error != 0 {
		c.t.Fatalf("write of %d bytes at %d: %v", len(p), off, r.Error)
	}
}

func (c *client) readAt(off uint64, n int) []byte {
	c.t.Helper()
	if r := c.reply(c.send(nbd.CmdRead, off, n, nil)); r.Error != 0 {
		c.t.Fatalf("read of %d bytes at %d: %v", n, off, r.Error)
	}
	return c.readN(n)
}

// expectEnd reads until the connection ends and reports any bytes the
// server sent first; a reset counts as an end only when allowReset.
func (c *client) expectEnd(what string, allowReset bool) {
	c.t.Helper()
	got, err := io.ReadAll(c.nc)
	if len(got) > 0 {
		c.t.Errorf("%s: the server sent %d more bytes (%x) before closing", what, len(got), got[:min(len(got), 32)])
	}
	switch {
	case err == nil: // ReadAll's EOF
	case allowReset && errors.Is(err, syscall.ECONNRESET):
	default:
		c.t.Errorf("%s: reading to the end of the connection: %v, want EOF", what, err)
	}
}

func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(i%253) + 1 + seed
	}
	return p
}

// ---- An in-memory backend ----

type memBackend struct {
	mu   sync.Mutex // guards data
	data []byte
}

func newMem(size int) *memBackend { return &memBackend{data: make([]byte, size)} }

func (m *memBackend) Size() uint64 { return uint64(len(m.data)) }

// Capabilities: all but fast zero (clearing memory is no faster than
// writing it). Extents reports everything as data.
func (m *memBackend) Capabilities() nbd.Caps { return nbd.CapsAll &^ nbd.CapFastZero }

func (m *memBackend) ReadAt(_ context.Context, p []byte, off uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(p, m.data[off:])
	return nil
}

func (m *memBackend) WriteAt(_ context.Context, p []byte, off uint64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	return nil
}

func (m *memBackend) Flush(context.Context) error { return nil }

func (m *memBackend) Trim(ctx context.Context, off, length uint64, _ bool) error {
	return m.Zero(ctx, off, length, 0)
}

func (m *memBackend) Zero(_ context.Context, off, length uint64, _ nbd.ZeroFlags) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
	return nil
}

func (m *memBackend) Extents(_ context.Context, off, length uint64) ([]nbd.Extent, error) {
	return []nbd.Extent{{Length: length}}, nil
}

func (m *memBackend) Cache(context.Context, uint64, uint64) error { return nil }

func (m *memBackend) bytes(off uint64, n int) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return bytes.Clone(m.data[off : off+uint64(n)])
}

// blockingWrites holds every write until the test closes release.
type blockingWrites struct {
	*memBackend
	entered chan uint64 // the offset of each write that arrived
	release chan struct{}
}

func (b *blockingWrites) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	b.entered <- off
	<-b.release
	return b.memBackend.WriteAt(ctx, p, off, fua)
}

// ---- Tests ----

// A panic while serving one request closes that client's connection and
// nothing else: other connections carry on, new ones are accepted, the
// panic is logged with its stack, and the tree still stops cleanly.
func TestNBDPanicClosesOnlyThatConnection(t *testing.T) {
	t.Cleanup(func() { checkNoLeaks(t) })
	const magic = 500 << 10
	const panicValue = "keel-test: injected panic at the magic offset"

	img, err := rawimage.Open(filepath.Join(t.TempDir(), "disk.img"), rawimage.Options{Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	var panics atomic.Int32
	h := startNBD(t, nbdserve.LocalImage{Image: img}, nbd.Hooks{
		BeforeRequest: func(export string, r nbd.Request) {
			if r.Offset == magic {
				panics.Add(1)
				panic(panicValue)
			}
		},
	})

	b := dial(t, h.sock)
	pb1 := pattern(4096, 1)
	b.writeAt(pb1, 0)
	if got := b.readAt(0, 4096); !bytes.Equal(got, pb1) {
		t.Fatal("connection B: read does not return what it wrote")
	}

	a := dial(t, h.sock)
	pa := pattern(4096, 2)
	a.writeAt(pa, 8192)
	a.send(nbd.CmdRead, magic, 4096, nil)
	a.expectEnd("connection A after the panic", true)
	if n := panics.Load(); n != 1 {
		t.Fatalf("the hook panicked %d times, want 1", n)
	}

	// B is untouched and sees A's write from before the panic.
	pb2 := pattern(4096, 3)
	b.writeAt(pb2, 4096)
	if got := b.readAt(0, 12288); !bytes.Equal(got, slicesConcat(pb1, pb2, pa)) {
		t.Error("connection B: after the panic, reads do not return what was written")
	}

	// A new connection is accepted and served.
	c := dial(t, h.sock)
	if got := c.readAt(4096, 4096); !bytes.Equal(got, pb2) {
		t.Error("connection C: read does not return B's write")
	}
	pc := pattern(512, 4)
	c.writeAt(pc, magic+4096)
	if got := b.readAt(magic+4096, 512); !bytes.Equal(got, pc) {
		t.Error("connection B does not see C's write")
	}

	waitFor(t, 10*time.Second, `"service panicked" in the log`, func() bool {
		return strings.Contains(h.log.String(), "service panicked")
	})
	log := h.log.String()
	for _, want := range []string{
		panicValue,                             // the hook's panic value
		"goroutine ",                           // a goroutine stack...
		"TestNBDPanicClosesOnlyThatConnection", // ...through the hook
		"nbd.(*conn).handle",                   // ...called from the request handler
	} {
		if !strings.Contains(log, want) {
			t.Errorf("the log lacks %q", want)
		}
	}

	if err := h.stop(); !errors.Is(err, context.Canceled) {
		t.Errorf("root Serve returned %v, want context.Canceled", err)
	}
	b.expectEnd("connection B after the stop", false)
	c.expectEnd("connection C after the stop", false)
}

func slicesConcat(ps ...[]byte) []byte { return bytes.Join(ps, nil) }

// Stopping the service tree answers a request in flight before closing the
// connection: success, never ESHUTDOWN, then EOF.
func TestNBDStopAnswersInFlightWrite(t *testing.T) {
	t.Cleanup(func() { checkNoLeaks(t) })
	be := &blockingWrites{memBackend: newMem(1 << 20), entered: make(chan uint64, 1), release: make(chan struct{})}
	h := startNBD(t, be, nbd.Hooks{})
	// Registered after startNBD so it runs before the harness's stop,
	// which would otherwise wait on the held write.
	released := false
	t.Cleanup(func() {
		if !released {
			close(be.release)
		}
	})
	c := dial(t, h.sock)

	const off = 128 << 10
	p := pattern(64<<10, 5)
	cookie := c.send(nbd.CmdWrite, off, len(p), p)
	select {
	case got := <-be.entered:
		if got != off {
			t.Fatalf("backend got a write at %d, want %d", got, off)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the write did not reach the backend within 10s")
	}

	h.cancel()
	// The connection has taken the stop once its reader has returned; it
	// is then only waiting for the write.
	waitFor(t, 10*time.Second, "the connection's reader to stop", func() bool {
		return !running("nbd.(*conn).readLoop(") // the frame, not its children's
	})
	select {
	case err := <-h.served:
		t.Fatalf("the root supervisor returned (%v) while a write was in flight", err)
	default:
	}

	close(be.release)
	released = true
	if r := c.reply(cookie); r.Error != 0 {
		t.Errorf("in-flight write answered with %v (%d), want success", r.Error, uint32(r.Error))
	}
	c.expectEnd("after the answer", false)
	if err := h.stop(); !errors.Is(err, context.Canceled) {
		t.Errorf("root Serve returned %v, want context.Canceled", err)
	}
	if !bytes.Equal(be.bytes(off, len(p)), p) {
		t.Error("the answered write is not in the backend")
	}
}

// ---- Listen ----

// accepts checks that a client dialling network/addr reaches l.
func accepts(t *testing.T, l net.Listener, network, addr string) {
	t.Helper()
	accepted := make(chan error, 1)
	go func() {
		nc, err := l.Accept()
		if err == nil {
			nc.Close()
		}
		accepted <- err
	}()
	nc, err := net.DialTimeout(network, addr, 10*time.Second)
	if err != nil {
		t.Fatalf("dialling %s %s: %v", network, addr, err)
	}
	nc.Close()
	select {
	case err := <-accepted:
		if err != nil {
			t.Fatalf("Accept: %v", err)
		}
	case <-time.After(10 * time.Second):
		l.Close()
		<-accepted
		t.Fatal("the listener did not accept within 10s")
	}
}

func isSocket(t *testing.T, path string) bool {
	t.Helper()
	st, err := os.Lstat(path)
	return err == nil && st.Mode()&os.ModeSocket != 0
}

func TestListenUnix(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, uri, err := nbdserve.Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if want := "nbd+unix:///?socket=" + sock; uri != want {
		t.Errorf("URI %q, want %q", uri, want)
	}
	if !isSocket(t, sock) {
		t.Fatalf("%s is not a socket", sock)
	}
	accepts(t, l, "unix", sock)
	l.Close()
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("closing the listener left %s behind (%v)", sock, err)
	}
}

// NBD clients (libnbd's nbd_connect_uri, qemu) percent-decode the socket
// query parameter as RFC 3986 says, without turning "+" into a space.
func TestListenUnixURIEscapesPath(t *testing.T) {
	for _, name := range []string{"a b.sock", "a&b=c.sock", "50%.sock", "q?.sock", "plus+.sock"} {
		sock := filepath.Join(t.TempDir(), name)
		l, uri, err := nbdserve.Listen("unix:" + sock)
		if err != nil {
			t.Fatalf("%q: %v", name, err)
		}
		l.Close()
		u, err := url.Parse(uri)
		if err != nil {
			t.Errorf("%q: URI %q does not parse: %v", name, uri, err)
			continue
		}
		raw, ok := strings.CutPrefix(u.RawQuery, "socket=")
		if u.Scheme != "nbd+unix" || u.Host != "" || u.Path != "/" || !ok || strings.ContainsAny(raw, "&;") {
			t.Errorf("%q: URI %q is not nbd+unix:///?socket=PATH", name, uri)
			continue
		}
		if got, err := url.PathUnescape(raw); err != nil || got != sock {
			t.Errorf("%q: URI %q names socket %q (%v), want %q", name, uri, got, err, sock)
		}
	}
}

func TestListenReplacesStaleSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	old, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	old.SetUnlinkOnClose(false)
	old.Close()
	if !isSocket(t, sock) {
		t.Fatal("no stale socket file to test with")
	}

	l, _, err := nbdserve.Listen("unix:" + sock)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer l.Close()
	accepts(t, l, "unix", sock)
}

func TestListenRefusesLiveSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	live, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()

	if l, _, err := nbdserve.Listen("unix:" + sock); err == nil {
		l.Close()
		t.Fatal("Listen took over a socket another listener is serving")
	}
	// The other listener keeps its socket. (Listen's probe may sit in its
	// backlog; accepts drains one connection, the probe or ours.)
	if !isSocket(t, sock) {
		t.Fatal("the live listener's socket file is gone")
	}
	accepts(t, live, "unix", sock)
}

func TestListenRefusesRegularFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "precious")
	if err := os.WriteFile(path, []byte("do not delete"), 0o644); err != nil {
		t.Fatal(err)
	}
	if l, _, err := nbdserve.Listen("unix:" + path); err == nil {
		l.Close()
		t.Fatal("Listen replaced a regular file")
	}
	if got, err := os.ReadFile(path); err != nil || string(got) != "do not delete" {
		t.Errorf("the regular file changed: %q, %v", got, err)
	}
}

func TestListenTCP(t *testing.T) {
	l, uri, err := nbdserve.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).Port
	if port == 0 {
		t.Fatal("listening on port 0")
	}
	if want := fmt.Sprintf("nbd://127.0.0.1:%d/", port); uri != want {
		t.Errorf("URI %q, want %q", uri, want)
	}
	accepts(t, l, "tcp", l.Addr().String())
}

func TestListenBadAddresses(t *testing.T) {
	for _, addr := range []string{"", "nope", "127.0.0.1", "127.0.0.1:notaport", "127.0.0.1:99999", "unix:"} {
		if l, uri, err := nbdserve.Listen(addr); err == nil {
			l.Close()
			t.Errorf("Listen(%q) = %q, nil; want an error", addr, uri)
		}
	}
}

func TestTLSURI(t *testing.T) {
	for in, want := range map[string]string{
		"nbd://127.0.0.1:10809/":          "nbds://127.0.0.1:10809/",
		"nbd+unix:///?socket=/run/k.sock": "nbds+unix:///?socket=/run/k.sock",
		"nbds://h/":                       "nbds://h/",
	} {
		if got := nbdserve.TLSURI(in); got != want {
			t.Errorf("TLSURI(%q) = %q, want %q", in, got, want)
		}
	}
}
