package nbd

import (
	"bytes"
	"encoding/hex"
	"errors"
	"reflect"
	"strings"
	"syscall"
	"testing"
)

// unhex reads a hex string with spaces and |-separators for readability.
func unhex(t testing.TB, s string) []byte {
	t.Helper()
	s = strings.NewReplacer(" ", "", "|", "", "\n", "", "\t", "").Replace(s)
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex in test table: %v", err)
	}
	return b
}

// encodeTable: what each encoder must produce, byte for byte.
var encodeTable = []struct {
	name string
	got  func() []byte
	want string
}{
	{"server greeting", func() []byte { return AppendServerGreeting(nil, FlagFixedNewstyle|FlagNoZeroes) },
		"4e42444d41474943 | 49484156454f5054 | 0003"},
	{"option GO", func() []byte {
		return AppendOption(nil, OptGo, AppendExportRequest(nil, ExportRequest{Name: "ab", Infos: []uint16{InfoBlockSize}}))
	}, "49484156454f5054 | 00000007 | 0000000a | 00000002 6162 | 0001 0003"},
	{"option reply ACK", func() []byte { return AppendOptionReply(nil, OptGo, RepAck, nil) },
		"0003e889045565a9 | 00000007 | 00000001 | 00000000"},
	{"option reply ERR_UNSUP with message", func() []byte { return AppendOptionReply(nil, 99, RepErrUnsup, []byte("no")) },
		"0003e889045565a9 | 00000063 | 80000001 | 00000002 | 6e6f"},
	{"info export", func() []byte { return AppendInfoExport(nil, 1<<30, TFlagHasFlags|TFlagSendFlush) },
		"0000 | 0000000040000000 | 0005"},
	{"info block size", func() []byte { return AppendInfoBlockSize(nil, BlockSize{512, 4096, 1 << 25}) },
		"0003 | 00000200 | 00001000 | 02000000"},
	{"info name", func() []byte { return AppendInfoString(nil, InfoName, "disk") }, "0001 6469736b"},
	{"rep server", func() []byte { return AppendRepServer(nil, "a", "bc") }, "00000001 61 6263"},
	{"rep meta context", func() []byte { return AppendRepMetaContext(nil, 1, "base:allocation") },
		"00000001 626173653a616c6c6f636174696f6e"},
	{"meta context request", func() []byte {
		return AppendMetaContextRequest(nil, MetaContextRequest{Export: "x", Queries: []string{"base:"}})
	}, "00000001 78 | 00000001 | 00000005 626173653a"},
	{"export name reply, no zeroes", func() []byte { return AppendExportNameReply(nil, 4096, TFlagHasFlags, true) },
		"0000000000001000 0001"},
	{"export name reply, zeroes", func() []byte { return AppendExportNameReply(nil, 4096, TFlagHasFlags, false) },
		"0000000000001000 0001" + strings.Repeat("00", 124)},
	{"compact request", func() []byte {
		return AppendRequest(nil, Request{Flags: CmdFlagFUA, Type: CmdWrite, Cookie: 0x0102030405060708, Offset: 0x1000, Length: 0x200}, false)
	}, "25609513 | 0001 | 0001 | 0102030405060708 | 0000000000001000 | 00000200"},
	{"extended request", func() []byte {
		return AppendRequest(nil, Request{Flags: CmdFlagPayloadLen, Type: CmdWrite, Cookie: 7, Offset: 512, Length: 1 << 33}, true)
	}, "21e41c71 | 0020 | 0001 | 0000000000000007 | 0000000000000200 | 0000000200000000"},
	{"simple reply", func() []byte { return AppendSimpleReply(nil, EINVAL, 9) },
		"67446698 | 00000016 | 0000000000000009"},
	{"structured chunk header", func() []byte {
		return AppendChunkHeader(nil, false, ReplyFlagDone, ReplyTypeOffsetData, 9, 0, 8+512)
	}, "668e33ef | 0001 | 0001 | 0000000000000009 | 00000208"},
	{"extended chunk header", func() []byte {
		return AppendChunkHeader(nil, true, ReplyFlagDone, ReplyTypeNone, 9, 4096, 0)
	}, "6e8a278c | 0001 | 0000 | 0000000000000009 | 0000000000001000 | 0000000000000000"},
	{"offset hole", func() []byte { return AppendOffsetHole(nil, 8192, 4096) }, "0000000000002000 00001000"},
	{"block status", func() []byte {
		return AppendBlockStatus(nil, 1, []Extent{{4096, 0}, {8192, StateHole | StateZero}})
	}, "00000001 | 00001000 00000000 | 00002000 00000003"},
	{"block status ext", func() []byte {
		return AppendBlockStatusExt(nil, 1, []Extent{{1 << 32, StateZero}})
	}, "00000001 | 00000001 | 0000000100000000 0000000000000002"},
	{"error chunk", func() []byte { return AppendErrorChunk(nil, EPERM, "ro") }, "00000001 | 0002 | 726f"},
}

