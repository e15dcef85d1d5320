// Package replica owns the replicated volume: the commands carried in the
// Raft log (command.go), the state machine's decisions on them, with no I/O
// (decide.go: writer epochs and fencing, claims and takeovers, the
// exactly-once request-id window, range checks, the member registry), the
// raft.FSM that carries those decisions out on a plain raw image and takes
// metadata-only snapshots (fsm.go: the image is the snapshot), the log
// stores (logstore.go), and a Node that runs it all (node.go) with the one
// way to commit a command from any member, Node.Propose.
//
// Every goroutine the package starts belongs to a Node (or an FSM) and ends
// by its Close; the package tests check that with goleak.
//
// It imports no Keel package but replica/rawimage, replica/imagesync and nbd
// (for nbd.ZeroFlags), and
// must never import services/, cmd/ or chaos/: forwarding to the leader
// crosses the network through the Forwarder interface, which the server
// implements.
package replica

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/keelstore/keel/nbd"
)

// A command is the data of one Raft log entry. Two forms exist, told
// apart by the first byte (big-endian throughout):
//
//	versioned: u8 0xFF | u8 level | u8 flags | u8 kind | body
//	legacy:    u8 kind | body                       (kind 1..7, level 1)
//
// Entries written before feature levels existed are legacy; kinds 1 to 7
// never used 0xFF (nor 0), so both decode unambiguously. The body of a
// kind is the same in both forms:
//
//	Write:    u64 epoch | u64 reqID | u64 ackedBelow | u64 offset | data
//	Trim:     u64 epoch | u64 reqID | u64 ackedBelow | u64 offset | u64 length
//	Zero:     u64 epoch | u64 reqID | u64 ackedBelow | u64 offset | u64 length | u8 flags
//	Claim:    u8 takeover | writer name
//	Release:  u64 epoch
//	Register: u16 len id | id | u16 len raft | raft | u16 len http | http | u16 len nbd | nbd
//	Forget:   id
//
// level is the lowest feature level (Level) that expresses the entry: a
// build that speaks a lower level cannot parse its body and must not guess
// (see ErrUnknownCommand and docs/replication.md, "Mixed versions").
// flags bit 0 (FlagIgnorable) says a node that does not know the entry may
// skip it without diverging (its kind changes nothing an older build
// reads); the other bits are reserved and zero. A leader writes the legacy
// form while any member speaks only LevelLegacy (a build from before
// levels, which refuses the versioned form), the versioned form otherwise.
//
// Zero's flags byte holds nbd.ZeroFlags bits. Only nbd.ZeroNoHole (bit 0,
// the byte's meaning since the first version) is set in the log: whether a
// fast zero may go ahead is decided before proposing, and FUA is moot for a
// command that is durable in a quorum's logs once committed. Apply ignores
// the other bits.
//
// epoch 0 is the "no writer" epoch of clients connected straight to a
// server: accepted only while no writer holds the volume, and never
// deduplicated (reqID 0).

// Level is a feature level: the set of command kinds and fields a build
// can read and write, in the Raft log and on the wire. It grows by one
// whenever a kind or a field is added; a build speaks every level up to
// its own (CurrentLevel), and a cluster speaks the lowest level of its
// members (see Node.ClusterLevel). Zero means "not said" (a message from a
// build before levels), which is read as LevelLegacy.
type Level uint8

// Feature levels.
const (
	// LevelLegacy: the seven kinds of this file in the legacy form.
	LevelLegacy Level = 1
	// LevelVersioned: the versioned form (level and flags on every entry).
	LevelVersioned Level = 2
	// CurrentLevel is the level this build speaks.
	CurrentLevel = LevelVersioned
)

// Or returns l, or LevelLegacy when l is zero (not said).
func (l Level) Or() Level {
	if l == 0 {
		return LevelLegacy
	}
	return l
}

// versionedMarker is the first byte of a versioned entry.
const versionedMarker = 0xFF

// FlagIgnorable, in a versioned entry's flags, lets a node that does not
// know the entry skip it.
const FlagIgnorable uint8 = 1

