// End-to-end tests: the built keel binary, driven by real NBD clients that
// nobody here wrote (qemu-io, qemu-img, nbdinfo, nbdcopy, libnbd's Python
// binding, fio's nbd engine), plus a small raw-protocol client at the bottom
// of this file for what those clients will not send: unknown commands,
// extended headers, garbage, and requests cut off half way.
//
// The binary is built once, by the first test that needs it (keeltest
// owns the processes, their output and the log scan). Every test
// starts its own `keel serve` on a unix socket in a fresh directory and stops
// it with SIGTERM when it ends, asserting a clean exit. Readiness is a
// completed NBD handshake, never a sleep. Every external command runs under a
// deadline.
//
// The tools are not optional: scripts/test installs them, and a missing one
// fails the test that needs it with the package to install.
//
// Environment:
//
//	KEEL_E2E_BIN   test this binary instead of building one
//	KEEL_E2E_RACE  when 1, build the binary with -race (scripts/test sets it)

package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
	"golang.org/x/sys/unix"
)

const (
	// systemPython is Debian's interpreter, the only one that sees the
	// python3-libnbd module; a pyenv python3 earlier in PATH does not.
	systemPython = "/usr/bin/python3"

	startTimeout = 15 * time.Second // from exec to a completed handshake
	stopTimeout  = 15 * time.Second // from SIGTERM to exit
	toolTimeout  = 2 * time.Minute  // any one client command
	logTimeout   = 5 * time.Second  // for a log line the server owes us

	kib = 1 << 10
	mib = 1 << 20
)

func TestMain(m *testing.M) {
	code := m.Run()
	keeltest.RemoveBinary()
	os.Exit(code)
}

// keelBin returns the binary under test, building it on first use (so that
// `go test -list` and fuzzing runs do not pay for it).
func keelBin(t *testing.T) string {
	t.Helper()
	return keeltest.MustBinary(t)
}

// ---------------------------------------------------------------------------
// The server under test.

type serveOpts struct {
	tcp      bool   // listen on 127.0.0.1 instead of a unix socket
	size     string // --size; empty leaves it out
	name     string // --name; empty leaves it out
	readOnly bool
	image    string // --file; empty means a fresh path in the test's directory
}

type keelServer struct {
	t     *testing.T
	image string
	sock  string // the unix socket, or "" when listening on TCP
	tcp   string // HOST:PORT when listening on TCP
	name  string
	p     *keeltest.Proc

	stopped sync.Once
}

// startKeel starts `keel serve` on a fresh unix socket, waits until it
// completes an NBD handshake, and registers a cleanup that stops it with
// SIGTERM and asserts exit status 0.
func startKeel(t *testing.T, o serveOpts) *keelServer {
	t.Helper()
	if o.image == "" {
		o.image = filepath.Join(t.TempDir(), "disk.img")
	}
	s := &keelServer{t: t, image: o.image, name: o.name}
	listen := ""
	if o.tcp {
		s.tcp = keeltest.MustFreeAddr(t)
		listen = s.tcp
	} else {
		s.sock = filepath.Join(keeltest.MustSocketDir(t), "nbd.sock")
		listen = "unix:" + s.sock
	}
	args := []string{"serve", "--file", o.image, "--listen", listen}
	if o.size != "" {
		args = append(args, "--size", o.size)
	}
	if o.name != "" {
		args = append(args, "--name", o.name)
	}
	if o.readOnly {
		args = append(args, "--read-only")
	}
	s.p = keeltest.MustStart(t, keeltest.ProcConfig{Name: "keel serve", Args: args})
	t.Cleanup(s.stop)
	s.waitReady()
	return s
}

// uri is the NBD URI of the server's export, as libnbd and qemu spell it.
func (s *keelServer) uri() string {
	if s.tcp != "" {
		return "nbd://" + s.tcp + "/" + url.PathEscape(s.name)
	}
	return "nbd+unix:///" + url.PathEscape(s.name) + "?socket=" + s.sock
}

// dial connects to the server's listener.
func (s *keelServer) dial() (net.Conn, error) {
	if s.tcp != "" {
		return net.DialTimeout("tcp", s.tcp, time.Second)
	}
	return net.DialTimeout("unix", s.sock, time.Second)
}

// waitReady polls until a client completes the handshake and a clean
// NBD_OPT_ABORT, failing fast if the process exits first.
func (s *keelServer) waitReady() {
	s.t.Helper()
	deadline := time.Now().Add(startTimeout)
	for {
		if s.p.Exited() {
			s.t.Fatalf("keel serve exited before it accepted a connection: %v\n%s", s.p.Err(), s.p.Output())
		}
		c, err := s.dial()
		if err == nil {
			err = probeHandshake(c)
			c.Close()
			if err != nil {
				s.t.Fatalf("keel serve accepted a connection but the handshake failed: %v\n%s", err, s.p.Output())
			}
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("keel serve did not accept a connection on %s within %v: %v\n%s", s.uri(), startTimeout, err, s.p.Output())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// probeHandshake reads the greeting, sends NBD_OPT_ABORT and waits for the
// server to answer or hang up: a well-behaved client saying goodbye.
func probeHandshake(c net.Conn) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	var greet [18]byte
	if _, err := io.ReadFull(c, greet[:]); err != nil {
		return fmt.Errorf("read greeting: %w", err)
	}
	if string(greet[:8]) != "NBDMAGIC" || binary.BigEndian.Uint64(greet[8:]) != optMagic {
		return fmt.Errorf("greeting is not fixed newstyle: % x", greet)
	}
	if binary.BigEndian.Uint16(greet[16:])&flagFixedNewstyle == 0 {
		return fmt.Errorf("greeting lacks NBD_FLAG_FIXED_NEWSTYLE: % x", greet)
	}
	msg := binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
	msg = appendOption(msg, optAbort, nil)
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("send abort: %w", err)
	}
	io.Copy(io.Discard, c) // the ACK, if any, then EOF
	return nil
}

// stop sends SIGTERM and asserts that the server exits 0 in time, without a
// panic or a data race on its stderr. It runs once, from cleanup or a test.
func (s *keelServer) stop() { s.stopWith(syscall.SIGTERM) }

// stopWith is stop with another signal. The panic and data race scan is
// MustStart's cleanup, which runs after this one.
func (s *keelServer) stopWith(sig os.Signal) {
	s.stopped.Do(func() {
		t := s.t
		t.Helper()
		err := s.p.StopWith(sig, stopTimeout)
		switch {
		case errors.Is(err, keeltest.ErrExited):
			t.Errorf("keel serve exited before the test stopped it: %v", s.p.Err())
		case errors.Is(err, keeltest.ErrTimeout):
			t.Errorf("keel serve did not exit within %v of %v", stopTimeout, sig)
		case err != nil:
			t.Errorf("keel serve after %v: %v (want exit status 0)", sig, err)
		}
		t.Logf("keel serve output:\n%s", s.p.Output())
	})
}

// lines returns the server's complete output lines so far.
func (s *keelServer) lines() []string { return s.p.Lines() }

// waitLines waits until more than n complete lines exist, then returns them
// all; it fails the test if none arrives within logTimeout.
func (s *keelServer) waitLines(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.Now().Add(logTimeout)
	for {
		if ls := s.lines(); len(ls) > n {
			return ls
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new line on keel's stderr within %v after line %d:\n%s", logTimeout, n, s.p.Output())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// ---------------------------------------------------------------------------
// Running clients.

// tool returns the path of a client program or fails the test naming the
// Debian package that provides it.
func tool(t *testing.T, name string) string {
	t.Helper()
	pkg := map[string]string{
		"qemu-io": "qemu-utils", "qemu-img": "qemu-utils",
		"nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin", "fio": "fio",
	}[name]
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is not installed (Debian package %s; scripts/test installs it): %v", name, pkg, err)
	}
	return p
}

// python returns the interpreter that has libnbd's nbd module.
func python(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, systemPython, "-c", "import nbd").CombinedOutput()
	if err != nil {
		t.Fatalf("%s cannot import nbd (Debian package python3-libnbd; scripts/test installs it): %v\n%s", systemPython, err, out)
	}
	return systemPython
}

type result struct {
	stdout, stderr string
	err            error
}

// run runs a command with a deadline and returns what it printed.
func run(t *testing.T, timeout time.Duration, name string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("%w (deadline %v exceeded)", err, timeout)
	}
	return result{stdout.String(), stderr.String(), err}
}

// mustRun is run that fails the test unless the command exits 0.
func mustRun(t *testing.T, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	r := run(t, timeout, name, args...)
	if r.err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", name, strings.Join(args, " "), r.err, r.stdout, r.stderr)
	}
	return r.stdout
}

