package keeltest

import (
	"errors"
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
