package upgrade

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// msgVersion is the version byte of every handover message.
const msgVersion = 1

// Message kinds (see the package comment for the layout).
const (
	kindReady = 'R'
	kindFail  = 'F'
	kindConn  = 'C'
	kindAck   = 'A'
	kindDone  = 'D'
	kindState = 'S'
)

// maxMsg bounds one handover message: a connection's state carries the
// bytes its reader had read ahead, at most a read buffer's worth.
const maxMsg = 1 << 20

// ErrBadMessage is returned for a handover message that does not parse.
var ErrBadMessage = errors.New("upgrade: bad handover message")

// msg is one handover message.
type msg struct {
	kind    byte
	payload []byte
}

// appendMsg encodes m after b.
func appendMsg(b []byte, m msg) []byte {
	b = append(b, msgVersion, m.kind)
	return append(b, m.payload...)
}

// parseMsg decodes one message; the payload aliases b.
func parseMsg(b []byte) (msg, error) {
	if len(b) < 2 {
		return msg{}, fmt.Errorf("%w: %d bytes", ErrBadMessage, len(b))
	}
	if b[0] != msgVersion {
		return msg{}, fmt.Errorf("%w: version %d, want %d", ErrBadMessage, b[0], msgVersion)
	}
	switch b[1] {
	case kindReady:
		if len(b) < 6 {
			return msg{}, fmt.Errorf("%w: READY of %d bytes", ErrBadMessage, len(b))
		}
	case kindFail, kindConn, kindState:
	case kindAck, kindDone:
		if len(b) != 2 {
			return msg{}, fmt.Errorf("%w: %q with a payload", ErrBadMessage, b[1])
		}
	default:
		return msg{}, fmt.Errorf("%w: kind %#x", ErrBadMessage, b[1])
	}
	return msg{kind: b[1], payload: b[2:]}, nil
}

// readyPayload is a READY message's payload: the child's pid and version.
func readyPayload(pid int, version string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(pid))
	return append(b, version...)
}

func parseReady(p []byte) (pid int, version string) {
	return int(binary.BigEndian.Uint32(p)), string(p[4:])
}