// script runs a Python script from testdata with libnbd available.
func script(t *testing.T, name string, args ...string) string {
	t.Helper()
	return mustRun(t, toolTimeout, python(t), append([]string{filepath.Join("testdata", name)}, args...)...)
}

// ---------------------------------------------------------------------------
// The image file, seen directly.

type extent struct {
	off, len int64
	hole     bool
}

func (e extent) String() string {
	kind := "data"
	if e.hole {
		kind = "hole"
	}
	return fmt.Sprintf("[%d,+%d %s]", e.off, e.len, kind)
}

// fileLayout walks the image with SEEK_DATA and SEEK_HOLE.
func fileLayout(t *testing.T, path string) []extent {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	size, fd := fi.Size(), int(f.Fd())
	var out []extent
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			data = size
		} else if err != nil {
			t.Fatalf("SEEK_DATA %d: %v", off, err)
		}
		if data > off {
			out = append(out, extent{off, data - off, true})
		}
		if data >= size {
			break
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			t.Fatalf("SEEK_HOLE %d: %v", data, err)
		}
		out = append(out, extent{data, hole - data, false})
		off = hole
	}
	return mergeExtents(out)
}

// mergeExtents joins neighbours of the same kind.
func mergeExtents(in []extent) []extent {
	var out []extent
	for _, e := range in {
		if n := len(out); n > 0 && out[n-1].hole == e.hole && out[n-1].off+out[n-1].len == e.off {
			out[n-1].len += e.len
			continue
		}
		out = append(out, e)
	}
	return out
}

// isHole reports whether [off, off+n) lies entirely in holes.
func isHole(layout []extent, off, n int64) bool {
	for _, e := range layout {
		if e.off < off+n && off < e.off+e.len && !e.hole {
			return false
		}
	}
	return true
}

// isData reports whether [off, off+n) lies entirely in data.
func isData(layout []extent, off, n int64) bool {
	for _, e := range layout {
		if e.off < off+n && off < e.off+e.len && e.hole {
			return false
		}
	}
	return true
}

func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkFill fails unless b[off:off+n] is all v.
func checkFill(t *testing.T, what string, b []byte, off, n int, v byte) {
	t.Helper()
	if off+n > len(b) {
		t.Errorf("%s: range [%d,+%d) beyond the %d-byte image", what, off, n, len(b))
		return
	}
	for i, c := range b[off : off+n] {
		if c != v {
			t.Errorf("%s: byte at %d is %#02x, want %#02x", what, off+i, c, v)
			return
		}
	}
}

