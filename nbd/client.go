package nbd

// The client side of a connection: the fixed newstyle handshake (falling
// back from NBD_OPT_GO to NBD_OPT_EXPORT_NAME, and from structured to simple
// replies, for older servers), then the transmission phase with many
// requests in flight at once.
//
// Requests are written by the calling goroutines, one at a time (header and
// payload in one writev). One reader goroutine reads every reply and hands
// it to the call waiting for it, found by cookie. A read's data goes straight
// from the socket's read buffer into the caller's buffer, under a per-call
// lock, so a call that gave up (its context ended) is never written to once
// it has returned: the reader then reads the data and drops it.
//
// Anything the server sends that breaks the protocol (a bad magic, an
// unknown cookie, a chunk outside its request, a length out of bounds)
// kills the connection: every pending and later call fails with an error
// wrapping ErrConnClosed, and Done is closed. A caller such as the proxy can
// then retry on another server.

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/hashicorp/go-hclog"
)

// ErrConnClosed is wrapped by the error of every call that failed because
// the connection is gone (the server hung up, broke the protocol, is
// shutting down, or Close was called), and by Err. The request may or may
// not have been carried out; retrying it elsewhere is the caller's choice.
var ErrConnClosed = errors.New("nbd: connection closed")

// ClientConfig configures a Client. Zero fields take the documented
// defaults.
type ClientConfig struct {
	// Export is the name of the export to use; "" asks for the server's
	// default export. At most 4096 bytes, no NUL. Default "".
	Export string
	// NoStructured skips negotiating structured replies. By default the
	// client asks for them (they carry error messages, sparse reads and
	// block status) and falls back to simple replies when the server
	// refuses. Default false.
	NoStructured bool
	// MetaContext selects the base:allocation metadata context so that
	// BlockStatus works. It needs structured replies; when the server
	// refuses either, the connection is still made and BlockStatus fails
	// with ENOTSUP. Default false.
	MetaContext bool
	// NoFragment sends every read with NBD_CMD_FLAG_DF once structured
	// replies are in use: the server answers it with one data chunk and
	// does not look for holes in the range first (a keel server would
	// otherwise SEEK_DATA/SEEK_HOLE its image for every read of 64 KiB
	// or more, which on tmpfs walks the file to its end). For a client
	// that wants the bytes, such as keel proxy. Default false.
	NoFragment bool
	// HandshakeTimeout bounds connecting (Dial) and, separately, the
	// whole option negotiation. Default 30s; range 1s to 1h.
	HandshakeTimeout time.Duration
	// CloseTimeout bounds how long Close waits for requests in flight to
	// be answered before it hangs up anyway. Default 30s; range 1ms to 1h.
	CloseTimeout time.Duration
	// MaxInFlight is the number of requests the connection has in flight
	// at once; callers beyond it wait for a slot. A request split into
	// several (see ReadAt) takes one slot per piece. Default 64; range 1
	// to 4096.
	MaxInFlight int
	// Logger receives one line per connection event worth an operator's
	// attention (fallbacks in the handshake, the connection dying).
	// Default: hclog.NewNullLogger().
	Logger hclog.Logger
	// TLS, when set, makes the client send NBD_OPT_STARTTLS before any
	// other option and run the rest of the connection over TLS with this
	// configuration (its RootCAs check the server; Certificates holds
	// the client's own, for servers that verify peers). A server that
	// refuses STARTTLS is an error: the client never falls back to plain
	// text. An empty ServerName is the host the client dials (Dial), or
	// the host of the connection's remote address (NewClient). Default
	// nil: no TLS.
	TLS *tls.Config
}

func (c ClientConfig) withDefaults() ClientConfig {
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = 30 * time.Second
	}
	if c.CloseTimeout == 0 {
		c.CloseTimeout = 30 * time.Second
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = 64
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	return c
}

// Validate checks the configuration; errors name the bad field and the
// allowed range.
func (c ClientConfig) Validate() error {
	c = c.withDefaults()
	if err := checkString(c.Export); err != nil {
		return fmt.Errorf("nbd: ClientConfig.Export: %w", err)
	}
	if c.HandshakeTimeout < time.Second || c.HandshakeTimeout > time.Hour {
		return fmt.Errorf("nbd: ClientConfig.HandshakeTimeout %v: must be from 1s to 1h", c.HandshakeTimeout)
	}
	if c.CloseTimeout < time.Millisecond || c.CloseTimeout > time.Hour {
		return fmt.Errorf("nbd: ClientConfig.CloseTimeout %v: must be from 1ms to 1h", c.CloseTimeout)
	}
	if c.MaxInFlight < 1 || c.MaxInFlight > 4096 {
		return fmt.Errorf("nbd: ClientConfig.MaxInFlight %d: must be from 1 to 4096", c.MaxInFlight)
	}
	return nil
}

// ServerError is the server's error reply to one request. It unwraps to its
// Errno, so errors.Is(err, nbd.EPERM) and errors.As(err, &errno) work; an
// ESHUTDOWN reply also unwraps to ErrConnClosed, since the server refused
// the request only because it is going away.
type ServerError struct {
	Command uint16 // CmdRead, CmdWrite, ...
	Offset  uint64
	Length  uint64
	Errno   Errno
	// Message is the text of the server's error chunk; empty with simple
	// replies.
	Message string
}

