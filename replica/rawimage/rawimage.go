// Package rawimage owns the volume's image: a plain raw sparse file, byte for
// byte the disk, that qemu, qemu-img, cp and losetup understand. It offers
// positioned reads and writes, hole punching and zeroing through fallocate,
// allocation maps through SEEK_DATA/SEEK_HOLE, and durability through
// fdatasync. Of Keel it imports only nbd, for the one zero-flags type
// (nbd.ZeroFlags) and the one "not fast" error (nbd.ErrNotFast) that the NBD
// server, the replicated log and the image share.
package rawimage

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/keelstore/keel/nbd"
)

// Sentinel errors, wrapped with the path and context.
var (
	// ErrSizeMismatch: an existing image is not the size asked for.
	ErrSizeMismatch = errors.New("rawimage: image size differs from the size asked for")
	// ErrNoSize: the image does not exist and no size was given to create it.
	ErrNoSize = errors.New("rawimage: image does not exist and no size was given")
	// ErrLocked: another process holds the image.
	ErrLocked = errors.New("rawimage: image is in use by another process")
	// ErrBadSize: the size is zero or not a multiple of 512.
	ErrBadSize = errors.New("rawimage: size must be a positive multiple of 512 bytes")
)

// Options for Open.
type Options struct {
	// Size creates a missing image at this many bytes and, when nonzero,
	// must equal the size of an existing one. Zero means "use the
	// existing image's size". New images must be a multiple of 512.
	Size uint64
	// ReadOnly opens the image for reading only (shared lock).
	ReadOnly bool
	// Hook, if set, sees every operation first (hook.go); nil in
	// production.
	Hook Hook
}

// File is an open image. Its methods are safe for concurrent use.
type File struct {
	f        *os.File
	path     string
	size     uint64
	readOnly bool
	// ranges makes a read atomic with a change it overlaps (rangelock.go).
	ranges rangeLock
	hook   Hook
	dense  denseTail
}

// denseTail remembers that the image has no hole from some offset to its
// end, so that Extents there costs no system call. SEEK_HOLE has no end
// bound: on a fully written image it walks to the end of the file, which
// on tmpfs is every page after the offset, and a sparse read asks it on
// every read (a 1 MiB sequential read of a 384 MiB image spent 68% of the
// server's CPU in lseek). A write never makes a hole, so the claim holds
// until a fallocate (a trim, or a zero that punches or zeroes a range).
type denseTail struct {
	mu   sync.Mutex
	ok   bool   // from is known
	from uint64 // no hole in [from, size)
	gen  uint64 // bumped around every fallocate
}

// covers reports whether [off, end of file) is known to hold no hole, and
// the generation to pass to learn otherwise.
func (d *denseTail) covers(off uint64) (bool, uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ok && off >= d.from, d.gen
}

// learn records that [from, end of file) held no hole, if no fallocate
// began or ended since gen was read.
func (d *denseTail) learn(from, gen uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.gen == gen && (!d.ok || from < d.from) {
		d.ok, d.from = true, from
	}
}

// forget drops the claim: a fallocate is about to change or has changed
// the allocation.
func (d *denseTail) forget() {
	d.mu.Lock()
	d.gen++
	d.ok = false
	d.mu.Unlock()
}

