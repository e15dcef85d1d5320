package main

// End-to-end tests of `keel upgrade` on a proxy: the binary is replaced
// under load, the client's connection carries over, and a broken binary is
// refused while the old process keeps serving.

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
	"github.com/keelstore/keel/upgrade"
)

// upgradeProxy is a proxy started from its own copy of the binary, so that
// a test can install another one at that path and upgrade to it.
type upgradeProxy struct {
	bin, pidFile, listen, http string
	log                        string // every generation's stdout and stderr
	first                      *keeltest.Proc
}

// startUpgradable starts bin with its output appended straight to a log
// file: an upgraded process inherits its ancestor's stdout and stderr, and
// the harness's pipe is closed a few seconds after that ancestor exits.
func startUpgradable(t testing.TB, name, bin, log string, args ...string) *keeltest.Proc {
	t.Helper()
	return keeltest.MustStart(t, keeltest.ProcConfig{Bin: "/bin/sh", Name: name,
		Args: append([]string{"-c", `exec "$0" "$@" >>"$KEEL_LOG" 2>&1`, bin}, args...),
		Env:  []string{"KEEL_LOG=" + log}})
}

// output is the log of every generation.
func (p *upgradeProxy) output() string {
	b, _ := os.ReadFile(p.log)
	return string(b)
}

func installBinary(t testing.TB, from, to string) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	tmp := to + ".new"
	dst, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, to); err != nil { // the running process keeps its inode
		t.Fatal(err)
	}
}

// buildVersion builds keel with main.version set to v.
func buildVersion(t *testing.T, v string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "keel-"+v)
	r := run(t, 3*time.Minute, "go", "build", "-ldflags", "-X main.version="+v, "-o", out, ".")
	if r.err != nil {
		t.Fatalf("go build %s: %v\n%s", v, r.err, r.stderr)
	}
	return out
}

func startUpgradeProxy(t *testing.T, c *keeltest.TCluster, bin string, flags ...string) *upgradeProxy {
	t.Helper()
	dir := t.TempDir()
	p := &upgradeProxy{bin: filepath.Join(dir, "keel"), pidFile: filepath.Join(dir, "proxy.pid"),
		listen: keeltest.MustFreeAddr(t), http: keeltest.MustFreeAddr(t)}
	installBinary(t, bin, p.bin)
	args := append([]string{"proxy", "--servers", strings.Join(c.HTTPAddrs(), ","), "--listen", p.listen,
		"--http", p.http, "--writer", "vm1", "--pid-file", p.pidFile}, flags...)
	p.log = filepath.Join(dir, "proxy.log")
	p.first = startUpgradable(t, "proxy", p.bin, p.log, args...)
	keeltest.MustPoll(t, 60*time.Second, "proxy writes its pid file", func() (bool, string) {
		pid, err := upgrade.ReadPID(p.pidFile)
		return err == nil && pid == p.first.Pid(), fmt.Sprint(err)
	})
	t.Cleanup(func() { // the last successor is nobody's child here
		if pid, err := upgrade.ReadPID(p.pidFile); err == nil && pid != p.first.Pid() {
			_ = syscall.Kill(pid, syscall.SIGTERM)
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			if err := keeltest.Poll(ctx, 60*time.Second, 50*time.Millisecond, "upgraded proxy stops", func() (bool, string, error) {
				return !upgrade.Alive(pid), "", nil
			}); err != nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
				t.Error(err)
			}
		}
		out := p.output()
		if lines := keeltest.CrashLines(out); len(lines) > 0 {
			t.Errorf("proxy log shows a crash:\n%s", strings.Join(lines, "\n"))
		}
		if t.Failed() {
			t.Logf("proxy log (every generation):\n%s", out[max(0, len(out)-keeltest.MaxLogDump):])
		}
	})
	return p
}

func (p *upgradeProxy) uri() string { return "nbd://" + p.listen + "/keel" }

