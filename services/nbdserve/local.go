package nbdserve

import (
	"errors"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica/rawimage"
)

// LocalImage serves a raw image file as an nbd.Backend: the standalone
// server of `keel serve`.
type LocalImage struct {
	Image *rawimage.File
}

var _ nbd.Backend = LocalImage{}

func (l LocalImage) Size() uint64                               { return l.Image.Size() }
func (l LocalImage) ReadAt(p []byte, off uint64) error          { return l.Image.ReadAt(p, off) }
func (l LocalImage) WriteAt(p []byte, off uint64, f bool) error { return l.Image.WriteAt(p, off, f) }
func (l LocalImage) Flush() error                               { return l.Image.Sync() }
func (l LocalImage) Cache(off, length uint64) error             { return l.Image.Cache(off, length) }

func (l LocalImage) Trim(off, length uint64, fua bool) error {
	return l.Image.Trim(off, length, fua)
}

func (l LocalImage) Zero(off, length uint64, f nbd.ZeroFlags) error {
	err := l.Image.Zero(off, length, f&nbd.ZeroNoHole != 0, f&nbd.ZeroFast != 0, f&nbd.ZeroFUA != 0)
	if errors.Is(err, rawimage.ErrNotFast) {
		return nbd.ErrNotFast
	}
	return err
}

func (l LocalImage) Extents(off, length uint64) ([]nbd.Extent, error) {
	ex, err := l.Image.Extents(off, length)
	if err != nil {
		return nil, err
	}
	out := make([]nbd.Extent, len(ex))
	for i, e := range ex {
		out[i].Length = e.Length
		if e.Hole {
			out[i].Flags = nbd.StateHole | nbd.StateZero
		}
	}
	return out, nil
}
