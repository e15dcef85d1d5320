package nbd

import (
	"reflect"
	"testing"
)

const hz = StateHole | StateZero

func TestClipExtents(t *testing.T) {
	for _, tc := range []struct {
		in     []Extent
		length uint64
		want   []Extent
	}{
		{[]Extent{{4096, 0}, {8192, hz}}, 8192, []Extent{{4096, 0}, {4096, hz}}},
		{[]Extent{{4096, hz}, {4096, hz}}, 8192, []Extent{{8192, hz}}},
		{[]Extent{{4096, hz}}, 8192, []Extent{{4096, hz}, {4096, 0}}}, // backend stopped early: rest is data
		{nil, 512, []Extent{{512, 0}}},
		{[]Extent{{0, hz}, {512, 0}}, 512, []Extent{{512, 0}}},
	} {
		if got := clipExtents(tc.in, tc.length); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("clipExtents(%v, %d) = %v, want %v", tc.in, tc.length, got, tc.want)
		}
	}
}

func TestAlignExtents(t *testing.T) {
	for _, tc := range []struct {
		in   []Extent
		off  uint64
		bs   uint64
		want []Extent
	}{
		{[]Extent{{4096, 0}, {4096, hz}}, 0, 512, []Extent{{4096, 0}, {4096, hz}}},
		// A hole starting mid-block: that block is data.
		{[]Extent{{700, 0}, {3396, hz}}, 0, 512, []Extent{{1024, 0}, {3072, hz}}},
		// Zero-only and hole|zero share zero.
		{[]Extent{{256, StateZero}, {768, hz}}, 0, 512, []Extent{{512, StateZero}, {512, hz}}},
		// Unaligned start offset: first partial block keeps its own flags.
		{[]Extent{{100, hz}, {512, 0}}, 412, 512, []Extent{{100, hz}, {512, 0}}},
		{[]Extent{{4096, 0}}, 0, 1, []Extent{{4096, 0}}},
	} {
		if got := alignExtents(tc.in, tc.off, tc.bs); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("alignExtents(%v, %d, %d) = %v, want %v", tc.in, tc.off, tc.bs, got, tc.want)
		}
	}
}

func TestCheckRequest(t *testing.T) {
	bs := BlockSize{512, 4096, 1 << 25}
	compact := &session{blockSizeAgreed: true}
	structured := &session{structured: true, metaContextID: 1, blockSizeAgreed: true}
	extended := &session{structured: true, extended: true, metaContextID: 1}
	const size = 1 << 30
	for _, tc := range []struct {
		name string
		st   *session
		ro   bool
		r    Request
		want Errno
	}{
		{"read ok", compact, false, Request{Type: CmdRead, Offset: 512, Length: 512}, 0},
		{"read to the last byte", compact, false, Request{Type: CmdRead, Offset: size - 512, Length: 512}, 0},
		{"read past end", compact, false, Request{Type: CmdRead, Offset: size - 512, Length: 1024}, EINVAL},
		{"length wraps", compact, false, Request{Type: CmdRead, Offset: 512, Length: 1<<64 - 256}, EINVAL},
		{"write past end", compact, false, Request{Type: CmdWrite, Offset: size, Length: 512}, ENOSPC},
		{"zero past end", compact, false, Request{Type: CmdWriteZeroes, Offset: size, Length: 512}, ENOSPC},
		{"block status past end", structured, false, Request{Type: CmdBlockStatus, Offset: size, Length: 512}, EINVAL},
		{"block status zero length", structured, false, Request{Type: CmdBlockStatus, Offset: 0}, EINVAL},
		{"block status without context", compact, false, Request{Type: CmdBlockStatus, Length: 512}, EINVAL},
		{"misaligned", compact, false, Request{Type: CmdRead, Offset: 1, Length: 512}, EINVAL},
		{"misaligned but no promise", extended, false, Request{Type: CmdRead, Offset: 1, Length: 5}, 0},
		{"read-only write", compact, true, Request{Type: CmdWrite, Length: 512}, EPERM},
		{"read-only read", compact, true, Request{Type: CmdRead, Length: 512}, 0},
		{"read-only flush", compact, true, Request{Type: CmdFlush}, 0},
		{"fua on read is fine", compact, false, Request{Type: CmdRead, Flags: CmdFlagFUA, Length: 512}, 0},
		{"DF needs structured", compact, false, Request{Type: CmdRead, Flags: CmdFlagDF, Length: 512}, EINVAL},
		{"DF structured", structured, false, Request{Type: CmdRead, Flags: CmdFlagDF, Length: 512}, 0},
		{"REQ_ONE only on block status", structured, false, Request{Type: CmdRead, Flags: CmdFlagReqOne, Length: 512}, EINVAL},
		{"unknown flag", compact, false, Request{Type: CmdRead, Flags: 1 << 15, Length: 512}, EINVAL},
		{"unknown command", compact, false, Request{Type: 8}, EINVAL},
		{"oversize read compact", compact, false, Request{Type: CmdRead, Length: 1<<25 + 512}, EINVAL},
		{"oversize read structured", structured, false, Request{Type: CmdRead, Length: 1<<25 + 512}, EOVERFLOW},
		{"huge trim is fine", compact, false, Request{Type: CmdTrim, Length: size}, 0},
		{"extended write without payload flag", extended, false, Request{Type: CmdWrite, Length: 512}, EINVAL},
		{"extended write", extended, false, Request{Type: CmdWrite, Flags: CmdFlagPayloadLen, Length: 512}, 0},
		{"payload flag on read", extended, false, Request{Type: CmdRead, Flags: CmdFlagPayloadLen, Length: 512}, EINVAL},
		{"flush with length", compact, false, Request{Type: CmdFlush, Length: 1}, EINVAL},
	} {
		if got := checkRequest(tc.r, tc.st, size, bs, tc.ro); got != tc.want {
			t.Errorf("%s: checkRequest(%+v) = %v, want %v", tc.name, tc.r, got, tc.want)
		}
	}
}
