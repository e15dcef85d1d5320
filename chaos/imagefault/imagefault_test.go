package imagefault_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/keelstore/keel/chaos/imagefault"
	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica/rawimage"
)

const bs = imagefault.BlockSize

func open(t *testing.T, seed uint64) (*rawimage.File, *imagefault.Layer, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	l := imagefault.New(path, seed)
	img, err := rawimage.Open(path, rawimage.Options{Size: 64 * bs, Hook: l})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img, l, path
}

func fill(c byte, n int) []byte { return bytes.Repeat([]byte{c}, n) }

func TestFailuresLeaveTheImageAlone(t *testing.T) {
	img, l, _ := open(t, 1)
	if err := img.WriteAt(fill('a', bs), 0, false); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		rules imagefault.Rules
		op    func() error
		errno syscall.Errno
	}{
		{imagefault.Rules{FailChange: "EIO"}, func() error { return img.WriteAt(fill('b', bs), 0, false) }, syscall.EIO},
		{imagefault.Rules{FailChange: "ENOSPC"}, func() error { return img.WriteAt(fill('b', bs), 0, false) }, syscall.ENOSPC},
		{imagefault.Rules{FailChange: "EIO"}, func() error { return img.Trim(0, bs, false) }, syscall.EIO},
		{imagefault.Rules{FailChange: "EIO"}, func() error { return img.Zero(0, bs, nbd.ZeroNoHole) }, syscall.EIO},
		{imagefault.Rules{FailRead: "EIO"}, func() error { return img.ReadAt(make([]byte, bs), 0) }, syscall.EIO},
		{imagefault.Rules{FailSync: "EIO"}, img.Sync, syscall.EIO},
	} {
		if err := l.Set(tc.rules); err != nil {
			t.Fatal(err)
		}
		err := tc.op()
		if !errors.Is(err, tc.errno) || !errors.Is(err, imagefault.ErrInjected) {
			t.Errorf("%+v: error %v, want an injected %v", tc.rules, err, tc.errno)
		}
		if err := l.Set(imagefault.Rules{}); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, bs)
		if err := img.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, fill('a', bs)) {
			t.Errorf("%+v: the failed operation changed the image", tc.rules)
		}
	}
	if err := l.Set(imagefault.Rules{FailRead: "EPERM"}); err == nil {
		t.Error("an unknown errno was accepted")
	}
}

// TestCrashLosesOnlyWhatWasNotSynced: after a crash each block holds what
// it held at the last fdatasync or one later change of it, whole, and a
// block not changed since the sync is as it was.
func TestCrashLosesOnlyWhatWasNotSynced(t *testing.T) {
	sawUndo, sawKeep := false, false
	for seed := uint64(1); seed <= 8; seed++ {
		img, l, _ := open(t, seed)
		if err := l.Set(imagefault.Rules{Lazy: true}); err != nil {
			t.Fatal(err)
		}
		if err := img.WriteAt(fill('a', 32*bs), 0, false); err != nil {
			t.Fatal(err)
		}
		if err := img.Sync(); err != nil {
			t.Fatal(err)
		}
		if l.Pending() != 0 {
			t.Fatalf("seed %d: %d blocks pending after a sync", seed, l.Pending())
		}
		// Unsynced: blocks 4..19 twice over, a trim of 20..23, and 40..43
		// written where nothing was.
		if err := img.WriteAt(fill('b', 16*bs), 4*bs, false); err != nil {
			t.Fatal(err)
		}
		if err := img.WriteAt(fill('c', 16*bs), 4*bs, false); err != nil {
			t.Fatal(err)
		}
		if err := img.Trim(20*bs, 4*bs, false); err != nil {
			t.Fatal(err)
		}
		if err := img.WriteAt(fill('d', 4*bs), 40*bs, false); err != nil {
			t.Fatal(err)
		}
		pending := l.Pending()
		if pending != 24 {
			t.Fatalf("seed %d: %d blocks pending, want 24", seed, pending)
		}
		undone, kept, err := l.Crash()
		if err != nil {
			t.Fatal(err)
		}
		if undone+kept != pending {
			t.Fatalf("seed %d: undid %d and kept %d of %d", seed, undone, kept, pending)
		}
		sawUndo, sawKeep = sawUndo || undone > 0, sawKeep || kept > 0
		// Read the file as the restarted server would (the layer now
		// blocks every operation on img).
		got := readFile(t, img.Path())
		for b := 0; b < 64; b++ {
			blk := got[b*bs : (b+1)*bs]
			var legal [][]byte
			switch {
			case b < 4 || (b >= 24 && b < 32):
				legal = [][]byte{fill('a', bs)}
			case b < 20:
				legal = [][]byte{fill('a', bs), fill('c', bs)} // 'b' was overwritten by 'c' before the crash
			case b < 24:
				legal = [][]byte{fill('a', bs), make([]byte, bs)}
			case b >= 40 && b < 44:
				legal = [][]byte{make([]byte, bs), fill('d', bs)}
			default:
				legal = [][]byte{make([]byte, bs)}
			}
			ok := false
			for _, want := range legal {
				ok = ok || bytes.Equal(blk, want)
			}
			if !ok {
				t.Errorf("seed %d: block %d holds %q..., not a state it was in", seed, b, blk[:4])
			}
		}
	}
	if !sawUndo || !sawKeep {
		t.Errorf("over 8 seeds: some block undone %v, some kept %v; want both", sawUndo, sawKeep)
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
