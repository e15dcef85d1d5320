// Package imagesync makes a node's raw image equal to its peers' images,
// moving only what differs. It is how a new node, or one too far behind for
// the Raft log, catches up: Raft snapshots are metadata only (the image is the
// snapshot), so Restore pulls the image out of band with Sync, and every node
// serves its own image to syncing peers with Handler.
//
// The copy is fuzzy: peers keep applying writes while it runs. That is fine
// because block writes are absolute overwrites; replaying the Raft log from an
// index no later than the start of the copy converges. This package does not
// replay anything.
//
// # How a sync runs
//
// The image is cut into segments (Config.SegmentSize) and each segment into
// chunks (Config.ChunkSize). Segments go through one work queue that every
// peer drains with Config.PerPeer workers. For a segment a worker asks its
// peer for one hash record per chunk, computes the same records locally,
// and for each chunk that differs either punches a hole (the peer's chunk is
// all zeroes) or fetches the chunk's bytes from the same peer. Fetched chunks
// are written sparsely: 4 KiB blocks of zeroes become holes. Comparing first
// is also what makes an interrupted sync resume: chunks already copied
// compare equal and do not move again.
//
// # Wire format
//
// Handler serves two GET endpoints relative to where it is mounted. Numbers
// are unsigned decimal. Every successful response carries the image size in
// the X-Keel-Image-Size header; the syncing side refuses a peer whose size
// differs from its own.
//
//	hashes?offset=O&length=L&chunk=C
//	    One 9-byte record per chunk of [O, O+L), in order:
//	        kind  1 byte   0 = data, 1 = all zeroes (a hole or zero bytes)
//	        sum   8 bytes  big-endian xxhash64 of the chunk's bytes; 0 for kind 1
//	    O and C are multiples of 4096; L is a multiple of C unless O+L is the
//	    end of the image (the last chunk is then shorter); 0 < L <= 1 GiB and
//	    C <= 64 MiB.
//	range?offset=O&length=L
//	    The L bytes at O (application/octet-stream). O is a multiple of 4096,
//	    L is a multiple of 4096 unless O+L is the end of the image, and
//	    0 < L <= 64 MiB.
//
// Anything else is answered 400 (bad numbers, alignment, range), 404
// (unknown path) or 405 (not GET or HEAD) with a one-line text message.
//
// Two chunks are equal when both are all zeroes, or both hold data with the
// same xxhash64. xxhash64 is not cryptographic: peers are trusted (they are
// the replicas of this very disk), and an accidental collision between a
// stale and a current chunk is vanishingly unlikely (2^-64 per chunk).
//
// imagesync imports replica/rawimage (for its Extent type) and nbd (for the
// zero flags rawimage takes) and nothing else from Keel.
package imagesync

import (
	"bytes"
	"errors"
	"fmt"

	"github.com/cespare/xxhash/v2"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica/rawimage"
)

// Wire limits and alignment; the handler enforces them and Config.Validate
// keeps the syncing side within them.
const (
	// Align is the alignment of every offset and chunk size on the wire.
	Align = 4096
	// MaxChunk is the largest chunk a hashes request may ask for.
	MaxChunk = 64 << 20
	// MaxHashSpan is the most bytes one hashes request may cover.
	MaxHashSpan = 1 << 30
	// MaxRange is the most bytes one range request may ask for.
	MaxRange = 64 << 20
	// SizeHeader carries the image size on every successful response.
	SizeHeader = "X-Keel-Image-Size"
	// recordSize is the size of one hash record: kind byte + 8-byte sum.
	recordSize = 9
)

// Record kinds on the wire.
const (
	kindData = 0
	kindZero = 1
)

// Sentinel errors, wrapped with context.
var (
	// ErrSizeMismatch: a peer's image is not the size of the local image.
	ErrSizeMismatch = errors.New("imagesync: peer image size differs from the local image size")
	// ErrNoPeers: every peer failed (or was dropped) before the sync was done.
	ErrNoPeers = errors.New("imagesync: no peer left to sync from")
	// ErrPeerProtocol: a peer answered something that does not follow the
	// wire format (bad status, missing header, wrong body length, bad kind).
	ErrPeerProtocol = errors.New("imagesync: peer broke the sync protocol")
)

// SourceImage is what Handler serves: an image it can size, read and map.
// *rawimage.File satisfies it.
type SourceImage interface {
	Size() uint64
	ReadAt(p []byte, off uint64) error
	// Extents maps [off, off+length) from off; it may cover less than asked
	// (the caller asks again from where it stopped).
	Extents(off, length uint64) ([]rawimage.Extent, error)
}

// Image is the local side of a sync. *rawimage.File satisfies it.
type Image interface {
	SourceImage
	WriteAt(p []byte, off uint64, fua bool) error
	// Trim punches a hole; the range must read back as zeroes afterwards.
	// If the image also has rawimage.File's Zero method, Sync uses Zero
	// instead (rawimage's Trim is only a hint on filesystems that cannot
	// punch holes, while Zero falls back to writing zeroes).
	Trim(off, length uint64, fua bool) error
	Sync() error
}

// zeroer is rawimage.File's Zero: punch a hole (flags 0), falling back to
// writing zeroes when the filesystem cannot.
type zeroer interface {
	Zero(off, length uint64, f nbd.ZeroFlags) error
}

var _ Image = (*rawimage.File)(nil)
var _ zeroer = (*rawimage.File)(nil)

// sum is one chunk's hash record.
type sum struct {
	zero bool   // all zeroes
	hash uint64 // xxhash64 of the bytes; 0 when zero
}

