package replica

import (
	"bytes"
	"encoding/hex"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/keelstore/keel/nbd"
)

// unhex reads a hex string with spaces and |-separators for readability.
func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.NewReplacer(" ", "", "|", "").Replace(s))
	if err != nil {
		t.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}

const (
	ioLegacy = "0000000000000005 | 0000000000000007 | 0000000000000003 | 0000000000001000" // epoch 5, req 7, acked 3, offset 4096
	regBody  = "0002 6e31 | 0004 723a3730 | 0004 683a3731 | 0000"                          // n1, r:70, h:71, no nbd
)

// commandTable: every kind in both forms, with the bytes of the log entry.
// legacy entries are what builds before feature levels wrote (and what a
// leader still writes while a member speaks only LevelLegacy).
var commandTable = []struct {
	name   string
	hex    string
	legacy bool
	cmd    Command
}{
	{"write legacy", "01 | " + ioLegacy + " | 6869", true,
		Command{Kind: KindWrite, Epoch: 5, ReqID: 7, AckedBelow: 3, Offset: 4096, Length: 2, Data: []byte("hi")}},
	{"write", "ff 02 00 01 | " + ioLegacy + " | 6869", false,
		Command{Kind: KindWrite, Epoch: 5, ReqID: 7, AckedBelow: 3, Offset: 4096, Length: 2, Data: []byte("hi")}},
	{"trim legacy", "02 | " + ioLegacy + " | 0000000000000200", true,
		Command{Kind: KindTrim, Epoch: 5, ReqID: 7, AckedBelow: 3, Offset: 4096, Length: 512}},
	{"trim", "ff 02 00 02 | " + ioLegacy + " | 0000000000000200", false,
		Command{Kind: KindTrim, Epoch: 5, ReqID: 7, AckedBelow: 3, Offset: 4096, Length: 512}},
	{"zero legacy", "03 | " + ioLegacy + " | 0000000000000200 | 01", true,
		Command{Kind: KindZero, Epoch: 5, ReqID: 7, AckedBelow: 3, Offset: 4096, Length: 512, ZeroFlags: nbd.ZeroNoHole}},
	{"zero", "ff 02 00 03 | " + ioLegacy + " | 0000000000000200 | 00", false,
		Command{Kind: KindZero, Epoch: 5, ReqID: 7, AckedBelow: 3, Offset: 4096, Length: 512}},
	{"claim legacy", "04 | 01 | 70726f7879", true, Command{Kind: KindClaim, Takeover: true, Writer: "proxy"}},
	{"claim", "ff 02 00 04 | 00 | 70726f7879", false, Command{Kind: KindClaim, Writer: "proxy"}},
	{"release legacy", "05 | 0000000000000009", true, Command{Kind: KindRelease, Epoch: 9}},
	{"release", "ff 02 00 05 | 0000000000000009", false, Command{Kind: KindRelease, Epoch: 9}},
	{"register legacy", "06 | " + regBody, true, Command{Kind: KindRegister, Node: NodeInfo{ID: "n1", Raft: "r:70", HTTP: "h:71"}}},
	{"register", "ff 02 00 06 | " + regBody, false, Command{Kind: KindRegister, Node: NodeInfo{ID: "n1", Raft: "r:70", HTTP: "h:71"}}},
	{"forget legacy", "07 | 6e31", true, Command{Kind: KindForget, Node: NodeInfo{ID: "n1"}}},
	{"forget", "ff 02 00 07 | 6e31", false, Command{Kind: KindForget, Node: NodeInfo{ID: "n1"}}},
}

func TestCommandTable(t *testing.T) {
	for _, tc := range commandTable {
		t.Run(tc.name, func(t *testing.T) {
			b := unhex(t, tc.hex)
			got, err := Decode(b)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if !reflect.DeepEqual(got, tc.cmd) {
				t.Errorf("Decode = %+v, want %+v", got, tc.cmd)
			}
			var back []byte
			if tc.legacy {
				back, err = tc.cmd.AppendFor(nil, LevelLegacy)
				if err != nil {
					t.Fatalf("AppendFor legacy: %v", err)
				}
				if compat := tc.cmd.EncodeCompat(nil); !bytes.Equal(compat, b) {
					t.Errorf("EncodeCompat = %x, want %x", compat, b)
				}
			} else {
				back = tc.cmd.Encode(nil)
				if at, err := tc.cmd.AppendFor(nil, CurrentLevel); err != nil || !bytes.Equal(at, b) {
					t.Errorf("AppendFor(CurrentLevel) = %x, %v; want %x", at, err, b)
				}
			}
			if !bytes.Equal(back, b) {
				t.Errorf("encoded %x, want %x", back, b)
			}
		})
	}
}

