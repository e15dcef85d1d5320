// Package diskfault is the disk fault layer of the chaos tests: a
// raft-wal file system (types.VFS) over the real one that, by the rules it
// is given at run time, fails writes, fsyncs or reads with EIO or ENOSPC,
// slows writes and fsyncs down, and simulates power loss the way LazyFS
// does for Jepsen: in lazy mode a write stays in this process's memory
// until the file is fsynced, so a crash (SIGKILL, or Crash, which first
// lets a random prefix of the unsynced writes reach the file, torn at a
// 512-byte boundary) loses everything written since the last successful
// fsync.
//
// It covers the Raft log (raft-wal's segment files, through
// replica.NodeConfig.WrapWALFS). The image is not under it yet.
//
// Production code never imports this package: cmd/keel's chaos.go (built
// only with -tags chaos) installs it.
package diskfault

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/raft-wal/types"
)

// Rules are the disk faults in force.
type Rules struct {
	// FailWrite, FailSync and FailRead make every write, fsync or read
	// fail with this errno: "EIO" or "ENOSPC"; "" for none.
	FailWrite string `json:"fail_write,omitempty"`
	FailSync  string `json:"fail_sync,omitempty"`
	FailRead  string `json:"fail_read,omitempty"`
	// Slow delays every write and fsync by this much.
	Slow time.Duration `json:"slow,omitempty"`
	// Lazy keeps writes in memory until the file is fsynced.
	Lazy bool `json:"lazy,omitempty"`
	// CrashAtSync: the next fsync does not happen; the power fails
	// instead (the FS's crash hook runs, which does not return). With
	// Lazy, the writes it was to make durable are lost or torn.
	CrashAtSync bool `json:"crash_at_sync,omitempty"`
}

// Errno is the error a rule's errno name stands for: syscall.EIO for
// "EIO", syscall.ENOSPC for "ENOSPC", nil for "" (no fault); any other
// name is the second error. The image's layer (chaos/imagefault) names
// its errnos the same way.
func Errno(s string) (error, error) {
	switch s {
	case "":
		return nil, nil
	case "EIO":
		return syscall.EIO, nil
	case "ENOSPC":
		return syscall.ENOSPC, nil
	}
	return nil, fmt.Errorf("errno %q: want EIO, ENOSPC or empty", s)
}

func errno(s string) (error, error) { return Errno(s) }

// Validate names the first bad field.
func (r Rules) Validate() error {
	for _, s := range []string{r.FailWrite, r.FailSync, r.FailRead} {
		if _, err := errno(s); err != nil {
			return fmt.Errorf("diskfault: %w", err)
		}
	}
	if r.Slow < 0 || r.Slow > 10*time.Second {
		return fmt.Errorf("diskfault: Rules.Slow %v: must be from 0 to 10s", r.Slow)
	}
	return nil
}

// ErrInjected is wrapped by every error this layer makes up.
var ErrInjected = errors.New("diskfault: injected disk fault")

// FS is a types.VFS under the rules; safe for any goroutine.
type FS struct {
	inner types.VFS

	mu      sync.Mutex // guards the following
	rules   Rules
	pending map[string][]chunk // path -> writes not yet fsynced (lazy mode)
	seed    uint64
	onCrash func() // for CrashAtSync
}

// OnCrash sets what CrashAtSync runs: simulate the loss (Crash) and kill
// the process. A test that keeps its process may return from it instead:
// the fsync then fails and writes nothing, as if the process had died in
// it (the test stops that node next).
func (fs *FS) OnCrash(f func()) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.onCrash = f
}

// chunk is one write held back in lazy mode.
type chunk struct {
	off  int64
	data []byte
}

// New wraps inner; seed drives Crash's choices.
func New(inner types.VFS, seed uint64) *FS {
	return &FS{inner: inner, pending: map[string][]chunk{}, seed: seed}
}

// Set replaces the rules. Leaving lazy mode does not write back what is
// pending; that waits for each file's next fsync, as a cache would.
func (fs *FS) Set(r Rules) error {
	if err := r.Validate(); err != nil {
		return err
	}
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.rules = r
	return nil
}

// Rules returns the rules in force.
func (fs *FS) Rules() Rules {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.rules
}

// Pending is how many bytes lazy mode holds back.
func (fs *FS) Pending() int {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.pendingLocked()
}

func (fs *FS) pendingLocked() int {
	n := 0
	for _, cs := range fs.pending {
		for _, c := range cs {
			n += len(c.data)
		}
	}
	return n
}