func (p *upgradeProxy) pid(t *testing.T) int {
	t.Helper()
	pid, err := upgrade.ReadPID(p.pidFile)
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// upgrade runs `keel upgrade` and returns its result.
func (p *upgradeProxy) upgrade(t *testing.T) result {
	t.Helper()
	return run(t, 2*time.Minute, keeltest.MustBinary(t), "upgrade", "--pid-file", p.pidFile, "--timeout", "90s")
}

// TestProxyUpgradeUnderLoad upgrades a proxy 20 times, alternating between
// two builds of different versions, while fio writes and verifies through
// it: no I/O error, every block verified, and each upgrade is a new
// process of the other version.
func TestProxyUpgradeUnderLoad(t *testing.T) {
	c := newCluster(t, "64M", 3)
	binA := keeltest.MustBinary(t)
	binB := buildVersion(t, "upgrade-b")
	p := startUpgradeProxy(t, c, binA)
	fio := startFio(t, "upgrades", p.uri(), "--rw=randwrite", "--bs=4k", "--size=16M", "--iodepth=16",
		"--verify=crc32c", "--verify_backlog=512", "--verify_state_save=0", "--loops=1000", "--time_based", "--runtime=90s")
	// Every upgrade below happens with fio's connection live. 20 upgrades
	// took over 40s on two cores busy with a soak besides, hence the 90s.
	keeltest.MustPoll(t, 60*time.Second, "fio writes through the proxy", func() (bool, string) {
		st, err := proxyStatusAt(t, p.http)
		return err == nil && st.Counters["writes"] > 0, fmt.Sprint(st.Counters, err)
	})
	versions := []string{"upgrade-b", "dev"}
	for i := range 20 {
		installBinary(t, []string{binB, binA}[i%2], p.bin)
		before := p.pid(t)
		r := p.upgrade(t)
		if r.err != nil {
			t.Fatalf("upgrade %d: %v\n%s%s", i+1, r.err, r.stdout, r.stderr)
		}
		if want := "(version " + versions[i%2] + ")"; !strings.Contains(r.stdout, want) {
			t.Fatalf("upgrade %d reported %q, want %s", i+1, r.stdout, want)
		}
		if after := p.pid(t); after == before || !upgrade.Alive(after) {
			t.Fatalf("upgrade %d: pid file names %d (was %d)", i+1, after, before)
		}
		// The new process says which build it is.
		if st, err := proxyStatusAt(t, p.http); err != nil || st.Version != versions[i%2] {
			t.Fatalf("upgrade %d: proxy status reports version %q (%v), want %q", i+1, st.Version, err, versions[i%2])
		}
		select {
		case <-fio.done:
			t.Fatalf("fio ended after %d upgrades, before the 20th", i+1)
		default:
		}
		t.Logf("upgrade %d: %s", i+1, strings.TrimSpace(r.stdout))
	}
	j := fio.wait(t)
	if j.Read.IOBytes == 0 {
		t.Error("fio verified nothing")
	}
}

// qemuSession is a long qemu-io session on one NBD connection (no
// reconnect-delay: a dropped connection would fail every later command).
type qemuSession struct {
	t     *testing.T
	cmd   *exec.Cmd
	stdin io.WriteCloser
	mu    sync.Mutex // guards out
	out   strings.Builder
}

func (q *qemuSession) Write(b []byte) (int, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.out.Write(b)
}

func (q *qemuSession) output() string {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.out.String()
}

func startQemuSession(t *testing.T, addr string) *qemuSession {
	t.Helper()
	host, port, _ := strings.Cut(addr, ":")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	q := &qemuSession{t: t}
	q.cmd = exec.CommandContext(ctx, tool(t, "qemu-io"), "--image-opts",
		"driver=nbd,server.type=inet,server.host="+host+",server.port="+port+",export=keel")
	q.cmd.Stdout, q.cmd.Stderr = q, q
	var err error
	if q.stdin, err = q.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := q.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); _ = q.cmd.Wait() })
	return q
}