// TestCommandUnknownAndMalformed: what a build makes of entries it cannot
// apply. Unknown (a newer build's, well formed) and malformed (no build's)
// are told apart, because the FSM halts on the first and refuses the
// second.
func TestCommandUnknownAndMalformed(t *testing.T) {
	for _, tc := range []struct {
		name  string
		hex   string
		level Level // the decoding build's
		want  error
		cmd   Command // for ErrUnknownCommand: what is known of it
	}{
		{"write of level 3", "ff 03 00 01 | " + ioLegacy + " | 6869", CurrentLevel, ErrUnknownCommand,
			Command{Kind: KindWrite, Level: 3, Body: unhex(t, ioLegacy+"6869")}},
		{"new kind, ignorable", "ff 02 01 2a | 6869", CurrentLevel, ErrUnknownCommand,
			Command{Kind: 42, Level: 2, Ignorable: true, Body: []byte("hi")}},
		{"new kind", "ff 03 00 2a", CurrentLevel, ErrUnknownCommand, Command{Kind: 42, Level: 3, Body: []byte{}}},
		{"reserved flag", "ff 02 02 05 | 0000000000000009", CurrentLevel, ErrUnknownCommand,
			Command{Kind: KindRelease, Level: 2, Body: unhex(t, "0000000000000009")}},
		{"versioned on a legacy build", "ff 02 00 07 | 6e31", LevelLegacy, ErrUnknownCommand,
			Command{Kind: KindForget, Level: 2, Body: []byte("n1")}},
		{"empty", "", CurrentLevel, ErrBadCommand, Command{}},
		{"legacy kind 0", "00 | 6e31", CurrentLevel, ErrBadCommand, Command{}},
		{"legacy kind 8", "08 | 6e31", CurrentLevel, ErrBadCommand, Command{}},
		{"versioned header truncated", "ff 02 00", CurrentLevel, ErrBadCommand, Command{}},
		{"versioned at level 1", "ff 01 00 07 | 6e31", CurrentLevel, ErrBadCommand, Command{}},
		{"known kind marked ignorable", "ff 02 01 07 | 6e31", CurrentLevel, ErrBadCommand, Command{}},
		{"trim body short", "ff 02 00 02 | " + ioLegacy, CurrentLevel, ErrBadCommand, Command{}},
		{"register field overruns", "06 | 0009 6e31", CurrentLevel, ErrBadCommand, Command{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := DecodeAt(unhex(t, tc.hex), tc.level)
			if !errors.Is(err, tc.want) {
				t.Fatalf("DecodeAt(level %d) error %v, want %v", tc.level, err, tc.want)
			}
			if tc.want == ErrBadCommand && errors.Is(err, ErrUnknownCommand) {
				t.Fatalf("malformed entry read as unknown: %v", err)
			}
			if tc.want == ErrUnknownCommand && !reflect.DeepEqual(got, tc.cmd) {
				t.Errorf("DecodeAt = %+v, want %+v", got, tc.cmd)
			}
		})
	}
}

// TestCommandLevels: the form a cluster's level asks for, and the refusal
// of a command above it.
func TestCommandLevels(t *testing.T) {
	w := Command{Kind: KindWrite, Offset: 8, Data: []byte("x")}
	if b, err := w.AppendFor(nil, 0); err != nil || b[0] != byte(KindWrite) {
		t.Errorf("AppendFor level 0 (not said) = %x, %v: want the legacy form", b, err)
	}
	if b, err := w.AppendFor(nil, LevelVersioned); err != nil || !bytes.Equal(b[:4], []byte{0xff, 2, 0, 1}) {
		t.Errorf("AppendFor LevelVersioned = %x, %v: want the versioned form", b, err)
	}
	future := Command{Kind: 42, Level: 3, Body: []byte("x")}
	if _, err := future.AppendFor(nil, LevelVersioned); !errors.Is(err, ErrFeatureLevel) {
		t.Errorf("a level-3 command in a level-2 cluster: %v, want ErrFeatureLevel", err)
	}
	if b, err := future.AppendFor(nil, 3); err != nil || !bytes.Equal(b, []byte{0xff, 3, 0, 42, 'x'}) {
		t.Errorf("a level-3 command in a level-3 cluster = %x, %v", b, err)
	}
	if got := (&Command{Kind: 42}).Need(); got != LevelVersioned {
		t.Errorf("an unknown kind needs %d, want %d (it exists only in the versioned form)", got, LevelVersioned)
	}
	if b := future.EncodeCompat(nil); !bytes.Equal(b, []byte{0xff, 3, 0, 42, 'x'}) {
		t.Errorf("EncodeCompat of a level-3 command = %x: want the versioned form", b)
	}
}

