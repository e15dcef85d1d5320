package upgrade

import (
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// sock is one end of the handover socketpair (SOCK_SEQPACKET: one message
// per packet, boundaries kept).
type sock struct {
	c   *net.UnixConn
	buf []byte
}

// socketpair returns the parent's end and the child's end as a file to
// pass through tableflip.
func socketpair() (*sock, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("upgrade: socketpair: %w", err)
	}
	for _, fd := range fds {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 2*maxMsg)
	}
	child := os.NewFile(uintptr(fds[1]), "keel-handover-child")
	parent, err := fileSock(os.NewFile(uintptr(fds[0]), "keel-handover-parent"))
	if err != nil {
		child.Close()
		return nil, nil, err
	}
	return parent, child, nil
}

// fileSock wraps f (which it closes: the socket keeps a duplicate).
func fileSock(f *os.File) (*sock, error) {
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("upgrade: handover socket: %w", err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("upgrade: handover socket is a %T, not a unix socket", c)
	}
	return &sock{c: uc, buf: make([]byte, maxMsg+64)}, nil
}

func (s *sock) Close() error { return s.c.Close() }

// send writes m, with f's descriptor attached when f is not nil.
func (s *sock) send(m msg, f *os.File) error {
	b := appendMsg(nil, m)
	if len(b) > maxMsg {
		return fmt.Errorf("upgrade: handover message of %d bytes exceeds %d", len(b), maxMsg)
	}
	var oob []byte
	if f != nil {
		oob = unix.UnixRights(int(f.Fd()))
	}
	if _, _, err := s.c.WriteMsgUnix(b, oob, nil); err != nil {
		return fmt.Errorf("upgrade: sending %q: %w", m.kind, err)
	}
	return nil
}

// errPeerGone is what recv returns once the other end has closed.
var errPeerGone = errors.New("upgrade: the other process closed the handover socket")

// recv reads one message and the descriptor it carries, if any. The
// payload is a copy.
func (s *sock) recv() (msg, *os.File, error) {
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := s.c.ReadMsgUnix(s.buf, oob)
	if err != nil {
		return msg{}, nil, fmt.Errorf("upgrade: reading the handover socket: %w", err)
	}
	var f *os.File
	if oobn > 0 {
		cms, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return msg{}, nil, fmt.Errorf("upgrade: handover control message: %w", err)
		}
		var fds []int
		for _, cm := range cms {
			got, err := unix.ParseUnixRights(&cm)
			if err == nil {
				fds = append(fds, got...)
			}
		}
		for i, fd := range fds {
			if i == 0 {
				unix.CloseOnExec(fd)
				f = os.NewFile(uintptr(fd), "keel-handed-over")
			} else {
				unix.Close(fd)
			}
		}
	}
	if n == 0 && f == nil {
		return msg{}, nil, errPeerGone
	}
	m, err := parseMsg(s.buf[:n])
	if err != nil {
		if f != nil {
			f.Close()
		}
		return msg{}, nil, err
	}
	m.payload = append([]byte(nil), m.payload...)
	if (m.kind == kindConn) != (f != nil) {
		if f != nil {
			f.Close()
		}
		return msg{}, nil, fmt.Errorf("%w: %q with %d descriptors", ErrBadMessage, m.kind, len(m.payload))
	}
	return m, f, nil
}