// do runs one command and waits until its output line appears (want, the
// n-th time it does), failing on any error qemu-io prints.
func (q *qemuSession) do(cmd, want string) {
	q.t.Helper()
	n := strings.Count(q.output(), want) + 1
	if _, err := fmt.Fprintln(q.stdin, cmd); err != nil {
		q.t.Fatalf("qemu-io %q: %v\n%s", cmd, err, q.output())
	}
	keeltest.MustPoll(q.t, 60*time.Second, "qemu-io "+cmd, func() (bool, string) {
		o := q.output()
		if bad := qemuIOTrouble(o); bad != "" {
			q.t.Fatalf("qemu-io %q: %s\n%s", cmd, bad, o)
		}
		return strings.Count(o, want) >= n, o
	})
}

// qemuIOTrouble names anything in a qemu-io session's output that is not
// a command succeeding.
func qemuIOTrouble(o string) string {
	l := strings.ToLower(o)
	for _, s := range []string{"error", "failed", "reconnect", "pattern verification"} {
		if strings.Contains(l, s) {
			return s
		}
	}
	return ""
}

func (q *qemuSession) close() {
	q.t.Helper()
	fmt.Fprintln(q.stdin, "quit")
	q.stdin.Close()
	if err := q.cmd.Wait(); err != nil {
		q.t.Fatalf("qemu-io: %v\n%s", err, q.output())
	}
	if bad := qemuIOTrouble(q.output()); bad != "" {
		q.t.Fatalf("qemu-io session: %s\n%s", bad, q.output())
	}
}