func (e *ServerError) Error() string {
	s := fmt.Sprintf("nbd: server failed %s of %d bytes at offset %d: %s",
		cmdName(e.Command), e.Length, e.Offset, strings.TrimPrefix(e.Errno.Error(), "nbd: "))
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

func (e *ServerError) Unwrap() []error {
	if e.Errno == ESHUTDOWN {
		return []error{e.Errno, ErrConnClosed}
	}
	return []error{e.Errno}
}

// OptionError is the server's refusal of a handshake option.
type OptionError struct {
	Option  uint32 // OptGo, OptStructuredReply, ...
	Type    uint32 // RepErrUnsup, RepErrUnknown, ...
	Message string // the server's text, if any
}

func (e *OptionError) Error() string {
	if e.Message == "" {
		return repName(e.Type)
	}
	return e.Message + " (" + repName(e.Type) + ")"
}

// Client is one connection to an NBD server. Its methods are safe for
// concurrent use by many goroutines; requests from different goroutines are
// in flight together and the server may answer them in any order.
//
// Requests are checked before they are sent: a range past the end of the
// export, or not aligned to the server's minimum block size, fails with an
// error wrapping EINVAL (ENOSPC for writes and zeroes past the end) and
// nothing is sent. Reads and writes larger than the server's maximum are
// split into several requests, sent together.
type Client struct {
	cfg ClientConfig
	nc  net.Conn // the TLS connection over the socket once STARTTLS is done
	br  *bufio.Reader
	log hclog.Logger

	serverName string // what the server's certificate is checked against
	secured    bool   // TLS is in use

	// Negotiated in the handshake; read-only afterwards.
	size       uint64
	flags      uint16
	bs         BlockSize
	structured bool
	hasMeta    bool
	metaID     uint32
	maxIO      uint64 // longest READ, WRITE or CACHE
	maxZero    uint64 // longest WRITE_ZEROES without FAST_ZERO

	slots chan struct{} // one token per request in flight
	wlock chan struct{} // held (one token) while requests are written

	wmu      sync.Mutex // guards wqueue, wspare and writing
	wqueue   []*call    // registered requests waiting to be written, oldest first
	wspare   []*call    // a drained queue's backing array, for reuse
	wscratch []byte     // gathers a batch where the connection has no writev (TLS); wlock's holder only
	writing  bool       // a goroutine is writing wqueue out

	sentRequests atomic.Uint64 // requests written whole
	sentBatches  atomic.Uint64 // writevs that carried them

	mu       sync.Mutex // guards the following
	pending  map[uint64]*call
	cookie   uint64        // the last cookie used
	closing  error         // set when no new request may start; wraps ErrConnClosed
	idle     chan struct{} // closed when pending empties while closing
	discIdle bool          // send NBD_CMD_DISC once pending empties (after ESHUTDOWN)
	err      error         // why the connection died; wraps ErrConnClosed
	dead     chan struct{} // closed when err is set

	discOnce sync.Once
	// hangup runs the disconnect the reader decides on (after ESHUTDOWN)
	// on its own goroutine, so the reader never blocks writing; the
	// reader waits for it before closing done.
	hangup sync.WaitGroup
	done   chan struct{} // closed when the reader goroutine has returned
}

// Size limits of the client.
const (
	// clientReadBuffer is the socket read buffer, and the most data copied
	// into a caller's buffer under its call's lock at once.
	clientReadBuffer = 128 << 10
	// maxUnpayloaded is the longest TRIM, fast WRITE_ZEROES or
	// BLOCK_STATUS sent in one request: a power of 2 (so a multiple of any
	// minimum block size) that fits the 32-bit length.
	maxUnpayloaded = 1 << 31
	// maxOptionReplies bounds the replies to one option, so a server
	// cannot keep the handshake busy forever within its timeout.
	maxOptionReplies = 4096
	// maxReadSpans bounds the pieces a read's reply may be in while it is
	// assembled out of order.
	maxReadSpans = 4096
	// discTimeout bounds writing NBD_CMD_DISC when hanging up.
	discTimeout = 5 * time.Second
)

var errServerShutdown = errors.New("the server is shutting down")

// oldstyleMagic follows NBDMAGIC in the greeting of an oldstyle server.
const oldstyleMagic uint64 = 0x00420281861253

// Dial connects to an NBD server on network ("tcp", "tcp4", "tcp6" or
// "unix") and runs the handshake. HandshakeTimeout bounds each.
func Dial(ctx context.Context, network, addr string, cfg ClientConfig) (*Client, error) {
	switch network {
	case "tcp", "tcp4", "tcp6", "unix":
	default:
		return nil, fmt.Errorf("nbd: dial: network %q: must be tcp, tcp4, tcp6 or unix", network)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, cfg.withDefaults().HandshakeTimeout)
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(dctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("nbd: dial %s %s: %w", network, addr, err)
	}
	if cfg.TLS != nil && cfg.TLS.ServerName == "" && network != "unix" {
		cfg.TLS = cfg.TLS.Clone()
		cfg.TLS.ServerName = hostOf(addr)
	}
	return NewClient(ctx, nc, cfg)
}

// NewClient runs the handshake on nc, a connection to a server that has not
// yet sent its greeting, and returns the Client that owns nc from then on.
// On failure nc is closed. ctx bounds the handshake only.
func NewClient(ctx context.Context, nc net.Conn, cfg ClientConfig) (*Client, error) {
	if err := cfg.Validate(); err != nil {
		nc.Close()
		return nil, err
	}
	cfg = cfg.withDefaults()
	c := &Client{
		cfg:     cfg,
		nc:      nc,
		br:      bufio.NewReaderSize(nc, clientReadBuffer),
		log:     cfg.Logger.With("server", remoteAddr(nc)),
		slots:   make(chan struct{}, cfg.MaxInFlight),
		wlock:   make(chan struct{}, 1),
		pending: map[uint64]*call{},
		dead:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	if a := nc.RemoteAddr(); a != nil && a.Network() != "unix" {
		c.serverName = hostOf(a.String())
	}
	if err := ctx.Err(); err != nil {
		nc.Close()
		return nil, fmt.Errorf("nbd: handshake with %s: %w", remoteAddr(nc), err)
	}
	_ = nc.SetDeadline(time.Now().Add(cfg.HandshakeTimeout))
	stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Unix(1, 0)) })
	err := c.handshake(ctx)
	if !stop() {
		nc.Close()
		return nil, fmt.Errorf("nbd: handshake with %s: %w", remoteAddr(nc), ctx.Err())
	}
	if err != nil {
		nc.Close()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil, fmt.Errorf("nbd: handshake with %s timed out after %v: %w", remoteAddr(nc), cfg.HandshakeTimeout, err)
		}
		return nil, err
	}
	_ = nc.SetDeadline(time.Time{})
	c.log.Debug("connected", "export", cfg.Export, "size", c.size, "flags", fmt.Sprintf("%#x", c.flags),
		"structured", c.structured, "base_allocation", c.hasMeta,
		"block_size", fmt.Sprintf("%d/%d/%d", c.bs.Minimum, c.bs.Preferred, c.bs.Maximum))
	go c.readLoop()
	return c, nil
}

// TLS reports whether the connection runs over TLS.
func (c *Client) TLS() bool { return c.secured }

func remoteAddr(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" {
		return a.String()
	}
	return "?"
}

// Size is the export's size in bytes.
func (c *Client) Size() uint64 { return c.size }

// ClientStats count what a Client wrote.
type ClientStats struct {
	// Requests is how many requests were written whole; Batches how many
	// writes (one writev each) carried them. Requests that are issued
	// while another batch is being written go out together, so
	// Requests/Batches is how well concurrent requests were coalesced.
	Requests, Batches uint64
	// Waiting is how many requests wait to be written now (while the
	// server does not read fast enough, or while a batch is going out).
	Waiting int
}

// Stats says what the Client has written so far.
func (c *Client) Stats() ClientStats {
	c.wmu.Lock()
	waiting := len(c.wqueue)
	c.wmu.Unlock()
	return ClientStats{Requests: c.sentRequests.Load(), Batches: c.sentBatches.Load(), Waiting: waiting}
}

// Flags are the transmission flags the server sent (TFlag...).
func (c *Client) Flags() uint16 { return c.flags }

// BlockSize is the server's block size constraints as advertised, or the
// defaults 1/4096/32 MiB when it sent none. A Maximum of 0xffffffff means no
// limit; the client still sends at most 32 MiB of payload per request.
func (c *Client) BlockSize() BlockSize { return c.bs }

// Structured reports whether structured replies are in use.
func (c *Client) Structured() bool { return c.structured }

// MetaContext reports whether base:allocation was selected, so BlockStatus
// can work.
func (c *Client) MetaContext() bool { return c.hasMeta }

// Done is closed when the connection has ended (it died, or Close was
// called) and the reader goroutine has returned.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err says why the connection ended; nil while it is alive. The error wraps
// ErrConnClosed and, where there is one, the cause (a *ProtocolError, an
// I/O error).
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (c *Client) has(flag uint16) bool {
	return c.flags&TFlagHasFlags != 0 && c.flags&flag != 0
}

// ---- Handshake ----

