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
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/keelstore/keel/nbd"
)

// A command is the data of one Raft log entry. Layout (big-endian):
//
//	Write:    u8 1 | u64 epoch | u64 reqID | u64 ackedBelow | u64 offset | data
//	Trim:     u8 2 | u64 epoch | u64 reqID | u64 ackedBelow | u64 offset | u64 length
//	Zero:     u8 3 | u64 epoch | u64 reqID | u64 ackedBelow | u64 offset | u64 length | u8 flags
//	Claim:    u8 4 | u8 takeover | writer name
//	Release:  u8 5 | u64 epoch
//	Register: u8 6 | u16 len id | id | u16 len raft | raft | u16 len http | http | u16 len nbd | nbd
//	Forget:   u8 7 | id
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

// Command is a decoded log entry.
type Command struct {
	Kind Kind
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
}

// NodeInfo is what the cluster records about a member: where to reach it.
type NodeInfo struct {
	ID   string `json:"id"`
	Raft string `json:"raft"`
	HTTP string `json:"http"`
	NBD  string `json:"nbd"`
}

// ErrBadCommand is wrapped by every decoding error.
var ErrBadCommand = errors.New("replica: malformed command")

const ioHeader = 1 + 8*4

// Encode appends the command's wire form to b.
func (c *Command) Encode(b []byte) []byte {
	be := binary.BigEndian
	b = append(b, byte(c.Kind))
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
	}
	return b
}

// Decode parses a command. Write data aliases b.
func Decode(b []byte) (Command, error) {
	be := binary.BigEndian
	var c Command
	if len(b) == 0 {
		return c, fmt.Errorf("%w: empty", ErrBadCommand)
	}
	c.Kind = Kind(b[0])
	switch c.Kind {
	case KindWrite, KindTrim, KindZero:
		if len(b) < ioHeader {
			return c, fmt.Errorf("%w: %v shorter than its header", ErrBadCommand, c.Kind)
		}
		c.Epoch = be.Uint64(b[1:])
		c.ReqID = be.Uint64(b[9:])
		c.AckedBelow = be.Uint64(b[17:])
		c.Offset = be.Uint64(b[25:])
		rest := b[ioHeader:]
		switch c.Kind {
		case KindWrite:
			c.Data = rest
			c.Length = uint64(len(rest))
		case KindTrim:
			if len(rest) != 8 {
				return c, fmt.Errorf("%w: trim length", ErrBadCommand)
			}
			c.Length = be.Uint64(rest)
		case KindZero:
			if len(rest) != 9 {
				return c, fmt.Errorf("%w: zero length", ErrBadCommand)
			}
			c.Length = be.Uint64(rest)
			c.ZeroFlags = nbd.ZeroFlags(rest[8])
		}
	case KindClaim:
		if len(b) < 2 {
			return c, fmt.Errorf("%w: claim", ErrBadCommand)
		}
		c.Takeover = b[1] == 1
		c.Writer = string(b[2:])
	case KindRelease:
		if len(b) != 9 {
			return c, fmt.Errorf("%w: release", ErrBadCommand)
		}
		c.Epoch = be.Uint64(b[1:])
	case KindRegister:
		rest := b[1:]
		var parts [4]string
		for i := range parts {
			if len(rest) < 2 {
				return c, fmt.Errorf("%w: register truncated", ErrBadCommand)
			}
			n := int(be.Uint16(rest))
			rest = rest[2:]
			if n > len(rest) {
				return c, fmt.Errorf("%w: register field overruns", ErrBadCommand)
			}
			parts[i] = string(rest[:n])
			rest = rest[n:]
		}
		if len(rest) != 0 || parts[0] == "" {
			return c, fmt.Errorf("%w: register", ErrBadCommand)
		}
		c.Node = NodeInfo{ID: parts[0], Raft: parts[1], HTTP: parts[2], NBD: parts[3]}
	case KindForget:
		if len(b) < 2 {
			return c, fmt.Errorf("%w: forget", ErrBadCommand)
		}
		c.Node.ID = string(b[1:])
	default:
		return c, fmt.Errorf("%w: unknown kind %d", ErrBadCommand, b[0])
	}
	return c, nil
}