func TestEncode(t *testing.T) {
	for _, tc := range encodeTable {
		t.Run(tc.name, func(t *testing.T) {
			if got, want := tc.got(), unhex(t, tc.want); !bytes.Equal(got, want) {
				t.Errorf("got  %x\nwant %x", got, want)
			}
		})
	}
}

// requestTable: request headers and what they parse to.
var requestTable = []struct {
	name     string
	hex      string
	extended bool
	want     Request
	err      bool
}{
	{"read", "25609513 0000 0000 00000000000000aa 0000000000000000 00001000", false,
		Request{Type: CmdRead, Cookie: 0xaa, Length: 4096}, false},
	{"write fua", "25609513 0001 0001 0000000000000001 0000000000100000 00000200", false,
		Request{Flags: CmdFlagFUA, Type: CmdWrite, Cookie: 1, Offset: 1 << 20, Length: 512}, false},
	{"block status req_one", "25609513 0008 0007 0000000000000002 0000000000000000 ffffffff", false,
		Request{Flags: CmdFlagReqOne, Type: CmdBlockStatus, Cookie: 2, Length: 0xffffffff}, false},
	{"extended trim 64-bit length", "21e41c71 0000 0004 0000000000000003 0000000000000000 0000010000000000", true,
		Request{Type: CmdTrim, Cookie: 3, Length: 1 << 40}, false},
	{"bad magic", "25609514 0000 0000 0000000000000000 0000000000000000 00000000", false, Request{}, true},
	{"compact magic when extended", "25609513 0000 0000 0000000000000000 0000000000000000 00000000 00000000", true, Request{}, true},
	{"short", "25609513 0000", false, Request{}, true},
}

func TestParseRequest(t *testing.T) {
	for _, tc := range requestTable {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseRequest(unhex(t, tc.hex), tc.extended)
			if tc.err {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("err = %v, want ErrMalformed", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
			if back := AppendRequest(nil, got, tc.extended); !bytes.Equal(back, unhex(t, tc.hex)) {
				t.Fatalf("re-encoded %x", back)
			}
		})
	}
}

// exportRequestTable: INFO/GO option data.
var exportRequestTable = []struct {
	name string
	hex  string
	want ExportRequest
	err  bool
}{
	{"default export, no infos", "00000000 0000", ExportRequest{Name: ""}, false},
	{"named, two infos", "00000004 6469736b 0002 0003 0001", ExportRequest{Name: "disk", Infos: []uint16{3, 1}}, false},
	{"name longer than data", "00000009 6469736b 0000", ExportRequest{}, true},
	{"count disagrees", "00000000 0002 0003", ExportRequest{}, true},
	{"trailing byte", "00000000 0000 00", ExportRequest{}, true},
	{"too short", "0000", ExportRequest{}, true},
	{"NUL in name", "00000001 00 0000", ExportRequest{}, true},
	{"huge name length", "ffffffff 0000", ExportRequest{}, true},
}