// handshake negotiates, then derives the request limits from what was
// agreed.
func (c *Client) handshake(ctx context.Context) error {
	gotBS, err := c.negotiate(ctx)
	if err != nil {
		return err
	}
	if !gotBS {
		c.bs = BlockSize{Minimum: 1, Preferred: 4096, Maximum: DefaultMaxPayload}
	} else if err := checkServerBlockSize(c.bs); err != nil {
		c.abort()
		return fmt.Errorf("nbd: handshake: %w", err)
	}
	m := uint64(c.bs.Minimum)
	c.maxIO = min(uint64(c.bs.Maximum), DefaultMaxPayload)
	c.maxIO -= c.maxIO % m
	c.maxZero = min(uint64(c.bs.Maximum), maxUnpayloaded)
	c.maxZero -= c.maxZero % m
	return nil
}

// negotiate runs the option haggling up to the transmission phase and
// reports whether the server sent its block sizes.
func (c *Client) negotiate(ctx context.Context) (gotBS bool, err error) {
	var g [18]byte
	if _, err := io.ReadFull(c.br, g[:]); err != nil {
		return false, fmt.Errorf("nbd: reading the greeting of %s: %w", remoteAddr(c.nc), err)
	}
	if be.Uint64(g[:]) == MagicNBD && be.Uint64(g[8:]) == oldstyleMagic {
		return false, fmt.Errorf("nbd: %s uses oldstyle negotiation, which this client does not support", remoteAddr(c.nc))
	}
	hflags, perr := ParseServerGreeting(g[:])
	if perr != nil {
		return false, fmt.Errorf("nbd: greeting of %s: %w", remoteAddr(c.nc), &ProtocolError{What: perr.Error()})
	}
	fixed := hflags&FlagFixedNewstyle != 0
	noZeroes := hflags&FlagNoZeroes != 0
	var cf uint32
	if fixed {
		cf |= ClientFixedNewstyle
	}
	if noZeroes {
		cf |= ClientNoZeroes
	}
	if _, err := c.nc.Write(be.AppendUint32(nil, cf)); err != nil {
		return false, fmt.Errorf("nbd: sending client flags: %w", err)
	}
	if !fixed {
		if c.cfg.TLS != nil {
			return false, fmt.Errorf("nbd: %s does not speak fixed newstyle negotiation, so it cannot do TLS", remoteAddr(c.nc))
		}
		// Plain newstyle allows no option but EXPORT_NAME.
		return false, c.exportName(noZeroes)
	}
	if c.cfg.TLS != nil {
		if err := c.clientStartTLS(ctx); err != nil {
			return false, err
		}
	}

	if !c.cfg.NoStructured {
		err := c.option(OptStructuredReply, nil, nil)
		var oe *OptionError
		switch {
		case err == nil:
			c.structured = true
		case errors.As(err, &oe) && !fatalRefusal(oe.Type):
			c.log.Info("server refused structured replies; using simple replies", "reply", oe.Error())
		default:
			return false, c.handshakeFailed(OptStructuredReply, err)
		}
	}

	if c.cfg.MetaContext {
		if c.structured {
			req := AppendMetaContextRequest(nil, MetaContextRequest{Export: c.cfg.Export, Queries: []string{MetaContextBaseAllocation}})
			var id uint32
			var got bool
			err := c.option(OptSetMetaContext, req, func(typ uint32, data []byte) error {
				if typ != RepMetaContext {
					return protoErrorf("reply type %s to NBD_OPT_SET_META_CONTEXT", repName(typ))
				}
				if len(data) < 4 {
					return protoErrorf("NBD_REP_META_CONTEXT of %d bytes", len(data))
				}
				if name := string(data[4:]); name != MetaContextBaseAllocation {
					return protoErrorf("server selected metadata context %q, which was not asked for", cleanMessage(data[4:]))
				}
				id, got = be.Uint32(data), true
				return nil
			})
			var oe *OptionError
			switch {
			case err == nil && got:
				c.hasMeta, c.metaID = true, id
			case err == nil:
				c.log.Info("server does not offer base:allocation; BlockStatus will fail")
			case errors.As(err, &oe) && !fatalRefusal(oe.Type):
				c.log.Info("server refused base:allocation; BlockStatus will fail", "reply", oe.Error())
			default:
				return false, c.handshakeFailed(OptSetMetaContext, err)
			}
		} else {
			c.log.Info("base:allocation needs structured replies, which are off; BlockStatus will fail")
		}
	}

	var gotExport bool
	req := AppendExportRequest(nil, ExportRequest{Name: c.cfg.Export, Infos: []uint16{InfoBlockSize}})
	err = c.option(OptGo, req, func(typ uint32, data []byte) error {
		if typ != RepInfo {
			return protoErrorf("reply type %s to NBD_OPT_GO", repName(typ))
		}
		if len(data) < 2 {
			return protoErrorf("NBD_REP_INFO of %d bytes", len(data))
		}
		switch be.Uint16(data) {
		case InfoExport:
			if len(data) != 12 {
				return protoErrorf("NBD_INFO_EXPORT of %d bytes, want 12", len(data))
			}
			c.size, c.flags, gotExport = be.Uint64(data[2:]), be.Uint16(data[10:]), true
		case InfoBlockSize:
			if len(data) != 14 {
				return protoErrorf("NBD_INFO_BLOCK_SIZE of %d bytes, want 14", len(data))
			}
			c.bs = BlockSize{Minimum: be.Uint32(data[2:]), Preferred: be.Uint32(data[6:]), Maximum: be.Uint32(data[10:])}
			gotBS = true
		}
		// Other information (name, description, types added later) is
		// not needed and, as the protocol asks, ignored.
		return nil
	})
	var oe *OptionError
	switch {
	case err == nil:
		if !gotExport {
			return false, fmt.Errorf("nbd: handshake: %w", protoErrorf("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"))
		}
	case errors.As(err, &oe) && oe.Type == RepErrUnsup:
		c.log.Info("server does not support NBD_OPT_GO; using NBD_OPT_EXPORT_NAME")
		gotBS = false
		if err := c.exportName(noZeroes); err != nil {
			return false, err
		}
	default:
		return false, c.handshakeFailed(OptGo, err)
	}
	return gotBS, nil
}

// handshakeFailed turns an error of option opt into the handshake's error,
// saying goodbye first when the server merely refused.
func (c *Client) handshakeFailed(opt uint32, err error) error {
	var oe *OptionError
	if !errors.As(err, &oe) {
		var pe *ProtocolError
		if errors.As(err, &pe) {
			return fmt.Errorf("nbd: handshake: %w", err)
		}
		return fmt.Errorf("nbd: handshake (%s): %w", optName(opt), err)
	}
	c.abort()
	switch {
	case opt == OptGo:
		return fmt.Errorf("nbd: server refused export %q: %w", c.cfg.Export, err)
	case oe.Type == RepErrTLSReqd:
		return fmt.Errorf("nbd: server requires TLS and this client is not configured for it: %w", err)
	case oe.Type == RepErrShutdown:
		return fmt.Errorf("nbd: server is shutting down: %w", err)
	}
	return fmt.Errorf("nbd: server refused %s: %w", optName(opt), err)
}

// fatalRefusal reports refusals that end the handshake whatever the option:
// the server wants TLS, or is going away.
func fatalRefusal(typ uint32) bool { return typ == RepErrTLSReqd || typ == RepErrShutdown }

// abort sends NBD_OPT_ABORT (a soft disconnect) without waiting for the
// reply; the caller closes the connection.
func (c *Client) abort() {
	_ = c.nc.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = c.nc.Write(AppendOption(nil, OptAbort, nil))
}

