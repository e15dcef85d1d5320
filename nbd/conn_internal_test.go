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
		{"read-only trim", compact, true, Request{Type: CmdTrim, Length: 512}, EPERM},
		{"read-only zero", compact, true, Request{Type: CmdWriteZeroes, Length: 512}, EPERM},
		{"read-only fast zero is not advertised", compact, true, Request{Type: CmdWriteZeroes, Flags: CmdFlagFastZero, Length: 512}, EINVAL},
		{"fast zero", compact, false, Request{Type: CmdWriteZeroes, Flags: CmdFlagFastZero | CmdFlagNoHole | CmdFlagFUA, Length: 512}, 0},
	} {
		st := *tc.st
		st.flags = advertisedFlags(CapsAll, tc.ro, st.structured, false)
		if got := checkRequest(tc.r, &st, size, bs); got != tc.want {
			t.Errorf("%s: checkRequest(%+v) = %v, want %v", tc.name, tc.r, got, tc.want)
		}
	}
}

// TestAdvertisedFlags: the handshake advertises exactly what the backend
// declares, less trim and zero on a read-only export.
func TestAdvertisedFlags(t *testing.T) {
	const has = TFlagHasFlags
	for _, tc := range []struct {
		name           string
		caps           Caps
		ro, structured bool
		want           uint16
	}{
		{"nothing", 0, false, false, has},
		{"nothing structured", 0, false, true, has | TFlagSendDF},
		{"everything", CapsAll, false, false, has | TFlagSendFlush | TFlagSendFUA | TFlagSendTrim | TFlagSendWriteZeroes |
			TFlagSendFastZero | TFlagSendCache | TFlagCanMultiConn},
		{"everything read-only", CapsAll, true, false, has | TFlagReadOnly | TFlagSendFlush | TFlagSendFUA | TFlagSendCache | TFlagCanMultiConn},
		{"flush", CapFlush, false, false, has | TFlagSendFlush},
		{"fua", CapFUA, false, false, has | TFlagSendFUA},
		{"trim", CapTrim, false, false, has | TFlagSendTrim},
		{"trim read-only", CapTrim, true, false, has | TFlagReadOnly},
		{"zero", CapZero, false, false, has | TFlagSendWriteZeroes},
		{"zero and fast zero", CapZero | CapFastZero, false, false, has | TFlagSendWriteZeroes | TFlagSendFastZero},
		{"fast zero alone is never advertised", CapFastZero, false, false, has},
		{"cache", CapCache, false, false, has | TFlagSendCache},
		{"multi-conn", CapMultiConn, false, false, has | TFlagCanMultiConn},
		{"extents is a meta context, not a flag", CapExtents, false, false, has},
	} {
		if got := advertisedFlags(tc.caps, tc.ro, tc.structured, false); got != tc.want {
			t.Errorf("%s: advertisedFlags(%#x, ro=%v, structured=%v) = %#x, want %#x", tc.name, uint16(tc.caps), tc.ro, tc.structured, got, tc.want)
		}
	}
	if got := advertisedFlags(0, false, false, true); got != has|TFlagRotational {
		t.Errorf("rotational: %#x", got)
	}
}

// TestCheckRequestCaps: a command or flag the backend did not declare is
// refused with EINVAL; with the capability it goes ahead.
func TestCheckRequestCaps(t *testing.T) {
	bs := BlockSize{512, 4096, 1 << 25}
	for _, tc := range []struct {
		name string
		need Caps
		r    Request
	}{
		{"flush", CapFlush, Request{Type: CmdFlush}},
		{"fua write", CapFUA, Request{Type: CmdWrite, Flags: CmdFlagFUA, Length: 512}},
		{"fua trim", CapFUA | CapTrim, Request{Type: CmdTrim, Flags: CmdFlagFUA, Length: 512}},
		{"trim", CapTrim, Request{Type: CmdTrim, Length: 512}},
		{"zero", CapZero, Request{Type: CmdWriteZeroes, Length: 512}},
		{"zero no hole", CapZero, Request{Type: CmdWriteZeroes, Flags: CmdFlagNoHole, Length: 512}},
		{"fast zero", CapZero | CapFastZero, Request{Type: CmdWriteZeroes, Flags: CmdFlagFastZero, Length: 512}},
		{"cache", CapCache, Request{Type: CmdCache, Length: 512}},
	} {
		for _, caps := range []Caps{tc.need, CapsAll} {
			st := &session{flags: advertisedFlags(caps, false, false, false)}
			if got := checkRequest(tc.r, st, 1<<20, bs); got != 0 {
				t.Errorf("%s with caps %#x: %v, want accepted", tc.name, uint16(caps), got)
			}
		}
		for c := Caps(1); c <= CapsAll; c <<= 1 {
			if !tc.need.Has(c) {
				continue
			}
			caps := CapsAll &^ c
			st := &session{flags: advertisedFlags(caps, false, false, false)}
			if got := checkRequest(tc.r, st, 1<<20, bs); got != EINVAL {
				t.Errorf("%s without cap %#x: %v, want EINVAL", tc.name, uint16(c), got)
			}
		}
	}
}
