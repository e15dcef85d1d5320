package replica

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"sync/atomic"

	"github.com/cespare/xxhash/v2"

	"github.com/keelstore/keel/replica/rawimage"
)

// Digest is the fingerprint of an image at an applied index, for keel verify.
type Digest struct {
	ID           string `json:"id"`
	AppliedIndex uint64 `json:"applied_index"`
	Size         uint64 `json:"size"`
	// Digest is xxhash64 over one record per 1 MiB chunk: the chunk's
	// xxhash64, or a zero marker for a chunk of zeroes (hole or not), so
	// images with the same bytes have the same digest however sparse.
	Digest string `json:"digest"`
}

const digestChunk = 1 << 20

var zeroChunk = make([]byte, digestChunk)

// ImageDigest computes the digest of img's contents.
func ImageDigest(img *rawimage.File) (string, error) { return imageDigest(img, nil) }

// imageDigest is ImageDigest, storing the bytes fingerprinted so far in
// done (when not nil) after each chunk.
func imageDigest(img *rawimage.File, done *atomic.Uint64) (string, error) {
	h := xxhash.New()
	buf := make([]byte, digestChunk)
	var rec [9]byte
	size := img.Size()
	for off := uint64(0); off < size; off += digestChunk {
		n := min(uint64(digestChunk), size-off)
		zero, err := isHole(img, off, n)
		if err != nil {
			return "", err
		}
		if !zero {
			if err := img.ReadAt(buf[:n], off); err != nil {
				return "", err
			}
			zero = bytes.Equal(buf[:n], zeroChunk[:n])
		}
		rec[0] = 0
		binary.BigEndian.PutUint64(rec[1:], 0)
		if zero {
			rec[0] = 1
		} else {
			binary.BigEndian.PutUint64(rec[1:], xxhash.Sum64(buf[:n]))
		}
		h.Write(rec[:])
		if done != nil {
			done.Store(off + n)
		}
	}
	return fmt.Sprintf("%016x", h.Sum64()), nil
}

// isHole reports whether [off, off+n) is one hole.
func isHole(img *rawimage.File, off, n uint64) (bool, error) {
	ex, err := img.Extents(off, n)
	if err != nil {
		return false, err
	}
	return len(ex) == 1 && ex[0].Hole && ex[0].Length >= n, nil
}

// Digest waits until the node has applied minIndex, then fingerprints the
// image while no command is applied, so the digest belongs to exactly the
// reported applied index.
func (n *Node) Digest(ctx context.Context, minIndex uint64) (Digest, error) {
	if err := n.fsm.WaitApplied(ctx, minIndex); err != nil {
		return Digest{}, fmt.Errorf("replica: waiting to apply index %d: %w", minIndex, err)
	}
	d := Digest{ID: n.cfg.ID, Size: n.img.Size()}
	err := n.fsm.Paused(func(st State) error {
		d.AppliedIndex = n.fsm.AppliedIndex()
		var err error
		n.digestDone.Store(0)
		n.digesting.Add(1)
		defer n.digesting.Add(-1)
		d.Digest, err = imageDigest(n.img, &n.digestDone)
		return err
	})
	return d, err
}

// DigestProgress reports a running Digest's progress: the bytes of the
// image fingerprinted so far and the image's size, and whether one runs
// (keel verify shows it on a big volume).
func (n *Node) DigestProgress() (done, total uint64, running bool) {
	return n.digestDone.Load(), n.img.Size(), n.digesting.Load() > 0
}