// FuzzDecodeCommand: Decode never panics, and what it decodes encodes, in
// the same form, to an entry that decodes to the same command.
func FuzzDecodeCommand(f *testing.F) {
	for _, tc := range commandTable {
		f.Add(unhex(f, tc.hex))
	}
	f.Add([]byte{0xff, 3, 1, 42, 'x'})
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := Decode(b)
		if errors.Is(err, ErrUnknownCommand) {
			if c.Level < LevelVersioned {
				t.Fatalf("unknown command %+v of level %d", c, c.Level)
			}
			return
		}
		if err != nil {
			if !errors.Is(err, ErrBadCommand) {
				t.Fatalf("error %v wraps neither sentinel", err)
			}
			return
		}
		var back []byte
		if b[0] == versionedMarker {
			back = c.Encode(nil)
		} else if back, err = c.AppendFor(nil, LevelLegacy); err != nil {
			t.Fatalf("a legacy entry %x does not encode in the legacy form: %v", b, err)
		}
		again, err := Decode(back)
		if err != nil {
			t.Fatalf("%x -> %+v -> %x does not decode: %v", b, c, back, err)
		}
		if !reflect.DeepEqual(again, c) {
			t.Fatalf("%x -> %+v -> %x -> %+v", b, c, back, again)
		}
	})
}

// TestAppendForLogReusesEncoded: a Write decoded from a buffer in the form
// the cluster reads is proposed as that buffer (no copy of its data);
// another form, a changed header, data that is not the buffer's tail, or
// another kind is encoded afresh, to the same bytes AppendFor gives.
func TestAppendForLogReusesEncoded(t *testing.T) {
	w := Command{Kind: KindWrite, Epoch: 5, ReqID: 7, AckedBelow: 3, Offset: 4096, Data: bytes.Repeat([]byte{9}, 4096)}
	decoded := func(b []byte) Command {
		c, err := Decode(b)
		if err != nil {
			t.Fatal(err)
		}
		c.Encoded = b
		return c
	}
	same := func(a, b []byte) bool { return len(a) == len(b) && &a[0] == &b[0] }
	for _, tc := range []struct {
		name   string
		c      Command
		level  Level
		reused bool
	}{
		{"versioned in a versioned cluster", decoded(w.Encode(nil)), LevelVersioned, true},
		{"legacy in a legacy cluster", decoded(w.EncodeCompat(nil)), LevelLegacy, true},
		{"legacy in a versioned cluster", decoded(w.EncodeCompat(nil)), LevelVersioned, false},
		{"versioned in a legacy cluster", decoded(w.Encode(nil)), LevelLegacy, false},
		{"header changed", func() Command { c := decoded(w.Encode(nil)); c.ReqID++; return c }(), LevelVersioned, false},
		{"data replaced", func() Command { c := decoded(w.Encode(nil)); c.Data = bytes.Clone(c.Data); return c }(), LevelVersioned, false},
		{"data cut", func() Command { c := decoded(w.Encode(nil)); c.Data = c.Data[:100]; return c }(), LevelVersioned, false},
		{"not a write", func() Command {
			c := Command{Kind: KindTrim, Epoch: 1, ReqID: 2, Offset: 0, Length: 512}
			return decoded(c.Encode(nil))
		}(), LevelVersioned, false},
	} {
		got, err := tc.c.appendForLog(tc.level)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		want, _ := tc.c.AppendFor(nil, tc.level)
		if !bytes.Equal(got, want) {
			t.Errorf("%s: %x..., want AppendFor's %x...", tc.name, got[:8], want[:8])
		}
		if reused := same(got, tc.c.Encoded); reused != tc.reused {
			t.Errorf("%s: Encoded reused %v, want %v", tc.name, reused, tc.reused)
		}
	}
}
