package wire

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/keelstore/keel/replica"
)

// The apply stream: one long-lived, multiplexed binary connection from a
// proxy to a server carrying apply requests and their answers, out of
// order, instead of one POST /v1/apply per write (docs/replication.md,
// "Binary write path").
//
// It starts as an HTTP/1.1 upgrade on the API listener, so it has that
// listener's TLS and lifetime:
//
//	POST /v1/apply/stream HTTP/1.1
//	Connection: Upgrade
//	Upgrade: keel-apply/1
//	Keel-Level: <the client's level>
//
//	HTTP/1.1 101 Switching Protocols
//	Connection: Upgrade
//	Upgrade: keel-apply/1
//	Keel-Level: <the server's level>
//
// A server of a build without the stream answers 404; the client then
// uses POST /v1/apply for that server (StreamUnsupported).
//
// Then frames, both ways, big-endian:
//
//	header:  u16 magic 0x4B41 ("KA") | u8 kind | u8 flags | u64 tag | u32 deadline ms | u32 length
//	request (kind 1, client to server): header | length bytes: one encoded
//	         replica.Command (Command.EncodeCompat), at most MaxStreamCommand
//	answer  (kind 2, server to client): header | length bytes:
//	         u8 status | u8 refused | u8 level | u8 duplicate | u64 index | u64 epoch |
//	         u32 reserved (0) | u16 n | holder | u16 n | leader | u16 n | error
//
// flags are reserved and zero in both kinds. The tag is the client's name
// for a request; the answer carries it back. deadline is how many
// milliseconds the client waits for the answer (0: no deadline), the
// stream's TimeoutHeader; it is zero in an answer. duplicate is 0 or 1.
// status says what the answer is (StreamStatus): an ApplyResponse, a
// failed attempt (error says why; the client retries, as after a non-2xx
// answer to POST /v1/apply), or "not the leader" (leader is its HTTP
// address when known). An answer with tag 0 answers no request: the
// server found the connection's framing broken (error says how) and
// closes it after this frame.

// StreamPath is the route of the upgrade; StreamProtocol its Upgrade token.
const (
	StreamPath     = "/v1/apply/stream"
	StreamProtocol = "keel-apply/1"
)

// Frame layout.
const (
	frameMagic = 0x4B41
	// FrameHeaderSize is the size of a frame's fixed header.
	FrameHeaderSize = 20
	// MaxStreamCommand bounds a request's command: the largest write's
	// data with room for its header (a claim's writer name is far smaller).
	MaxStreamCommand = replica.MaxCommandData + 4096
	// maxAnswer bounds an answer's body (three strings of up to 64 KiB).
	maxAnswer       = 24 + 3*(2+0xFFFF)
	answerFixed     = 24 // the answer body's fixed part
	maxAnswerString = 0xFFFF
)

// FrameKind is a frame's kind byte.
type FrameKind uint8

// Frame kinds.
const (
	FrameRequest FrameKind = 1
	FrameAnswer  FrameKind = 2
)

// StreamStatus says what an answer is.
type StreamStatus uint8

// Answer statuses. The numbers are part of the wire format.
const (
	// StreamAnswered: the ApplyResponse of the request (which may be a
	// refusal).
	StreamAnswered StreamStatus = 0
	// StreamFailed: the attempt failed before a result (no node running,
	// the enqueue timed out, ...); the client may retry it.
	StreamFailed StreamStatus = 1
	// StreamNotLeader: the server is not the leader; Leader is the
	// leader's HTTP address when it knows one.
	StreamNotLeader StreamStatus = 2
)

// ErrBadFrame is wrapped by every error of a frame that breaks the
// stream's framing: the connection carrying it cannot go on.
var ErrBadFrame = errors.New("wire: bad apply-stream frame")

// FrameHeader is a frame's fixed header.
type FrameHeader struct {
	Kind     FrameKind
	Tag      uint64
	Deadline uint32 // milliseconds; 0: none
	Length   uint32
}

// AppendFrameHeader appends h's encoding to b.
func AppendFrameHeader(b []byte, h FrameHeader) []byte {
	be := binary.BigEndian
	b = be.AppendUint16(b, frameMagic)
	b = append(b, byte(h.Kind), 0)
	b = be.AppendUint64(b, h.Tag)
	b = be.AppendUint32(b, h.Deadline)
	return be.AppendUint32(b, h.Length)
}