// Open opens the image at path, creating it (sparse, at opts.Size) when it
// is missing. The file is locked (flock) for the life of the File so two
// processes never serve the same image.
func Open(path string, opts Options) (*File, error) {
	flags := os.O_RDWR
	if opts.ReadOnly {
		flags = os.O_RDONLY
	}
	// Refuse FIFOs, devices and directories before opening: opening a FIFO
	// would wait for a writer forever.
	if st, err := os.Stat(path); err == nil && !st.Mode().IsRegular() {
		return nil, fmt.Errorf("rawimage: %s is not a regular file (%s)", path, st.Mode().Type())
	}
	f, err := os.OpenFile(path, flags, 0)
	created := false
	if errors.Is(err, os.ErrNotExist) && !opts.ReadOnly {
		if opts.Size == 0 {
			return nil, fmt.Errorf("%w: %s (give a size to create it)", ErrNoSize, path)
		}
		if opts.Size%512 != 0 {
			return nil, fmt.Errorf("%w: %d", ErrBadSize, opts.Size)
		}
		f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		created = err == nil
	} else if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s (a read-only image must exist)", ErrNoSize, path)
	}
	if err != nil {
		return nil, fmt.Errorf("rawimage: opening %s: %w", path, err)
	}
	img := &File{f: f, path: path, readOnly: opts.ReadOnly, hook: opts.Hook}
	if err := img.lock(); err != nil {
		f.Close()
		return nil, err
	}
	if created {
		if err := img.create(opts.Size); err != nil {
			f.Close()
			os.Remove(path)
			return nil, err
		}
		return img, nil
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("rawimage: %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("rawimage: %s is not a regular file", path)
	}
	img.size = uint64(st.Size())
	if img.size == 0 && opts.Size != 0 && !opts.ReadOnly {
		// An empty file (left by a crash between create and size, or by
		// touch) is sized like a new image.
		if opts.Size%512 != 0 {
			f.Close()
			return nil, fmt.Errorf("%w: %d", ErrBadSize, opts.Size)
		}
		if err := img.create(opts.Size); err != nil {
			f.Close()
			return nil, err
		}
		return img, nil
	}
	if opts.Size != 0 && opts.Size != img.size {
		f.Close()
		return nil, fmt.Errorf("%w: %s is %d bytes, asked for %d", ErrSizeMismatch, path, img.size, opts.Size)
	}
	if img.size == 0 {
		f.Close()
		return nil, fmt.Errorf("rawimage: %s is empty (0 bytes); remove it or give a size", path)
	}
	return img, nil
}

func (img *File) lock() error {
	how := unix.LOCK_EX
	if img.readOnly {
		how = unix.LOCK_SH
	}
	if err := img.control(func(fd int) error { return unix.Flock(fd, how|unix.LOCK_NB) }); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("%w: %s", ErrLocked, img.path)
		}
		return fmt.Errorf("rawimage: locking %s: %w", img.path, err)
	}
	return nil
}

// create sizes a new, empty image and makes its existence durable.
func (img *File) create(size uint64) error {
	if err := img.f.Truncate(int64(size)); err != nil {
		return fmt.Errorf("rawimage: sizing %s to %d bytes: %w", img.path, size, err)
	}
	if err := img.f.Sync(); err != nil {
		return fmt.Errorf("rawimage: syncing %s: %w", img.path, err)
	}
	if d, err := os.Open(filepath.Dir(img.path)); err == nil {
		_ = d.Sync()
		d.Close()
	}
	img.size = size
	return nil
}

// Path is the image's file name.
func (img *File) Path() string { return img.path }

// Size is the image size in bytes.
func (img *File) Size() uint64 { return img.size }

// ReadOnly reports whether the image was opened read-only.
func (img *File) ReadOnly() bool { return img.readOnly }

// Close releases the lock and the file.
func (img *File) Close() error { return img.f.Close() }

// ReadAt fills p from off.
func (img *File) ReadAt(p []byte, off uint64) error {
	l := img.ranges.rlock(off, uint64(len(p)))
	n, err := 0, img.before(OpRead, off, uint64(len(p)))
	if err == nil {
		n, err = img.f.ReadAt(p, int64(off))
	}
	img.ranges.runlock(l)
	if err == io.EOF && n == len(p) {
		err = nil
	}
	if err != nil {
		return fmt.Errorf("rawimage: reading %d bytes at %d: %w", len(p), off, err)
	}
	return nil
}

// WriteAt writes p at off; with fua the data is on stable storage on return.
func (img *File) WriteAt(p []byte, off uint64, fua bool) error {
	if off > img.size || uint64(len(p)) > img.size-off {
		return fmt.Errorf("rawimage: writing %d bytes at %d: past the end of the %d-byte image", len(p), off, img.size)
	}
	l := img.ranges.lock(off, uint64(len(p)))
	err := img.before(OpWrite, off, uint64(len(p)))
	if err == nil {
		_, err = img.f.WriteAt(p, int64(off))
	}
	img.ranges.unlock(l)
	if err != nil {
		return fmt.Errorf("rawimage: writing %d bytes at %d: %w", len(p), off, err)
	}
	if fua {
		return img.Sync()
	}
	return nil
}