// option sends one option and reads its replies up to the final one. Other
// replies go to each (nil: any is a protocol violation). It returns nil on
// NBD_REP_ACK and an *OptionError on a refusal.
func (c *Client) option(opt uint32, data []byte, each func(typ uint32, data []byte) error) error {
	if _, err := c.nc.Write(AppendOption(nil, opt, data)); err != nil {
		return err
	}
	var h [optReplyHeaderSize]byte
	for n := 0; ; n++ {
		if n >= maxOptionReplies {
			return protoErrorf("more than %d replies to %s", maxOptionReplies, optName(opt))
		}
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return err
		}
		rh, err := ParseOptionReplyHeader(h[:])
		if err != nil {
			return protoErrorf("reply to %s: %v", optName(opt), err)
		}
		if rh.Option != opt {
			return protoErrorf("reply to option %d while waiting for %s", rh.Option, optName(opt))
		}
		if rh.Length > MaxOptionLength {
			return protoErrorf("reply to %s of %d bytes", optName(opt), rh.Length)
		}
		d := make([]byte, rh.Length)
		if _, err := io.ReadFull(c.br, d); err != nil {
			return err
		}
		switch {
		case rh.Type == RepAck:
			return nil
		case IsRepErr(rh.Type):
			return &OptionError{Option: opt, Type: rh.Type, Message: cleanMessage(d)}
		case each == nil:
			return protoErrorf("reply type %s to %s", repName(rh.Type), optName(opt))
		}
		if err := each(rh.Type, d); err != nil {
			return err
		}
	}
}

// exportName ends the handshake with NBD_OPT_EXPORT_NAME, which a server
// that refuses can only answer by hanging up.
func (c *Client) exportName(noZeroes bool) error {
	if _, err := c.nc.Write(AppendOption(nil, OptExportName, []byte(c.cfg.Export))); err != nil {
		return fmt.Errorf("nbd: sending NBD_OPT_EXPORT_NAME: %w", err)
	}
	n := 10
	if !noZeroes {
		n += exportNameZeroPad
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(c.br, b); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || isConnReset(err) {
			return fmt.Errorf("nbd: server refused export %q: it hung up after NBD_OPT_EXPORT_NAME: %w", c.cfg.Export, err)
		}
		return fmt.Errorf("nbd: reading the reply to NBD_OPT_EXPORT_NAME: %w", err)
	}
	c.size, c.flags = be.Uint64(b), be.Uint16(b[8:])
	return nil
}

func checkServerBlockSize(bs BlockSize) error {
	pow2 := func(v uint32) bool { return v != 0 && v&(v-1) == 0 }
	if !pow2(bs.Minimum) || bs.Minimum > 1<<16 {
		return protoErrorf("server's minimum block size %d is not a power of 2 from 1 to 65536", bs.Minimum)
	}
	if bs.Maximum < bs.Minimum || (bs.Maximum != 0xffffffff && bs.Maximum%bs.Minimum != 0) {
		return protoErrorf("server's maximum block size %d is not a multiple of its minimum %d", bs.Maximum, bs.Minimum)
	}
	return nil
}

// ---- Commands ----

// ReadAt fills p from offset off of the export. Holes the server reports are
// zero-filled.
func (c *Client) ReadAt(ctx context.Context, p []byte, off uint64) error {
	if err := c.check(CmdRead, off, uint64(len(p)), EINVAL); err != nil || len(p) == 0 {
		return err
	}
	var flags uint16
	if c.cfg.NoFragment && c.structured {
		flags = CmdFlagDF
	}
	return c.run(ctx, CmdRead, flags, off, uint64(len(p)), c.maxIO, p)
}

// WriteAt writes p at offset off. With fua it returns only once the data is
// on stable storage (by NBD_CMD_FLAG_FUA, or a flush after the write when
// the server supports flushes but not FUA).
func (c *Client) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	if err := c.check(CmdWrite, off, uint64(len(p)), ENOSPC); err != nil || len(p) == 0 {
		return err
	}
	flags, flush := c.fua(fua)
	if err := c.run(ctx, CmdWrite, flags, off, uint64(len(p)), c.maxIO, p); err != nil {
		return err
	}
	if flush {
		return c.Flush(ctx)
	}
	return nil
}

// Flush returns once every write the server has answered is on stable
// storage. A server that does not advertise flushes has no volatile cache;
// then Flush sends nothing.
func (c *Client) Flush(ctx context.Context) error {
	if !c.has(TFlagSendFlush) {
		return c.alive()
	}
	_, err := c.do(ctx, CmdFlush, 0, 0, 0, nil)
	return err
}

// Trim discards [off, off+length): later reads may return anything until it
// is written again. It fails with ENOTSUP, unsent, when the server does not
// advertise trims (EPERM when the export is read-only).
func (c *Client) Trim(ctx context.Context, off, length uint64, fua bool) error {
	if err := c.check(CmdTrim, off, length, EINVAL); err != nil || length == 0 {
		return err
	}
	if !c.has(TFlagSendTrim) {
		return c.unsupported(CmdTrim, off, length, "the server does not support trims")
	}
	flags, flush := c.fua(fua)
	if err := c.run(ctx, CmdTrim, flags, off, length, maxUnpayloaded, nil); err != nil {
		return err
	}
	if flush {
		return c.Flush(ctx)
	}
	return nil
}

// Zero makes [off, off+length) read as zeroes. ZeroNoHole keeps the range
// allocated; ZeroFast fails with ENOTSUP unless the server can zero faster
// than by writing (and, unsent, when the server does not advertise fast
// zeroes); ZeroFUA is as for WriteAt. It fails with ENOTSUP, unsent, when
// the server does not advertise NBD_CMD_WRITE_ZEROES (EPERM when the export
// is read-only).
func (c *Client) Zero(ctx context.Context, off, length uint64, f ZeroFlags) error {
	if err := c.check(CmdWriteZeroes, off, length, ENOSPC); err != nil || length == 0 {
		return err
	}
	if !c.has(TFlagSendWriteZeroes) {
		return c.unsupported(CmdWriteZeroes, off, length, "the server does not support NBD_CMD_WRITE_ZEROES")
	}
	flags, flush := c.fua(f&ZeroFUA != 0)
	if f&ZeroNoHole != 0 {
		flags |= CmdFlagNoHole
	}
	max := c.maxZero
	if f&ZeroFast != 0 {
		if !c.has(TFlagSendFastZero) {
			return c.unsupported(CmdWriteZeroes, off, length, "the server does not support fast zeroes")
		}
		flags |= CmdFlagFastZero
		max = maxUnpayloaded // the maximum block size does not bind fast zeroes
	}
	if err := c.run(ctx, CmdWriteZeroes, flags, off, length, max, nil); err != nil {
		return err
	}
	if flush {
		return c.Flush(ctx)
	}
	return nil
}

// Cache asks the server to read [off, off+length) into its cache. It fails
// with ENOTSUP, unsent, when the server does not advertise NBD_CMD_CACHE.
func (c *Client) Cache(ctx context.Context, off, length uint64) error {
	if err := c.check(CmdCache, off, length, EINVAL); err != nil || length == 0 {
		return err
	}
	if !c.has(TFlagSendCache) {
		return c.unsupported(CmdCache, off, length, "the server does not support NBD_CMD_CACHE")
	}
	return c.run(ctx, CmdCache, 0, off, length, c.maxIO, nil)
}

