package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestProfileFlags: --cpu-profile and --mem-profile write profiles that go
// tool pprof reads, and an unwritable path is refused before the command
// runs.
func TestProfileFlags(t *testing.T) {
	bin := keelBin(t)
	dir := t.TempDir()
	cpu, mem := filepath.Join(dir, "cpu.pprof"), filepath.Join(dir, "mem.pprof")
	mustRun(t, 30*time.Second, bin, "--cpu-profile", cpu, "--mem-profile", mem, "version")
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("go tool pprof reads the profiles, and go is not on PATH: %v", err)
	}
	for _, c := range []struct{ file, index string }{{cpu, "samples"}, {mem, "alloc_space"}, {mem, "inuse_space"}} {
		data, err := os.ReadFile(c.file)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.HasPrefix(data, []byte{0x1f, 0x8b}) {
			t.Fatalf("%s: not a gzipped profile (%d bytes)", c.file, len(data))
		}
		out := mustRun(t, time.Minute, gobin, "tool", "pprof", "-top", "-sample_index="+c.index, bin, c.file)
		if !strings.Contains(out, "flat%") {
			t.Errorf("go tool pprof -sample_index=%s %s printed no listing:\n%s", c.index, c.file, out)
		}
	}

	for _, flag := range []string{"--cpu-profile", "--mem-profile"} {
		r := run(t, 30*time.Second, bin, flag, filepath.Join(dir, "missing", "p.pprof"), "version")
		if r.err == nil || !strings.Contains(r.stderr, flag) || strings.Contains(r.stdout, "feature level") {
			t.Errorf("%s into a missing directory: err %v, stdout %q, stderr %q; want a refusal naming the flag before the command runs", flag, r.err, r.stdout, r.stderr)
		}
	}
}
