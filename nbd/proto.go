// Package nbd owns the Network Block Device protocol: the wire format as a
// codec over bytes (codec.go, no I/O); the server side of a connection on top
// of it (handshake.go, conn.go) with a Backend interface so the same server
// can serve a local image, a replicated volume or a remote one; and a
// concurrent client (client.go) for keel proxy to reach the servers.
//
// A Backend declares its Capabilities (flush, FUA, trim, zero, fast zero,
// cache, extents, multi-conn); the handshake advertises exactly those (the
// base:allocation context only with extents) and a request for anything
// else is answered with EINVAL without reaching the backend. Every backend
// call gets the connection's context, cancelled only when no answer can be
// delivered any more (the connection died, or a graceful stop ran past
// DrainTimeout); a graceful stop itself answers every request already read.
// TLS (tls.go): NBD_OPT_STARTTLS on the server (ServerConfig.TLS, a
// TLSMode as nbdkit's --tls) and on the client (ClientConfig.TLS).
// ZeroFlags and ErrNotFast are the one zero-flags type and the one "not
// fast" error that rawimage and the replicated log use too.
//
// nbd imports no other Keel package.
//
// # Wire layout
//
// All integers are big-endian. The layouts below follow the protocol
// document (NetworkBlockDevice/nbd, doc/proto.md, with the extended-header
// extension).
//
// Handshake (fixed newstyle):
//
//	S: u64 NBDMAGIC  u64 IHAVEOPT  u16 handshake flags
//	C: u32 client flags
//
// Option request and option reply:
//
//	C: u64 IHAVEOPT  u32 option  u32 length  [length bytes]
//	S: u64 REPLYMAGIC  u32 option  u32 reply type  u32 length  [length bytes]
//
// NBD_OPT_STARTTLS (5, no data) is answered NBD_REP_ACK, and both sides
// then run a TLS handshake on the socket; the option haggling starts over
// inside TLS.
//
// Reply to NBD_OPT_EXPORT_NAME (no option reply header):
//
//	S: u64 size  u16 transmission flags  [124 zero bytes unless NO_ZEROES]
//
// Requests (28 bytes compact, 32 bytes extended):
//
//	C: u32 0x25609513  u16 flags  u16 type  u64 cookie  u64 offset  u32 length
//	C: u32 0x21e41c71  u16 flags  u16 type  u64 cookie  u64 offset  u64 length
//
// Replies (16 bytes simple, 20 bytes structured, 32 bytes extended):
//
//	S: u32 0x67446698  u32 error  u64 cookie
//	S: u32 0x668e33ef  u16 flags  u16 type  u64 cookie  u32 length
//	S: u32 0x6e8a278c  u16 flags  u16 type  u64 cookie  u64 offset  u64 length
package nbd

// Magic numbers.
const (
	MagicNBD          uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	MagicOpt          uint64 = 0x49484156454F5054 // "IHAVEOPT"
	MagicOptReply     uint64 = 0x0003e889045565a9
	MagicRequest      uint32 = 0x25609513
	MagicExtRequest   uint32 = 0x21e41c71
	MagicSimpleReply  uint32 = 0x67446698
	MagicStructReply  uint32 = 0x668e33ef
	MagicExtReply     uint32 = 0x6e8a278c
	exportNameZeroPad        = 124
)

// Handshake flags (server) and client flags.
const (
	FlagFixedNewstyle uint16 = 1 << 0
	FlagNoZeroes      uint16 = 1 << 1

	ClientFixedNewstyle uint32 = 1 << 0
	ClientNoZeroes      uint32 = 1 << 1
)

// Transmission flags.
const (
	TFlagHasFlags           uint16 = 1 << 0
	TFlagReadOnly           uint16 = 1 << 1
	TFlagSendFlush          uint16 = 1 << 2
	TFlagSendFUA            uint16 = 1 << 3
	TFlagRotational         uint16 = 1 << 4
	TFlagSendTrim           uint16 = 1 << 5
	TFlagSendWriteZeroes    uint16 = 1 << 6
	TFlagSendDF             uint16 = 1 << 7
	TFlagCanMultiConn       uint16 = 1 << 8
	TFlagSendResize         uint16 = 1 << 9
	TFlagSendCache          uint16 = 1 << 10
	TFlagSendFastZero       uint16 = 1 << 11
	TFlagBlockStatusPayload uint16 = 1 << 12
)

