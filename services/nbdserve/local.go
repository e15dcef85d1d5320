package nbdserve

import (
	"context"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica/rawimage"
)

// LocalImage serves a raw image file as an nbd.Backend: the standalone
// server of `keel serve`.
type LocalImage struct {
	Image *rawimage.File
}

var _ nbd.Backend = LocalImage{}

func (l LocalImage) Size() uint64 { return l.Image.Size() }

// Capabilities: everything. One file behind every connection, so flush and
// FUA act across connections (multi-conn); a fast zero is a punched hole or
// a zeroed range, and where the filesystem has neither rawimage refuses it
// with nbd.ErrNotFast rather than write zeroes.
func (l LocalImage) Capabilities() nbd.Caps { return nbd.CapsAll }

func (l LocalImage) ReadAt(_ context.Context, p []byte, off uint64) error {
	return l.Image.ReadAt(p, off)
}

func (l LocalImage) WriteAt(_ context.Context, p []byte, off uint64, fua bool) error {
	return l.Image.WriteAt(p, off, fua)
}

func (l LocalImage) Flush(context.Context) error { return l.Image.Sync() }

func (l LocalImage) Cache(_ context.Context, off, length uint64) error {
	return l.Image.Cache(off, length)
}

func (l LocalImage) Trim(_ context.Context, off, length uint64, fua bool) error {
	return l.Image.Trim(off, length, fua)
}

func (l LocalImage) Zero(_ context.Context, off, length uint64, f nbd.ZeroFlags) error {
	return l.Image.Zero(off, length, f)
}

func (l LocalImage) Extents(_ context.Context, off, length uint64) ([]nbd.Extent, error) {
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