func (s sum) String() string {
	if s.zero {
		return "zero"
	}
	return fmt.Sprintf("data:%016x", s.hash)
}

// span is a run of the image, all data or all hole, in absolute offsets.
type span struct {
	off, end uint64
	hole     bool
}

// mapSpans maps [off, end) with img.Extents, asking again until the range is
// covered. A filesystem that reports nothing for the rest is treated as data
// there (reading is always correct, only slower).
func mapSpans(img SourceImage, off, end uint64, out []span) ([]span, error) {
	out = out[:0]
	for pos := off; pos < end; {
		ex, err := img.Extents(pos, end-pos)
		if err != nil {
			return nil, err
		}
		if len(ex) == 0 {
			out = appendSpan(out, span{pos, end, false})
			break
		}
		for _, e := range ex {
			if e.Length == 0 || pos >= end {
				continue
			}
			stop := end
			if e.Length < end-pos {
				stop = pos + e.Length
			}
			out = appendSpan(out, span{pos, stop, e.Hole})
			pos = stop
		}
	}
	return out, nil
}

func appendSpan(out []span, s span) []span {
	if n := len(out); n > 0 && out[n-1].hole == s.hole && out[n-1].end == s.off {
		out[n-1].end = s.end
		return out
	}
	return append(out, s)
}

// zeroes is a read-only block of zeroes for hashing holes and testing data.
var zeroes = make([]byte, 1<<20)

// isZero reports whether p is all zero bytes.
func isZero(p []byte) bool {
	for len(p) > 0 {
		n := min(len(p), len(zeroes))
		if !bytes.Equal(p[:n], zeroes[:n]) {
			return false
		}
		p = p[n:]
	}
	return true
}

// chunkSummer computes hash records over an image, reading only its data
// extents, through one reusable buffer. It is not safe for concurrent use.
type chunkSummer struct {
	img   SourceImage
	buf   []byte // read buffer; chunks are hashed through it piece by piece
	spans []span
	d     *xxhash.Digest
}

func newChunkSummer(img SourceImage, buf []byte) *chunkSummer {
	return &chunkSummer{img: img, buf: buf, d: xxhash.New()}
}

// sums appends to out one record per chunk of [off, off+length), the last
// chunk possibly shorter, and appends to allocated whether any of each chunk
// is allocated (a data extent).
func (c *chunkSummer) sums(off, length, chunk uint64, out []sum, allocated []bool) ([]sum, []bool, error) {
	end := off + length
	var err error
	if c.spans, err = mapSpans(c.img, off, end, c.spans); err != nil {
		return nil, nil, err
	}
	si := 0
	for cs := off; cs < end; cs += chunk {
		ce := min(cs+chunk, end)
		for si < len(c.spans) && c.spans[si].end <= cs {
			si++
		}
		c.d.Reset()
		zero, alloc := true, false
		for i := si; i < len(c.spans) && c.spans[i].off < ce; i++ {
			s := c.spans[i]
			lo, hi := max(s.off, cs), min(s.end, ce)
			if s.hole {
				if !zero {
					hashZeroes(c.d, hi-lo)
				}
				continue
			}
			alloc = true
			for pos := lo; pos < hi; {
				n := min(hi-pos, uint64(len(c.buf)))
				p := c.buf[:n]
				if err := c.img.ReadAt(p, pos); err != nil {
					return nil, nil, err
				}
				if zero && !isZero(p) {
					// The first nonzero byte: everything before it in this
					// chunk was zeroes, which the digest has not seen yet.
					zero = false
					hashZeroes(c.d, pos-cs)
				}
				if !zero {
					c.d.Write(p)
				}
				pos += n
			}
		}
		if zero {
			out = append(out, sum{zero: true})
		} else {
			out = append(out, sum{hash: c.d.Sum64()})
		}
		allocated = append(allocated, alloc)
	}
	return out, allocated, nil
}

func hashZeroes(d *xxhash.Digest, n uint64) {
	for n > 0 {
		k := min(n, uint64(len(zeroes)))
		d.Write(zeroes[:k])
		n -= k
	}
}

// appendRecords encodes sums in the wire format.
func appendRecords(b []byte, sums []sum) []byte {
	for _, s := range sums {
		if s.zero {
			b = append(b, kindZero, 0, 0, 0, 0, 0, 0, 0, 0)
			continue
		}
		h := s.hash
		b = append(b, kindData, byte(h>>56), byte(h>>48), byte(h>>40), byte(h>>32),
			byte(h>>24), byte(h>>16), byte(h>>8), byte(h))
	}
	return b
}

// parseRecords decodes exactly n records from b.
func parseRecords(b []byte, n int, out []sum) ([]sum, error) {
	if len(b) != n*recordSize {
		return nil, fmt.Errorf("%w: %d bytes of hash records, want %d (%d records)", ErrPeerProtocol, len(b), n*recordSize, n)
	}
	for i := 0; i < n; i++ {
		r := b[i*recordSize : (i+1)*recordSize]
		var h uint64
		for _, x := range r[1:] {
			h = h<<8 | uint64(x)
		}
		switch r[0] {
		case kindData:
			out = append(out, sum{hash: h})
		case kindZero:
			if h != 0 {
				return nil, fmt.Errorf("%w: record %d is kind zero with sum %016x", ErrPeerProtocol, i, h)
			}
			out = append(out, sum{zero: true})
		default:
			return nil, fmt.Errorf("%w: record %d has kind %d", ErrPeerProtocol, i, r[0])
		}
	}
	return out, nil
}