// BlockStatus describes the allocation of the export from off in
// base:allocation extents (StateHole, StateZero): consecutive, nonzero, at
// least one, and covering at most length bytes (possibly fewer: call again
// from where they end). With reqOne the server sends a single extent. It
// fails with ENOTSUP, unsent, when base:allocation was not negotiated.
func (c *Client) BlockStatus(ctx context.Context, off, length uint64, reqOne bool) ([]Extent, error) {
	if length == 0 {
		return nil, fmt.Errorf("nbd: BLOCK_STATUS of 0 bytes at offset %d: %w", off, EINVAL)
	}
	if err := c.check(CmdBlockStatus, off, length, EINVAL); err != nil {
		return nil, err
	}
	if !c.hasMeta {
		return nil, c.unsupported(CmdBlockStatus, off, length, "base:allocation was not negotiated (ClientConfig.MetaContext needs a server that supports it and structured replies)")
	}
	var flags uint16
	if reqOne {
		flags = CmdFlagReqOne
	}
	cl, err := c.do(ctx, CmdBlockStatus, flags, off, min(length, maxUnpayloaded), nil)
	if err != nil {
		return nil, err
	}
	return cl.extents, nil
}

// Close stops new requests, waits up to CloseTimeout for those in flight
// to be answered, sends NBD_CMD_DISC and closes the connection. It returns
// once the reader goroutine has returned. Calls after Close fail with an
// error wrapping ErrConnClosed. Close is idempotent and returns nil.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closing == nil {
		c.closing = fmt.Errorf("%w: the client was closed", ErrConnClosed)
	}
	var idle chan struct{}
	if len(c.pending) > 0 && c.err == nil {
		if c.idle == nil {
			c.idle = make(chan struct{})
		}
		idle = c.idle
	}
	c.mu.Unlock()
	if idle != nil {
		t := time.NewTimer(c.cfg.CloseTimeout)
		select {
		case <-idle:
		case <-c.dead:
		case <-t.C:
			c.log.Warn("requests still in flight after the close timeout; hanging up", "timeout", c.cfg.CloseTimeout)
		}
		t.Stop()
	}
	c.disconnect(errors.New("the client was closed"))
	<-c.done
	return nil
}

// check validates a request's range against the export: in bounds (else
// pastEnd) and aligned to the minimum block size (else EINVAL).
func (c *Client) check(cmd uint16, off, length uint64, pastEnd Errno) error {
	if off > c.size || length > c.size-off {
		return fmt.Errorf("nbd: %s of %d bytes at offset %d: past the end of the %d-byte export: %w", cmdName(cmd), length, off, c.size, pastEnd)
	}
	if m := uint64(c.bs.Minimum); m > 1 && (off%m != 0 || length%m != 0) {
		return fmt.Errorf("nbd: %s of %d bytes at offset %d: not aligned to the server's minimum block size %d: %w", cmdName(cmd), length, off, m, EINVAL)
	}
	return nil
}

// unsupported is the error of a command the server did not advertise:
// ENOTSUP, or EPERM for a change to a read-only export.
func (c *Client) unsupported(cmd uint16, off, length uint64, why string) error {
	if (cmd == CmdTrim || cmd == CmdWriteZeroes) && c.has(TFlagReadOnly) {
		return fmt.Errorf("nbd: %s of %d bytes at offset %d: the export is read-only: %w", cmdName(cmd), length, off, EPERM)
	}
	return fmt.Errorf("nbd: %s of %d bytes at offset %d: %s: %w", cmdName(cmd), length, off, why, ENOTSUP)
}

// fua returns the command flag for a FUA request, or that a flush must
// follow instead.
func (c *Client) fua(fua bool) (flags uint16, flush bool) {
	switch {
	case !fua:
		return 0, false
	case c.has(TFlagSendFUA):
		return CmdFlagFUA, false
	}
	return 0, c.has(TFlagSendFlush)
}

// alive returns the error a new request would get, or nil.
func (c *Client) alive() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.refuseLocked()
}

func (c *Client) refuseLocked() error {
	if c.err != nil {
		return c.err
	}
	return c.closing
}

// ---- Calls ----

// call is one request in flight. The caller's goroutine writes it; the
// reader goroutine fills in the reply and finishes it.
type call struct {
	cookie  uint64
	cmd     uint16
	flags   uint16
	off     uint64
	length  uint64
	payload []byte // a write's data; the caller's, read while sending
	hdr     [RequestSize]byte

	// ctx is the caller's while the request waits to be written; sent
	// gets exactly one value: nil once the request is written whole,
	// else why it was not (the call is then unregistered, or the
	// connection failed and finished it).
	ctx  context.Context
	sent chan error

	// done is closed when the call is finished; err and extents are set
	// before.
	done    chan struct{}
	err     error
	extents []Extent

	mu     sync.Mutex // guards the following
	dst    []byte     // a read's destination, the caller's buffer
	sealed bool       // dst must not be written any more: the call returned or finished

	// Reply state, touched by the reader goroutine only.
	spans     []span // parts of a read covered by data and hole chunks
	rerr      error  // the first error chunk
	rext      []Extent
	gotStatus bool
}

// span is a range [start, end) relative to a read's offset.
type span struct{ start, end uint64 }

// run sends [off, off+length) as requests of at most max bytes, all in
// flight together, and waits for every one. buf is a read's destination or
// a write's payload.
func (c *Client) run(ctx context.Context, cmd, flags uint16, off, length, max uint64, buf []byte) error {
	if length <= max {
		_, err := c.do(ctx, cmd, flags, off, length, buf)
		return err
	}
	var calls []*call
	var err error
	for done := uint64(0); done < length; {
		n := min(max, length-done)
		var b []byte
		if buf != nil {
			b = buf[done : done+n]
		}
		cl := newCall(cmd, flags, off+done, n, b)
		if err = c.start(ctx, cl); err != nil {
			break
		}
		calls = append(calls, cl)
		done += n
	}
	for _, cl := range calls {
		if e := c.wait(ctx, cl); e != nil && err == nil {
			err = e
		}
	}
	return err
}

// do sends one request and waits for its reply.
func (c *Client) do(ctx context.Context, cmd, flags uint16, off, length uint64, buf []byte) (*call, error) {
	cl := newCall(cmd, flags, off, length, buf)
	if err := c.start(ctx, cl); err != nil {
		return nil, err
	}
	return cl, c.wait(ctx, cl)
}

func newCall(cmd, flags uint16, off, length uint64, buf []byte) *call {
	cl := &call{cmd: cmd, flags: flags, off: off, length: length, done: make(chan struct{})}
	if cmd == CmdRead {
		cl.dst = buf
	} else {
		cl.payload = buf
	}
	return cl
}

// start takes a slot, registers cl and sends its request. On error the
// request was not sent whole and nobody need wait for cl.
func (c *Client) start(ctx context.Context, cl *call) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case c.slots <- struct{}{}:
	default:
		select {
		case c.slots <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		case <-c.dead:
			return c.Err()
		}
	}
	c.mu.Lock()
	if err := c.refuseLocked(); err != nil {
		c.mu.Unlock()
		<-c.slots
		return err
	}
	c.cookie++
	cl.cookie = c.cookie
	c.pending[cl.cookie] = cl
	c.mu.Unlock()
	AppendRequest(cl.hdr[:0], Request{Flags: cl.flags, Type: cl.cmd, Cookie: cl.cookie, Offset: cl.off, Length: cl.length}, false)

	cl.ctx, cl.sent = ctx, make(chan error, 1)
	c.wmu.Lock()
	c.wqueue = append(c.wqueue, cl)
	if c.writing {
		c.wmu.Unlock()
		return c.awaitSent(ctx, cl)
	}
	c.writing = true
	c.wmu.Unlock()
	c.writeQueued()
	return <-cl.sent
}