// MaxCommandData bounds the data in one Raft entry. Larger writes (NBD
// allows 32 MiB) become several entries, committed concurrently, so what
// one AppendEntries round holds in memory stays bounded (16 entries of at
// most 1 MiB). NBD promises no atomicity for a write, and the request is
// answered only once every part is committed.
const MaxCommandData = 1 << 20

// Kind is the first byte of a command.
type Kind uint8

// Command kinds.
const (
	KindWrite    Kind = 1
	KindTrim     Kind = 2
	KindZero     Kind = 3
	KindClaim    Kind = 4
	KindRelease  Kind = 5
	KindRegister Kind = 6
	KindForget   Kind = 7
)

func (k Kind) String() string {
	switch k {
	case KindWrite:
		return "write"
	case KindTrim:
		return "trim"
	case KindZero:
		return "zero"
	case KindClaim:
		return "claim"
	case KindRelease:
		return "release"
	case KindRegister:
		return "register"
	case KindForget:
		return "forget"
	}
	return fmt.Sprintf("kind %d", uint8(k))
}

// level is the feature level that introduced the kind; 0 for a kind this
// build does not know.
func (k Kind) level() Level {
	switch k {
	case KindWrite, KindTrim, KindZero, KindClaim, KindRelease, KindRegister, KindForget:
		return LevelLegacy
	}
	return 0
}

// Command is a decoded log entry.
type Command struct {
	Kind Kind
	// Level is the feature level the command needs beyond its kind's
	// (Need): zero for the kinds of this build, which Decode leaves zero
	// whatever form the entry had; for a command this build does not know
	// (ErrUnknownCommand), the entry's level. Encode writes the entry at
	// Need, so a level above the kind's is kept.
	Level Level
	// Ignorable: a node that does not know the command may skip it
	// (FlagIgnorable). Kinds this build knows are never ignorable.
	Ignorable bool
	// Body is the undecoded body of a command this build does not know
	// (Decode's ErrUnknownCommand), and what Encode writes for one.
	Body []byte
	// Write, Trim, Zero.
	Epoch      uint64
	ReqID      uint64
	AckedBelow uint64 // every reqID below this was answered to the writer's client
	Offset     uint64
	Length     uint64        // Trim and Zero; for Write, len(Data)
	Data       []byte        // Write
	ZeroFlags  nbd.ZeroFlags // Zero: only nbd.ZeroNoHole is carried
	// Claim.
	Takeover bool
	Writer   string
	// Register, Forget.
	Node NodeInfo
	// Encoded, if set, is the buffer the command was decoded from (Decode
	// leaves it nil; a caller that decoded a command it then proposes sets
	// it). Node.Apply proposes it as is, without copying a Write's data
	// again, when it is a Write in exactly the form the cluster reads with
	// Data as its tail (appendForLog checks); anything else is encoded
	// afresh.
	Encoded []byte
}

// NodeInfo is what the cluster records about a member: where to reach it.
type NodeInfo struct {
	ID   string `json:"id"`
	Raft string `json:"raft"`
	HTTP string `json:"http"`
	NBD  string `json:"nbd"`
}

// Errors of encoding and decoding.
var (
	// ErrBadCommand is wrapped by every decoding error but
	// ErrUnknownCommand: the entry cannot come from any build's encoder.
	ErrBadCommand = errors.New("replica: malformed command")
	// ErrUnknownCommand: a well-formed versioned entry of a kind or level
	// this build does not know (a newer build wrote it). Decode returns
	// its Kind, Level, Ignorable and Body.
	ErrUnknownCommand = errors.New("replica: command of a newer feature level than this build knows")
	// ErrFeatureLevel: the command needs a feature level above what the
	// cluster speaks (some member runs an older build); nothing was
	// proposed.
	ErrFeatureLevel = errors.New("replica: command needs a newer feature level than every member speaks")
)

const ioHeader = 8 * 4