// createImage makes a sparse image of size bytes with the given fills.
func createImage(t *testing.T, size int64, fills map[int64][]byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for off, b := range fills {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

// ---------------------------------------------------------------------------
// Serving: sizes, names, flags.

func TestServeSizes(t *testing.T) {
	nbdinfo := tool(t, "nbdinfo")
	for _, tc := range []struct {
		arg  string
		want int64
	}{
		{"64M", 64 * mib},
		{"256MiB", 256 * mib},
		{"1G", 1 << 30},
		{"1048576", 1 * mib},
		{"4096", 4096},
	} {
		t.Run(tc.arg, func(t *testing.T) {
			s := startKeel(t, serveOpts{size: tc.arg})
			got := strings.TrimSpace(mustRun(t, toolTimeout, nbdinfo, "--size", s.uri()))
			if got != strconv.FormatInt(tc.want, 10) {
				t.Errorf("nbdinfo --size = %s, want %d", got, tc.want)
			}
			fi, err := os.Stat(s.image)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Size() != tc.want {
				t.Errorf("image file size = %d, want %d", fi.Size(), tc.want)
			}
			if a := allocatedBytes(t, s.image); a > 64*kib {
				t.Errorf("new image has %d bytes allocated, want a sparse file", a)
			}
		})
	}
}

func TestServeExistingImage(t *testing.T) {
	nbdinfo := tool(t, "nbdinfo")
	img := createImage(t, 8*mib, map[int64][]byte{0: bytes.Repeat([]byte{0x42}, 4096)})

	t.Run("without --size", func(t *testing.T) {
		s := startKeel(t, serveOpts{image: img})
		if got := strings.TrimSpace(mustRun(t, toolTimeout, nbdinfo, "--size", s.uri())); got != strconv.Itoa(8*mib) {
			t.Errorf("nbdinfo --size = %s, want %d", got, 8*mib)
		}
	})
	t.Run("with matching --size", func(t *testing.T) {
		s := startKeel(t, serveOpts{image: img, size: "8M"})
		if got := strings.TrimSpace(mustRun(t, toolTimeout, nbdinfo, "--size", s.uri())); got != strconv.Itoa(8*mib) {
			t.Errorf("nbdinfo --size = %s, want %d", got, 8*mib)
		}
	})
	t.Run("with disagreeing --size", func(t *testing.T) {
		refuses(t, "serve", "--file", img, "--size", "16M",
			"--listen", "unix:"+filepath.Join(keeltest.MustSocketDir(t), "nbd.sock"))
	})
	fi, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != 8*mib {
		t.Errorf("image size changed to %d", fi.Size())
	}
	checkFill(t, "existing data", readFile(t, img), 0, 4096, 0x42)

	t.Run("missing file without --size", func(t *testing.T) {
		refuses(t, "serve", "--file", filepath.Join(t.TempDir(), "absent.img"),
			"--listen", "unix:"+filepath.Join(keeltest.MustSocketDir(t), "nbd.sock"))
	})
}

// refuses asserts that keel, run with args, exits promptly with a non-zero
// status and says something on stderr.
func refuses(t *testing.T, args ...string) {
	t.Helper()
	const d = 10 * time.Second
	r := run(t, d, keelBin(t), args...)
	var exit *exec.ExitError
	switch {
	case r.err == nil:
		t.Errorf("keel %s exited 0, want a refusal\n%s%s", strings.Join(args, " "), r.stdout, r.stderr)
	case !errors.As(r.err, &exit) || !exit.Exited():
		t.Errorf("keel %s: %v; want a prompt refusal (non-zero exit within %v)\n%s", strings.Join(args, " "), r.err, d, r.stderr)
	case strings.TrimSpace(r.stderr) == "":
		t.Errorf("keel %s refused (%v) without saying why on stderr", strings.Join(args, " "), r.err)
	default:
		t.Logf("keel refused: %v: %s", r.err, strings.TrimSpace(r.stderr))
	}
}

// TestListenTCP serves on loopback TCP and stops on SIGINT.
func TestListenTCP(t *testing.T) {
	nbdinfo, qemuIO := tool(t, "nbdinfo"), tool(t, "qemu-io")
	s := startKeel(t, serveOpts{tcp: true, size: "16M"})
	if got := strings.TrimSpace(mustRun(t, toolTimeout, nbdinfo, "--size", s.uri())); got != strconv.Itoa(16*mib) {
		t.Errorf("nbdinfo --size = %s, want %d", got, 16*mib)
	}
	mustRun(t, toolTimeout, qemuIO, "-f", "raw", "-c", "write -P 0x5c 0 64k", s.uri())
	s.stopWith(os.Interrupt) // asserts exit status 0
	checkFill(t, "written over TCP", readFile(t, s.image), 0, 64*kib, 0x5c)
}

func TestExportName(t *testing.T) {
	nbdinfo := tool(t, "nbdinfo")
	s := startKeel(t, serveOpts{size: "16M", name: "vol0"})
	for _, name := range []string{"vol0", ""} {
		u := "nbd+unix:///" + name + "?socket=" + s.sock
		if got := strings.TrimSpace(mustRun(t, toolTimeout, nbdinfo, "--size", u)); got != strconv.Itoa(16*mib) {
			t.Errorf("export %q: nbdinfo --size = %s, want %d", name, got, 16*mib)
		}
	}
	if r := run(t, toolTimeout, nbdinfo, "--size", "nbd+unix:///other?socket="+s.sock); r.err == nil {
		t.Errorf("export \"other\" was served (size %s), want an error for an unknown export name", strings.TrimSpace(r.stdout))
	}
}

// nbdinfoJSON is the part of `nbdinfo --json` that the tests check.
type nbdinfoJSON struct {
	Protocol   string `json:"protocol"`
	Structured bool   `json:"structured"`
	Exports    []struct {
		Name           string   `json:"export-name"`
		Contexts       []string `json:"contexts"`
		IsReadOnly     bool     `json:"is_read_only"`
		CanCache       bool     `json:"can_cache"`
		CanDF          bool     `json:"can_df"`
		CanFastZero    bool     `json:"can_fast_zero"`
		CanFlush       bool     `json:"can_flush"`
		CanFUA         bool     `json:"can_fua"`
		CanMultiConn   bool     `json:"can_multi_conn"`
		CanTrim        bool     `json:"can_trim"`
		CanZero        bool     `json:"can_zero"`
		BlockMinimum   *int64   `json:"block_size_minimum"`
		BlockPreferred *int64   `json:"block_size_preferred"`
		BlockMaximum   *int64   `json:"block_size_maximum"`
		Size           int64    `json:"export-size"`
	} `json:"exports"`
}

func getInfo(t *testing.T, uri string) nbdinfoJSON {
	t.Helper()
	out := mustRun(t, toolTimeout, tool(t, "nbdinfo"), "--json", uri)
	var info nbdinfoJSON
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo --json lists %d exports, want 1\n%s", len(info.Exports), out)
	}
	t.Logf("nbdinfo --json:\n%s", out)
	return info
}

func TestNbdinfoFlags(t *testing.T) {
	for _, tc := range []struct {
		name     string
		opts     serveOpts
		size     int64
		minBlock int64
	}{
		{"read-write", serveOpts{size: "64M"}, 64 * mib, 512},
		{"read-only", serveOpts{readOnly: true}, 64 * mib, 512},
		{"odd size", serveOpts{}, 1000, 1}, // an existing image of 1000 bytes
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.opts.size == "" {
				tc.opts.image = createImage(t, tc.size, nil)
			}
			s := startKeel(t, tc.opts)
			info := getInfo(t, s.uri())
			e := info.Exports[0]
			check := func(what string, got, want any) {
				t.Helper()
				if got != want {
					t.Errorf("%s = %v, want %v", what, got, want)
				}
			}
			check("protocol", info.Protocol, "newstyle-fixed")
			check("structured", info.Structured, true)
			check("export-size", e.Size, tc.size)
			check("is_read_only", e.IsReadOnly, tc.opts.readOnly)
			check("can_df", e.CanDF, true)
			check("can_multi_conn", e.CanMultiConn, true)
			check("can_cache", e.CanCache, true)
			if !tc.opts.readOnly {
				check("can_flush", e.CanFlush, true)
				check("can_fua", e.CanFUA, true)
				check("can_trim", e.CanTrim, true)
				check("can_zero", e.CanZero, true)
				check("can_fast_zero", e.CanFastZero, true)
			}
			if !contains(e.Contexts, "base:allocation") {
				t.Errorf("contexts = %q, want base:allocation among them", e.Contexts)
			}
			for _, b := range []struct {
				what string
				got  *int64
				want int64
			}{
				{"block_size_minimum", e.BlockMinimum, tc.minBlock},
				{"block_size_preferred", e.BlockPreferred, 4096},
				{"block_size_maximum", e.BlockMaximum, 32 * mib},
			} {
				if b.got == nil {
					t.Errorf("%s missing (no NBD_INFO_BLOCK_SIZE?)", b.what)
				} else {
					check(b.what, *b.got, b.want)
				}
			}
		})
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// ---------------------------------------------------------------------------
// Data through real clients.

func TestQemuIO(t *testing.T) {
	qemuIO, qemuImg := tool(t, "qemu-io"), tool(t, "qemu-img")
	const size = 64 * mib
	s := startKeel(t, serveOpts{size: "64M"})

	// Each MiB from 0 to 6 ends in a different state; comments give the
	// NBD command qemu sends.
	cmds := []string{
		"write -P 0xab 0 1M", // WRITE
		"read -P 0xab 0 1M",
		"write -P 0xcc 1M 1M",
		"write -z 1M 1M", // WRITE_ZEROES + NO_HOLE over data
		"write -P 0xcc 2M 1M",
		"discard 2M 1M",          // TRIM
		"write -f -P 0xcd 3M 1M", // WRITE + FUA
		"write -P 0xcc 4M 1M",
		"write -z -u 4M 1M", // WRITE_ZEROES, holes allowed
		"write -z 5M 1M",    // WRITE_ZEROES + NO_HOLE over a hole
		"flush",             // FLUSH
		"read -P 0 1M 1M",
		"read -P 0 2M 1M",
		"read -P 0xcd 3M 1M",
		"read -P 0 4M 1M",
		"read -P 0 5M 1M",
		"read -P 0 6M 58M",
	}
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := mustRun(t, toolTimeout, qemuIO, append(args, s.uri())...)
	t.Logf("qemu-io:\n%s", out)
	if strings.Contains(out, "failed") {
		t.Errorf("qemu-io reported a failure:\n%s", out)
	}
	if n := strings.Count(out, "wrote "); n != 8 {
		t.Errorf("qemu-io reported %d writes, want 8", n)
	}
	if n := strings.Count(out, "discard "); n != 1 {
		t.Errorf("qemu-io reported %d discards, want 1", n)
	}
	if n := strings.Count(out, "read "); n != 7 {
		t.Errorf("qemu-io reported %d reads, want 7", n)
	}

	// qemu-io's map must account for the whole disk.
	out = mustRun(t, toolTimeout, qemuIO, "-f", "raw", "-c", "map", s.uri())
	if got := mapTotal(t, out); got != size {
		t.Errorf("qemu-io map covers %d bytes, want %d:\n%s", got, size, out)
	}

	// The file itself.
	img := readFile(t, s.image)
	if len(img) != size {
		t.Fatalf("image is %d bytes, want %d", len(img), size)
	}
	checkFill(t, "write -P 0xab", img, 0, mib, 0xab)
	checkFill(t, "write -z over data", img, mib, mib, 0)
	checkFill(t, "discard", img, 2*mib, mib, 0)
	checkFill(t, "write -f", img, 3*mib, mib, 0xcd)
	checkFill(t, "write -z -u", img, 4*mib, mib, 0)
	checkFill(t, "write -z over a hole", img, 5*mib, mib, 0)
	checkFill(t, "never written", img, 6*mib, size-6*mib, 0)

	layout := fileLayout(t, s.image)
	t.Logf("image layout: %v", layout)
	if !isData(layout, 0, mib) || !isData(layout, 3*mib, mib) {
		t.Errorf("written MiBs 0 and 3 are not all data in the file: %v", layout)
	}
	if !isHole(layout, 2*mib, mib) {
		t.Errorf("discard 2M 1M did not punch a hole in the file: %v", layout)
	}
	if !isHole(layout, 4*mib, mib) {
		t.Errorf("write -z -u 4M 1M did not punch a hole in the file: %v", layout)
	}
	if !isHole(layout, 6*mib, size-6*mib) {
		t.Errorf("never-written tail is not a hole: %v", layout)
	}
	// WRITE_ZEROES with NO_HOLE must leave MiBs 1 and 5 allocated
	// (SEEK_DATA may still call unwritten extents holes, st_blocks does not).
	if a := allocatedBytes(t, s.image); a < 4*mib {
		t.Errorf("image has %d bytes allocated, want at least 4 MiB (MiBs 0, 1, 3, 5; NO_HOLE must allocate)", a)
	}

	// qemu's view of allocation comes from base:allocation; it must agree
	// with the file.
	out = mustRun(t, toolTimeout, qemuImg, "map", "-f", "raw", "--output=json", s.uri())
	var qmap []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
		Zero   bool  `json:"zero"`
	}
	if err := json.Unmarshal([]byte(out), &qmap); err != nil {
		t.Fatalf("qemu-img map: %v\n%s", err, out)
	}
	var qlayout []extent
	for _, e := range qmap {
		if !e.Data && !e.Zero {
			t.Errorf("qemu-img map extent %+v is neither data nor zero", e)
		}
		qlayout = append(qlayout, extent{e.Start, e.Length, !e.Data})
	}
	if got := fmt.Sprint(mergeExtents(qlayout)); got != fmt.Sprint(layout) {
		t.Errorf("qemu-img map disagrees with the file:\n map: %s\nfile: %v", got, layout)
	}
}