// ParseFrameHeader parses and checks a frame's header (at least
// FrameHeaderSize bytes): the magic, a known kind, zero flags, a length
// within its kind's bound, no deadline on an answer.
func ParseFrameHeader(b []byte) (FrameHeader, error) {
	if len(b) < FrameHeaderSize {
		return FrameHeader{}, fmt.Errorf("%w: header of %d bytes, want %d", ErrBadFrame, len(b), FrameHeaderSize)
	}
	be := binary.BigEndian
	if m := be.Uint16(b); m != frameMagic {
		return FrameHeader{}, fmt.Errorf("%w: magic %#04x, want %#04x", ErrBadFrame, m, frameMagic)
	}
	h := FrameHeader{Kind: FrameKind(b[2]), Tag: be.Uint64(b[4:]), Deadline: be.Uint32(b[12:]), Length: be.Uint32(b[16:])}
	if b[3] != 0 {
		return h, fmt.Errorf("%w: flags %#02x, want 0", ErrBadFrame, b[3])
	}
	switch h.Kind {
	case FrameRequest:
		if h.Length == 0 || h.Length > MaxStreamCommand {
			return h, fmt.Errorf("%w: request of %d bytes, want 1 to %d", ErrBadFrame, h.Length, MaxStreamCommand)
		}
	case FrameAnswer:
		if h.Length < answerFixed+6 || h.Length > maxAnswer || h.Deadline != 0 {
			return h, fmt.Errorf("%w: answer of %d bytes with deadline %d, want %d to %d bytes and none", ErrBadFrame, h.Length, h.Deadline, answerFixed+6, maxAnswer)
		}
	default:
		return h, fmt.Errorf("%w: kind %d", ErrBadFrame, h.Kind)
	}
	return h, nil
}

// StreamAnswer is the body of an answer frame.
type StreamAnswer struct {
	Status StreamStatus
	// Response is the result (StreamAnswered); its Error says why for the
	// other statuses.
	Response ApplyResponse
	// Leader is the leader's HTTP address (StreamNotLeader), when known.
	Leader string
}

// AppendAnswer appends a whole answer frame (header and body) for tag to
// b. Strings longer than 64 KiB are cut.
func AppendAnswer(b []byte, tag uint64, a StreamAnswer) []byte {
	r := &a.Response
	holder, leader, msg := cut(r.Holder), cut(a.Leader), cut(r.Error)
	n := answerFixed + 6 + len(holder) + len(leader) + len(msg)
	b = AppendFrameHeader(b, FrameHeader{Kind: FrameAnswer, Tag: tag, Length: uint32(n)})
	dup := byte(0)
	if r.Duplicate {
		dup = 1
	}
	be := binary.BigEndian
	b = append(b, byte(a.Status), byte(r.Refused), byte(r.Level), dup)
	b = be.AppendUint64(b, r.Index)
	b = be.AppendUint64(b, r.Epoch)
	b = be.AppendUint32(b, 0) // reserved
	for _, s := range []string{holder, leader, msg} {
		b = be.AppendUint16(b, uint16(len(s)))
		b = append(b, s...)
	}
	return b
}

func cut(s string) string {
	if len(s) > maxAnswerString {
		return s[:maxAnswerString]
	}
	return s
}

// ParseAnswer parses an answer frame's body (the header's Length bytes).
func ParseAnswer(b []byte) (StreamAnswer, error) {
	var a StreamAnswer
	if len(b) < answerFixed+6 {
		return a, fmt.Errorf("%w: answer of %d bytes, want at least %d", ErrBadFrame, len(b), answerFixed+6)
	}
	be := binary.BigEndian
	a.Status = StreamStatus(b[0])
	if a.Status > StreamNotLeader {
		return a, fmt.Errorf("%w: answer status %d", ErrBadFrame, b[0])
	}
	r := &a.Response
	r.Refused, r.Level = Refusal(b[1]), replica.Level(b[2])
	if b[3] > 1 {
		return a, fmt.Errorf("%w: duplicate %d, want 0 or 1", ErrBadFrame, b[3])
	}
	r.Duplicate = b[3] == 1
	r.Index, r.Epoch = be.Uint64(b[4:]), be.Uint64(b[12:])
	// b[20:24] is reserved; the three strings follow.
	if be.Uint32(b[20:]) != 0 {
		return a, fmt.Errorf("%w: reserved answer bytes set", ErrBadFrame)
	}
	rest := b[answerFixed:]
	var strs [3]string
	for i := range strs {
		if len(rest) < 2 {
			return a, fmt.Errorf("%w: answer truncated", ErrBadFrame)
		}
		n := int(be.Uint16(rest))
		rest = rest[2:]
		if n > len(rest) {
			return a, fmt.Errorf("%w: answer string of %d bytes overruns", ErrBadFrame, n)
		}
		strs[i], rest = string(rest[:n]), rest[n:]
	}
	if len(rest) != 0 {
		return a, fmt.Errorf("%w: %d bytes after the answer", ErrBadFrame, len(rest))
	}
	r.Holder, a.Leader, r.Error = strs[0], strs[1], strs[2]
	return a, nil
}