// Need is the lowest feature level that expresses c.
func (c *Command) Need() Level {
	l := c.Kind.level()
	if l == 0 {
		l = LevelVersioned // unknown kinds exist only in the versioned form
	}
	return max(l, c.Level)
}

// Encode appends the command's versioned form to b, at level c.Need().
func (c *Command) Encode(b []byte) []byte {
	flags := uint8(0)
	if c.Ignorable {
		flags |= FlagIgnorable
	}
	b = append(b, versionedMarker, byte(max(LevelVersioned, c.Need())), flags, byte(c.Kind))
	return c.appendBody(b)
}

// AppendFor appends the form a cluster speaking level reads: the legacy
// form below LevelVersioned, the versioned one from it on. A command that
// needs more than level is refused with ErrFeatureLevel.
func (c *Command) AppendFor(b []byte, level Level) ([]byte, error) {
	level = level.Or()
	if need := c.Need(); need > level {
		return b, fmt.Errorf("%w: %v needs level %d, the cluster speaks %d", ErrFeatureLevel, c.Kind, need, level)
	}
	if level < LevelVersioned {
		return c.appendBody(append(b, byte(c.Kind))), nil
	}
	return c.Encode(b), nil
}

// EncodeCompat is the form every build reads when c needs no more than
// LevelLegacy (the legacy one), else the versioned one. Senders that do
// not know the receiver's level (a proxy, a forwarding follower) use it.
func (c *Command) EncodeCompat(b []byte) []byte {
	if c.Need() <= LevelLegacy {
		out, _ := c.AppendFor(b, LevelLegacy)
		return out
	}
	return c.Encode(b)
}

// appendForLog is AppendFor(nil, level), except that it returns
// c.Encoded itself when that holds exactly those bytes: a Write whose Data
// is Encoded's tail (the same memory) and whose header encodes at level to
// Encoded's head. So a write read from the network into one buffer goes
// into the log without another copy of its data.
func (c *Command) appendForLog(level Level) ([]byte, error) {
	if c.Kind == KindWrite && len(c.Data) > 0 && len(c.Encoded) > len(c.Data) {
		h := *c
		h.Data, h.Encoded = nil, nil
		var buf [4 + ioHeader]byte
		head, err := h.AppendFor(buf[:0], level)
		if err == nil && len(head)+len(c.Data) == len(c.Encoded) &&
			&c.Encoded[len(head)] == &c.Data[0] && bytes.Equal(head, c.Encoded[:len(head)]) {
			return c.Encoded, nil
		}
	}
	return c.AppendFor(nil, level)
}

func (c *Command) appendBody(b []byte) []byte {
	be := binary.BigEndian
	switch c.Kind {
	case KindWrite, KindTrim, KindZero:
		b = be.AppendUint64(b, c.Epoch)
		b = be.AppendUint64(b, c.ReqID)
		b = be.AppendUint64(b, c.AckedBelow)
		b = be.AppendUint64(b, c.Offset)
		switch c.Kind {
		case KindWrite:
			b = append(b, c.Data...)
		case KindTrim:
			b = be.AppendUint64(b, c.Length)
		case KindZero:
			b = be.AppendUint64(b, c.Length)
			b = append(b, byte(c.ZeroFlags))
		}
	case KindClaim:
		t := byte(0)
		if c.Takeover {
			t = 1
		}
		b = append(b, t)
		b = append(b, c.Writer...)
	case KindRelease:
		b = be.AppendUint64(b, c.Epoch)
	case KindRegister:
		for _, s := range []string{c.Node.ID, c.Node.Raft, c.Node.HTTP, c.Node.NBD} {
			b = be.AppendUint16(b, uint16(len(s)))
			b = append(b, s...)
		}
	case KindForget:
		b = append(b, c.Node.ID...)
	default:
		b = append(b, c.Body...)
	}
	return b
}

// Decode parses a command as this build does (DecodeAt CurrentLevel).
// Write data aliases b.
func Decode(b []byte) (Command, error) { return DecodeAt(b, CurrentLevel) }