// Options.
const (
	OptExportName      uint32 = 1
	OptAbort           uint32 = 2
	OptList            uint32 = 3
	OptPeekExport      uint32 = 4
	OptStartTLS        uint32 = 5
	OptInfo            uint32 = 6
	OptGo              uint32 = 7
	OptStructuredReply uint32 = 8
	OptListMetaContext uint32 = 9
	OptSetMetaContext  uint32 = 10
	OptExtendedHeaders uint32 = 11
)

// Option reply types. Errors have bit 31 set.
const (
	RepAck         uint32 = 1
	RepServer      uint32 = 2
	RepInfo        uint32 = 3
	RepMetaContext uint32 = 4

	repErrBit           uint32 = 1 << 31
	RepErrUnsup         uint32 = repErrBit + 1
	RepErrPolicy        uint32 = repErrBit + 2
	RepErrInvalid       uint32 = repErrBit + 3
	RepErrPlatform      uint32 = repErrBit + 4
	RepErrTLSReqd       uint32 = repErrBit + 5
	RepErrUnknown       uint32 = repErrBit + 6
	RepErrShutdown      uint32 = repErrBit + 7
	RepErrBlockSizeReqd uint32 = repErrBit + 8
	RepErrTooBig        uint32 = repErrBit + 9
	RepErrExtHeaderReqd uint32 = repErrBit + 10
)

// Info types carried in NBD_REP_INFO.
const (
	InfoExport      uint16 = 0
	InfoName        uint16 = 1
	InfoDescription uint16 = 2
	InfoBlockSize   uint16 = 3
)

// Commands.
const (
	CmdRead        uint16 = 0
	CmdWrite       uint16 = 1
	CmdDisc        uint16 = 2
	CmdFlush       uint16 = 3
	CmdTrim        uint16 = 4
	CmdCache       uint16 = 5
	CmdWriteZeroes uint16 = 6
	CmdBlockStatus uint16 = 7
)

// Command flags.
const (
	CmdFlagFUA        uint16 = 1 << 0
	CmdFlagNoHole     uint16 = 1 << 1
	CmdFlagDF         uint16 = 1 << 2
	CmdFlagReqOne     uint16 = 1 << 3
	CmdFlagFastZero   uint16 = 1 << 4
	CmdFlagPayloadLen uint16 = 1 << 5
)

// Structured reply flags and chunk types.
const (
	ReplyFlagDone uint16 = 1 << 0

	ReplyTypeNone           uint16 = 0
	ReplyTypeOffsetData     uint16 = 1
	ReplyTypeOffsetHole     uint16 = 2
	ReplyTypeBlockStatus    uint16 = 5
	ReplyTypeBlockStatusExt uint16 = 6
	ReplyTypeError          uint16 = 1<<15 + 1
	ReplyTypeErrorOffset    uint16 = 1<<15 + 2
)

// base:allocation status flags.
const (
	StateHole uint32 = 1 << 0
	StateZero uint32 = 1 << 1
)

// MetaContextBaseAllocation is the one metadata context Keel serves.
const MetaContextBaseAllocation = "base:allocation"

// Size limits from the protocol document.
const (
	// MaxString is the longest string (export name, description, error
	// message, context name) the protocol allows.
	MaxString = 4096
	// DefaultMaxPayload is the payload size every server should accept
	// (2^25) and what Keel advertises as its maximum.
	DefaultMaxPayload = 1 << 25
	// MaxOptionLength bounds the data of one option we are willing to
	// parse; longer options are skipped and refused.
	MaxOptionLength = 64 << 10
	// MaxExtents bounds the descriptors in one block status chunk.
	MaxExtents = 1 << 20
)

// Header sizes.
const (
	RequestSize        = 28
	ExtRequestSize     = 32
	SimpleReplySize    = 16
	StructReplySize    = 20
	ExtReplySize       = 32
	optionHeaderSize   = 16
	optReplyHeaderSize = 20
)
