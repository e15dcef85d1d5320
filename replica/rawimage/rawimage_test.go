package rawimage_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica/rawimage"
)

const mib = 1 << 20

// openNew creates a new image of size bytes in a fresh directory and closes
// it when the test ends.
func openNew(t testing.TB, size uint64) (*rawimage.File, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	img, err := rawimage.Open(path, rawimage.Options{Size: size})
	if err != nil {
		t.Fatalf("Open(%s, size %d): %v", path, size, err)
	}
	t.Cleanup(func() { img.Close() })
	return img, path
}

func stat(t *testing.T, path string) *syscall.Stat_t {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return &st
}

// fsBlock is the allocation granularity of the filesystem holding path:
// holes and data are reported in whole blocks of this size.
func fsBlock(t *testing.T, path string) uint64 {
	t.Helper()
	var sfs syscall.Statfs_t
	if err := syscall.Statfs(filepath.Dir(path), &sfs); err != nil {
		t.Fatal(err)
	}
	return uint64(sfs.Bsize)
}

// pattern returns n bytes, none of them zero, that depend on seed.
func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(i%251) + 1 + seed
		if p[i] == 0 {
			p[i] = 1
		}
	}
	return p
}

func write(t *testing.T, img *rawimage.File, p []byte, off uint64) {
	t.Helper()
	if err := img.WriteAt(p, off, false); err != nil {
		t.Fatalf("WriteAt(%d bytes at %d): %v", len(p), off, err)
	}
}

func read(t *testing.T, img *rawimage.File, off uint64, n int) []byte {
	t.Helper()
	p := make([]byte, n)
	if err := img.ReadAt(p, off); err != nil {
		t.Fatalf("ReadAt(%d bytes at %d): %v", n, off, err)
	}
	return p
}

func extents(t *testing.T, img *rawimage.File, off, length uint64) []rawimage.Extent {
	t.Helper()
	ex, err := img.Extents(off, length)
	if err != nil {
		t.Fatalf("Extents(%d, %d): %v", off, length, err)
	}
	return ex
}

// modelExtents is what Extents must report for [off, off+length) clipped to
// size, given the byte ranges that hold data: every filesystem block that a
// data range touches is data, every other block a hole.
func modelExtents(size, off, length, block uint64, data [][2]uint64) []rawimage.Extent {
	end := min(off+length, size)
	isData := func(b uint64) bool { // block starting at b
		for _, d := range data {
			if d[0] < b+block && b < d[1] {
				return true
			}
		}
		return false
	}
	var out []rawimage.Extent
	for b := off / block * block; b < end; b += block {
		lo, hi := max(b, off), min(b+block, end)
		e := rawimage.Extent{Length: hi - lo, Hole: !isData(b)}
		if n := len(out); n > 0 && out[n-1].Hole == e.Hole {
			out[n-1].Length += e.Length
			continue
		}
		out = append(out, e)
	}
	return out
}

func checkExtents(t *testing.T, img *rawimage.File, off, length uint64, want []rawimage.Extent) {
	t.Helper()
	if got := extents(t, img, off, length); !slices.Equal(got, want) {
		t.Errorf("Extents(%d, %d)\n got  %+v\n want %+v", off, length, got, want)
	}
}

func TestOpenCreatesSparseImage(t *testing.T) {
	img, path := openNew(t, 64*mib)
	if img.Size() != 64*mib || img.Path() != path || img.ReadOnly() {
		t.Errorf("Size %d Path %q ReadOnly %v; want %d %q false", img.Size(), img.Path(), img.ReadOnly(), 64*mib, path)
	}
	st := stat(t, path)
	if st.Size != 64*mib {
		t.Errorf("file size %d, want %d", st.Size, 64*mib)
	}
	if st.Blocks != 0 {
		t.Errorf("new image has %d blocks allocated, want 0 (sparse)", st.Blocks)
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		t.Errorf("mode %o, want a regular file", st.Mode)
	}
	if got := read(t, img, 32*mib, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Error("a new image does not read as zeroes")
	}
}

