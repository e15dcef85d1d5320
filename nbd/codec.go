package nbd

import (
	"encoding/binary"
	"errors"
	"strings"
)

// The codec: every message of the protocol as Parse (bytes to value) and
// Append (value to bytes). No I/O happens here; parsers never panic on any
// input and return an error wrapping ErrMalformed when the bytes do not
// follow the layout documented in proto.go.

var be = binary.BigEndian

// ErrMalformed is wrapped by every parse error of the codec.
var ErrMalformed = errors.New("nbd: malformed message")

func malformed(what string) error { return &codecError{what} }

type codecError struct{ what string }

func (e *codecError) Error() string { return "nbd: malformed message: " + e.what }
func (e *codecError) Unwrap() error { return ErrMalformed }

// ---- Handshake ----

// AppendServerGreeting appends the fixed newstyle greeting.
func AppendServerGreeting(b []byte, flags uint16) []byte {
	b = be.AppendUint64(b, MagicNBD)
	b = be.AppendUint64(b, MagicOpt)
	return be.AppendUint16(b, flags)
}

// ParseServerGreeting parses the 18-byte greeting (client side).
func ParseServerGreeting(b []byte) (flags uint16, err error) {
	if len(b) != 18 {
		return 0, malformed("greeting length")
	}
	if be.Uint64(b) != MagicNBD || be.Uint64(b[8:]) != MagicOpt {
		return 0, malformed("greeting magic (not a newstyle NBD server)")
	}
	return be.Uint16(b[16:]), nil
}

// ---- Options ----

// OptionHeader is the fixed part of a client's option request.
type OptionHeader struct {
	Option uint32
	Length uint32
}

// ParseOptionHeader parses the 16-byte option header.
func ParseOptionHeader(b []byte) (OptionHeader, error) {
	if len(b) != optionHeaderSize {
		return OptionHeader{}, malformed("option header length")
	}
	if be.Uint64(b) != MagicOpt {
		return OptionHeader{}, malformed("option magic")
	}
	return OptionHeader{Option: be.Uint32(b[8:]), Length: be.Uint32(b[12:])}, nil
}