// Crash simulates power loss: a random prefix of each file's unsynced
// writes reaches the file, the last one perhaps torn at a 512-byte
// boundary, and the rest is lost. The caller then kills the process (the
// chaos build sends itself SIGKILL). It returns the bytes lost.
func (fs *FS) Crash() (lost int, err error) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	for path, cs := range fs.pending {
		// The choice depends on the seed and on what is pending, not on
		// how many crashes this process made: each run crashes once, and
		// a restarted server has the same seed.
		rng := rand.New(rand.NewPCG(fs.seed, uint64(cs[0].off)<<16^uint64(len(cs))<<8^uint64(len(cs[len(cs)-1].data))))
		keep := rng.IntN(len(cs) + 1)
		w, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return lost, fmt.Errorf("diskfault: crash: %w", err)
		}
		for i, c := range cs {
			data := c.data
			switch {
			case i < keep:
			case i == keep:
				data = data[:rng.IntN(len(data)/512+1)*512]
			default:
				data = nil
			}
			lost += len(c.data) - len(data)
			if len(data) > 0 {
				if _, err := w.WriteAt(data, c.off); err != nil {
					w.Close()
					return lost, fmt.Errorf("diskfault: crash: %w", err)
				}
			}
		}
		if err := w.Close(); err != nil {
			return lost, fmt.Errorf("diskfault: crash: %w", err)
		}
	}
	fs.pending = map[string][]chunk{}
	return lost, nil
}

// DropPending simulates the power loss in which none of the unsynced
// writes reached the disk, and returns the bytes lost.
func (fs *FS) DropPending() int {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	lost := fs.pendingLocked()
	fs.pending = map[string][]chunk{}
	return lost
}

func (fs *FS) ListDir(dir string) ([]string, error) { return fs.inner.ListDir(dir) }

func (fs *FS) Delete(dir, name string) error {
	fs.mu.Lock()
	delete(fs.pending, filepath.Join(dir, name))
	fs.mu.Unlock()
	return fs.inner.Delete(dir, name)
}

func (fs *FS) Create(dir, name string, size uint64) (types.WritableFile, error) {
	f, err := fs.inner.Create(dir, name, size)
	if err != nil {
		return nil, err
	}
	return &file{fs: fs, path: filepath.Join(dir, name), w: f, r: f}, nil
}

func (fs *FS) OpenWriter(dir, name string) (types.WritableFile, error) {
	f, err := fs.inner.OpenWriter(dir, name)
	if err != nil {
		return nil, err
	}
	return &file{fs: fs, path: filepath.Join(dir, name), w: f, r: f}, nil
}

func (fs *FS) OpenReader(dir, name string) (types.ReadableFile, error) {
	f, err := fs.inner.OpenReader(dir, name)
	if err != nil {
		return nil, err
	}
	return &file{fs: fs, path: filepath.Join(dir, name), r: f}, nil
}

// file is one open file; reads see the writes lazy mode holds back.
type file struct {
	fs   *FS
	path string
	w    types.WritableFile // nil for a reader
	r    types.ReadableFile
}

func (f *file) rules() Rules {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	return f.fs.rules
}

func (f *file) WriteAt(p []byte, off int64) (int, error) {
	r := f.rules()
	if r.Slow > 0 {
		time.Sleep(r.Slow) // the disk is slow: this is the injected latency
	}
	if e, _ := errno(r.FailWrite); e != nil {
		return 0, fmt.Errorf("%w: write %s: %w", ErrInjected, f.path, e)
	}
	f.fs.mu.Lock()
	if f.fs.rules.Lazy || len(f.fs.pending[f.path]) > 0 {
		// Once a file has pending writes, later ones queue behind them so
		// that a write-back keeps their order.
		f.fs.pending[f.path] = append(f.fs.pending[f.path], chunk{off: off, data: append([]byte(nil), p...)})
		f.fs.mu.Unlock()
		return len(p), nil
	}
	f.fs.mu.Unlock()
	return f.w.WriteAt(p, off)
}

func (f *file) ReadAt(p []byte, off int64) (int, error) {
	if e, _ := errno(f.rules().FailRead); e != nil {
		return 0, fmt.Errorf("%w: read %s: %w", ErrInjected, f.path, e)
	}
	n, err := f.r.ReadAt(p, off)
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	end := off + int64(n)
	for _, c := range f.fs.pending[f.path] {
		lo, hi := max(off, c.off), min(off+int64(len(p)), c.off+int64(len(c.data)))
		if lo < hi {
			copy(p[lo-off:hi-off], c.data[lo-c.off:hi-c.off])
			if lo <= end {
				end = max(end, hi)
			}
		}
	}
	if int(end-off) > n {
		n = int(end - off)
		if n == len(p) {
			err = nil
		}
	}
	return n, err
}

func (f *file) Sync() error {
	r := f.rules()
	if r.Slow > 0 {
		time.Sleep(r.Slow)
	}
	if e, _ := errno(r.FailSync); e != nil {
		return fmt.Errorf("%w: fsync %s: %w", ErrInjected, f.path, e)
	}
	if r.CrashAtSync {
		f.fs.mu.Lock()
		crash := f.fs.onCrash
		f.fs.mu.Unlock()
		if crash != nil {
			crash()
			return fmt.Errorf("%w: fsync %s: the power failed", ErrInjected, f.path)
		}
	}
	f.fs.mu.Lock()
	cs := f.fs.pending[f.path]
	delete(f.fs.pending, f.path)
	f.fs.mu.Unlock()
	for i, c := range cs {
		if _, err := f.w.WriteAt(c.data, c.off); err != nil {
			f.fs.mu.Lock()
			f.fs.pending[f.path] = append(cs[i:], f.fs.pending[f.path]...)
			f.fs.mu.Unlock()
			return err
		}
	}
	return f.w.Sync()
}

func (f *file) Close() error { return f.r.Close() }