// TestProxyUpgradeRefusesBrokenBinary: a binary that exits at start, hangs
// before ready, or crashes right after ready (while the parent hands over)
// is refused: the old process keeps serving, the pid file still names it,
// and a qemu-io session on one connection keeps working throughout, until
// a good binary takes it over.
func TestProxyUpgradeRefusesBrokenBinary(t *testing.T) {
	c := newCluster(t, "16M", 3)
	binA := keeltest.MustBinary(t)
	crash := filepath.Join(t.TempDir(), "crashchild")
	if r := run(t, 3*time.Minute, "go", "build", "-o", crash, "../../upgrade/upgradetest/crashchild"); r.err != nil {
		t.Fatalf("building crashchild: %v\n%s", r.err, r.stderr)
	}
	p := startUpgradeProxy(t, c, binA, "--upgrade-timeout", "5s")
	dir := t.TempDir()
	exits := filepath.Join(dir, "exits")
	hangs := filepath.Join(dir, "hangs")
	if err := os.WriteFile(exits, []byte("#!/bin/sh\necho broken build >&2\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(hangs, []byte("#!/bin/sh\nexec sleep 600\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	q := startQemuSession(t, p.listen)
	q.do("write -P 0x5a 0 64k", "wrote 65536/65536")
	before := p.pid(t)
	for i, tc := range []struct{ name, bin, want string }{
		{"exits at start", exits, "exit status 3"},
		{"hangs before ready", hangs, "timed out"},
		{"crashes right after ready", crash, "exit status 3"},
	} {
		installBinary(t, tc.bin, p.bin)
		r := p.upgrade(t)
		if r.err == nil || !strings.Contains(r.stderr, tc.want) {
			t.Fatalf("%s: keel upgrade = %v, stderr %q; want a failure mentioning %q", tc.name, r.err, r.stderr, tc.want)
		}
		if now := p.pid(t); now != before || !upgrade.Alive(before) {
			t.Fatalf("%s: pid file names %d, old process %d alive=%v", tc.name, now, before, upgrade.Alive(before))
		}
		pat := fmt.Sprintf("0x%02x", 0x10+i)
		q.do("read -P 0x5a 0 64k", "read 65536/65536")
		q.do("write -P "+pat+" 1M 64k", "wrote 65536/65536")
		q.do("read -P "+pat+" 1M 64k", "read 65536/65536")
		t.Logf("%s: refused: %s", tc.name, strings.TrimSpace(r.stderr))
	}
	installBinary(t, binA, p.bin)
	if r := p.upgrade(t); r.err != nil {
		t.Fatalf("good binary after the broken ones: %v\n%s", r.err, r.stderr)
	}
	q.do("read -P 0x5a 0 64k", "read 65536/65536")
	q.do("write -P 0x33 64k 64k", "wrote 65536/65536")
	q.do("read -P 0x33 64k 64k", "read 65536/65536")
	q.close()
}

// TestProxyUpgradeQemuIOSession: one qemu-io session, one connection,
// across 6 proxy upgrades with writes and verified reads between them: it
// never sees an error or a reconnect.
func TestProxyUpgradeQemuIOSession(t *testing.T) {
	c := newCluster(t, "16M", 3)
	binA := keeltest.MustBinary(t)
	p := startUpgradeProxy(t, c, binA)
	q := startQemuSession(t, p.listen)
	for i := range 6 {
		pat := fmt.Sprintf("0x%02x", 0x40+i)
		off := fmt.Sprintf("%dk", 64*i)
		q.do("write -P "+pat+" "+off+" 64k", "wrote 65536/65536")
		r := p.upgrade(t)
		if r.err != nil {
			t.Fatalf("upgrade %d: %v\n%s", i+1, r.err, r.stderr)
		}
		q.do("read -P "+pat+" "+off+" 64k", "read 65536/65536")
	}
	for i := range 6 { // everything written is still there
		q.do(fmt.Sprintf("read -P 0x%02x %dk 64k", 0x40+i, 64*i), "read 65536/65536")
	}
	q.close()
	if n := strings.Count(p.output(), "connections quiesced for handover: count=1"); n != 6 {
		t.Errorf("%d upgrades handed qemu-io's connection over, want 6", n)
	}
}

// TestServeUpgradeQemuIOSession: keel serve upgrades the same way (the
// image passes down with its lock): one qemu-io session across 3 upgrades
// sees every write, no error and no reconnect, and a second keel serve on
// the image is still refused.
func TestServeUpgradeQemuIOSession(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "keel")
	installBinary(t, keeltest.MustBinary(t), bin)
	pidFile, img, listen := filepath.Join(dir, "serve.pid"), filepath.Join(dir, "disk.img"), keeltest.MustFreeAddr(t)
	logPath := filepath.Join(dir, "serve.log")
	first := startUpgradable(t, "serve", bin, logPath, "serve", "--file", img, "--size", "16M", "--listen", listen, "--pid-file", pidFile)
	keeltest.MustPoll(t, 30*time.Second, "keel serve writes its pid file", func() (bool, string) {
		pid, err := upgrade.ReadPID(pidFile)
		return err == nil && pid == first.Pid(), fmt.Sprint(err)
	})
	p := &upgradeProxy{bin: bin, pidFile: pidFile, listen: listen, log: logPath, first: first}
	t.Cleanup(func() {
		if pid, err := upgrade.ReadPID(pidFile); err == nil && pid != first.Pid() {
			_ = syscall.Kill(pid, syscall.SIGTERM)
		}
	})
	q := startQemuSession(t, listen)
	for i := range 3 {
		pat := fmt.Sprintf("0x%02x", 0x60+i)
		q.do(fmt.Sprintf("write -P %s %dk 64k", pat, 64*i), "wrote 65536/65536")
		if r := p.upgrade(t); r.err != nil {
			t.Fatalf("upgrade %d: %v\n%s", i+1, r.err, r.stderr)
		}
		q.do(fmt.Sprintf("read -P %s %dk 64k", pat, 64*i), "read 65536/65536")
	}
	if r := run(t, 30*time.Second, bin, "serve", "--file", img, "--listen", keeltest.MustFreeAddr(t)); r.err == nil || !strings.Contains(r.stderr, "in use by another process") {
		t.Errorf("a second keel serve on the image: %v %s; want it refused (locked)", r.err, r.stderr)
	}
	q.close()
	if n := strings.Count(p.output(), "connections quiesced for handover: count=1"); n != 3 {
		t.Errorf("%d upgrades handed qemu-io's connection over, want 3", n)
	}
}