// Sync puts every completed write on stable storage (fdatasync).
func (img *File) Sync() error {
	if err := img.before(OpSync, 0, 0); err != nil {
		return fmt.Errorf("rawimage: fdatasync %s: %w", img.path, err)
	}
	for {
		err := img.control(unix.Fdatasync)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("rawimage: fdatasync %s: %w", img.path, err)
		}
		if img.hook != nil {
			img.hook.Synced()
		}
		return nil
	}
}

func (img *File) fallocate(mode uint32, off, length uint64) error {
	img.dense.forget()
	defer img.dense.forget()
	for {
		err := img.control(func(fd int) error { return unix.Fallocate(fd, mode, int64(off), int64(length)) })
		if err == unix.EINTR {
			continue
		}
		return err
	}
}

func unsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS)
}

// Trim discards the range by punching a hole; it reads back as zeroes. On a
// filesystem that cannot punch holes it does nothing (a trim is a hint).
func (img *File) Trim(off, length uint64, fua bool) error {
	l := img.ranges.lock(off, length)
	err := img.before(OpTrim, off, length)
	if err == nil {
		err = img.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	}
	img.ranges.unlock(l)
	if err != nil && !unsupported(err) {
		return fmt.Errorf("rawimage: punching hole of %d bytes at %d: %w", length, off, err)
	}
	if fua {
		return img.Sync()
	}
	return nil
}

// Zero makes the range read as zeroes. nbd.ZeroNoHole keeps it allocated
// (FALLOC_FL_ZERO_RANGE); otherwise a hole is punched. When the filesystem
// supports neither, zeroes are written, unless nbd.ZeroFast is set: then
// nbd.ErrNotFast is returned and nothing changes. nbd.ZeroFUA syncs before
// returning.
func (img *File) Zero(off, length uint64, f nbd.ZeroFlags) error {
	l := img.ranges.lock(off, length)
	err := img.zero(off, length, f&nbd.ZeroNoHole != 0, f&nbd.ZeroFast != 0)
	img.ranges.unlock(l)
	if err != nil {
		return err
	}
	if f&nbd.ZeroFUA != 0 {
		return img.Sync()
	}
	return nil
}