func TestParseExportRequest(t *testing.T) {
	for _, tc := range exportRequestTable {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseExportRequest(unhex(t, tc.hex))
			if tc.err {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("err = %v, want ErrMalformed", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

var metaRequestTable = []struct {
	name string
	hex  string
	want MetaContextRequest
	err  bool
}{
	{"no queries", "00000000 00000000", MetaContextRequest{}, false},
	{"base:allocation", "00000000 00000001 0000000f 626173653a616c6c6f636174696f6e",
		MetaContextRequest{Queries: []string{"base:allocation"}}, false},
	{"two queries", "00000001 78 00000002 00000005 626173653a 00000002 783a",
		MetaContextRequest{Export: "x", Queries: []string{"base:", "x:"}}, false},
	{"count too large", "00000000 00000002 00000001 61", MetaContextRequest{}, true},
	{"query overruns", "00000000 00000001 00000009 61", MetaContextRequest{}, true},
	{"trailing bytes", "00000000 00000000 ff", MetaContextRequest{}, true},
	{"too short", "000000", MetaContextRequest{}, true},
}

func TestParseMetaContextRequest(t *testing.T) {
	for _, tc := range metaRequestTable {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseMetaContextRequest(unhex(t, tc.hex))
			if tc.err {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("err = %v, want ErrMalformed", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestParseReplyRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		hdr  []byte
		want Reply
	}{
		{AppendSimpleReply(nil, EIO, 5), Reply{Magic: MagicSimpleReply, Error: EIO, Cookie: 5}},
		{AppendChunkHeader(nil, false, ReplyFlagDone, ReplyTypeError, 6, 0, 10),
			Reply{Magic: MagicStructReply, Flags: ReplyFlagDone, Type: ReplyTypeError, Cookie: 6, Length: 10}},
		{AppendChunkHeader(nil, true, 0, ReplyTypeOffsetData, 7, 512, 1<<20),
			Reply{Magic: MagicExtReply, Type: ReplyTypeOffsetData, Cookie: 7, Offset: 512, Length: 1 << 20}},
	} {
		got, err := ParseReply(tc.hdr)
		if err != nil || got != tc.want {
			t.Errorf("ParseReply(%x) = %+v, %v; want %+v", tc.hdr, got, err, tc.want)
		}
	}
	if _, err := ParseReply(unhex(t, "deadbeef")); !errors.Is(err, ErrMalformed) {
		t.Errorf("bad magic: err = %v", err)
	}
}

func TestBlockStatusAndErrorChunkRoundTrip(t *testing.T) {
	ex := []Extent{{4096, 0}, {1 << 20, StateHole | StateZero}}
	for _, ext := range []bool{false, true} {
		var p []byte
		if ext {
			p = AppendBlockStatusExt(nil, 3, ex)
		} else {
			p = AppendBlockStatus(nil, 3, ex)
		}
		id, got, err := ParseBlockStatus(p, ext)
		if err != nil || id != 3 || !reflect.DeepEqual(got, ex) {
			t.Errorf("ext=%v: got %d %+v %v", ext, id, got, err)
		}
	}
	e, msg, err := ParseErrorChunk(AppendErrorChunk(nil, ENOSPC, "full"))
	if err != nil || e != ENOSPC || msg != "full" {
		t.Errorf("error chunk: %v %q %v", e, msg, err)
	}
	if _, _, err := ParseErrorChunk(unhex(t, "00000001 0009 61")); !errors.Is(err, ErrMalformed) {
		t.Errorf("overlong message: err = %v", err)
	}
}

func TestErrnoOf(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want Errno
	}{
		{nil, 0},
		{EOVERFLOW, EOVERFLOW},
		{ErrNotFast, ENOTSUP},
		{ErrReadOnly, EPERM},
		{errors.Join(errors.New("x"), errNo(28)), ENOSPC},
		{errNo(122), ENOSPC}, // EDQUOT
		{errNo(27), ENOSPC},  // EFBIG
		{errNo(30), EPERM},   // EROFS
		{errors.New("disk on fire"), EIO},
	} {
		if got := ErrnoOf(tc.err); got != tc.want {
			t.Errorf("ErrnoOf(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func errNo(n int) error { return syscall.Errno(n) }