func TestOpenExistingKeepsSize(t *testing.T) {
	img, path := openNew(t, 3*mib)
	write(t, img, pattern(4096, 7), mib)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	for _, opts := range []rawimage.Options{{}, {Size: 3 * mib}, {ReadOnly: true}, {ReadOnly: true, Size: 3 * mib}} {
		img, err := rawimage.Open(path, opts)
		if err != nil {
			t.Fatalf("reopen with %+v: %v", opts, err)
		}
		if img.Size() != 3*mib || img.ReadOnly() != opts.ReadOnly {
			t.Errorf("reopen with %+v: Size %d ReadOnly %v", opts, img.Size(), img.ReadOnly())
		}
		if got := read(t, img, mib, 4096); !bytes.Equal(got, pattern(4096, 7)) {
			t.Errorf("reopen with %+v: data written before is gone", opts)
		}
		img.Close()
	}
}

func TestOpenRefusesMissingWithoutSize(t *testing.T) {
	for _, ro := range []bool{false, true} {
		path := filepath.Join(t.TempDir(), "missing.img")
		img, err := rawimage.Open(path, rawimage.Options{ReadOnly: ro})
		if !errors.Is(err, rawimage.ErrNoSize) {
			t.Errorf("read-only %v: Open of a missing image without size: %v, want ErrNoSize", ro, err)
		}
		if img != nil {
			img.Close()
		}
		if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("read-only %v: refused Open left a file behind (%v)", ro, err)
		}
	}
	// A read-only open never creates, even when given a size.
	path := filepath.Join(t.TempDir(), "missing.img")
	if _, err := rawimage.Open(path, rawimage.Options{ReadOnly: true, Size: mib}); !errors.Is(err, rawimage.ErrNoSize) {
		t.Errorf("read-only Open of a missing image with a size: %v, want ErrNoSize", err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("read-only Open created the image (%v)", err)
	}
}

func TestOpenRefusesSizeMismatch(t *testing.T) {
	img, path := openNew(t, 2*mib)
	img.Close()
	for _, size := range []uint64{mib, 2*mib + 512, 4 * mib} {
		img, err := rawimage.Open(path, rawimage.Options{Size: size})
		if !errors.Is(err, rawimage.ErrSizeMismatch) {
			t.Errorf("Open of a %d-byte image with size %d: %v, want ErrSizeMismatch", 2*mib, size, err)
		}
		if img != nil {
			img.Close()
		}
	}
	if st := stat(t, path); st.Size != 2*mib {
		t.Errorf("refused Opens changed the image size to %d", st.Size)
	}
}

func TestOpenRefusesBadNewSize(t *testing.T) {
	for _, size := range []uint64{1, 511, 513, 1000, mib + 1} {
		path := filepath.Join(t.TempDir(), "new.img")
		img, err := rawimage.Open(path, rawimage.Options{Size: size})
		if !errors.Is(err, rawimage.ErrBadSize) {
			t.Errorf("Open(new, size %d): %v, want ErrBadSize", size, err)
		}
		if img != nil {
			img.Close()
		}
		if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("size %d: refused Open left a file behind (%v)", size, err)
		}
	}
}

func TestOpenRefusesNonRegularFiles(t *testing.T) {
	dir := t.TempDir()
	for _, opts := range []rawimage.Options{{}, {ReadOnly: true}, {Size: mib}} {
		if img, err := rawimage.Open(dir, opts); err == nil {
			img.Close()
			t.Errorf("Open of a directory with %+v succeeded", opts)
		}
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	if img, err := rawimage.Open(fifo, rawimage.Options{}); err == nil {
		img.Close()
		t.Error("Open of a FIFO succeeded")
	}
}

// A read-only Open of a FIFO must be refused like any other non-regular
// file, not wait for a writer to appear.
func TestOpenReadOnlyFIFODoesNotBlock(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	type result struct {
		img *rawimage.File
		err error
	}
	done := make(chan result, 1)
	go func() {
		img, err := rawimage.Open(fifo, rawimage.Options{ReadOnly: true})
		done <- result{img, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-time.After(5 * time.Second):
		t.Error("read-only Open of a FIFO still blocked after 5s (waiting for a writer)")
		// Unblock it: opening the write end lets the reader's open return.
		w, err := os.OpenFile(fifo, os.O_WRONLY, 0)
		if err != nil {
			t.Fatalf("opening the FIFO's write end: %v", err)
		}
		defer w.Close()
		r = <-done
	}
	if r.err == nil {
		r.img.Close()
		t.Error("read-only Open of a FIFO succeeded")
	}
}

// The error for an empty image says to "give a size"; doing so must work.
func TestOpenEmptyFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "empty.img")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if img, err := rawimage.Open(path, rawimage.Options{}); err == nil {
		img.Close()
		t.Fatal("Open of a 0-byte image without a size succeeded")
	} else {
		t.Logf("without a size: %v", err)
	}
	img, err := rawimage.Open(path, rawimage.Options{Size: mib})
	if err != nil {
		t.Fatalf("Open of a 0-byte image with a size, as the error advises: %v", err)
	}
	defer img.Close()
	if img.Size() != mib {
		t.Errorf("Size %d, want %d", img.Size(), mib)
	}
}

