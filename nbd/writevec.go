package nbd

import (
	"crypto/tls"
	"net"
)

// gatherMax bounds one gathered write on a connection without writev.
const gatherMax = 256 << 10

// writeVec writes v to nc: in one writev where nc has one (TCP and unix
// sockets), otherwise (TLS) gathered into as few Writes as fit in
// gatherMax bytes each, since each Write there makes at least one record,
// and a 16-byte header in a record of its own costs about as much as a
// 16 KiB one. scratch is reused between calls. It reports how much was
// written.
func writeVec(nc net.Conn, v net.Buffers, scratch *[]byte) (int64, error) {
	return WriteBuffers(nc, v, scratch)
}

// WriteBuffers is writeVec for the other users of Keel's connections (the
// apply stream): v in one writev on a socket, gathered into few records on
// a TLS connection.
func WriteBuffers(nc net.Conn, v net.Buffers, scratch *[]byte) (int64, error) {
	if _, ok := nc.(*tls.Conn); !ok {
		return v.WriteTo(nc)
	}
	return gather(v, scratch, nc.Write)
}

// gather writes bufs through write, copying runs of them into scratch so
// that each write carries up to gatherMax bytes; a buffer of gatherMax or
// more goes out on its own, uncopied.
func gather(bufs [][]byte, scratch *[]byte, write func([]byte) (int, error)) (int64, error) {
	var n int64
	buf := (*scratch)[:0]
	flush := func() error {
		if len(buf) == 0 {
			return nil
		}
		m, err := write(buf)
		n += int64(m)
		buf = buf[:0]
		return err
	}
	for _, b := range bufs {
		if len(buf)+len(b) > gatherMax {
			if err := flush(); err != nil {
				return n, err
			}
			if len(b) >= gatherMax {
				m, err := write(b)
				n += int64(m)
				if err != nil {
					return n, err
				}
				continue
			}
		}
		buf = append(buf, b...)
	}
	err := flush()
	if cap(buf) <= 2*gatherMax { // append may have grown it past the bound
		*scratch = buf[:0]
	}
	return n, err
}