// awaitSent waits until the goroutine writing the queue has written cl.
// When ctx ends first and cl is still queued, cl is taken out and
// unregistered; once a writer has taken it, ctx interrupts that write
// (writeBatch), so this returns promptly either way. It never returns
// while cl's payload may still be read.
func (c *Client) awaitSent(ctx context.Context, cl *call) error {
	select {
	case err := <-cl.sent:
		return err
	case <-ctx.Done():
	}
	c.wmu.Lock()
	for i, q := range c.wqueue {
		if q == cl {
			c.wqueue = append(c.wqueue[:i], c.wqueue[i+1:]...)
			c.wmu.Unlock()
			if c.unregister(cl) {
				c.disconnect(errServerShutdown)
			}
			return ctx.Err()
		}
	}
	c.wmu.Unlock()
	return <-cl.sent
}

// writeQueued writes the queue out until it is empty: the requests that
// piled up while a batch was being written go out together in one writev,
// the way the server coalesces its replies. The caller set c.writing.
func (c *Client) writeQueued() {
	var vec net.Buffers
	for {
		c.wmu.Lock()
		batch := c.wqueue
		if len(batch) == 0 {
			c.writing = false
			c.wmu.Unlock()
			return
		}
		c.wqueue = c.wspare[:0]
		c.wspare = nil
		c.wmu.Unlock()

		retry, disc := c.writeBatch(batch, &vec)

		c.wmu.Lock()
		if len(retry) > 0 { // not written; they go first
			c.wqueue = append(retry, c.wqueue...)
		} else {
			clear(batch)
			c.wspare = batch[:0]
		}
		c.wmu.Unlock()
		if disc {
			c.disconnect(errServerShutdown)
		}
	}
}

// writeBatch writes batch's requests in one writev and tells each caller.
// A call whose context has ended is dropped unwritten. While the batch is
// written, the end of any of its calls' contexts interrupts the write: if
// nothing had gone out, the calls whose context ended are dropped and the
// others returned to be written again (retry); a batch cut in half leaves
// the stream out of step, so the connection is failed. disc says the
// connection must now hang up (which needs wlock, released by then).
func (c *Client) writeBatch(batch []*call, vec *net.Buffers) (retry []*call, disc bool) {
	select {
	case c.wlock <- struct{}{}:
	default:
		select {
		case c.wlock <- struct{}{}:
		case <-c.dead:
			for _, cl := range batch {
				cl.sent <- c.Err() // fail finished cl
			}
			return nil, false
		}
	}
	defer func() { <-c.wlock }()

	drop := func(cl *call, err error) {
		if c.unregister(cl) {
			disc = true
		}
		cl.sent <- err
	}
	live := make([]*call, 0, len(batch))
	for _, cl := range batch {
		if err := cl.ctx.Err(); err != nil {
			drop(cl, err)
			continue
		}
		live = append(live, cl)
	}
	if len(live) == 0 {
		return nil, disc
	}
	v := (*vec)[:0]
	for _, cl := range live {
		v = append(v, cl.hdr[:])
		if len(cl.payload) > 0 {
			v = append(v, cl.payload)
		}
	}
	*vec = v
	type interrupt struct {
		stop  func() bool
		fired chan struct{}
	}
	var stops []interrupt
	for _, cl := range live {
		if cl.ctx.Done() == nil {
			continue
		}
		fired := make(chan struct{})
		stops = append(stops, interrupt{context.AfterFunc(cl.ctx, func() {
			_ = c.nc.SetWriteDeadline(time.Unix(1, 0))
			close(fired)
		}), fired})
	}
	n, err := writeVec(c.nc, v, &c.wscratch)
	clear(*vec)
	interrupted := false
	for _, s := range stops {
		if !s.stop() {
			<-s.fired
			interrupted = true
		}
	}
	if interrupted {
		_ = c.nc.SetWriteDeadline(time.Time{})
	}
	switch {
	case err == nil:
		c.sentBatches.Add(1)
		c.sentRequests.Add(uint64(len(live)))
		for _, cl := range live {
			cl.sent <- nil
		}
		return nil, disc
	case interrupted && n == 0 && errors.Is(err, os.ErrDeadlineExceeded):
		for _, cl := range live {
			if cerr := cl.ctx.Err(); cerr != nil {
				drop(cl, cerr)
			} else {
				retry = append(retry, cl)
			}
		}
		return retry, disc
	}
	if interrupted {
		err = fmt.Errorf("request cut short when its context ended: %w", err)
	}
	what := cmdName(live[0].cmd)
	if len(live) > 1 {
		what = fmt.Sprintf("%d requests", len(live))
	}
	c.fail(fmt.Errorf("sending %s: %w", what, err))
	for _, cl := range live {
		cl.sent <- c.Err()
	}
	return nil, disc
}

// wait waits for cl's reply. When ctx ends first, cl is sealed so the
// reader will not touch the caller's buffer again, and ctx's error is
// returned; the reply, when it comes, is read and dropped.
func (c *Client) wait(ctx context.Context, cl *call) error {
	select {
	case <-cl.done:
		return cl.err
	case <-ctx.Done():
	}
	cl.mu.Lock()
	cl.sealed = true
	cl.mu.Unlock()
	return ctx.Err()
}

// unregister drops a call whose request was never sent. It reports
// whether the connection should now hang up.
func (c *Client) unregister(cl *call) (disc bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, disc = c.removeLocked(cl)
	return disc
}

// removeLocked takes cl out of pending and frees its slot. It reports
// whether cl was there (whoever removes a call finishes it) and whether the
// connection should now hang up.
func (c *Client) removeLocked(cl *call) (removed, disc bool) {
	if c.pending[cl.cookie] != cl {
		return false, false
	}
	delete(c.pending, cl.cookie)
	<-c.slots
	if len(c.pending) == 0 {
		if c.idle != nil {
			close(c.idle)
			c.idle = nil
		}
		disc = c.discIdle
	}
	return true, disc
}

// complete finishes cl with err, unless the connection's death already did.
// The reader goroutine calls it.
func (c *Client) complete(cl *call, err error) {
	c.mu.Lock()
	removed, disc := c.removeLocked(cl)
	c.mu.Unlock()
	if removed {
		if err == nil {
			cl.extents = cl.rext
		}
		cl.finish(err)
	}
	if disc {
		c.hangup.Add(1)
		go func() {
			defer c.hangup.Done()
			c.disconnect(errServerShutdown)
		}()
	}
}

func (cl *call) finish(err error) {
	cl.mu.Lock()
	cl.sealed = true
	cl.mu.Unlock()
	cl.err = err
	close(cl.done)
}

// fail ends the connection: every pending call fails, and so does every
// later one. The first cause is kept.
func (c *Client) fail(cause error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = fmt.Errorf("%w: %w", ErrConnClosed, cause)
	err := c.err
	close(c.dead)
	pending := c.pending
	c.pending = map[uint64]*call{}
	if c.idle != nil {
		close(c.idle)
		c.idle = nil
	}
	closing := c.closing != nil
	c.mu.Unlock()
	c.nc.Close()
	for _, cl := range pending {
		<-c.slots
		cl.finish(err)
	}
	if closing {
		c.log.Debug("connection closed", "reason", cause, "failed_requests", len(pending))
	} else {
		c.log.Warn("connection to the server lost", "error", cause, "failed_requests", len(pending))
	}
}

