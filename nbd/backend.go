package nbd

import (
	"context"
	"fmt"
)

// Backend is what an export serves. The connection code has already checked
// every request against the export's size, block sizes, read-only flag and
// the backend's Capabilities before it calls a Backend, so offsets and
// lengths are always in range and a method whose capability is not declared
// is never called (it may simply return an error).
//
// Methods are called concurrently from many goroutines. A write that returned
// (without FUA) must be covered by a later Flush.
//
// Every call but Size and Capabilities gets the context of its connection.
// It is cancelled only when nobody can be answered any more: the connection
// died (a reply could not be written, the client vanished in the middle of a
// request, or the server closed it after a panic) or a graceful stop ran
// past the server's DrainTimeout. A graceful stop itself does not cancel it,
// nor does a client that hangs up between requests (served like
// NBD_CMD_DISC): requests already read are served to the end. Backends pass
// it down to whatever they wait on.
type Backend interface {
	// Size is the export size in bytes; it does not change while serving.
	Size() uint64
	// Capabilities says what the backend does beyond reading and
	// writing; it does not change while serving. The handshake
	// advertises exactly these, and requests for anything else are
	// refused with EINVAL before they reach the backend.
	Capabilities() Caps
	// ReadAt fills p from off.
	ReadAt(ctx context.Context, p []byte, off uint64) error
	// WriteAt writes p at off; with fua (only with CapFUA) it returns
	// only once p is on stable storage.
	WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error
	// Flush (CapFlush) returns once every write that has returned is on
	// stable storage.
	Flush(ctx context.Context) error
	// Trim (CapTrim) discards the range; later reads may return anything
	// until it is written again (Keel's backends return zeroes).
	Trim(ctx context.Context, off, length uint64, fua bool) error
	// Zero (CapZero) makes the range read as zeroes. With ZeroNoHole the
	// range stays allocated; with ZeroFast (only with CapFastZero) the
	// backend returns ErrNotFast, and changes nothing, unless it can do
	// it in less time than writing the same range.
	Zero(ctx context.Context, off, length uint64, flags ZeroFlags) error
	// Extents (CapExtents) describes the allocation of [off,
	// off+length): consecutive extents starting at off whose lengths are
	// nonzero. It may stop early (at least one extent) and the last may
	// run past off+length. Flags use the base:allocation bits
	// (StateHole, StateZero).
	Extents(ctx context.Context, off, length uint64) ([]Extent, error)
	// Cache (CapCache) is a hint that the range will be read soon.
	Cache(ctx context.Context, off, length uint64) error
}

// Caps is the set of things a Backend can do beyond reading and writing.
// Each maps to what the handshake advertises.
type Caps uint16

// Capabilities.
const (
	CapFlush     Caps = 1 << iota // Flush: NBD_FLAG_SEND_FLUSH
	CapFUA                        // fua on writes, trims and zeroes: NBD_FLAG_SEND_FUA
	CapTrim                       // Trim: NBD_FLAG_SEND_TRIM
	CapZero                       // Zero: NBD_FLAG_SEND_WRITE_ZEROES
	CapFastZero                   // ZeroFast honoured: NBD_FLAG_SEND_FAST_ZERO; needs CapZero
	CapCache                      // Cache: NBD_FLAG_SEND_CACHE
	CapExtents                    // Extents: the base:allocation context, sparse reads
	CapMultiConn                  // flush and FUA act across connections: NBD_FLAG_CAN_MULTI_CONN

	// CapsAll is every capability.
	CapsAll = CapFlush | CapFUA | CapTrim | CapZero | CapFastZero | CapCache | CapExtents | CapMultiConn
)

// Has reports whether every capability in want is in c.
func (c Caps) Has(want Caps) bool { return c&want == want }

// ZeroFlags qualify Backend.Zero. The same type serves rawimage and the
// replicated log's zero command, whose wire byte carries these bits
// (ZeroNoHole is bit 0 there).
type ZeroFlags uint8

