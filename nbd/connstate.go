package nbd

// ConnState is what a connection in transmission negotiated, and the bytes
// its reader had read ahead of the last request it handled: enough for
// another process to resume it (Server.ResumeConn) with the client none the
// wiser.
//
// Encoded (AppendConnState, ParseConnState), big endian:
//
//	byte 0        version (1)
//	byte 1        bit 0 structured replies, bit 1 extended headers,
//	              bit 2 the client asked for block sizes (bits 3-7 zero)
//	bytes 2-3     transmission flags sent to the client
//	bytes 4-7     meta context id of base:allocation (0: none)
//	bytes 8-19    block sizes advertised: minimum, preferred, maximum
//	bytes 20-21   export name length n (at most 4096)
//	n bytes       export name
//	4 bytes       read-ahead length m
//	m bytes       read-ahead: the start of requests not yet handled
type ConnState struct {
	Export          string
	Structured      bool
	Extended        bool
	BlockSizeAgreed bool
	Flags           uint16
	MetaContextID   uint32
	BlockSize       BlockSize
	ReadAhead       []byte
}

// connStateVersion is the version byte of an encoded ConnState.
const connStateVersion = 1

const (
	csStructured = 1 << iota
	csExtended
	csBlockSizeAgreed
)

// maxReadAhead bounds the read-ahead a state may carry: a connection's
// read buffer, plus what is left of the read-ahead it was resumed with.
const maxReadAhead = 128 << 10

// AppendConnState appends st's encoding to b.
func AppendConnState(b []byte, st ConnState) []byte {
	var bits byte
	if st.Structured {
		bits |= csStructured
	}
	if st.Extended {
		bits |= csExtended
	}
	if st.BlockSizeAgreed {
		bits |= csBlockSizeAgreed
	}
	b = append(b, connStateVersion, bits)
	b = be.AppendUint16(b, st.Flags)
	b = be.AppendUint32(b, st.MetaContextID)
	b = be.AppendUint32(b, st.BlockSize.Minimum)
	b = be.AppendUint32(b, st.BlockSize.Preferred)
	b = be.AppendUint32(b, st.BlockSize.Maximum)
	b = be.AppendUint16(b, uint16(len(st.Export)))
	b = append(b, st.Export...)
	b = be.AppendUint32(b, uint32(len(st.ReadAhead)))
	return append(b, st.ReadAhead...)
}

// ParseConnState decodes an encoded ConnState; ReadAhead is a copy.
func ParseConnState(b []byte) (ConnState, error) {
	var st ConnState
	if len(b) < 22 {
		return st, malformed("connection state length")
	}
	if b[0] != connStateVersion {
		return st, malformed("connection state version")
	}
	bits := b[1]
	if bits&^(csStructured|csExtended|csBlockSizeAgreed) != 0 {
		return st, malformed("connection state bits")
	}
	st.Structured = bits&csStructured != 0
	st.Extended = bits&csExtended != 0
	st.BlockSizeAgreed = bits&csBlockSizeAgreed != 0
	if st.Extended && !st.Structured {
		return st, malformed("connection state: extended headers without structured replies")
	}
	st.Flags = be.Uint16(b[2:])
	st.MetaContextID = be.Uint32(b[4:])
	st.BlockSize = BlockSize{be.Uint32(b[8:]), be.Uint32(b[12:]), be.Uint32(b[16:])}
	n := int(be.Uint16(b[20:]))
	if n > maxExportNameLen {
		return st, malformed("connection state export name length")
	}
	b = b[22:]
	if len(b) < n+4 {
		return st, malformed("connection state export name")
	}
	st.Export = string(b[:n])
	b = b[n:]
	m := be.Uint32(b)
	b = b[4:]
	if m > maxReadAhead || uint32(len(b)) != m {
		return st, malformed("connection state read-ahead length")
	}
	if m > 0 {
		st.ReadAhead = append([]byte(nil), b...)
	}
	return st, nil
}

// maxExportNameLen bounds an export name, as the spec does.
const maxExportNameLen = 4096
