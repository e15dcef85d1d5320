package keeltest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// sh starts /bin/sh -c script as a Proc; the harness runs any binary.
func sh(t *testing.T, script string) *Proc {
	t.Helper()
	p, err := Start(ProcConfig{Bin: "/bin/sh", Name: "sh", Args: []string{"-c", script},
		LogPath: filepath.Join(t.TempDir(), "sh.log"), RingBytes: 64})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Kill() })
	return p
}

func TestProcKilledReportsSignal(t *testing.T) {
	p := sh(t, "echo started; exec sleep 60")
	if err := Poll(t.Context(), 10*time.Second, 10*time.Millisecond, "started", func() (bool, string, error) {
		return strings.Contains(p.Output(), "started"), p.Output(), nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	if sig, ok := p.ExitSignal(); !ok || sig != syscall.SIGKILL {
		t.Errorf("ExitSignal = %v, %v; want SIGKILL", sig, ok)
	}
	if c := p.ExitCode(); c != -1 {
		t.Errorf("ExitCode = %d after SIGKILL, want -1", c)
	}
	if err := p.Kill(); !errors.Is(err, ErrExited) {
		t.Errorf("second Kill: %v, want ErrExited", err)
	}
}

func TestProcStopPauseResume(t *testing.T) {
	p := sh(t, "trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 0.05; done")
	// The trap must be set before the signal comes.
	if err := Poll(t.Context(), 10*time.Second, 10*time.Millisecond, "ready", func() (bool, string, error) {
		return strings.Contains(p.Output(), "ready"), "", nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := p.Pause(); err != nil {
		t.Fatal(err)
	}
	if err := p.Wait(200 * time.Millisecond); !errors.Is(err, ErrTimeout) {
		t.Fatalf("Wait on a paused process: %v, want ErrTimeout", err)
	}
	if err := p.Resume(); err != nil {
		t.Fatal(err)
	}
	if err := p.Stop(10 * time.Second); err != nil {
		t.Fatalf("Stop: %v, want exit status 0", err)
	}
	if p.ExitCode() != 0 || !strings.Contains(p.Output(), "bye") {
		t.Errorf("exit code %d, output %q; want 0 and the trap's line", p.ExitCode(), p.Output())
	}
}

func TestProcStopTimesOutAndKills(t *testing.T) {
	p := sh(t, "trap '' TERM; echo ready; while :; do sleep 0.05; done")
	if err := Poll(t.Context(), 10*time.Second, 10*time.Millisecond, "ready", func() (bool, string, error) {
		return strings.Contains(p.Output(), "ready"), "", nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := p.Stop(300 * time.Millisecond); !errors.Is(err, ErrTimeout) {
		t.Errorf("Stop of a process ignoring SIGTERM: %v, want ErrTimeout", err)
	}
	if !p.Exited() {
		t.Errorf("still running after Stop timed out")
	}
}

func TestScanCatchesPlantedPanic(t *testing.T) {
	p := sh(t, `echo fine; echo "panic: planted"; echo "WARNING: DATA RACE"; echo "fatal error: planted"; exit 2`)
	if err := p.Wait(10 * time.Second); err == nil {
		t.Fatal("exit status 2 reported as success")
	}
	if p.ExitCode() != 2 {
		t.Errorf("ExitCode = %d, want 2", p.ExitCode())
	}
	err := p.Scan()
	if !errors.Is(err, ErrCrash) {
		t.Fatalf("Scan = %v, want ErrCrash", err)
	}
	for _, l := range []string{"panic: planted", "WARNING: DATA RACE", "fatal error: planted"} {
		if !strings.Contains(err.Error(), l) {
			t.Errorf("Scan's error lacks %q: %v", l, err)
		}
	}
	if strings.Contains(err.Error(), "fine") {
		t.Errorf("Scan's error shows a harmless line: %v", err)
	}
	if got := CrashLines("ok\n  panic: not at the start\n"); len(got) != 0 {
		t.Errorf("CrashLines took an indented panic: %q", got)
	}
}

func TestRingKeepsTheTail(t *testing.T) {
	r := newRing(8)
	for _, w := range []string{"abc", "defgh", "ij", "klmnopqrstu", "vw"} {
		r.Write([]byte(w))
	}
	if got := r.String(); got != "pqrstuvw" {
		t.Errorf("ring = %q, want the last 8 bytes %q", got, "pqrstuvw")
	}
	r = newRing(8)
	r.Write([]byte("abc"))
	if got := r.String(); got != "abc" {
		t.Errorf("ring = %q, want %q", got, "abc")
	}
}

func TestFreeAddrIsFreeAndDistinct(t *testing.T) {
	a, b := MustFreeAddr(t), MustFreeAddr(t)
	if a == b {
		t.Errorf("two FreeAddr calls gave %s twice", a)
	}
	for _, addr := range []string{a, b} {
		if !strings.HasPrefix(addr, "127.0.0.1:") {
			t.Errorf("FreeAddr %s is not on loopback", addr)
		}
	}
}

func TestConfigsValidate(t *testing.T) {
	if err := (ProcConfig{Bin: "keel", Args: []string{"serve"}}).Validate(); !errors.Is(err, ErrBadConfig) || !strings.Contains(err.Error(), "LogPath") {
		t.Errorf("ProcConfig without LogPath: %v", err)
	}
	if err := (ClusterConfig{Bin: "keel", Dir: "d", Size: "1M"}).Validate(); !errors.Is(err, ErrBadConfig) || !strings.Contains(err.Error(), "N 0") {
		t.Errorf("ClusterConfig with N 0: %v", err)
	}
}

func TestRunReturnsExitStatus(t *testing.T) {
	log := filepath.Join(t.TempDir(), "run.log")
	if err := Run(t.Context(), ProcConfig{Bin: "/bin/sh", Args: []string{"-c", "echo hi"}, LogPath: log}, time.Second); err != nil {
		t.Errorf("Run of a clean exit: %v", err)
	}
	err := Run(t.Context(), ProcConfig{Bin: "/bin/sh", Args: []string{"-c", "exit 3"}, LogPath: log}, time.Second)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Errorf("Run of exit 3: %v, want its exit status", err)
	}
	b, _ := os.ReadFile(log)
	if !strings.Contains(string(b), ": sh -c echo hi\nhi\n") {
		t.Errorf("log lacks the header naming the program and the output:\n%s", b)
	}
}

func TestRunStopsWhenContextEnds(t *testing.T) {
	log := filepath.Join(t.TempDir(), "run.log")
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		errc <- Run(ctx, ProcConfig{Bin: "/bin/sh", Name: "sh",
			Args: []string{"-c", "trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 0.05; done"}, LogPath: log}, 10*time.Second)
	}()
	if err := Poll(t.Context(), 10*time.Second, 10*time.Millisecond, "ready", func() (bool, string, error) {
		b, _ := os.ReadFile(log)
		return strings.Contains(string(b), "ready"), string(b), nil
	}); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("Run after cancel: %v, want context.Canceled", err)
	}
	if b, _ := os.ReadFile(log); !strings.Contains(string(b), "bye") {
		t.Errorf("the process did not get SIGTERM:\n%s", b)
	}
}

func TestClusterPathsChosenByCaller(t *testing.T) {
	dir := t.TempDir()
	c, err := NewCluster(ClusterConfig{Bin: "keel", Dir: filepath.Join(dir, "data"), N: 1, Size: "1M",
		LogDir: filepath.Join(dir, "logs"), NBDSocketDir: filepath.Join(dir, "socks")})
	if err != nil {
		t.Fatal(err)
	}
	n, err := c.Add("n1")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "socks", "n1.sock")
	if n.NBD != "unix:"+sock || n.NBDSocket() != sock || n.URI() != "nbd+unix:///keel?socket="+sock {
		t.Errorf("NBD %q, socket %q, URI %q; want unix:%s", n.NBD, n.NBDSocket(), n.URI(), sock)
	}
	if !strings.Contains(strings.Join(n.Args(), " "), "--nbd unix:"+sock) {
		t.Errorf("args %q lack --nbd unix:%s", n.Args(), sock)
	}
	if want := filepath.Join(dir, "logs", "n1.log"); n.LogPath != want {
		t.Errorf("LogPath %s, want %s", n.LogPath, want)
	}
	if fi, err := os.Stat(filepath.Join(dir, "socks")); err != nil || !fi.IsDir() {
		t.Errorf("socket directory not made: %v", err)
	}

	c2, err := NewCluster(ClusterConfig{Bin: "keel", Dir: dir, N: 1, Size: "1M"})
	if err != nil {
		t.Fatal(err)
	}
	n2, err := c2.Add("n1")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(n2.NBD, "127.0.0.1:") || n2.NBDSocket() != "" || n2.LogPath != filepath.Join(dir, "n1.log") {
		t.Errorf("defaults: NBD %q, socket %q, log %s", n2.NBD, n2.NBDSocket(), n2.LogPath)
	}
}

// TestProxyAddressAndLogChosenByCaller runs a stand-in for keel that
// prints what the harness waits for.
func TestProxyAddressAndLogChosenByCaller(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "fakekeel")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\necho \"proxy serving $*\"\nexec sleep 60\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	c, err := NewCluster(ClusterConfig{Bin: bin, Dir: dir, N: 1, Size: "1M"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	http, log := MustFreeAddr(t), filepath.Join(dir, "mine.log")
	p, err := c.StartProxy(t.Context(), ProxyConfig{Name: "px", Listen: "unix:" + filepath.Join(dir, "px.sock"), HTTP: http, LogPath: log,
		GlobalFlags: []string{"--cpu-profile", "f"}})
	if err != nil {
		t.Fatal(err)
	}
	if p.HTTP != http || p.LogPath != log {
		t.Errorf("HTTP %s, log %s; want %s, %s", p.HTTP, p.LogPath, http, log)
	}
	b, err := os.ReadFile(log)
	if err != nil || !strings.Contains(string(b), "proxy serving --cpu-profile f proxy --servers  --listen unix:") ||
		!strings.Contains(string(b), "--http "+http+" --writer px") {
		t.Errorf("log %s (%v):\n%s", log, err, b)
	}
	if err := p.Stop(); err == nil {
		t.Errorf("sleep killed by SIGTERM reported as a clean exit")
	}
}

// TestSuccessorFollowsAHandover: a Direct process that starts its
// successor and exits (as keel upgrade does) is followed by pid; the
// successor's output lands in the same log, and it can be signalled and
// seen to exit.
func TestSuccessorFollowsAHandover(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "pid")
	// The successor ignores SIGTERM, so only the harness's SIGKILL ends it.
	script := `sh -c 'trap "" TERM; echo up:$$; while :; do sleep 0.05; done' & echo $! > ` + pidFile + `; echo first`
	p, err := Start(ProcConfig{Bin: "/bin/sh", Name: "sh", Args: []string{"-c", script}, LogPath: filepath.Join(dir, "sh.log"), Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Wait(10 * time.Second); err != nil {
		t.Fatalf("the first process: %v", err)
	}
	var pid int
	if err := Poll(t.Context(), 10*time.Second, 10*time.Millisecond, "pid file", func() (bool, string, error) {
		b, err := os.ReadFile(pidFile)
		if err != nil {
			return false, err.Error(), nil
		}
		_, err = fmt.Sscan(string(b), &pid)
		return err == nil, fmt.Sprint(err), nil
	}); err != nil {
		t.Fatal(err)
	}
	q := p.Successor(pid)
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })
	if q.Exited() || q.Pid() != pid {
		t.Fatalf("successor %d: exited %v, pid %d", pid, q.Exited(), q.Pid())
	}
	if err := Poll(t.Context(), 10*time.Second, 10*time.Millisecond, "successor's output", func() (bool, string, error) {
		// (The header line holds the script, so look for the pid.)
		return strings.Contains(readLog(t, filepath.Join(dir, "sh.log")), fmt.Sprintf("up:%d", pid)), "", nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := q.Stop(300 * time.Millisecond); !errors.Is(err, ErrTimeout) {
		t.Fatalf("Stop of a successor that ignores SIGTERM: %v, want ErrTimeout (then killed)", err)
	}
	if !q.Exited() {
		t.Fatal("the successor still runs after Stop killed it")
	}
	if err := q.Signal(syscall.SIGTERM); !errors.Is(err, ErrExited) {
		t.Errorf("Signal after the exit: %v, want ErrExited", err)
	}
}

func readLog(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