// AppendOption appends an option request with its data (client side).
func AppendOption(b []byte, option uint32, data []byte) []byte {
	b = be.AppendUint64(b, MagicOpt)
	b = be.AppendUint32(b, option)
	b = be.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// AppendOptionReply appends an option reply with its data.
func AppendOptionReply(b []byte, option, typ uint32, data []byte) []byte {
	b = be.AppendUint64(b, MagicOptReply)
	b = be.AppendUint32(b, option)
	b = be.AppendUint32(b, typ)
	b = be.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// OptionReplyHeader is the fixed part of an option reply.
type OptionReplyHeader struct {
	Option uint32
	Type   uint32
	Length uint32
}

// ParseOptionReplyHeader parses the 20-byte option reply header (client side).
func ParseOptionReplyHeader(b []byte) (OptionReplyHeader, error) {
	if len(b) != optReplyHeaderSize {
		return OptionReplyHeader{}, malformed("option reply header length")
	}
	if be.Uint64(b) != MagicOptReply {
		return OptionReplyHeader{}, malformed("option reply magic")
	}
	return OptionReplyHeader{Option: be.Uint32(b[8:]), Type: be.Uint32(b[12:]), Length: be.Uint32(b[16:])}, nil
}

// IsRepErr reports whether an option reply type is an error.
func IsRepErr(typ uint32) bool { return typ&repErrBit != 0 }

// ExportRequest is the data of NBD_OPT_INFO and NBD_OPT_GO:
//
//	u32 name length  name  u16 count  count x u16 info request
type ExportRequest struct {
	Name  string
	Infos []uint16
}

// ParseExportRequest parses the data of NBD_OPT_INFO or NBD_OPT_GO.
func ParseExportRequest(data []byte) (ExportRequest, error) {
	if len(data) < 6 {
		return ExportRequest{}, malformed("INFO/GO data shorter than 6 bytes")
	}
	n := be.Uint32(data)
	if uint64(n) > uint64(len(data))-6 {
		return ExportRequest{}, malformed("INFO/GO name length exceeds option data")
	}
	name := string(data[4 : 4+n])
	rest := data[4+n:]
	count := int(be.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*count {
		return ExportRequest{}, malformed("INFO/GO information request count disagrees with option length")
	}
	if err := checkString(name); err != nil {
		return ExportRequest{}, err
	}
	r := ExportRequest{Name: name}
	if count > 0 {
		r.Infos = make([]uint16, count)
		for i := range r.Infos {
			r.Infos[i] = be.Uint16(rest[2*i:])
		}
	}
	return r, nil
}

// AppendExportRequest appends INFO/GO option data (client side).
func AppendExportRequest(b []byte, r ExportRequest) []byte {
	b = be.AppendUint32(b, uint32(len(r.Name)))
	b = append(b, r.Name...)
	b = be.AppendUint16(b, uint16(len(r.Infos)))
	for _, i := range r.Infos {
		b = be.AppendUint16(b, i)
	}
	return b
}

// MetaContextRequest is the data of NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT:
//
//	u32 name length  name  u32 count  count x (u32 length  query)
type MetaContextRequest struct {
	Export  string
	Queries []string
}

// ParseMetaContextRequest parses LIST/SET_META_CONTEXT option data.
func ParseMetaContextRequest(data []byte) (MetaContextRequest, error) {
	if len(data) < 8 {
		return MetaContextRequest{}, malformed("meta context data shorter than 8 bytes")
	}
	n := be.Uint32(data)
	if uint64(n) > uint64(len(data))-8 {
		return MetaContextRequest{}, malformed("meta context export name length exceeds option data")
	}
	r := MetaContextRequest{Export: string(data[4 : 4+n])}
	if err := checkString(r.Export); err != nil {
		return MetaContextRequest{}, err
	}
	rest := data[4+n:]
	count := be.Uint32(rest)
	rest = rest[4:]
	// Each query takes at least 4 bytes, which bounds count by the data.
	if uint64(count) > uint64(len(rest))/4 {
		return MetaContextRequest{}, malformed("meta context query count exceeds option data")
	}
	for i := uint32(0); i < count; i++ {
		if len(rest) < 4 {
			return MetaContextRequest{}, malformed("meta context query truncated")
		}
		ql := be.Uint32(rest)
		rest = rest[4:]
		if uint64(ql) > uint64(len(rest)) {
			return MetaContextRequest{}, malformed("meta context query length exceeds option data")
		}
		q := string(rest[:ql])
		if err := checkString(q); err != nil {
			return MetaContextRequest{}, err
		}
		r.Queries = append(r.Queries, q)
		rest = rest[ql:]
	}
	if len(rest) != 0 {
		return MetaContextRequest{}, malformed("meta context data has trailing bytes")
	}
	return r, nil
}

// AppendMetaContextRequest appends LIST/SET_META_CONTEXT data (client side).
func AppendMetaContextRequest(b []byte, r MetaContextRequest) []byte {
	b = be.AppendUint32(b, uint32(len(r.Export)))
	b = append(b, r.Export...)
	b = be.AppendUint32(b, uint32(len(r.Queries)))
	for _, q := range r.Queries {
		b = be.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// checkString applies the protocol's rules for strings: no NUL, at most
// 4096 bytes.
func checkString(s string) error {
	if len(s) > MaxString {
		return malformed("string longer than 4096 bytes")
	}
	if strings.IndexByte(s, 0) >= 0 {
		return malformed("string contains NUL")
	}
	return nil
}

// AppendInfoExport appends the payload of NBD_REP_INFO/NBD_INFO_EXPORT.
func AppendInfoExport(b []byte, size uint64, flags uint16) []byte {
	b = be.AppendUint16(b, InfoExport)
	b = be.AppendUint64(b, size)
	return be.AppendUint16(b, flags)
}

// AppendInfoString appends the payload of NBD_INFO_NAME or NBD_INFO_DESCRIPTION.
func AppendInfoString(b []byte, typ uint16, s string) []byte {
	b = be.AppendUint16(b, typ)
	return append(b, s...)
}

// BlockSize holds the three size constraints of NBD_INFO_BLOCK_SIZE.
type BlockSize struct {
	Minimum, Preferred, Maximum uint32
}

// AppendInfoBlockSize appends the payload of NBD_INFO_BLOCK_SIZE.
func AppendInfoBlockSize(b []byte, bs BlockSize) []byte {
	b = be.AppendUint16(b, InfoBlockSize)
	b = be.AppendUint32(b, bs.Minimum)
	b = be.AppendUint32(b, bs.Preferred)
	return be.AppendUint32(b, bs.Maximum)
}

// AppendRepServer appends the payload of NBD_REP_SERVER.
func AppendRepServer(b []byte, name, description string) []byte {
	b = be.AppendUint32(b, uint32(len(name)))
	b = append(b, name...)
	return append(b, description...)
}

// AppendRepMetaContext appends the payload of NBD_REP_META_CONTEXT.
func AppendRepMetaContext(b []byte, id uint32, name string) []byte {
	b = be.AppendUint32(b, id)
	return append(b, name...)
}

// AppendExportNameReply appends the reply to NBD_OPT_EXPORT_NAME.
func AppendExportNameReply(b []byte, size uint64, flags uint16, noZeroes bool) []byte {
	b = be.AppendUint64(b, size)
	b = be.AppendUint16(b, flags)
	if !noZeroes {
		b = append(b, make([]byte, exportNameZeroPad)...)
	}
	return b
}

// ---- Transmission ----

// Request is one transmission request. With extended headers Length is
// 64 bits; in the compact form it fits 32.
type Request struct {
	Flags  uint16
	Type   uint16
	Cookie uint64
	Offset uint64
	Length uint64
}

// ParseRequest parses a request header: 28 bytes compact or 32 bytes when
// extended headers were negotiated.
func ParseRequest(b []byte, extended bool) (Request, error) {
	var r Request
	if extended {
		if len(b) != ExtRequestSize {
			return r, malformed("extended request header length")
		}
		if m := be.Uint32(b); m != MagicExtRequest {
			return r, malformed("extended request magic")
		}
		r.Length = be.Uint64(b[24:])
	} else {
		if len(b) != RequestSize {
			return r, malformed("request header length")
		}
		if m := be.Uint32(b); m != MagicRequest {
			return r, malformed("request magic")
		}
		r.Length = uint64(be.Uint32(b[24:]))
	}
	r.Flags = be.Uint16(b[4:])
	r.Type = be.Uint16(b[6:])
	r.Cookie = be.Uint64(b[8:])
	r.Offset = be.Uint64(b[16:])
	return r, nil
}

// AppendRequest appends a request header (client side).
func AppendRequest(b []byte, r Request, extended bool) []byte {
	if extended {
		b = be.AppendUint32(b, MagicExtRequest)
	} else {
		b = be.AppendUint32(b, MagicRequest)
	}
	b = be.AppendUint16(b, r.Flags)
	b = be.AppendUint16(b, r.Type)
	b = be.AppendUint64(b, r.Cookie)
	b = be.AppendUint64(b, r.Offset)
	if extended {
		return be.AppendUint64(b, r.Length)
	}
	return be.AppendUint32(b, uint32(r.Length))
}

// PayloadLength is the number of payload bytes that follow the request
// header on the wire.
func (r Request) PayloadLength(extended bool) uint64 {
	if extended {
		if r.Flags&CmdFlagPayloadLen != 0 {
			return r.Length
		}
		return 0
	}
	if r.Type == CmdWrite {
		return r.Length
	}
	return 0
}

// AppendSimpleReply appends a simple reply header.
func AppendSimpleReply(b []byte, errno Errno, cookie uint64) []byte {
	b = be.AppendUint32(b, MagicSimpleReply)
	b = be.AppendUint32(b, uint32(errno))
	return be.AppendUint64(b, cookie)
}

// AppendChunkHeader appends a structured (20-byte) or, when extended, an
// extended (32-byte) reply chunk header. offset is the request's offset and
// is only sent in the extended form.
func AppendChunkHeader(b []byte, extended bool, flags, typ uint16, cookie, offset, length uint64) []byte {
	if extended {
		b = be.AppendUint32(b, MagicExtReply)
	} else {
		b = be.AppendUint32(b, MagicStructReply)
	}
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, typ)
	b = be.AppendUint64(b, cookie)
	if extended {
		b = be.AppendUint64(b, offset)
		return be.AppendUint64(b, length)
	}
	return be.AppendUint32(b, uint32(length))
}

// Reply is a parsed reply header of any of the three forms (client side).
type Reply struct {
	Magic  uint32
	Error  Errno  // simple replies only
	Flags  uint16 // structured and extended
	Type   uint16 // structured and extended
	Cookie uint64
	Offset uint64 // extended only
	Length uint64 // payload length, structured and extended
}

// ReplyHeaderSize returns the size of the header that starts with magic, or 0.
func ReplyHeaderSize(magic uint32) int {
	switch magic {
	case MagicSimpleReply:
		return SimpleReplySize
	case MagicStructReply:
		return StructReplySize
	case MagicExtReply:
		return ExtReplySize
	}
	return 0
}

// ParseReply parses a whole reply header; its length must match the magic.
func ParseReply(b []byte) (Reply, error) {
	if len(b) < 4 {
		return Reply{}, malformed("reply header too short")
	}
	r := Reply{Magic: be.Uint32(b)}
	if n := ReplyHeaderSize(r.Magic); n == 0 || n != len(b) {
		return Reply{}, malformed("reply magic or length")
	}
	switch r.Magic {
	case MagicSimpleReply:
		r.Error = Errno(be.Uint32(b[4:]))
		r.Cookie = be.Uint64(b[8:])
	case MagicStructReply:
		r.Flags, r.Type = be.Uint16(b[4:]), be.Uint16(b[6:])
		r.Cookie = be.Uint64(b[8:])
		r.Length = uint64(be.Uint32(b[16:]))
	case MagicExtReply:
		r.Flags, r.Type = be.Uint16(b[4:]), be.Uint16(b[6:])
		r.Cookie = be.Uint64(b[8:])
		r.Offset = be.Uint64(b[16:])
		r.Length = be.Uint64(b[24:])
	}
	return r, nil
}

// Extent is one run of blocks with the same status.
type Extent struct {
	Length uint64
	Flags  uint32
}

// AppendOffsetHole appends the payload of NBD_REPLY_TYPE_OFFSET_HOLE.
func AppendOffsetHole(b []byte, offset uint64, length uint32) []byte {
	b = be.AppendUint64(b, offset)
	return be.AppendUint32(b, length)
}

// AppendBlockStatus appends the payload of NBD_REPLY_TYPE_BLOCK_STATUS
// (32-bit lengths; callers keep each extent below 4 GiB).
func AppendBlockStatus(b []byte, contextID uint32, extents []Extent) []byte {
	b = be.AppendUint32(b, contextID)
	for _, e := range extents {
		b = be.AppendUint32(b, uint32(e.Length))
		b = be.AppendUint32(b, e.Flags)
	}
	return b
}

// AppendBlockStatusExt appends the payload of NBD_REPLY_TYPE_BLOCK_STATUS_EXT.
func AppendBlockStatusExt(b []byte, contextID uint32, extents []Extent) []byte {
	b = be.AppendUint32(b, contextID)
	b = be.AppendUint32(b, uint32(len(extents)))
	for _, e := range extents {
		b = be.AppendUint64(b, e.Length)
		b = be.AppendUint64(b, uint64(e.Flags))
	}
	return b
}

// ParseBlockStatus parses a BLOCK_STATUS or BLOCK_STATUS_EXT payload (client side).
func ParseBlockStatus(payload []byte, ext bool) (contextID uint32, extents []Extent, err error) {
	if ext {
		if len(payload) < 8+16 || (len(payload)-8)%16 != 0 {
			return 0, nil, malformed("block status ext payload length")
		}
		contextID = be.Uint32(payload)
		n := be.Uint32(payload[4:])
		if uint64(n) != uint64(len(payload)-8)/16 {
			return 0, nil, malformed("block status ext descriptor count")
		}
		for p := payload[8:]; len(p) > 0; p = p[16:] {
			extents = append(extents, Extent{Length: be.Uint64(p), Flags: uint32(be.Uint64(p[8:]))})
		}
		return contextID, extents, nil
	}
	if len(payload) < 4+8 || (len(payload)-4)%8 != 0 {
		return 0, nil, malformed("block status payload length")
	}
	contextID = be.Uint32(payload)
	for p := payload[4:]; len(p) > 0; p = p[8:] {
		extents = append(extents, Extent{Length: uint64(be.Uint32(p)), Flags: be.Uint32(p[4:])})
	}
	return contextID, extents, nil
}

// AppendErrorChunk appends the payload of NBD_REPLY_TYPE_ERROR.
func AppendErrorChunk(b []byte, errno Errno, message string) []byte {
	if len(message) > MaxString {
		message = message[:MaxString]
	}
	b = be.AppendUint32(b, uint32(errno))
	b = be.AppendUint16(b, uint16(len(message)))
	return append(b, message...)
}

// ParseErrorChunk parses the payload of an error chunk (client side).
func ParseErrorChunk(payload []byte) (Errno, string, error) {
	if len(payload) < 6 {
		return 0, "", malformed("error chunk shorter than 6 bytes")
	}
	n := int(be.Uint16(payload[4:]))
	if n > len(payload)-6 {
		return 0, "", malformed("error chunk message length exceeds payload")
	}
	return Errno(be.Uint32(payload)), string(payload[6 : 6+n]), nil
}