// zero is Zero under the range lock, without the sync.
func (img *File) zero(off, length uint64, noHole, fast bool) error {
	err := img.before(OpZero, off, length)
	if err != nil {
		return fmt.Errorf("rawimage: zeroing %d bytes at %d: %w", length, off, err)
	}
	if !noHole {
		err = img.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	}
	if noHole || unsupported(err) {
		err = img.fallocate(unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	}
	if unsupported(err) {
		if fast {
			return fmt.Errorf("rawimage: zeroing %d bytes at %d: the filesystem can neither punch holes nor zero ranges: %w", length, off, nbd.ErrNotFast)
		}
		err = img.writeZeroes(off, length)
	}
	if err != nil {
		return fmt.Errorf("rawimage: zeroing %d bytes at %d: %w", length, off, err)
	}
	return nil
}

var zeroBlock = make([]byte, 1<<20)

func (img *File) writeZeroes(off, length uint64) error {
	for length > 0 {
		n := min(length, uint64(len(zeroBlock)))
		if _, err := img.f.WriteAt(zeroBlock[:n], int64(off)); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// control runs f on the image's descriptor, holding it open meanwhile
// (os.File.Fd would race with Close, and a closed descriptor's number may
// already name another file): os.ErrClosed once the image is closed.
func (img *File) control(f func(fd int) error) error {
	rc, err := img.f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = f(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// before tells the hook, if any, about op.
func (img *File) before(op Op, off, length uint64) error {
	if img.hook == nil {
		return nil
	}
	return img.hook.Before(op, off, length)
}

// Extent is a run of the image that is all data or all hole.
type Extent struct {
	Length uint64
	// Hole: SEEK_DATA skips it, so it reads as zeroes. Usually that means
	// unallocated, but filesystems such as ext4 also skip ranges that are
	// allocated and unwritten (FALLOC_FL_ZERO_RANGE).
	Hole bool
}

// maxExtents bounds one Extents call.
const maxExtents = 1 << 16

// Extents maps [off, off+length) from off, using SEEK_DATA and SEEK_HOLE.
// It may return fewer extents than needed to cover the range (at least
// one; off must be inside the image); on a filesystem without hole support
// the range is one data extent.
func (img *File) Extents(off, length uint64) ([]Extent, error) {
	if off >= img.size {
		return nil, fmt.Errorf("rawimage: extents at %d: at or past the end of the %d-byte image", off, img.size)
	}
	end := img.size
	if length < img.size-off {
		end = off + length
	}
	known, gen := img.dense.covers(off)
	if known {
		return []Extent{{Length: end - off}}, nil
	}
	var out []Extent
	err := img.control(func(fd int) error {
		var err error
		var denseFrom uint64
		out, denseFrom, err = extents(fd, off, end, img.size)
		if err == nil && denseFrom < img.size {
			img.dense.learn(denseFrom, gen)
		}
		return err
	})
	return out, err
}

// extents is Extents on the open descriptor fd, up to end, in a file of
// size bytes. denseFrom is an offset from which SEEK_HOLE found no hole
// before the end of the file, or size if it found none.
func extents(fd int, off, end, size uint64) (out []Extent, denseFrom uint64, err error) {
	denseFrom = size
	pos := off
	for pos < end && len(out) < maxExtents {
		data, err := unix.Seek(fd, int64(pos), unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			// No data at or after pos: a hole to the end of the file.
			out = append(out, Extent{Length: end - pos, Hole: true})
			break
		}
		if err != nil {
			if errors.Is(err, unix.EINVAL) || unsupported(err) {
				return []Extent{{Length: end - pos}}, size, nil
			}
			return nil, size, fmt.Errorf("rawimage: SEEK_DATA at %d: %w", pos, err)
		}
		if uint64(data) > pos {
			stop := min(uint64(data), end)
			out = append(out, Extent{Length: stop - pos, Hole: true})
			pos = stop
			continue
		}
		hole, err := unix.Seek(fd, int64(pos), unix.SEEK_HOLE)
		if err != nil {
			return nil, size, fmt.Errorf("rawimage: SEEK_HOLE at %d: %w", pos, err)
		}
		if uint64(hole) >= size {
			denseFrom = pos // only the implicit hole at the end
		}
		stop := min(uint64(hole), end)
		if stop <= pos { // cannot happen on a sane filesystem; never loop
			stop = end
		}
		out = append(out, Extent{Length: stop - pos})
		pos = stop
	}
	return out, denseFrom, nil
}

// Cache asks the kernel to read the range ahead.
func (img *File) Cache(off, length uint64) error {
	if err := img.control(func(fd int) error { return unix.Fadvise(fd, int64(off), int64(length), unix.FADV_WILLNEED) }); err != nil {
		return fmt.Errorf("rawimage: readahead of %d bytes at %d: %w", length, off, err)
	}
	return nil
}

// File returns the image's open file, to pass to a process that takes
// over serving it (Inherit); the image keeps ownership.
func (img *File) File() *os.File { return img.f }

// Inherit takes over an image another process opened (its File, passed
// down): the flock belongs to the open file description, which both
// processes now share, so it stays held while either serves. f must be
// the image at path; Inherit takes ownership of it.
func Inherit(f *os.File, path string, readOnly bool) (*File, error) {
	img := &File{f: f, path: path, readOnly: readOnly}
	if err := img.lock(); err != nil { // the same description: succeeds
		f.Close()
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("rawimage: %s: %w", path, err)
	}
	if !st.Mode().IsRegular() || st.Size() == 0 {
		f.Close()
		return nil, fmt.Errorf("rawimage: inherited %s is not a sized regular file", path)
	}
	img.size = uint64(st.Size())
	return img, nil
}