func TestOpenLocks(t *testing.T) {
	img, path := openNew(t, mib)

	// flock locks belong to the open file description, so a second Open
	// in this process conflicts just as another process would.
	for _, opts := range []rawimage.Options{{}, {ReadOnly: true}, {Size: mib}} {
		if second, err := rawimage.Open(path, opts); !errors.Is(err, rawimage.ErrLocked) {
			if second != nil {
				second.Close()
			}
			t.Errorf("second Open with %+v while open read-write: %v, want ErrLocked", opts, err)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}

	// Read-only opens share the lock and keep writers out.
	ro1, err := rawimage.Open(path, rawimage.Options{ReadOnly: true})
	if err != nil {
		t.Fatalf("read-only Open after Close: %v", err)
	}
	ro2, err := rawimage.Open(path, rawimage.Options{ReadOnly: true})
	if err != nil {
		t.Errorf("second read-only Open: %v, want success (shared lock)", err)
	} else {
		ro2.Close()
	}
	if rw, err := rawimage.Open(path, rawimage.Options{}); !errors.Is(err, rawimage.ErrLocked) {
		if rw != nil {
			rw.Close()
		}
		t.Errorf("read-write Open while open read-only: %v, want ErrLocked", err)
	}
	ro1.Close()

	rw, err := rawimage.Open(path, rawimage.Options{})
	if err != nil {
		t.Fatalf("read-write Open after every other was closed: %v", err)
	}
	rw.Close()
}

func TestReadWriteRoundTrip(t *testing.T) {
	img, path := openNew(t, 4*mib)
	cases := []struct {
		off uint64
		n   int
		fua bool
	}{
		{0, 512, false},
		{4096, 65536, true},
		{mib + 3, 1000, false},   // unaligned
		{4*mib - 512, 512, true}, // the last sector: reads end exactly at EOF
	}
	for i, c := range cases {
		if err := img.WriteAt(pattern(c.n, byte(i)), c.off, c.fua); err != nil {
			t.Fatalf("WriteAt(%d bytes at %d, fua %v): %v", c.n, c.off, c.fua, err)
		}
	}
	for i, c := range cases {
		if got := read(t, img, c.off, c.n); !bytes.Equal(got, pattern(c.n, byte(i))) {
			t.Errorf("ReadAt(%d bytes at %d) does not return what was written", c.n, c.off)
		}
	}
	if st := stat(t, path); uint64(st.Size) != 4*mib {
		t.Errorf("writes changed the file size to %d", st.Size)
	}
	// Between the writes the image still reads as zeroes.
	if got := read(t, img, 2*mib, 8192); !bytes.Equal(got, make([]byte, 8192)) {
		t.Error("unwritten range does not read as zeroes")
	}
}

func TestReadOnlyRefusesChanges(t *testing.T) {
	img, path := openNew(t, mib)
	write(t, img, pattern(8192, 1), 0)
	img.Close()

	ro, err := rawimage.Open(path, rawimage.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if err := ro.WriteAt(pattern(512, 9), 0, false); err == nil {
		t.Error("WriteAt on a read-only image succeeded")
	}
	if err := ro.Trim(0, 4096, false); err == nil {
		t.Error("Trim on a read-only image succeeded")
	}
	if err := ro.Zero(0, 4096, 0); err == nil {
		t.Error("Zero on a read-only image succeeded")
	}
	if got := read(t, ro, 0, 8192); !bytes.Equal(got, pattern(8192, 1)) {
		t.Error("a read-only image changed")
	}
	if err := ro.Sync(); err != nil {
		t.Errorf("Sync of a read-only image: %v", err)
	}
}

func TestExtents(t *testing.T) {
	const size = 2 * mib
	img, path := openNew(t, size)
	bs := fsBlock(t, path)
	t.Logf("filesystem block size %d", bs)

	checkExtents(t, img, 0, size, []rawimage.Extent{{Length: size, Hole: true}})

	writes := [][2]uint64{ // [start, end)
		{64 << 10, 64<<10 + 4096}, // one aligned block
		{300000, 300100},          // 100 bytes inside one block
		{mib, mib + 3*4096},       // three blocks
		{size - 8192, size},       // up to the end of the image
	}
	for i, w := range writes {
		write(t, img, pattern(int(w[1]-w[0]), byte(i)), w[0])
	}
	for _, stage := range []string{"before sync", "after sync"} {
		t.Run(stage, func(t *testing.T) {
			for _, r := range [][2]uint64{
				{0, size},                 // the whole image
				{66 << 10, 100 << 10},     // starts inside a hole, ends inside one
				{64<<10 + 1000, 1000},     // inside one data block
				{299000, 4096},            // around the small write
				{mib + 4096, 4096},        // one block in the middle of data
				{size - 12288, 12288},     // hole then data to the end
				{size - 4096, 64 << 20},   // asks past the end: stops at the size
				{1<<20 - 512, 512 + 4096}, // ends inside data
			} {
				want := modelExtents(size, r[0], r[1], bs, writes)
				checkExtents(t, img, r[0], r[1], want)
				// Whatever the layout, the extents cover exactly the asked
				// range clipped to the image.
				var total uint64
				for _, e := range extents(t, img, r[0], r[1]) {
					if e.Length == 0 {
						t.Errorf("Extents(%d, %d) returned an empty extent", r[0], r[1])
					}
					total += e.Length
				}
				if wantTotal := min(r[0]+r[1], size) - r[0]; total != wantTotal {
					t.Errorf("Extents(%d, %d) covers %d bytes, want %d", r[0], r[1], total, wantTotal)
				}
			}
		})
		if err := img.Sync(); err != nil {
			t.Fatal(err)
		}
	}
}

// checkZeroed checks [off, off+n) reads as zeroes and the bytes just around
// it still hold the pattern written over [base, base+len(p)).
func checkZeroed(t *testing.T, img *rawimage.File, base uint64, p []byte, off, n uint64) {
	t.Helper()
	got := read(t, img, base, len(p))
	want := bytes.Clone(p)
	clear(want[off-base : off-base+n])
	if !bytes.Equal(got, want) {
		for i := range got {
			if got[i] != want[i] {
				t.Errorf("byte %d: got %d, want %d (zeroed [%d, %d))", base+uint64(i), got[i], want[i], off, off+n)
				break
			}
		}
	}
}

func TestTrimPunchesHole(t *testing.T) {
	img, path := openNew(t, mib)
	bs := fsBlock(t, path)
	base := uint64(128 << 10)
	p := pattern(64<<10, 3)
	write(t, img, p, base)
	if err := img.Sync(); err != nil {
		t.Fatal(err)
	}
	before := stat(t, path).Blocks

	// Two whole blocks: deallocated.
	if err := img.Trim(base+bs, 2*bs, false); err != nil {
		t.Fatalf("Trim: %v", err)
	}
	checkZeroed(t, img, base, p, base+bs, 2*bs)
	checkExtents(t, img, base, 64<<10, []rawimage.Extent{
		{Length: bs}, {Length: 2 * bs, Hole: true}, {Length: 64<<10 - 3*bs},
	})
	if after := stat(t, path).Blocks; after != before-int64(2*bs/512) {
		t.Errorf("blocks %d after trimming %d bytes, want %d", after, 2*bs, before-int64(2*bs/512))
	}

	// Part of a block: zeroed, the block stays.
	if err := img.Trim(base+4*bs+100, 50, true); err != nil {
		t.Fatalf("Trim with fua: %v", err)
	}
	p2 := bytes.Clone(p)
	clear(p2[bs : 3*bs])
	checkZeroed(t, img, base, p2, base+4*bs+100, 50)
}

func TestZeroPunchesHoleByDefault(t *testing.T) {
	img, path := openNew(t, mib)
	bs := fsBlock(t, path)
	base := uint64(256 << 10)
	p := pattern(64<<10, 5)
	write(t, img, p, base)
	if err := img.Sync(); err != nil {
		t.Fatal(err)
	}
	before := stat(t, path).Blocks
	if err := img.Zero(base, 32<<10, 0); err != nil {
		t.Fatalf("Zero: %v", err)
	}
	checkZeroed(t, img, base, p, base, 32<<10)
	checkExtents(t, img, base, 64<<10, []rawimage.Extent{{Length: 32 << 10, Hole: true}, {Length: 32 << 10}})
	if after := stat(t, path).Blocks; after != before-(32<<10)/512 {
		t.Errorf("blocks %d after zeroing 32 KiB, want %d (a hole)", after, before-(32<<10)/512)
	}

	// An unaligned zero with fast and fua: punching is fast here.
	if err := img.Zero(base+(32<<10)+bs+7, 1000, nbd.ZeroFast|nbd.ZeroFUA); err != nil {
		t.Fatalf("fast Zero: %v", err)
	}
	p2 := bytes.Clone(p)
	clear(p2[:32<<10])
	checkZeroed(t, img, base, p2, base+(32<<10)+bs+7, 1000)
}

func TestZeroNoHoleKeepsAllocation(t *testing.T) {
	img, path := openNew(t, mib)
	base := uint64(512 << 10)
	p := pattern(64<<10, 9)
	write(t, img, p, base)
	if err := img.Sync(); err != nil {
		t.Fatal(err)
	}
	before := stat(t, path).Blocks
	if err := img.Zero(base+(16<<10), 32<<10, nbd.ZeroNoHole); err != nil {
		t.Fatalf("Zero no-hole: %v", err)
	}
	checkZeroed(t, img, base, p, base+(16<<10), 32<<10)
	if after := stat(t, path).Blocks; after != before {
		t.Errorf("blocks %d after a no-hole zero, want %d (still allocated)", after, before)
	}
	// Whether the zeroed range shows as data or as a hole depends on the
	// filesystem (ext4 keeps it as unwritten extents, which SEEK_DATA
	// skips); either way the extents cover the range.
	ex := extents(t, img, base, 64<<10)
	t.Logf("extents after a no-hole zero: %+v", ex)
	var total uint64
	for _, e := range ex {
		total += e.Length
	}
	if total != 64<<10 {
		t.Errorf("extents cover %d bytes, want %d", total, 64<<10)
	}
}

func TestZeroNoHoleFast(t *testing.T) {
	img, _ := openNew(t, mib)
	p := pattern(64<<10, 11)
	write(t, img, p, 0)
	err := img.Zero(4096, 8192, nbd.ZeroNoHole|nbd.ZeroFast|nbd.ZeroFUA)
	switch {
	case err == nil:
		checkZeroed(t, img, 0, p, 4096, 8192)
	case errors.Is(err, nbd.ErrNotFast):
		// Refused: nothing may have changed.
		checkZeroed(t, img, 0, p, 0, 0)
		t.Logf("this filesystem cannot zero without a hole quickly: %v", err)
	default:
		t.Fatalf("fast no-hole Zero: %v", err)
	}
}

func TestSyncAndCache(t *testing.T) {
	img, _ := openNew(t, 4*mib)
	write(t, img, pattern(mib, 2), mib)
	if err := img.Sync(); err != nil {
		t.Errorf("Sync: %v", err)
	}
	if err := img.Cache(0, 4*mib); err != nil {
		t.Errorf("Cache of the whole image: %v", err)
	}
	if err := img.Cache(mib+100, 1000); err != nil {
		t.Errorf("Cache of an unaligned range: %v", err)
	}
	if got := read(t, img, mib, mib); !bytes.Equal(got, pattern(mib, 2)) {
		t.Error("data changed across Sync and Cache")
	}
}

// TestInheritSharesTheLock: an image passed to another process (here,
// another File over the same description) is served under the same lock,
// and a fresh Open is still refused.
func TestInheritSharesTheLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.img")
	img, err := rawimage.Open(path, rawimage.Options{Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	dup, err := syscall.Dup(int(img.File().Fd()))
	if err != nil {
		t.Fatal(err)
	}
	child, err := rawimage.Inherit(os.NewFile(uintptr(dup), path), path, false)
	if err != nil {
		t.Fatalf("Inherit: %v", err)
	}
	defer child.Close()
	if child.Size() != 1<<20 {
		t.Errorf("inherited size %d, want %d", child.Size(), 1<<20)
	}
	if _, err := rawimage.Open(path, rawimage.Options{}); !errors.Is(err, rawimage.ErrLocked) {
		t.Errorf("Open of an inherited image: %v, want ErrLocked", err)
	}
}
