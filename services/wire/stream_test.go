package wire

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// frameTable: frames and their bytes, both ways.
var frameTable = []struct {
	name   string
	hex    string
	header FrameHeader
	answer *StreamAnswer // for answers
}{
	{"request", "4b41 01 00 0000000000000007 00001388 00000003 010203",
		FrameHeader{Kind: FrameRequest, Tag: 7, Deadline: 5000, Length: 3}, nil},
	{"answer ok", "4b41 02 00 0000000000000009 00000000 0000001e" +
		"00 00 02 01 000000000000002a 0000000000000005 00000000 0000 0000 0000",
		FrameHeader{Kind: FrameAnswer, Tag: 9, Length: 30},
		&StreamAnswer{Response: ApplyResponse{Level: 2, Index: 42, Epoch: 5, Duplicate: true}}},
	{"answer refused", "4b41 02 00 0000000000000001 00000000 00000022" +
		"00 02 02 00 0000000000000000 0000000000000000 00000000 0002 6877 0000 0002 6e6f",
		FrameHeader{Kind: FrameAnswer, Tag: 1, Length: 34},
		&StreamAnswer{Response: ApplyResponse{Level: 2, Refused: RefusedWriterHeld, Holder: "hw", Error: "no"}}},
	{"not leader", "4b41 02 00 0000000000000003 00000000 00000023" +
		"02 00 00 00 0000000000000000 0000000000000000 00000000 0000 0003 613a31 0002 6e6c",
		FrameHeader{Kind: FrameAnswer, Tag: 3, Length: 35},
		&StreamAnswer{Status: StreamNotLeader, Leader: "a:1", Response: ApplyResponse{Error: "nl"}}},
}

func TestFrameTable(t *testing.T) {
	for _, tc := range frameTable {
		b := unhex(t, tc.hex)
		h, err := ParseFrameHeader(b)
		if err != nil || h != tc.header {
			t.Errorf("%s: header %+v, %v; want %+v", tc.name, h, err, tc.header)
			continue
		}
		if int(h.Length) != len(b)-FrameHeaderSize {
			t.Errorf("%s: length %d, body %d", tc.name, h.Length, len(b)-FrameHeaderSize)
		}
		if tc.answer == nil {
			if got := AppendFrameHeader(nil, tc.header); !bytes.Equal(got, b[:FrameHeaderSize]) {
				t.Errorf("%s: encoded %x, want %x", tc.name, got, b[:FrameHeaderSize])
			}
			continue
		}
		a, err := ParseAnswer(b[FrameHeaderSize:])
		if err != nil || !reflect.DeepEqual(a, *tc.answer) {
			t.Errorf("%s: answer %+v, %v; want %+v", tc.name, a, err, *tc.answer)
		}
		if got := AppendAnswer(nil, tc.header.Tag, *tc.answer); !bytes.Equal(got, b) {
			t.Errorf("%s: encoded\n %x, want\n %x", tc.name, got, b)
		}
	}
}

func TestFrameRefused(t *testing.T) {
	for _, tc := range []struct{ name, hex, want string }{
		{"short", "4b41 01", "header of 3 bytes"},
		{"magic", "4b42 01 00 0000000000000007 00000000 00000003", "magic"},
		{"http", "504f5354 202f76312f6170706c79 2048545450 2f", "magic"}, // "POST /v1/apply HTTP/"
		{"flags", "4b41 01 01 0000000000000007 00000000 00000003", "flags"},
		{"kind", "4b41 03 00 0000000000000007 00000000 00000003", "kind 3"},
		{"empty request", "4b41 01 00 0000000000000007 00000000 00000000", "request of 0 bytes"},
		{"huge request", "4b41 01 00 0000000000000007 00000000 00101001", "request of 1052673 bytes"},
		{"answer deadline", "4b41 02 00 0000000000000007 00000001 0000001e", "deadline 1"},
		{"short answer", "4b41 02 00 0000000000000007 00000000 00000010", "answer of 16 bytes"},
	} {
		_, err := ParseFrameHeader(unhex(t, tc.hex))
		if !errors.Is(err, ErrBadFrame) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want ErrBadFrame saying %q", tc.name, err, tc.want)
		}
	}
	for _, tc := range []struct{ name, hex, want string }{
		{"status", "03 00 00 00 0000000000000000 0000000000000000 00000000 0000 0000 0000", "status 3"},
		{"duplicate", "00 00 00 02 0000000000000000 0000000000000000 00000000 0000 0000 0000", "duplicate 2"},
		{"reserved", "00 00 00 00 0000000000000000 0000000000000000 00000001 0000 0000 0000", "reserved"},
		{"overrun", "00 00 00 00 0000000000000000 0000000000000000 00000000 0009 6877 0000 0000", "overruns"},
		{"trailing", "00 00 00 00 0000000000000000 0000000000000000 00000000 0000 0000 0000 ff", "after the answer"},
	} {
		_, err := ParseAnswer(unhex(t, tc.hex))
		if !errors.Is(err, ErrBadFrame) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want ErrBadFrame saying %q", tc.name, err, tc.want)
		}
	}
}

// readFrames decodes a byte stream as a sequence of frames the way both
// ends do: a header, then its body; answers parsed. It returns the frames
// it read and the error that ended it (nil at a clean end).
func readFrames(b []byte) (n int, err error) {
	br := bufio.NewReader(bytes.NewReader(b))
	var hdr [FrameHeaderSize]byte
	for {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return n, nil
			}
			return n, err
		}
		h, err := ParseFrameHeader(hdr[:])
		if err != nil {
			return n, err
		}
		body := make([]byte, h.Length)
		if _, err := io.ReadFull(br, body); err != nil {
			return n, io.ErrUnexpectedEOF // a frame cut short, however short
		}
		if h.Kind == FrameAnswer {
			a, err := ParseAnswer(body)
			if err != nil {
				return n, err
			}
			if again := AppendAnswer(nil, h.Tag, a); !bytes.Equal(again, append(hdr[:], body...)) {
				return n, errors.New("answer does not encode back to its bytes")
			}
		} else if again := AppendFrameHeader(nil, h); !bytes.Equal(again, hdr[:]) {
			return n, errors.New("header does not encode back to its bytes")
		}
		n++
	}
}

// FuzzStreamFrames: the frame decoder never panics, refuses what breaks
// the framing with ErrBadFrame (or a short read), and every frame it
// accepts encodes back to the same bytes.
func FuzzStreamFrames(f *testing.F) {
	var all []byte
	for _, tc := range frameTable {
		b := unhex(f, tc.hex)
		f.Add(b)
		all = append(all, b...)
	}
	f.Add(all)
	f.Add([]byte("POST /v1/apply HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, err := readFrames(b)
		if err != nil && !errors.Is(err, ErrBadFrame) && !errors.Is(err, io.ErrUnexpectedEOF) {
			if strings.Contains(err.Error(), "encode back") {
				t.Fatal(err)
			}
			t.Fatalf("%x: %v wraps neither ErrBadFrame nor a short read", b, err)
		}
	})
}
