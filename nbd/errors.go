package nbd

import (
	"errors"
	"fmt"
	"syscall"
)

// Errno is an error value of the NBD protocol, as sent in a reply.
type Errno uint32

// The error values the protocol defines. Their numbers match Linux errno.
const (
	EPERM     Errno = 1
	EIO       Errno = 5
	ENOMEM    Errno = 12
	EINVAL    Errno = 22
	ENOSPC    Errno = 28
	EOVERFLOW Errno = 75
	ENOTSUP   Errno = 95
	ESHUTDOWN Errno = 108
)

func (e Errno) Error() string {
	switch e {
	case EPERM:
		return "nbd: operation not permitted"
	case EIO:
		return "nbd: input/output error"
	case ENOMEM:
		return "nbd: cannot allocate memory"
	case EINVAL:
		return "nbd: invalid argument"
	case ENOSPC:
		return "nbd: no space left on device"
	case EOVERFLOW:
		return "nbd: value too large"
	case ENOTSUP:
		return "nbd: operation not supported"
	case ESHUTDOWN:
		return "nbd: server is shutting down"
	}
	return fmt.Sprintf("nbd: error %d", uint32(e))
}

// Sentinel errors a Backend may return (wrapped or not).
var (
	// ErrNotFast is returned by Backend.Zero when the caller asked for a
	// fast zero and the backend cannot do better than writing zeroes.
	ErrNotFast = errors.New("nbd: zeroing this range would not be fast")
	// ErrReadOnly is returned for a write to a read-only backend.
	ErrReadOnly = errors.New("nbd: export is read-only")
)

// ErrnoOf maps any error to the protocol's error value. This is the one place
// where Go errors become NBD error codes.
func ErrnoOf(err error) Errno {
	if err == nil {
		return 0
	}
	var e Errno
	if errors.As(err, &e) {
		return e
	}
	switch {
	case errors.Is(err, ErrNotFast):
		return ENOTSUP
	case errors.Is(err, ErrReadOnly):
		return EPERM
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EROFS):
		return EPERM
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return ENOSPC
	case errors.Is(err, syscall.ENOMEM):
		return ENOMEM
	case errors.Is(err, syscall.EINVAL):
		return EINVAL
	case errors.Is(err, syscall.EOVERFLOW):
		return EOVERFLOW
	case errors.Is(err, syscall.ENOTSUP), errors.Is(err, syscall.EOPNOTSUPP):
		return ENOTSUP
	case errors.Is(err, syscall.ESHUTDOWN):
		return ESHUTDOWN
	}
	return EIO
}

// ProtocolError is a violation by the peer that ends the connection (a hard
// disconnect in the protocol's words).
type ProtocolError struct {
	What string
}

func (e *ProtocolError) Error() string { return "nbd: protocol violation: " + e.What }

func protoErrorf(format string, args ...any) error {
	return &ProtocolError{What: fmt.Sprintf(format, args...)}
}
