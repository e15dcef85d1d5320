package nbd

// TLS for NBD: NBD_OPT_STARTTLS upgrades the connection in the middle of
// the option haggling, as qemu-nbd and nbdkit do it. The server runs in
// one of the spec's three modes (TLSMode); tlsDecide is the pure decision
// of what an option gets before the session is secured, and the handshake
// (handshake.go) acts on it. The client side is in client.go.
//
// After STARTTLS is acknowledged both ends run the TLS handshake on the
// raw socket, then the option haggling starts over on the TLS connection:
// what was negotiated in plain text (structured replies, extended
// headers, a metadata context) is forgotten, as a man in the middle could
// have chosen it.

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
)

// TLSMode says whether a server offers TLS and whether it insists on it,
// as nbdkit's --tls off|on|require.
type TLSMode uint8

const (
	// TLSOff (the spec's NOTLS): NBD_OPT_STARTTLS is refused with
	// NBD_REP_ERR_UNSUP and everything is in plain text.
	TLSOff TLSMode = iota
	// TLSOn: STARTTLS is accepted, and clients that do not ask for it
	// are served in plain text too (SELECTIVETLS with no TLS-only
	// export). Only for a migration to TLSRequire: a man in the middle
	// can strip the STARTTLS.
	TLSOn
	// TLSRequire (FORCEDTLS): every option but STARTTLS and ABORT sent
	// before TLS is refused with NBD_REP_ERR_TLS_REQD, and an
	// NBD_OPT_EXPORT_NAME before TLS, which cannot be refused, ends the
	// connection.
	TLSRequire
)

func (m TLSMode) String() string {
	switch m {
	case TLSOff:
		return "off"
	case TLSOn:
		return "on"
	case TLSRequire:
		return "require"
	}
	return fmt.Sprintf("TLSMode(%d)", uint8(m))
}

// ParseTLSMode parses "off", "on" or "require" (as nbdkit's --tls).
func ParseTLSMode(s string) (TLSMode, error) {
	switch strings.ToLower(s) {
	case "off":
		return TLSOff, nil
	case "on":
		return TLSOn, nil
	case "require":
		return TLSRequire, nil
	}
	return 0, fmt.Errorf("nbd: TLS mode %q: must be off, on or require", s)
}

// tlsVerdict is what the TLS policy makes of one option.
type tlsVerdict uint8

const (
	tlsProceed       tlsVerdict = iota // handle the option as usual
	tlsStart                           // acknowledge STARTTLS and run the TLS handshake
	tlsRefuseUnsup                     // STARTTLS on a server without TLS: NBD_REP_ERR_UNSUP
	tlsRefuseInvalid                   // a second STARTTLS, or one with data: NBD_REP_ERR_INVALID
	tlsRefuseReqd                      // before TLS under TLSRequire: NBD_REP_ERR_TLS_REQD
	tlsHangUp                          // EXPORT_NAME before TLS under TLSRequire: end the connection
)

// tlsDecide is a pure decision: what option gets from a server in mode
// whose session is (secured) or is not yet under TLS, given the length of
// the option's data.
func tlsDecide(mode TLSMode, secured bool, option uint32, dataLen uint32) tlsVerdict {
	if option == OptStartTLS {
		switch {
		case mode == TLSOff:
			return tlsRefuseUnsup
		case secured || dataLen != 0:
			return tlsRefuseInvalid
		}
		return tlsStart
	}
	if mode != TLSRequire || secured || option == OptAbort {
		return tlsProceed
	}
	if option == OptExportName {
		return tlsHangUp
	}
	return tlsRefuseReqd
}

// ErrTLSRequired ends a connection whose client chose an export with
// NBD_OPT_EXPORT_NAME before TLS on a server that requires it (the option
// cannot be refused, so the server hangs up).
var ErrTLSRequired = errors.New("nbd: TLS is required")

// errTLSHandshake wraps a failed TLS handshake after STARTTLS: the
// connection is closed, it cannot go back to plain text.
var errTLSHandshake = errors.New("nbd: TLS handshake failed")

// errNotTLSDetachable is returned when a TLS connection is asked to hand itself over
// to another process: its session keys and record sequence numbers live in
// this process's crypto/tls state, which cannot be exported.
var errNotTLSDetachable = fmt.Errorf("%w: a TLS session cannot leave this process", ErrNotDetachable)

// hsConn is the connection the handshake reads and writes: the raw
// socket, then the TLS connection over it after STARTTLS.
type hsConn struct {
	nc      net.Conn
	br      *bufio.Reader
	bw      *bufio.Writer
	secured bool
	// refusedTLS counts options refused with NBD_REP_ERR_TLS_REQD.
	refusedTLS int
}

// startTLS runs the server side of the TLS handshake on hc after STARTTLS
// was acknowledged, and replaces hc's connection by the TLS one. Bytes the
// client sent early (already in br) are the start of its ClientHello.
func (s *Server) startTLS(ctx context.Context, hc *hsConn) error {
	raw := hc.nc
	if n := hc.br.Buffered(); n > 0 {
		early, _ := hc.br.Peek(n)
		raw = &prefixConn{Conn: hc.nc, pre: &prefixReader{pre: append([]byte(nil), early...), r: hc.nc}}
	}
	tc := tls.Server(raw, s.cfg.TLSConfig)
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("%w: %w", errTLSHandshake, err)
	}
	hc.nc = tc
	hc.br = bufio.NewReaderSize(tc, 64<<10)
	hc.bw = bufio.NewWriterSize(tc, 4<<10)
	hc.secured = true
	return nil
}

// prefixConn is a net.Conn whose reads start with bytes read ahead of it.
type prefixConn struct {
	net.Conn
	pre *prefixReader
}

func (p *prefixConn) Read(b []byte) (int, error) { return p.pre.Read(b) }

// clientStartTLS runs STARTTLS from the client: the option, then the TLS
// handshake; the Client's connection becomes the TLS one. The server's
// refusal is an error: a client configured for TLS never falls back to
// plain text (the spec's advice against downgrades).
func (c *Client) clientStartTLS(ctx context.Context) error {
	if err := c.option(OptStartTLS, nil, nil); err != nil {
		var oe *OptionError
		if errors.As(err, &oe) {
			c.abort()
			return fmt.Errorf("nbd: server %s refused TLS: %w", remoteAddr(c.nc), err)
		}
		return fmt.Errorf("nbd: handshake (NBD_OPT_STARTTLS): %w", err)
	}
	if c.br.Buffered() != 0 {
		return fmt.Errorf("nbd: handshake: %w", protoErrorf("server sent %d bytes in plain text after acknowledging NBD_OPT_STARTTLS", c.br.Buffered()))
	}
	cfg := c.cfg.TLS
	if cfg.ServerName == "" && !cfg.InsecureSkipVerify {
		cfg = cfg.Clone()
		cfg.ServerName = c.serverName
	}
	tc := tls.Client(c.nc, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("nbd: TLS handshake with %s: %w", remoteAddr(c.nc), err)
	}
	c.nc = tc
	c.br = bufio.NewReaderSize(tc, clientReadBuffer)
	c.secured = true
	return nil
}

// hostOf is the host part of a HOST:PORT address (the address itself if
// it has no port): the name a TLS client checks the server's certificate
// against.
func hostOf(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}