// mapTotal sums the lengths in qemu-io's map output and checks that the
// ranges are contiguous from 0.
func mapTotal(t *testing.T, out string) int64 {
	t.Helper()
	re := regexp.MustCompile(`\((0x[0-9a-f]+)\) bytes.* at offset .*\((0x[0-9a-f]+)\)`)
	var total int64
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		m := re.FindStringSubmatch(line)
		if m == nil {
			t.Errorf("qemu-io map: unexpected line %q", line)
			continue
		}
		n, _ := strconv.ParseInt(m[1], 0, 64)
		off, _ := strconv.ParseInt(m[2], 0, 64)
		if off != total {
			t.Errorf("qemu-io map: range at %d, want %d", off, total)
		}
		total = off + n
	}
	return total
}

func TestNbdinfoMap(t *testing.T) {
	nbdinfo, qemuIO := tool(t, "nbdinfo"), tool(t, "qemu-io")
	const size = 64 * mib
	// Data the image has before the server starts...
	img := createImage(t, size, map[int64][]byte{
		0:            bytes.Repeat([]byte{1}, 4*kib),
		1 * mib:      bytes.Repeat([]byte{2}, 64*kib),
		10 * mib:     bytes.Repeat([]byte{3}, mib),
		size - 4*kib: bytes.Repeat([]byte{4}, 4*kib),
	})
	s := startKeel(t, serveOpts{image: img})
	// ...and what is written and discarded through it.
	mustRun(t, toolTimeout, qemuIO, "-f", "raw",
		"-c", "write -P 0x11 20M 512k",
		"-c", "write -P 0x12 33M 4k",
		"-c", "discard 10M 512k",
		s.uri())

	layout := fileLayout(t, s.image)
	t.Logf("image layout: %v", layout)
	// The comparison below means nothing if the layout is trivial.
	for _, want := range []struct {
		off, n int64
		hole   bool
	}{
		{0, 4 * kib, false}, {64 * kib, 512 * kib, true}, {1 * mib, 64 * kib, false},
		{10 * mib, 512 * kib, true}, {10*mib + 512*kib, 512 * kib, false},
		{20 * mib, 512 * kib, false}, {33 * mib, 4 * kib, false}, {40 * mib, mib, true},
		{size - 4*kib, 4 * kib, false},
	} {
		if want.hole && !isHole(layout, want.off, want.n) || !want.hole && !isData(layout, want.off, want.n) {
			t.Fatalf("the filesystem did not keep the layout this test needs ([%d,+%d) hole=%v): %v", want.off, want.n, want.hole, layout)
		}
	}

	out := mustRun(t, toolTimeout, nbdinfo, "--map", "--json", s.uri())
	var nmap []struct {
		Offset int64  `json:"offset"`
		Length int64  `json:"length"`
		Type   uint32 `json:"type"`
		Desc   string `json:"description"`
	}
	if err := json.Unmarshal([]byte(out), &nmap); err != nil {
		t.Fatalf("nbdinfo --map --json: %v\n%s", err, out)
	}
	var got []extent
	for _, e := range nmap {
		switch e.Type {
		case 0:
			got = append(got, extent{e.Offset, e.Length, false})
		case 3:
			got = append(got, extent{e.Offset, e.Length, true})
		default:
			t.Errorf("nbdinfo --map: extent at %d has type %d (%s), want 0 (data) or 3 (hole,zero)", e.Offset, e.Type, e.Desc)
		}
	}
	if fmt.Sprint(mergeExtents(got)) != fmt.Sprint(layout) {
		t.Errorf("nbdinfo --map disagrees with SEEK_DATA/SEEK_HOLE on the image:\nnbdinfo: %v\n   file: %v", mergeExtents(got), layout)
	}
}

func TestNbdcopyRoundTrip(t *testing.T) {
	nbdcopy := tool(t, "nbdcopy")
	const size = 256 * mib
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src.bin"), filepath.Join(dir, "dst.bin")
	want := make([]byte, size)
	rng := rand.NewChaCha8([32]byte{'k', 'e', 'e', 'l'})
	rng.Read(want)
	// Leave some runs of zeros so sparseness detection has work to do.
	for off := 0; off < size; off += 16 * mib {
		clear(want[off : off+mib])
	}
	if err := os.WriteFile(src, want, 0o644); err != nil {
		t.Fatal(err)
	}

	s := startKeel(t, serveOpts{size: "256M"})
	mustRun(t, toolTimeout, nbdcopy, "--connections=4", "--flush", src, s.uri())
	mustRun(t, toolTimeout, nbdcopy, "--connections=4", s.uri(), dst)

	compareFile(t, "nbdcopy's copy out", dst, want)
	compareFile(t, "the image file", s.image, want)
}

// compareFile compares a file with want a few MiB at a time.
func compareFile(t *testing.T, what, path string, want []byte) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4*mib)
	for off := 0; ; {
		n, err := io.ReadFull(f, buf)
		if n > len(want)-off {
			t.Errorf("%s is longer than the %d bytes that went in", what, len(want))
			return
		}
		if !bytes.Equal(buf[:n], want[off:off+n]) {
			t.Errorf("%s differs from what went in: %s", what, firstDiff(buf[:n], want[off:off+n]))
			return
		}
		off += n
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			if off != len(want) {
				t.Errorf("%s is %d bytes, want %d", what, off, len(want))
			}
			return
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

func firstDiff(got, want []byte) string {
	if len(got) != len(want) {
		return fmt.Sprintf("length %d, want %d", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			return fmt.Sprintf("first difference at byte %d: %#02x, want %#02x", i, got[i], want[i])
		}
	}
	return "no difference"
}

func TestFioVerify(t *testing.T) {
	fio := tool(t, "fio")
	s := startKeel(t, serveOpts{size: "256M"})
	out := filepath.Join(t.TempDir(), "fio.json")
	const size = 128 * mib
	r := run(t, 5*time.Minute, fio,
		"--name=randwrite-verify", "--ioengine=nbd", "--uri="+s.uri(),
		"--rw=randwrite", "--bs=4k", "--iodepth=32", "--size="+strconv.Itoa(size),
		"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
		"--output-format=json", "--output="+out)
	if r.err != nil {
		t.Fatalf("fio: %v\nstdout:\n%s\nstderr:\n%s", r.err, r.stdout, r.stderr)
	}
	if strings.Contains(r.stdout+r.stderr, "verify:") {
		t.Errorf("fio mentioned verification problems:\n%s\n%s", r.stdout, r.stderr)
	}
	var res struct {
		Jobs []fioJob `json:"jobs"`
	}
	b := readFile(t, out)
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatalf("fio json: %v\n%s", err, b)
	}
	if len(res.Jobs) != 1 {
		t.Fatalf("fio reported %d jobs, want 1", len(res.Jobs))
	}
	j := res.Jobs[0]
	if j.Error != 0 || j.Write.IOBytes != size || j.Read.IOBytes != size {
		t.Errorf("fio job: error %d, wrote %d, verified %d; want 0, %d, %d", j.Error, j.Write.IOBytes, j.Read.IOBytes, size, size)
	}
}

// ---------------------------------------------------------------------------
// Bad requests through libnbd with its client-side checks off.

// badCase is what testdata/badinput.py reports for one request.
type badCase struct {
	Name   string  `json:"name"`
	Errno  *string `json:"errno"` // nil when the request succeeded
	After  string  `json:"after"` // "ok", or what went wrong with a normal read afterwards
	Zeroed *bool   `json:"zeroed,omitempty"`
}

// badPattern must match PATTERN in testdata/badinput.py.
const badPattern = 0x5a