// Zero flags.
const (
	ZeroNoHole ZeroFlags = 1 << iota // keep the range allocated
	ZeroFast                         // fail with ErrNotFast unless fast
	ZeroFUA                          // stable on return
)

// Export is one named disk a Server offers.
type Export struct {
	// Name is the export's canonical name. Clients that ask for the empty
	// name get the server's default export.
	Name string
	// Description is shown by clients such as nbdinfo; optional.
	Description string
	// Backend holds the data.
	Backend Backend
	// ReadOnly refuses writes, trims and zeroes with EPERM (and leaves
	// trim and zero unadvertised whatever the backend can do).
	ReadOnly bool
	// BlockSize are the constraints advertised in NBD_INFO_BLOCK_SIZE and
	// enforced on clients that asked for them. Zero fields take defaults:
	// minimum 512 when the size is a multiple of 512 (else 1), preferred
	// 4096, maximum 32 MiB.
	BlockSize BlockSize
	// Rotational sets NBD_FLAG_ROTATIONAL.
	Rotational bool
}

// withDefaults returns e with the block size defaults filled in.
func (e Export) withDefaults() Export {
	if e.BlockSize.Minimum == 0 {
		e.BlockSize.Minimum = 1
		if e.Backend != nil && e.Backend.Size()%512 == 0 {
			e.BlockSize.Minimum = 512
		}
	}
	if e.BlockSize.Preferred == 0 {
		e.BlockSize.Preferred = max(4096, e.BlockSize.Minimum)
	}
	if e.BlockSize.Maximum == 0 {
		e.BlockSize.Maximum = DefaultMaxPayload
	}
	return e
}

// Validate checks the export; errors name the bad field and the allowed range.
func (e Export) Validate() error {
	if e.Backend == nil {
		return fmt.Errorf("nbd: export %q: Backend is nil", e.Name)
	}
	if err := checkString(e.Name); err != nil {
		return fmt.Errorf("nbd: export Name: %w", err)
	}
	if err := checkString(e.Description); err != nil {
		return fmt.Errorf("nbd: export Description: %w", err)
	}
	e = e.withDefaults()
	bs := e.BlockSize
	pow2 := func(v uint32) bool { return v != 0 && v&(v-1) == 0 }
	if !pow2(bs.Minimum) || bs.Minimum > 1<<16 {
		return fmt.Errorf("nbd: export BlockSize.Minimum %d: must be a power of 2 from 1 to 65536", bs.Minimum)
	}
	if !pow2(bs.Preferred) || bs.Preferred < max(bs.Minimum, 512) {
		return fmt.Errorf("nbd: export BlockSize.Preferred %d: must be a power of 2, at least 512 and at least the minimum %d", bs.Preferred, bs.Minimum)
	}
	if bs.Maximum < bs.Preferred || bs.Maximum > DefaultMaxPayload {
		return fmt.Errorf("nbd: export BlockSize.Maximum %d: must be from the preferred size %d to %d", bs.Maximum, bs.Preferred, DefaultMaxPayload)
	}
	if bs.Maximum%bs.Minimum != 0 {
		return fmt.Errorf("nbd: export BlockSize.Maximum %d: must be a multiple of the minimum %d", bs.Maximum, bs.Minimum)
	}
	if c := e.Backend.Capabilities(); c&^CapsAll != 0 {
		return fmt.Errorf("nbd: export %q: Backend.Capabilities %#x: unknown bits %#x", e.Name, uint16(c), uint16(c&^CapsAll))
	} else if c.Has(CapFastZero) && !c.Has(CapZero) {
		return fmt.Errorf("nbd: export %q: Backend.Capabilities: CapFastZero needs CapZero", e.Name)
	}
	if e.Backend.Size()%uint64(bs.Minimum) != 0 {
		return fmt.Errorf("nbd: export size %d: must be a multiple of BlockSize.Minimum %d", e.Backend.Size(), bs.Minimum)
	}
	return nil
}
