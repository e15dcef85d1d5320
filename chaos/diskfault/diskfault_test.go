package diskfault

import (
	"bytes"
	"errors"
	"syscall"
	"testing"

	walfs "github.com/hashicorp/raft-wal/fs"
)

func TestLazyAndCrash(t *testing.T) {
	dir := t.TempDir()
	fs := New(walfs.New(), 1)
	w, err := fs.Create(dir, "seg", 1<<16)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if _, err := w.WriteAt([]byte("synced"), 0); err != nil {
		t.Fatal(err)
	}
	if err := w.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := fs.Set(Rules{Lazy: true}); err != nil {
		t.Fatal(err)
	}
	lazy := bytes.Repeat([]byte{'L'}, 4096)
	if _, err := w.WriteAt(lazy, 4096); err != nil {
		t.Fatal(err)
	}
	// This process sees the write; the disk does not have it.
	got := make([]byte, 4096)
	if _, err := w.ReadAt(got, 4096); err != nil || !bytes.Equal(got, lazy) {
		t.Fatalf("read through the layer: %q, %v", got[:8], err)
	}
	r, _ := fs.OpenReader(dir, "seg")
	if _, err := r.ReadAt(got, 4096); err != nil || !bytes.Equal(got, lazy) {
		t.Fatalf("read through another handle: %q, %v", got[:8], err)
	}
	r.Close()
	raw := walfs.New()
	rr, _ := raw.OpenReader(dir, "seg")
	defer rr.Close()
	if _, err := rr.ReadAt(got, 4096); err != nil || got[0] != 0 {
		t.Fatalf("the disk has the lazy write before fsync: %q, %v", got[:8], err)
	}
	if fs.Pending() != 4096 {
		t.Fatalf("pending %d, want 4096", fs.Pending())
	}
	// A crash keeps a prefix (at a 512-byte boundary) and loses the rest.
	lost, err := fs.Crash()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rr.ReadAt(got, 4096); err != nil {
		t.Fatal(err)
	}
	kept := bytes.IndexByte(append(got, 0), 0)
	if kept%512 != 0 || kept+lost != 4096 {
		t.Fatalf("after the crash %d bytes reached the disk and %d were lost", kept, lost)
	}
	// fsync writes back what is pending.
	if _, err := w.WriteAt(lazy, 8192); err != nil {
		t.Fatal(err)
	}
	if err := w.Sync(); err != nil {
		t.Fatal(err)
	}
	if _, err := rr.ReadAt(got, 8192); err != nil || !bytes.Equal(got, lazy) || fs.Pending() != 0 {
		t.Fatalf("after fsync the disk has %q, pending %d, %v", got[:8], fs.Pending(), err)
	}
	synced := make([]byte, 6)
	if _, err := rr.ReadAt(synced, 0); err != nil || string(synced) != "synced" {
		t.Fatalf("synced data: %q, %v", synced, err)
	}
}

func TestErrors(t *testing.T) {
	dir := t.TempDir()
	fs := New(walfs.New(), 1)
	w, err := fs.Create(dir, "seg", 4096)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	for _, tc := range []struct {
		rules Rules
		op    func() error
		want  error
	}{
		{Rules{FailWrite: "EIO"}, func() error { _, err := w.WriteAt([]byte("x"), 0); return err }, syscall.EIO},
		{Rules{FailWrite: "ENOSPC"}, func() error { _, err := w.WriteAt([]byte("x"), 0); return err }, syscall.ENOSPC},
		{Rules{FailSync: "EIO"}, w.Sync, syscall.EIO},
		{Rules{FailRead: "EIO"}, func() error { _, err := w.ReadAt(make([]byte, 1), 0); return err }, syscall.EIO},
	} {
		if err := fs.Set(tc.rules); err != nil {
			t.Fatal(err)
		}
		if err := tc.op(); !errors.Is(err, tc.want) || !errors.Is(err, ErrInjected) {
			t.Errorf("%+v: got %v, want %v", tc.rules, err, tc.want)
		}
	}
	if err := fs.Set(Rules{}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt([]byte("x"), 0); err != nil {
		t.Fatalf("no rules: %v", err)
	}
	if err := fs.Set(Rules{FailRead: "EPERM"}); err == nil {
		t.Fatal("EPERM accepted")
	}
}
