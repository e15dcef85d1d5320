// Package imagefault is the chaos tests' fault layer under a server's
// image: a rawimage.Hook that fails reads, changes (writes, trims,
// zeroes) or fdatasyncs with EIO or ENOSPC, and simulates power loss.
//
// Power loss: while Rules.Lazy holds, the layer keeps, for every 4 KiB
// block changed since the image's last fdatasync, what the block held
// before that first change (the hook is called under the image's range
// lock, so that read is the block as it was). Crash puts those blocks back,
// except a random few that keep the new bytes: after a power cut any
// subset of the writes not yet synced may be on the disk, at block
// granularity, and none of the synced ones is lost. The caller then kills
// the process.
//
// Only keel built with -tags chaos links this package (cmd/keel/chaos.go).
package imagefault

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"os"
	"slices"
	"sync"

	"github.com/keelstore/keel/chaos/diskfault"
	"github.com/keelstore/keel/replica/rawimage"
)

// ErrInjected wraps every error the layer makes up.
var ErrInjected = errors.New("imagefault: injected image fault")

// BlockSize is the granularity of what a crash keeps or undoes.
const BlockSize = 4096

// Rules are the image faults in force.
type Rules struct {
	// FailChange, FailRead and FailSync make every change (write, trim,
	// zero), read or fdatasync fail with this errno: "EIO" or "ENOSPC";
	// "" for none.
	FailChange string `json:"fail_change,omitempty"`
	FailRead   string `json:"fail_read,omitempty"`
	FailSync   string `json:"fail_sync,omitempty"`
	// Lazy remembers what each change since the last fdatasync
	// overwrote, so that Crash can lose it.
	Lazy bool `json:"lazy,omitempty"`
}

func errno(s string) (error, error) { return diskfault.Errno(s) }

// Validate names the first bad field.
func (r Rules) Validate() error {
	for name, v := range map[string]string{"fail_change": r.FailChange, "fail_read": r.FailRead, "fail_sync": r.FailSync} {
		if _, err := errno(v); err != nil {
			return fmt.Errorf("imagefault: %s: %w", name, err)
		}
	}
	return nil
}

// Layer is the hook of one image. Its methods are safe for concurrent use.
type Layer struct {
	path string
	seed uint64

	mu      sync.Mutex // guards the following
	rules   Rules
	f       *os.File          // the image, opened on the first undo record
	undo    map[uint64][]byte // block number: its bytes before the first unsynced change
	crashed bool
}

var _ rawimage.Hook = (*Layer)(nil)

// New returns a layer for the image at path, with no fault in force. seed
// chooses which blocks a crash keeps.
func New(path string, seed uint64) *Layer {
	return &Layer{path: path, seed: seed, undo: map[uint64][]byte{}}
}

// Set replaces the rules. Leaving Lazy forgets what was remembered.
func (l *Layer) Set(r Rules) error {
	if err := r.Validate(); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.rules = r
	if !r.Lazy {
		clear(l.undo)
	}
	return nil
}

// Rules returns the rules in force.
func (l *Layer) Rules() Rules {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.rules
}

// Pending is how many blocks a crash now would put back (or keep).
func (l *Layer) Pending() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.undo)
}

// Before implements rawimage.Hook.
func (l *Layer) Before(op rawimage.Op, off, length uint64) error {
	l.mu.Lock()
	if l.crashed {
		// The power is off: nothing reaches the image any more. The
		// process is being killed; hold the caller until it is.
		l.mu.Unlock()
		select {}
	}
	err := l.beforeLocked(op, off, length)
	l.mu.Unlock()
	return err
}

func (l *Layer) beforeLocked(op rawimage.Op, off, length uint64) error {
	var rule string
	switch op {
	case rawimage.OpRead:
		rule = l.rules.FailRead
	case rawimage.OpSync:
		rule = l.rules.FailSync
	default:
		rule = l.rules.FailChange
	}
	if e, _ := errno(rule); e != nil {
		return fmt.Errorf("%w: %v of %d bytes at %d: %w", ErrInjected, op, length, off, e)
	}
	if l.rules.Lazy && op != rawimage.OpRead && op != rawimage.OpSync && length > 0 {
		return l.rememberLocked(off, length)
	}
	return nil
}

// rememberLocked reads, for each block of [off, off+length) not yet
// remembered, what it holds now.
func (l *Layer) rememberLocked(off, length uint64) error {
	if l.f == nil {
		f, err := os.OpenFile(l.path, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("imagefault: opening %s to remember its blocks: %w", l.path, err)
		}
		l.f = f
	}
	for b := off / BlockSize; b*BlockSize < off+length; b++ {
		if _, ok := l.undo[b]; ok {
			continue
		}
		p := make([]byte, BlockSize)
		n, err := l.f.ReadAt(p, int64(b*BlockSize))
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("imagefault: remembering block %d: %w", b, err)
		}
		l.undo[b] = p[:n]
	}
	return nil
}

// Synced implements rawimage.Hook: what was remembered is on the disk now.
func (l *Layer) Synced() {
	l.mu.Lock()
	defer l.mu.Unlock()
	clear(l.undo)
}

// Crash cuts the power: every block changed since the last fdatasync goes
// back to what it held then, except a random few (none to all, chosen by
// the seed and what is pending) that keep their new bytes. From now on
// every operation on the image blocks. It returns how many blocks were put
// back and how many kept; the caller then kills the process.
func (l *Layer) Crash() (undone, kept int, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.crashed = true
	if len(l.undo) == 0 {
		return 0, 0, nil
	}
	blocks := slices.Sorted(maps.Keys(l.undo)) // the seed decides, not map order
	rng := rand.New(rand.NewPCG(l.seed, uint64(len(blocks))))
	keepOdds := rng.Float64() // how much of what was in flight made it
	for _, b := range blocks {
		p := l.undo[b]
		if rng.Float64() < keepOdds {
			kept++
			continue
		}
		if _, err := l.f.WriteAt(p, int64(b*BlockSize)); err != nil {
			return undone, kept, fmt.Errorf("imagefault: crash: putting block %d back: %w", b, err)
		}
		undone++
	}
	return undone, kept, nil
}