// disconnect says goodbye with NBD_CMD_DISC (if the connection is still
// alive and no request is being written) and closes the connection.
func (c *Client) disconnect(cause error) {
	c.discOnce.Do(func() {
		if c.Err() == nil {
			t := time.NewTimer(discTimeout)
			select {
			case c.wlock <- struct{}{}:
				c.mu.Lock()
				c.cookie++
				cookie := c.cookie
				c.mu.Unlock()
				_ = c.nc.SetWriteDeadline(time.Now().Add(discTimeout))
				_, _ = c.nc.Write(AppendRequest(nil, Request{Type: CmdDisc, Cookie: cookie}, false))
				<-c.wlock
			case <-t.C:
			}
			t.Stop()
		}
		c.fail(cause)
	})
}

// ---- Replies ----

func (c *Client) readLoop() {
	err := c.readReplies()
	if errors.Is(err, io.EOF) {
		err = fmt.Errorf("the server hung up: %w", err)
	}
	c.fail(err)
	c.hangup.Wait()
	close(c.done)
}

func (c *Client) readReplies() error {
	var h [StructReplySize]byte
	for {
		if _, err := io.ReadFull(c.br, h[:4]); err != nil {
			return err
		}
		var err error
		switch magic := be.Uint32(h[:]); magic {
		case MagicSimpleReply:
			if err = c.readFull(h[4:SimpleReplySize]); err != nil {
				return err
			}
			rep, _ := ParseReply(h[:SimpleReplySize])
			err = c.simpleReply(rep)
		case MagicStructReply:
			if !c.structured {
				return protoErrorf("structured reply chunk, but structured replies were not negotiated")
			}
			if err = c.readFull(h[4:]); err != nil {
				return err
			}
			rep, _ := ParseReply(h[:])
			err = c.chunk(rep)
		default:
			return protoErrorf("reply magic %#08x", magic)
		}
		if err != nil {
			return err
		}
	}
}