func runBadInput(t *testing.T, s *keelServer, mode string, want map[string][]string) {
	t.Helper()
	out := script(t, "badinput.py", s.uri(), mode)
	var res struct {
		Cases []badCase `json:"cases"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("badinput.py: %v\n%s", err, out)
	}
	seen := map[string]bool{}
	for _, c := range res.Cases {
		seen[c.Name] = true
		allowed, ok := want[c.Name]
		if !ok {
			t.Errorf("%s: no expectation in the test", c.Name)
			continue
		}
		got := "ok"
		if c.Errno != nil {
			got = *c.Errno
		}
		if !contains(allowed, got) {
			t.Errorf("%s: got %s, want %s", c.Name, got, strings.Join(allowed, " or "))
		}
		if c.After != "ok" {
			t.Errorf("%s: connection not usable afterwards: %s", c.Name, c.After)
		}
		if c.Zeroed != nil && got == "ok" && !*c.Zeroed {
			t.Errorf("%s: succeeded but the range does not read back as zeros", c.Name)
		}
	}
	for name := range want {
		if !seen[name] {
			t.Errorf("%s: badinput.py did not report it", name)
		}
	}
}

func TestBadRequests(t *testing.T) {
	s := startKeel(t, serveOpts{size: "64M"})
	ok := []string{"ok"}
	runBadInput(t, s, "rw", map[string][]string{
		"read past end":               {"EINVAL"},
		"read straddling end":         {"EINVAL"},
		"write past end":              {"ENOSPC"},
		"write straddling end":        {"ENOSPC"},
		"zero past end":               {"ENOSPC"},
		"trim past end":               {"EINVAL"},
		"cache past end":              {"EINVAL"},
		"block status past end":       {"EINVAL"},
		"read misaligned offset":      {"EINVAL"},
		"read misaligned length":      {"EINVAL"},
		"write misaligned":            {"EINVAL"},
		"zero misaligned":             {"EINVAL"},
		"trim misaligned":             {"EINVAL"},
		"read 33 MiB":                 {"EOVERFLOW"},
		"write 33 MiB":                {"EINVAL"},
		"read unknown flag":           {"EINVAL"},
		"write unknown flag":          {"EINVAL"},
		"read with NO_HOLE":           {"EINVAL"},
		"write with DF":               {"EINVAL"},
		"read with FUA":               ok, // the spec: FUA is valid on every command
		"flush with FUA":              ok,
		"read with DF":                ok,
		"read 0 bytes":                {"ok", "EINVAL"}, // the spec leaves it open
		"write 0 bytes":               {"ok", "EINVAL"},
		"zero FAST_ZERO":              ok, // punching a hole is fast
		"zero FAST_ZERO NO_HOLE":      {"ok", "ENOTSUP"},
		"simple: read 33 MiB":         {"EINVAL"},
		"no meta: block status":       {"EINVAL"},
		"read 32 MiB":                 ok,
		"write 32 MiB":                ok,
		"block status whole disk":     ok,
		"second connection sees data": ok,
	})
}

func TestBadRequestsReadOnly(t *testing.T) {
	img := createImage(t, 64*mib, map[int64][]byte{0: bytes.Repeat([]byte{badPattern}, 64*kib)})
	s := startKeel(t, serveOpts{image: img, readOnly: true})
	runBadInput(t, s, "ro", map[string][]string{
		"write":          {"EPERM"},
		"zero":           {"EPERM"},
		"trim":           {"EPERM"},
		"write past end": {"EPERM", "ENOSPC"},
		"read":           {"ok"},
		"cache":          {"ok"},
		"block status":   {"ok"},
	})
	checkFill(t, "read-only image", readFile(t, img), 0, 64*kib, badPattern)
	checkFill(t, "read-only image", readFile(t, img), 64*kib, 64*mib-64*kib, 0)
}

// ---------------------------------------------------------------------------
// Stopping.

// TestGracefulStop sends SIGTERM while 32 writes are always in flight. The
// server must exit 0, must not answer any request with an error because it is
// stopping, and every acknowledged write must be in the file.
func TestGracefulStop(t *testing.T) {
	py := python(t)
	s := startKeel(t, serveOpts{size: "64M"})

	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, py, filepath.Join("testdata", "graceful.py"), s.uri())
	cmd.WaitDelay = 5 * time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := bufio.NewScanner(stdout)
	lines.Buffer(nil, 64*mib)
	if !lines.Scan() || lines.Text() != "ready" {
		cmd.Wait()
		t.Fatalf("graceful.py did not get going: %q %v\n%s", lines.Text(), lines.Err(), stderr.String())
	}
	s.stop() // SIGTERM; asserts exit 0
	var report struct {
		Issued int            `json:"issued"`
		Block  int            `json:"block"`
		Blocks int            `json:"blocks"`
		Acked  []int          `json:"acked"`
		Failed map[string]int `json:"failed"` // index -> errno
		End    string         `json:"end"`
	}
	if !lines.Scan() {
		cmd.Wait()
		t.Fatalf("graceful.py printed no report: %v\n%s", lines.Err(), stderr.String())
	}
	if err := json.Unmarshal(lines.Bytes(), &report); err != nil {
		t.Fatalf("graceful.py report: %v\n%s", err, lines.Text())
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("graceful.py: %v\n%s", err, stderr.String())
	}
	t.Logf("issued %d writes, %d acknowledged, %d failed; connection ended with %q",
		report.Issued, len(report.Acked), len(report.Failed), report.End)

	// Requests the server never read fail in libnbd with ENOTCONN when the
	// connection closes; an error the server sent (ESHUTDOWN, EIO) is wrong.
	for i, e := range report.Failed {
		if e != int(unix.ENOTCONN) && e != int(unix.ECONNRESET) && e != int(unix.EPIPE) {
			t.Errorf("write %s failed with %v, want only connection-closed errors while stopping", i, syscall.Errno(e))
		}
	}

	// Each block holds the last acknowledged write to it, or a later one
	// whose answer the client never saw.
	img := readFile(t, s.image)
	last := make([]int, report.Blocks)
	for i := range last {
		last[i] = -1
	}
	for _, i := range report.Acked {
		if b := i % report.Blocks; i > last[b] {
			last[b] = i
		}
	}
	fill := func(i int) byte { return byte(i%251) + 1 } // as in graceful.py
	for b := range report.Blocks {
		chunk := img[b*report.Block : (b+1)*report.Block]
		allowed := map[byte]bool{}
		if last[b] < 0 {
			allowed[0] = true // never acknowledged: may be untouched
		}
		for i := b; i < report.Issued; i += report.Blocks {
			if i >= last[b] {
				allowed[fill(i)] = true
			}
		}
		if !allowed[chunk[0]] || bytes.Count(chunk, chunk[:1]) != len(chunk) {
			t.Errorf("block %d: holds %#02x..., want one of the writes from write %d on (acknowledged before stop)", b, chunk[0], last[b])
		}
	}
}

// TestStopWithIdleClients: clients that send nothing, one in negotiation and
// one in transmission, must not hold up a stop, and must see the connection
// close rather than an error reply.
func TestStopWithIdleClients(t *testing.T) {
	s := startKeel(t, serveOpts{size: "16M"})
	negotiating := rawDial(t, s.sock)
	transmitting := rawDial(t, s.sock)
	transmitting.structuredReplies()
	transmitting.goExport("")
	start := time.Now()
	s.stop() // SIGTERM; asserts exit status 0 within stopTimeout
	t.Logf("stopped in %v", time.Since(start))
	for name, c := range map[string]*rawConn{"negotiating": negotiating, "transmitting": transmitting} {
		if n, err := io.Copy(io.Discard, c.c); err != nil || n != 0 {
			t.Errorf("%s client: %d bytes then %v, want a plain close", name, n, err)
		}
	}
}

// ---------------------------------------------------------------------------
// Hostile and broken clients, through the raw client below.

// TestUnknownCommand sends command types no NBD version defines.
func TestUnknownCommand(t *testing.T) {
	s := startKeel(t, serveOpts{size: "16M"})
	for _, mode := range []string{"structured", "simple"} {
		t.Run(mode, func(t *testing.T) {
			c := rawDial(t, s.sock)
			if mode == "structured" {
				c.structuredReplies()
				c.goExport("")
			} else {
				c.exportName("")
				if c.flags&tflagSendDF != 0 {
					t.Errorf("transmission flags %#04x offer DF without structured replies", c.flags)
				}
			}
			wantFlags := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim |
				tflagSendWriteZeroes | tflagCanMultiConn | tflagSendCache | tflagSendFastZero)
			if mode == "structured" {
				wantFlags |= tflagSendDF
			}
			if c.flags&wantFlags != wantFlags {
				t.Errorf("transmission flags %#04x lack %#04x", c.flags, wantFlags&^c.flags)
			}
			for _, typ := range []uint16{12, 0x42, 0xffff} {
				if r := c.do(0, typ, 0, 0, nil); r.errno != nbdEINVAL {
					t.Errorf("command type %#x: error %d, want EINVAL (22)", typ, r.errno)
				}
				if r := c.do(0, cmdRead, 0, 4096, nil); r.errno != 0 || len(r.data) != 4096 {
					t.Errorf("read after command type %#x: error %d, %d bytes", typ, r.errno, len(r.data))
				}
			}
			c.disconnect()
		})
	}
}

// TestOptionHaggling: fixed newstyle means an option the server does not
// know, or an export it does not have, is an error reply and negotiation
// goes on.
func TestOptionHaggling(t *testing.T) {
	s := startKeel(t, serveOpts{size: "16M", name: "vol0"})
	c := rawDial(t, s.sock)
	if r := c.optionReplies(99, []byte("what is this")); r[len(r)-1].typ != repErrUnsup {
		t.Errorf("unknown option 99: reply %#x, want NBD_REP_ERR_UNSUP", r[len(r)-1].typ)
	}
	goOther := binary.BigEndian.AppendUint32(nil, 5)
	goOther = append(goOther, "other"...)
	goOther = binary.BigEndian.AppendUint16(goOther, 0)
	if r := c.optionReplies(optGo, goOther); r[len(r)-1].typ != repErrUnknown {
		// After an ACK the connection is in transmission; stop here.
		t.Fatalf("NBD_OPT_GO for export \"other\": reply %#x, want NBD_REP_ERR_UNKNOWN", r[len(r)-1].typ)
	}
	var names []string
	for _, rep := range c.option(optList, nil) {
		if rep.typ == repServer && len(rep.data) >= 4 {
			n := binary.BigEndian.Uint32(rep.data)
			if int(n) <= len(rep.data)-4 {
				names = append(names, string(rep.data[4:4+n]))
			}
		}
	}
	if !contains(names, "vol0") {
		t.Errorf("NBD_OPT_LIST: %q, want vol0 among them", names)
	}
	c.structuredReplies()
	c.goExport("vol0")
	if c.size != 16*mib {
		t.Errorf("export size %d, want %d", c.size, 16*mib)
	}
	if r := c.do(0, cmdRead, 0, 4096, nil); r.errno != 0 || len(r.data) != 4096 {
		t.Errorf("read: error %d, %d bytes", r.errno, len(r.data))
	}
	c.disconnect()
}

// TestStructuredReplies checks what libnbd smooths over: DF means at most
// one content chunk, REQ_ONE at most one extent, holes read as zeros.
func TestStructuredReplies(t *testing.T) {
	s := startKeel(t, serveOpts{size: "16M"})
	c := rawDial(t, s.sock)
	c.structuredReplies()
	c.setMeta("", "base:allocation")
	c.goExport("")
	payload := bytes.Repeat([]byte{0x99}, 8192)
	if r := c.do(0, cmdWrite, 1*mib, uint64(len(payload)), payload); r.errno != 0 {
		t.Fatalf("write: error %d", r.errno)
	}
	want := append(append(make([]byte, 64*kib), payload...), make([]byte, 64*kib)...)
	for _, flags := range []uint16{0, cmdFlagDF} {
		r := c.do(flags, cmdRead, 1*mib-64*kib, uint64(len(want)), nil)
		if r.errno != 0 {
			t.Errorf("read (flags %#x): error %d", flags, r.errno)
			continue
		}
		if !bytes.Equal(r.data, want) {
			t.Errorf("read (flags %#x): %s", flags, firstDiff(r.data, want))
		}
		if flags&cmdFlagDF != 0 && r.chunks > 1 {
			t.Errorf("read with DF: %d content chunks, want at most 1", r.chunks)
		}
		t.Logf("read (flags %#x): %d content chunks", flags, r.chunks)
	}
	r := c.do(cmdFlagReqOne, cmdBlockStatus, 0, 16*mib, nil)
	if r.errno != 0 || len(r.extents) != 1 || r.extents[0].flags != 3 || r.extents[0].len > 1*mib {
		t.Errorf("block status REQ_ONE from 0: error %d, extents %+v; want one hole (3) of at most 1 MiB", r.errno, r.extents)
	}
	r = c.do(0, cmdBlockStatus, 1*mib, 8192, nil)
	if r.errno != 0 || len(r.extents) == 0 || r.extents[0].flags != 0 {
		t.Errorf("block status at 1 MiB: error %d, extents %+v; want data (0) first", r.errno, r.extents)
	}
	c.disconnect()
}

// TestExtendedHeaders negotiates NBD_OPT_EXTENDED_HEADERS, which neither
// libnbd 1.14 nor qemu 7.2 speak, and uses 64-bit requests and replies.
func TestExtendedHeaders(t *testing.T) {
	s := startKeel(t, serveOpts{size: "64M"})
	c := rawDial(t, s.sock)
	if r := c.option(optExtendedHeaders, nil); r[len(r)-1].typ != repAck {
		t.Fatalf("NBD_OPT_EXTENDED_HEADERS: reply %#x, want ACK", r[len(r)-1].typ)
	}
	c.extended, c.structured = true, true
	c.setMeta("", "base:allocation")

	// NBD_OPT_INFO first: the export and its block sizes, staying in
	// negotiation.
	info := c.info("", optInfo)
	if info.size != 64*mib || info.minBlock != 512 || info.prefBlock != 4096 || info.maxBlock != 32*mib {
		t.Errorf("NBD_OPT_INFO: size %d, block sizes %d/%d/%d; want %d, 512/4096/%d",
			info.size, info.minBlock, info.prefBlock, info.maxBlock, 64*mib, 32*mib)
	}
	c.goExport("")

	payload := bytes.Repeat([]byte{0x77}, 8192)
	if r := c.do(cmdFlagPayloadLen, cmdWrite, 1*mib, uint64(len(payload)), payload); r.errno != 0 {
		t.Fatalf("extended write: error %d", r.errno)
	}
	if r := c.do(0, cmdRead, 1*mib-4096, 3*4096, nil); r.errno != 0 {
		t.Errorf("extended read: error %d", r.errno)
	} else if want := append(make([]byte, 4096), payload...); !bytes.Equal(r.data, want) {
		t.Errorf("extended read: %s", firstDiff(r.data, want))
	}
	r := c.do(0, cmdBlockStatus, 0, 64*mib, nil)
	if r.errno != 0 {
		t.Fatalf("extended block status: error %d", r.errno)
	}
	var off uint64
	var sawData bool
	for _, e := range r.extents {
		if off <= 1*mib && 1*mib < off+e.len {
			sawData = e.flags == 0
		}
		off += e.len
	}
	if !sawData || len(r.extents) < 2 || r.extents[0].flags != 3 {
		t.Errorf("extended block status %+v: want a hole (3) at 0 and data (0) at 1 MiB", r.extents)
	}
	if r := c.do(0, cmdRead, 0, 33*mib, nil); r.errno != nbdEOVERFLOW {
		t.Errorf("extended read of 33 MiB: error %d, want EOVERFLOW (75)", r.errno)
	}
	if r := c.do(0, cmdRead, 1*mib, 4096, nil); r.errno != 0 || !bytes.Equal(r.data, payload[:4096]) {
		t.Errorf("read after the oversize read: error %d", r.errno)
	}
	c.disconnect()
	checkFill(t, "extended write", readFile(t, s.image), 1*mib, len(payload), 0x77)
}

// brokenClient is one way to misbehave, run on a fresh connection.
type brokenClient struct {
	name string
	// act misbehaves on c, which is a fresh connection to the server.
	act func(t *testing.T, c net.Conn)
	// hangsUp says the server must close the connection afterwards.
	hangsUp bool
}

// checkBrokenClients runs each misbehaviour against one server holding
// known data, then asserts that the server closed the connection when it
// had to, logged about one line, kept the data, and still serves.
func checkBrokenClients(t *testing.T, cases []brokenClient) {
	nbdinfo := tool(t, "nbdinfo")
	img := createImage(t, 16*mib, map[int64][]byte{0: bytes.Repeat([]byte{0x11}, mib)})
	s := startKeel(t, serveOpts{image: img})
	for _, bc := range cases {
		t.Run(bc.name, func(t *testing.T) {
			before := len(s.lines())
			c, err := net.DialTimeout("unix", s.sock, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			bc.act(t, c)
			if bc.hangsUp {
				if _, err := io.Copy(io.Discard, c); err != nil && !errors.Is(err, syscall.ECONNRESET) {
					t.Errorf("server did not close the connection: %v", err)
				}
			}
			c.Close()
			s.waitLines(t, before)
			// A well-behaved client afterwards proves the server still
			// serves; lines logged meanwhile count against the broken one.
			if got := strings.TrimSpace(mustRun(t, toolTimeout, nbdinfo, "--size", s.uri())); got != strconv.Itoa(16*mib) {
				t.Errorf("nbdinfo --size afterwards = %s", got)
			}
			lines := s.lines()
			if n := len(lines) - before; n > 3 {
				t.Errorf("server logged %d lines for one broken client, want about one:\n%s", n, strings.Join(lines[before:], "\n"))
			} else {
				t.Logf("server logged:\n%s", strings.Join(lines[before:], "\n"))
			}
			b := readFile(t, img)
			checkFill(t, "data written before", b, 0, mib, 0x11)
			checkFill(t, "never written", b, mib, 15*mib, 0)
		})
	}
}

func TestDisconnectMidRequest(t *testing.T) {
	writeHeader := func(length uint32) []byte {
		h := binary.BigEndian.AppendUint32(nil, requestMagic)
		h = binary.BigEndian.AppendUint16(h, 0)
		h = binary.BigEndian.AppendUint16(h, cmdWrite)
		h = binary.BigEndian.AppendUint64(h, 1)
		h = binary.BigEndian.AppendUint64(h, 0) // over the known data
		return binary.BigEndian.AppendUint32(h, length)
	}
	transmit := func(t *testing.T, c net.Conn) *rawConn {
		r := &rawConn{t: t, c: c}
		r.greet()
		r.structuredReplies()
		r.goExport("")
		return r
	}
	checkBrokenClients(t, []brokenClient{
		{name: "half a request header", act: func(t *testing.T, c net.Conn) {
			transmit(t, c)
			c.Write(writeHeader(mib)[:14])
		}},
		{name: "half a write payload", act: func(t *testing.T, c net.Conn) {
			transmit(t, c)
			c.Write(append(writeHeader(mib), bytes.Repeat([]byte{0x22}, mib/2)...))
		}},
		{name: "reads in flight", act: func(t *testing.T, c net.Conn) {
			r := transmit(t, c)
			for i := range 64 {
				r.send(0, cmdRead, uint64(i)*mib%(16*mib), mib, nil)
			}
			// Close with 64 MiB of replies unread.
			c.(*net.UnixConn).CloseRead()
		}},
		{name: "half an option", act: func(t *testing.T, c net.Conn) {
			r := &rawConn{t: t, c: c}
			r.greet()
			msg := appendOption(nil, optGo, make([]byte, 64))
			c.Write(msg[:30])
		}},
	})
}

func TestGarbage(t *testing.T) {
	rng := rand.New(rand.NewChaCha8([32]byte{'g', 'a', 'r', 'b', 'a', 'g', 'e'}))
	garbage := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	readGreeting := func(t *testing.T, c net.Conn) {
		if _, err := io.ReadFull(c, make([]byte, 18)); err != nil {
			t.Fatalf("greeting: %v", err)
		}
	}
	checkBrokenClients(t, []brokenClient{
		{name: "before the greeting", hangsUp: true, act: func(t *testing.T, c net.Conn) {
			c.Write(append([]byte{0xde, 0xad, 0xbe, 0xef}, garbage(4092)...))
		}},
		{name: "as client flags", hangsUp: true, act: func(t *testing.T, c net.Conn) {
			readGreeting(t, c)
			c.Write(append([]byte{0xff, 0xff, 0xff, 0xfc}, garbage(60)...))
		}},
		{name: "as an option", hangsUp: true, act: func(t *testing.T, c net.Conn) {
			readGreeting(t, c)
			c.Write(binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes))
			c.Write(garbage(64))
		}},
		{name: "option of 4 GiB", hangsUp: true, act: func(t *testing.T, c net.Conn) {
			readGreeting(t, c)
			msg := binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
			msg = binary.BigEndian.AppendUint64(msg, optMagic)
			msg = binary.BigEndian.AppendUint32(msg, optGo)
			msg = binary.BigEndian.AppendUint32(msg, 0xffffffff)
			c.Write(append(msg, garbage(100)...))
			c.(*net.UnixConn).CloseWrite() // the server must not wait for 4 GiB
		}},
		{name: "as a request", hangsUp: true, act: func(t *testing.T, c net.Conn) {
			r := &rawConn{t: t, c: c}
			r.greet()
			r.exportName("")
			c.Write(garbage(28))
			c.Write(garbage(4096))
		}},
	})
}

// ---------------------------------------------------------------------------
// A raw NBD client: just enough protocol to send what real clients will not.
// Layouts follow doc/proto.md of NetworkBlockDevice/nbd.

const (
	optMagic          = 0x49484156454F5054 // "IHAVEOPT"
	optReplyMagic     = 0x3e889045565a9
	requestMagic      = 0x25609513
	extRequestMagic   = 0x21e41c71
	simpleReplyMagic  = 0x67446698
	structReplyMagic  = 0x668e33ef
	extReplyMagic     = 0x6e8a278c
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	optExportName      = 1
	optList            = 3
	optAbort           = 2
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optSetMetaContext  = 10
	optExtendedHeaders = 11

	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4
	repErrBit      = 1 << 31
	repErrUnsup    = repErrBit | 1
	repErrUnknown  = repErrBit | 6

	infoExport    = 0
	infoBlockSize = 3

	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagSendDF          = 1 << 7
	tflagCanMultiConn    = 1 << 8
	tflagSendCache       = 1 << 10
	tflagSendFastZero    = 1 << 11

	cmdFlagPayloadLen = 1 << 5 // extended headers: a payload of length bytes follows

	cmdFlagDF     = 1 << 2
	cmdFlagReqOne = 1 << 3

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdBlockStatus = 7

	replyFlagDone              = 1 << 0
	replyNone                  = 0
	replyOffsetData            = 1
	replyOffsetHole            = 2
	replyBlockStatus           = 5
	replyBlockStatusExt        = 6
	replyErrBit                = 1 << 15
	nbdEINVAL           uint32 = 22
	nbdEOVERFLOW        uint32 = 75
)

type rawConn struct {
	t          *testing.T
	c          net.Conn
	structured bool // structured replies negotiated
	extended   bool // extended headers negotiated
	size       uint64
	flags      uint16 // transmission flags
	cookie     uint64
}

func rawDial(t *testing.T, sock string) *rawConn {
	t.Helper()
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	r := &rawConn{t: t, c: c}
	r.greet()
	return r
}

func (r *rawConn) read(n int) []byte {
	r.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(r.c, b); err != nil {
		r.t.Fatalf("raw client: read %d bytes: %v", n, err)
	}
	return b
}

func (r *rawConn) write(b []byte) {
	r.t.Helper()
	if _, err := r.c.Write(b); err != nil {
		r.t.Fatalf("raw client: write: %v", err)
	}
}

// greet reads the server's greeting and answers with fixed newstyle and no
// zeroes.
func (r *rawConn) greet() {
	r.t.Helper()
	g := r.read(18)
	if string(g[:8]) != "NBDMAGIC" || binary.BigEndian.Uint64(g[8:]) != optMagic {
		r.t.Fatalf("greeting % x is not newstyle", g)
	}
	if f := binary.BigEndian.Uint16(g[16:]); f&(flagFixedNewstyle|flagNoZeroes) != flagFixedNewstyle|flagNoZeroes {
		r.t.Fatalf("greeting flags %#x lack FIXED_NEWSTYLE|NO_ZEROES", f)
	}
	r.write(binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes))
}

func appendOption(b []byte, opt uint32, data []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

type optReply struct {
	typ  uint32
	data []byte
}

// option sends one option and returns its replies up to the final one,
// failing the test on an error reply.
func (r *rawConn) option(opt uint32, data []byte) []optReply {
	r.t.Helper()
	out := r.optionReplies(opt, data)
	if last := out[len(out)-1]; last.typ&repErrBit != 0 {
		r.t.Fatalf("option %d: error reply %#x: %q", opt, last.typ, last.data)
	}
	return out
}

// optionReplies sends one option and returns its replies up to the final
// one: an ACK or an error.
func (r *rawConn) optionReplies(opt uint32, data []byte) []optReply {
	r.t.Helper()
	r.write(appendOption(nil, opt, data))
	var out []optReply
	for {
		h := r.read(20)
		if m := binary.BigEndian.Uint64(h); m != optReplyMagic {
			r.t.Fatalf("option %d: reply magic %#x", opt, m)
		}
		if o := binary.BigEndian.Uint32(h[8:]); o != opt {
			r.t.Fatalf("option %d: reply is for option %d", opt, o)
		}
		rep := optReply{binary.BigEndian.Uint32(h[12:]), r.read(int(binary.BigEndian.Uint32(h[16:])))}
		out = append(out, rep)
		if rep.typ&repErrBit != 0 || rep.typ == repAck {
			return out
		}
	}
}

type exportInfo struct {
	size                          uint64
	flags                         uint16
	minBlock, prefBlock, maxBlock uint32
}

// info sends NBD_OPT_INFO or NBD_OPT_GO asking for block sizes.
func (r *rawConn) info(name string, opt uint32) exportInfo {
	r.t.Helper()
	d := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	d = append(d, name...)
	d = binary.BigEndian.AppendUint16(d, 1)
	d = binary.BigEndian.AppendUint16(d, infoBlockSize)
	var info exportInfo
	var sawExport bool
	for _, rep := range r.option(opt, d) {
		if rep.typ != repInfo || len(rep.data) < 2 {
			continue
		}
		switch binary.BigEndian.Uint16(rep.data) {
		case infoExport:
			if len(rep.data) != 12 {
				r.t.Fatalf("NBD_INFO_EXPORT of %d bytes", len(rep.data))
			}
			info.size = binary.BigEndian.Uint64(rep.data[2:])
			info.flags = binary.BigEndian.Uint16(rep.data[10:])
			sawExport = true
		case infoBlockSize:
			if len(rep.data) != 14 {
				r.t.Fatalf("NBD_INFO_BLOCK_SIZE of %d bytes", len(rep.data))
			}
			info.minBlock = binary.BigEndian.Uint32(rep.data[2:])
			info.prefBlock = binary.BigEndian.Uint32(rep.data[6:])
			info.maxBlock = binary.BigEndian.Uint32(rep.data[10:])
		}
	}
	if !sawExport {
		r.t.Fatalf("option %d: no NBD_INFO_EXPORT before the ACK", opt)
	}
	return info
}

func (r *rawConn) structuredReplies() {
	r.t.Helper()
	r.option(optStructuredReply, nil)
	r.structured = true
}

func (r *rawConn) goExport(name string) {
	r.t.Helper()
	info := r.info(name, optGo)
	r.size, r.flags = info.size, info.flags
}

func (r *rawConn) exportName(name string) {
	r.t.Helper()
	r.write(appendOption(nil, optExportName, []byte(name)))
	b := r.read(10)
	r.size, r.flags = binary.BigEndian.Uint64(b), binary.BigEndian.Uint16(b[8:])
}

func (r *rawConn) setMeta(export string, queries ...string) {
	r.t.Helper()
	d := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	d = append(d, export...)
	d = binary.BigEndian.AppendUint32(d, uint32(len(queries)))
	for _, q := range queries {
		d = binary.BigEndian.AppendUint32(d, uint32(len(q)))
		d = append(d, q...)
	}
	var n int
	for _, rep := range r.option(optSetMetaContext, d) {
		if rep.typ == repMetaContext {
			n++
		}
	}
	if n != len(queries) {
		r.t.Fatalf("NBD_OPT_SET_META_CONTEXT %q selected %d contexts", queries, n)
	}
}

// send writes one request, compact or extended as negotiated.
func (r *rawConn) send(flags, typ uint16, off, length uint64, payload []byte) uint64 {
	r.t.Helper()
	r.cookie++
	var h []byte
	if r.extended {
		h = binary.BigEndian.AppendUint32(h, extRequestMagic)
	} else {
		h = binary.BigEndian.AppendUint32(h, requestMagic)
	}
	h = binary.BigEndian.AppendUint16(h, flags)
	h = binary.BigEndian.AppendUint16(h, typ)
	h = binary.BigEndian.AppendUint64(h, r.cookie)
	h = binary.BigEndian.AppendUint64(h, off)
	if r.extended {
		h = binary.BigEndian.AppendUint64(h, length)
	} else {
		h = binary.BigEndian.AppendUint32(h, uint32(length))
	}
	r.write(append(h, payload...))
	return r.cookie
}

type rawExtent struct{ len, flags uint64 }

type rawResult struct {
	errno   uint32
	data    []byte // a read's data, holes filled in
	chunks  int    // content chunks (data and hole) in a structured read
	extents []rawExtent
}

// do sends one request and collects its whole reply. Nothing else may be in
// flight.
func (r *rawConn) do(flags, typ uint16, off, length uint64, payload []byte) rawResult {
	r.t.Helper()
	cookie := r.send(flags, typ, off, length, payload)
	var res rawResult
	if typ == cmdRead {
		res.data = make([]byte, length)
	}
	for {
		magic := binary.BigEndian.Uint32(r.read(4))
		var rflags, rtype uint16
		var rcookie, rlen uint64
		switch magic {
		case simpleReplyMagic:
			if r.extended {
				r.t.Fatalf("simple reply with extended headers negotiated")
			}
			h := r.read(12)
			res.errno, rcookie = binary.BigEndian.Uint32(h), binary.BigEndian.Uint64(h[4:])
			if rcookie != cookie {
				r.t.Fatalf("reply cookie %d, want %d", rcookie, cookie)
			}
			if typ == cmdRead && r.structured {
				r.t.Errorf("simple reply to a read with structured replies negotiated")
			}
			if typ == cmdRead && res.errno == 0 {
				res.data = r.read(int(length))
			} else {
				res.data = nil
			}
			return res
		case structReplyMagic:
			if r.extended || !r.structured {
				r.t.Fatalf("compact structured reply on this connection")
			}
			h := r.read(16)
			rflags, rtype = binary.BigEndian.Uint16(h), binary.BigEndian.Uint16(h[2:])
			rcookie, rlen = binary.BigEndian.Uint64(h[4:]), uint64(binary.BigEndian.Uint32(h[12:]))
		case extReplyMagic:
			if !r.extended {
				r.t.Fatalf("extended reply without extended headers")
			}
			h := r.read(28)
			rflags, rtype = binary.BigEndian.Uint16(h), binary.BigEndian.Uint16(h[2:])
			rcookie, rlen = binary.BigEndian.Uint64(h[4:]), binary.BigEndian.Uint64(h[20:])
		default:
			r.t.Fatalf("reply magic %#x", magic)
		}
		if rcookie != cookie {
			r.t.Fatalf("reply cookie %d, want %d", rcookie, cookie)
		}
		if rlen > 64*mib {
			r.t.Fatalf("reply chunk of %d bytes", rlen)
		}
		p := r.read(int(rlen))
		switch {
		case rtype&replyErrBit != 0:
			if len(p) < 6 {
				r.t.Fatalf("error chunk of %d bytes", len(p))
			}
			res.errno = binary.BigEndian.Uint32(p)
			res.data = nil
		case rtype == replyNone:
		case rtype == replyOffsetData && typ == cmdRead:
			o := binary.BigEndian.Uint64(p)
			if o < off || o+uint64(len(p)-8) > off+length {
				r.t.Fatalf("data chunk [%d,+%d) outside the read", o, len(p)-8)
			}
			copy(res.data[o-off:], p[8:])
			res.chunks++
		case rtype == replyOffsetHole && typ == cmdRead:
			// The data was made zero already.
			res.chunks++
		case rtype == replyBlockStatus && typ == cmdBlockStatus:
			for d := p[4:]; len(d) >= 8; d = d[8:] {
				res.extents = append(res.extents, rawExtent{uint64(binary.BigEndian.Uint32(d)), uint64(binary.BigEndian.Uint32(d[4:]))})
			}
		case rtype == replyBlockStatusExt && typ == cmdBlockStatus && r.extended:
			for d := p[8:]; len(d) >= 16; d = d[16:] {
				res.extents = append(res.extents, rawExtent{binary.BigEndian.Uint64(d), binary.BigEndian.Uint64(d[8:])})
			}
		default:
			r.t.Fatalf("reply chunk type %d to command %d", rtype, typ)
		}
		if rflags&replyFlagDone != 0 {
			return res
		}
	}
}

// disconnect sends NBD_CMD_DISC and waits for the server to close.
func (r *rawConn) disconnect() {
	r.t.Helper()
	r.send(0, cmdDisc, 0, 0, nil)
	if n, err := io.Copy(io.Discard, r.c); err != nil || n != 0 {
		r.t.Errorf("after NBD_CMD_DISC: %d more bytes, %v", n, err)
	}
}
