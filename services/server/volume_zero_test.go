package server_test

import (
	"bytes"
	"testing"

	"github.com/keelstore/keel/nbd"
)

// TestVolumeFastZero: the volume advertises FAST_ZERO and honours it by
// zeroing (the zero command moves no data, see Volume.Zero), with and
// without NO_HOLE; it never answers ENOTSUP.
func TestVolumeFastZero(t *testing.T) {
	o := startOneNode(t)
	c := nbdClient(t, o)
	if c.Flags&nbd.TFlagSendFastZero == 0 || c.Flags&nbd.TFlagSendWriteZeroes == 0 {
		t.Fatalf("transmission flags %#x: want WRITE_ZEROES and FAST_ZERO", c.Flags)
	}
	data := bytes.Repeat([]byte{0xa5}, 16384)
	if res, err := c.Do(nbd.Request{Type: nbd.CmdWrite, Cookie: 1, Length: uint64(len(data))}, data); err != nil || res.Err != 0 {
		t.Fatalf("write: %+v %v", res, err)
	}
	for i, flags := range []uint16{nbd.CmdFlagFastZero, nbd.CmdFlagFastZero | nbd.CmdFlagNoHole | nbd.CmdFlagFUA} {
		off := uint64(i) * 8192
		res, err := c.Do(nbd.Request{Type: nbd.CmdWriteZeroes, Flags: flags, Cookie: 2, Offset: off, Length: 8192}, nil)
		if err != nil || res.Err != 0 {
			t.Fatalf("fast zero with flags %#x: %+v %v", flags, res, err)
		}
	}
	res, err := c.Do(nbd.Request{Type: nbd.CmdRead, Flags: nbd.CmdFlagDF, Cookie: 3, Length: uint64(len(data))}, nil)
	if err != nil || res.Err != 0 || !bytes.Equal(res.Data, make([]byte, len(data))) {
		t.Fatalf("read after the fast zeroes: %v %v; want all zeroes", res.Err, err)
	}
}