// DecodeAt parses a command as a build speaking level does: a versioned
// entry above level, or of a kind unknown at level, gives
// ErrUnknownCommand with the entry's Kind, Level, Ignorable and Body
// filled in. Write data and Body alias b.
func DecodeAt(b []byte, level Level) (Command, error) {
	var c Command
	if len(b) == 0 {
		return c, fmt.Errorf("%w: empty", ErrBadCommand)
	}
	if b[0] != versionedMarker {
		c.Kind = Kind(b[0])
		if c.Kind.level() != LevelLegacy {
			return c, fmt.Errorf("%w: unknown kind %d", ErrBadCommand, b[0])
		}
		return c, c.decodeBody(b[1:])
	}
	if len(b) < 4 {
		return c, fmt.Errorf("%w: versioned header truncated", ErrBadCommand)
	}
	entry, flags, kind := Level(b[1]), b[2], Kind(b[3])
	if entry < LevelVersioned {
		return c, fmt.Errorf("%w: versioned entry of level %d", ErrBadCommand, entry)
	}
	c.Kind = kind
	known := kind.level()
	if entry > level || known == 0 || known > level || flags&^FlagIgnorable != 0 {
		c.Level, c.Ignorable, c.Body = entry, flags&FlagIgnorable != 0, b[4:]
		return c, fmt.Errorf("%w: %v at level %d (flags %#x); this build speaks %d", ErrUnknownCommand, kind, entry, flags, level)
	}
	if known > entry || flags != 0 {
		// Our own encoder never writes a kind below its level, nor marks a
		// kind it knows ignorable.
		return c, fmt.Errorf("%w: %v marked level %d, flags %#x", ErrBadCommand, kind, entry, flags)
	}
	return c, c.decodeBody(b[4:])
}

func (c *Command) decodeBody(b []byte) error {
	be := binary.BigEndian
	switch c.Kind {
	case KindWrite, KindTrim, KindZero:
		if len(b) < ioHeader {
			return fmt.Errorf("%w: %v shorter than its header", ErrBadCommand, c.Kind)
		}
		c.Epoch = be.Uint64(b[0:])
		c.ReqID = be.Uint64(b[8:])
		c.AckedBelow = be.Uint64(b[16:])
		c.Offset = be.Uint64(b[24:])
		rest := b[ioHeader:]
		switch c.Kind {
		case KindWrite:
			c.Data = rest
			c.Length = uint64(len(rest))
		case KindTrim:
			if len(rest) != 8 {
				return fmt.Errorf("%w: trim length", ErrBadCommand)
			}
			c.Length = be.Uint64(rest)
		case KindZero:
			if len(rest) != 9 {
				return fmt.Errorf("%w: zero length", ErrBadCommand)
			}
			c.Length = be.Uint64(rest)
			c.ZeroFlags = nbd.ZeroFlags(rest[8])
		}
	case KindClaim:
		if len(b) < 1 {
			return fmt.Errorf("%w: claim", ErrBadCommand)
		}
		c.Takeover = b[0] == 1
		c.Writer = string(b[1:])
	case KindRelease:
		if len(b) != 8 {
			return fmt.Errorf("%w: release", ErrBadCommand)
		}
		c.Epoch = be.Uint64(b)
	case KindRegister:
		rest := b
		var parts [4]string
		for i := range parts {
			if len(rest) < 2 {
				return fmt.Errorf("%w: register truncated", ErrBadCommand)
			}
			n := int(be.Uint16(rest))
			rest = rest[2:]
			if n > len(rest) {
				return fmt.Errorf("%w: register field overruns", ErrBadCommand)
			}
			parts[i] = string(rest[:n])
			rest = rest[n:]
		}
		if len(rest) != 0 || parts[0] == "" {
			return fmt.Errorf("%w: register", ErrBadCommand)
		}
		c.Node = NodeInfo{ID: parts[0], Raft: parts[1], HTTP: parts[2], NBD: parts[3]}
	case KindForget:
		if len(b) < 1 {
			return fmt.Errorf("%w: forget", ErrBadCommand)
		}
		c.Node.ID = string(b)
	}
	return nil
}