// readFull reads the middle of a message: EOF there is unexpected.
func (c *Client) readFull(p []byte) error {
	_, err := io.ReadFull(c.br, p)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

func (c *Client) lookup(cookie uint64) *call {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pending[cookie]
}

func (c *Client) simpleReply(rep Reply) error {
	cl := c.lookup(rep.Cookie)
	if cl == nil {
		return protoErrorf("simple reply for unknown cookie %d", rep.Cookie)
	}
	if cl.spans != nil || cl.rerr != nil || cl.gotStatus {
		return protoErrorf("simple reply for cookie %d after structured chunks", rep.Cookie)
	}
	if rep.Error != 0 {
		c.complete(cl, c.serverError(cl, rep.Error, ""))
		return nil
	}
	switch cl.cmd {
	case CmdRead:
		if c.structured {
			return protoErrorf("simple reply with data to a read (cookie %d), but structured replies were negotiated", rep.Cookie)
		}
		if err := c.readData(cl, 0, cl.length); err != nil {
			return err
		}
	case CmdBlockStatus:
		return protoErrorf("simple reply to a block status request (cookie %d)", rep.Cookie)
	}
	c.complete(cl, nil)
	return nil
}

// chunk handles one structured reply chunk.
func (c *Client) chunk(rep Reply) error {
	cl := c.lookup(rep.Cookie)
	if cl == nil {
		return protoErrorf("reply chunk type %d for unknown cookie %d", rep.Type, rep.Cookie)
	}
	if max := maxChunk(cl, rep.Type); rep.Length > max {
		return protoErrorf("reply chunk type %d of %d bytes for a %s of %d bytes (at most %d allowed)",
			rep.Type, rep.Length, cmdName(cl.cmd), cl.length, max)
	}
	switch rep.Type {
	case ReplyTypeNone:
		if rep.Flags&ReplyFlagDone == 0 {
			return protoErrorf("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE (cookie %d)", rep.Cookie)
		}

	case ReplyTypeOffsetData:
		if cl.cmd != CmdRead {
			return protoErrorf("data chunk in the reply to %s (cookie %d)", cmdName(cl.cmd), rep.Cookie)
		}
		if rep.Length <= 8 {
			return protoErrorf("data chunk of %d bytes", rep.Length)
		}
		var b [8]byte
		if err := c.readFull(b[:]); err != nil {
			return err
		}
		rel, err := cl.cover(be.Uint64(b[:]), rep.Length-8)
		if err != nil {
			return err
		}
		if err := c.readData(cl, rel, rep.Length-8); err != nil {
			return err
		}

	case ReplyTypeOffsetHole:
		if cl.cmd != CmdRead {
			return protoErrorf("hole chunk in the reply to %s (cookie %d)", cmdName(cl.cmd), rep.Cookie)
		}
		if rep.Length != 12 {
			return protoErrorf("hole chunk of %d bytes, want 12", rep.Length)
		}
		var b [12]byte
		if err := c.readFull(b[:]); err != nil {
			return err
		}
		n := uint64(be.Uint32(b[8:]))
		if n == 0 {
			return protoErrorf("hole chunk of length 0 (cookie %d)", rep.Cookie)
		}
		rel, err := cl.cover(be.Uint64(b[:]), n)
		if err != nil {
			return err
		}
		cl.mu.Lock()
		if !cl.sealed {
			clear(cl.dst[rel : rel+n])
		}
		cl.mu.Unlock()

	case ReplyTypeBlockStatus:
		if cl.cmd != CmdBlockStatus {
			return protoErrorf("block status chunk in the reply to %s (cookie %d)", cmdName(cl.cmd), rep.Cookie)
		}
		p := make([]byte, rep.Length)
		if err := c.readFull(p); err != nil {
			return err
		}
		if err := c.blockStatus(cl, p); err != nil {
			return err
		}

	default:
		if rep.Type&(1<<15) == 0 {
			return protoErrorf("unknown reply chunk type %d (cookie %d)", rep.Type, rep.Cookie)
		}
		p := make([]byte, rep.Length)
		if err := c.readFull(p); err != nil {
			return err
		}
		if err := c.errorChunk(cl, rep.Type, p); err != nil {
			return err
		}
	}

	if rep.Flags&ReplyFlagDone == 0 {
		return nil
	}
	err := cl.rerr
	if err == nil {
		switch {
		case cl.cmd == CmdRead && (len(cl.spans) != 1 || cl.spans[0] != span{0, cl.length}):
			return protoErrorf("reply to a read of %d bytes at %d (cookie %d) ended without covering it all", cl.length, cl.off, rep.Cookie)
		case cl.cmd == CmdBlockStatus && !cl.gotStatus:
			return protoErrorf("reply to a block status request (cookie %d) ended without a status chunk", rep.Cookie)
		}
	}
	c.complete(cl, err)
	return nil
}

// maxChunk is the largest payload a chunk of type typ may have in the reply
// to cl; anything longer is refused before it is read.
func maxChunk(cl *call, typ uint16) uint64 {
	switch typ {
	case ReplyTypeNone:
		return 0
	case ReplyTypeOffsetData:
		return 8 + cl.length
	case ReplyTypeOffsetHole:
		return 12
	case ReplyTypeBlockStatus:
		return 4 + 8*MaxExtents
	}
	if typ&(1<<15) != 0 {
		return 6 + 0xffff + 8 // errno, message length, message, offset
	}
	return 0
}

// cover records that a chunk delivered [off, off+n) of the read and returns
// where that is in the caller's buffer. Chunks must lie inside the request
// and must not overlap.
func (cl *call) cover(off, n uint64) (uint64, error) {
	if off < cl.off || n > cl.length || off-cl.off > cl.length-n {
		return 0, protoErrorf("chunk for [%d, +%d) outside the read of [%d, +%d)", off, n, cl.off, cl.length)
	}
	rel := off - cl.off
	s := cl.spans
	i := sort.Search(len(s), func(i int) bool { return s[i].start >= rel })
	if (i > 0 && s[i-1].end > rel) || (i < len(s) && s[i].start < rel+n) {
		return 0, protoErrorf("chunk for [%d, +%d) overlaps another of the same read", off, n)
	}
	switch {
	case i > 0 && s[i-1].end == rel && i < len(s) && s[i].start == rel+n:
		s[i-1].end = s[i].end
		s = append(s[:i], s[i+1:]...)
	case i > 0 && s[i-1].end == rel:
		s[i-1].end = rel + n
	case i < len(s) && s[i].start == rel+n:
		s[i].start = rel
	default:
		if len(s) >= maxReadSpans {
			return 0, protoErrorf("reply to a read in more than %d separate pieces", maxReadSpans)
		}
		s = append(s, span{})
		copy(s[i+1:], s[i:])
		s[i] = span{rel, rel + n}
	}
	cl.spans = s
	return rel, nil
}

// readData reads n bytes of a read's data from the socket into cl's buffer
// at rel, a buffer's worth at a time under cl's lock, or drops them if cl
// is sealed.
func (c *Client) readData(cl *call, rel, n uint64) error {
	for n > 0 {
		k := int(min(n, uint64(c.br.Size())))
		b, err := c.br.Peek(k)
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
		cl.mu.Lock()
		if !cl.sealed {
			copy(cl.dst[rel:], b)
		}
		cl.mu.Unlock()
		_, _ = c.br.Discard(k)
		rel += uint64(k)
		n -= uint64(k)
	}
	return nil
}

func (c *Client) blockStatus(cl *call, p []byte) error {
	id, ex, err := ParseBlockStatus(p, false)
	if err != nil {
		return protoErrorf("block status chunk: %v", err)
	}
	if id != c.metaID {
		return protoErrorf("block status for metadata context %d; only %d was selected", id, c.metaID)
	}
	if cl.gotStatus {
		return protoErrorf("two block status chunks for one context in one reply")
	}
	cl.gotStatus = true
	// The protocol lets the server describe more than was asked; the
	// caller gets exactly what it asked about.
	var out []Extent
	var total uint64
	for _, e := range ex {
		if e.Length == 0 {
			return protoErrorf("block status extent of length 0")
		}
		if total >= cl.length {
			break
		}
		l := min(e.Length, cl.length-total)
		out = append(out, Extent{Length: l, Flags: e.Flags})
		total += l
	}
	if cl.flags&CmdFlagReqOne != 0 {
		out = out[:1]
	}
	cl.rext = out
	return nil
}

func (c *Client) errorChunk(cl *call, typ uint16, p []byte) error {
	errno, msg, err := ParseErrorChunk(p)
	if err != nil {
		return protoErrorf("error chunk: %v", err)
	}
	if errno == 0 {
		return protoErrorf("error chunk with error value 0")
	}
	if typ == ReplyTypeErrorOffset {
		rest := p[6+len(msg):]
		if len(rest) != 8 {
			return protoErrorf("NBD_REPLY_TYPE_ERROR_OFFSET without its offset")
		}
		off := be.Uint64(rest)
		if off < cl.off || off-cl.off >= max(cl.length, 1) {
			return protoErrorf("error offset %d outside the request [%d, +%d)", off, cl.off, cl.length)
		}
		msg = fmt.Sprintf("at offset %d: %s", off, msg)
	}
	if cl.rerr == nil {
		cl.rerr = c.serverError(cl, errno, cleanMessage([]byte(msg)))
	}
	return nil
}

// serverError builds the error of a call the server failed. Values the
// protocol does not define are taken as EINVAL, as it asks of clients.
func (c *Client) serverError(cl *call, errno Errno, msg string) error {
	switch errno {
	case EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN:
	default:
		if msg != "" {
			msg = ": " + msg
		}
		msg = fmt.Sprintf("error value %d%s", uint32(errno), msg)
		errno = EINVAL
	}
	if errno == ESHUTDOWN {
		// The server is going away: it must be left with a soft
		// disconnect once what is in flight is answered.
		c.mu.Lock()
		if c.closing == nil {
			c.closing = fmt.Errorf("%w: the server is shutting down", ErrConnClosed)
		}
		c.discIdle = true
		c.mu.Unlock()
	}
	return &ServerError{Command: cl.cmd, Offset: cl.off, Length: cl.length, Errno: errno, Message: msg}
}

// cleanMessage makes a server's text safe to print: valid UTF-8, no control
// characters, at most MaxString bytes.
func cleanMessage(b []byte) string {
	if len(b) > MaxString {
		b = b[:MaxString]
	}
	s := strings.ToValidUTF8(string(b), "?")
	return strings.Map(func(r rune) rune {
		if r == utf8.RuneError || !unicode.IsPrint(r) {
			return '?'
		}
		return r
	}, s)
}

func optName(o uint32) string {
	switch o {
	case OptExportName:
		return "NBD_OPT_EXPORT_NAME"
	case OptAbort:
		return "NBD_OPT_ABORT"
	case OptList:
		return "NBD_OPT_LIST"
	case OptStartTLS:
		return "NBD_OPT_STARTTLS"
	case OptInfo:
		return "NBD_OPT_INFO"
	case OptGo:
		return "NBD_OPT_GO"
	case OptStructuredReply:
		return "NBD_OPT_STRUCTURED_REPLY"
	case OptListMetaContext:
		return "NBD_OPT_LIST_META_CONTEXT"
	case OptSetMetaContext:
		return "NBD_OPT_SET_META_CONTEXT"
	case OptExtendedHeaders:
		return "NBD_OPT_EXTENDED_HEADERS"
	}
	return fmt.Sprintf("option %d", o)
}

func repName(t uint32) string {
	switch t {
	case RepAck:
		return "NBD_REP_ACK"
	case RepServer:
		return "NBD_REP_SERVER"
	case RepInfo:
		return "NBD_REP_INFO"
	case RepMetaContext:
		return "NBD_REP_META_CONTEXT"
	case RepErrUnsup:
		return "NBD_REP_ERR_UNSUP"
	case RepErrPolicy:
		return "NBD_REP_ERR_POLICY"
	case RepErrInvalid:
		return "NBD_REP_ERR_INVALID"
	case RepErrPlatform:
		return "NBD_REP_ERR_PLATFORM"
	case RepErrTLSReqd:
		return "NBD_REP_ERR_TLS_REQD"
	case RepErrUnknown:
		return "NBD_REP_ERR_UNKNOWN"
	case RepErrShutdown:
		return "NBD_REP_ERR_SHUTDOWN"
	case RepErrBlockSizeReqd:
		return "NBD_REP_ERR_BLOCK_SIZE_REQD"
	case RepErrTooBig:
		return "NBD_REP_ERR_TOO_BIG"
	case RepErrExtHeaderReqd:
		return "NBD_REP_ERR_EXT_HEADER_REQD"
	}
	if IsRepErr(t) {
		return fmt.Sprintf("error reply %#x", t)
	}
	return fmt.Sprintf("reply type %d", t)
}
