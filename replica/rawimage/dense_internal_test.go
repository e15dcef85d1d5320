package rawimage

import (
	"bytes"
	"path/filepath"
	"testing"
)

// TestDenseTail: once Extents has found no hole from an offset to the end
// of a written image, later calls there answer without seeking; a trim
// drops that, and Extents reports the hole it punched.
func TestDenseTail(t *testing.T) {
	const size = 1 << 20
	img, err := Open(filepath.Join(t.TempDir(), "disk.img"), Options{Size: size})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if err := img.WriteAt(bytes.Repeat([]byte{7}, size), 0, false); err != nil {
		t.Fatal(err)
	}
	ex, err := img.Extents(256<<10, size)
	if err != nil || len(ex) != 1 || ex[0].Hole || ex[0].Length != size-256<<10 {
		t.Fatalf("extents of a written image from 256 KiB: %+v %v", ex, err)
	}
	if known, _ := img.dense.covers(512 << 10); !known {
		t.Fatal("no hole was found after 256 KiB, and Extents did not remember it")
	}
	if known, _ := img.dense.covers(0); known {
		t.Fatal("remembered a dense tail from 0: only 256 KiB on was looked at")
	}
	if err := img.Trim(512<<10, 64<<10, false); err != nil {
		t.Fatal(err)
	}
	if known, _ := img.dense.covers(768 << 10); known {
		t.Fatal("a trim left the dense tail in place")
	}
	ex, err = img.Extents(256<<10, size)
	if err != nil {
		t.Fatal(err)
	}
	var hole uint64
	pos := uint64(256 << 10)
	for _, e := range ex {
		if e.Hole {
			if pos != 512<<10 {
				t.Errorf("hole at %d, want 512 KiB: %+v", pos, ex)
			}
			hole += e.Length
		}
		pos += e.Length
	}
	if hole == 0 {
		t.Fatalf("no hole reported after the trim (does this filesystem punch holes? tmpfs, ext4 and xfs do): %+v", ex)
	}
	if hole != 64<<10 {
		t.Errorf("hole of %d bytes after the trim, want 64 KiB: %+v", hole, ex)
	}
	// The tail after the hole is dense again, and remembered as such.
	if _, err := img.Extents(576<<10, size); err != nil {
		t.Fatal(err)
	}
	if known, _ := img.dense.covers(576 << 10); !known {
		t.Error("the tail after the trimmed range was not remembered as dense")
	}
}
