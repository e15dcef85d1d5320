package wire

import (
	"errors"
	"fmt"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica"
)

// Refusal says why the state machine refused a committed command. It
// crosses processes as a number (ApplyResponse.Refused); this file is the
// one mapping between it, replica's sentinel errors and NBD errnos.
type Refusal uint8

// Refusals. The numbers are part of the wire format: never reuse one.
const (
	NotRefused        Refusal = 0
	RefusedStaleEpoch Refusal = 1 // replica.ErrStaleEpoch: the writer was fenced
	RefusedWriterHeld Refusal = 2 // replica.ErrWriterHeld: another writer holds the volume
	RefusedOutOfRange Refusal = 3 // replica.ErrOutOfRange: past the end of the image
	RefusedBadCommand Refusal = 4 // replica.ErrBadCommand: the command did not decode
	RefusedOther      Refusal = 5 // anything else the FSM answered
	// RefusedFeatureLevel: replica.ErrFeatureLevel: the command needs a
	// level some member does not speak; it was not proposed.
	RefusedFeatureLevel Refusal = 6
	// RefusedUnknownCommand: replica.ErrUnknownCommand: the command is of
	// a level or kind the answering build does not know.
	RefusedUnknownCommand Refusal = 7
)

var refusalErrs = map[Refusal]error{
	RefusedStaleEpoch: replica.ErrStaleEpoch,
	RefusedWriterHeld: replica.ErrWriterHeld,
	RefusedOutOfRange: replica.ErrOutOfRange,
	RefusedBadCommand: replica.ErrBadCommand,

	RefusedFeatureLevel:   replica.ErrFeatureLevel,
	RefusedUnknownCommand: replica.ErrUnknownCommand,
}

// RefusalOf returns the refusal for an FSM result error (nil: NotRefused).
func RefusalOf(err error) Refusal {
	if err == nil {
		return NotRefused
	}
	for r, base := range refusalErrs {
		if errors.Is(err, base) {
			return r
		}
	}
	return RefusedOther
}

// Err returns the error a refusal stands for, with the remote side's
// message as detail; errors.Is finds replica's sentinel in it. NotRefused
// gives nil.
func (r Refusal) Err(detail string) error {
	if r == NotRefused {
		return nil
	}
	base, ok := refusalErrs[r]
	if !ok {
		return fmt.Errorf("keel: command refused (code %d): %s", uint8(r), detail)
	}
	if detail == "" {
		return base
	}
	return &refusedError{base: base, detail: detail}
}

// refusedError reads as the remote message (which already starts with the
// sentinel's text) and unwraps to the sentinel.
type refusedError struct {
	base   error
	detail string
}

func (e *refusedError) Error() string { return e.detail }
func (e *refusedError) Unwrap() error { return e.base }

// Errno is the NBD error a client sees for a refusal: a fenced writer or a
// held volume EPERM, a range past the end ENOSPC, anything else EIO.
func (r Refusal) Errno() nbd.Errno {
	switch r {
	case NotRefused:
		return 0
	case RefusedStaleEpoch, RefusedWriterHeld:
		return nbd.EPERM
	case RefusedOutOfRange:
		return nbd.ENOSPC
	}
	return nbd.EIO
}

// NBDError maps an FSM result error to what the NBD client sees, keeping
// the cause: errors.Is finds both the errno and replica's sentinel.
func NBDError(err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%w: %w", RefusalOf(err).Errno(), err)
}

func (r Refusal) String() string {
	switch r {
	case NotRefused:
		return "not refused"
	case RefusedStaleEpoch:
		return "stale epoch"
	case RefusedWriterHeld:
		return "writer held"
	case RefusedOutOfRange:
		return "out of range"
	case RefusedBadCommand:
		return "bad command"
	case RefusedFeatureLevel:
		return "feature level"
	case RefusedUnknownCommand:
		return "unknown command"
	}
	return "other"
}
