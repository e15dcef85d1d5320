package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// ServerConfig configures a Server. Zero fields take the documented defaults.
type ServerConfig struct {
	// Exports are the disks offered. The first is the default export,
	// chosen by clients that ask for the empty name. At least one.
	Exports []Export
	// Logger receives one line per connection event worth an operator's
	// attention. Default: hclog.NewNullLogger().
	Logger hclog.Logger
	// HandshakeTimeout bounds the whole option negotiation of one client.
	// Default 30s; range 1s to 1h.
	HandshakeTimeout time.Duration
	// DrainTimeout bounds a graceful stop: how long in-flight requests may
	// take to be answered (and a half-read request to arrive) before the
	// connection is closed anyway. Default 60s; range 1s to 1h.
	DrainTimeout time.Duration
	// MaxInFlight is the number of requests of one connection served
	// concurrently; the reader waits when it is reached. Default 64;
	// range 1 to 4096.
	MaxInFlight int
	// MaxInFlightBytes bounds the payload buffers of one connection's
	// in-flight requests. Default 128 MiB; range 32 MiB to 4 GiB.
	MaxInFlightBytes int64
	// TLS is whether NBD_OPT_STARTTLS is offered and whether it is
	// required (see TLSMode). Default TLSOff.
	TLS TLSMode
	// TLSConfig is the server side of TLS: its certificate and, when
	// client certificates are wanted, ClientAuth and ClientCAs (the
	// caller builds it; tls.RequireAndVerifyClientCert refuses a client
	// without a certificate signed by ClientCAs). Required when TLS is
	// TLSOn or TLSRequire, with a certificate; ignored when TLSOff.
	TLSConfig *tls.Config
	// Hooks let tests and the chaos monkey reach into request handling.
	Hooks Hooks
}

// Hooks are called from the goroutine that serves a request, so a panic or a
// delay injected there behaves like one in the backend.
type Hooks struct {
	// HeaderRead runs when a request header has been read, before its
	// payload.
	HeaderRead func(r Request)
	// BeforeRequest runs before a valid request reaches the backend.
	BeforeRequest func(export string, r Request)
	// Stopping runs when a connection in the transmission phase starts
	// its graceful stop.
	Stopping func()
}

func (c ServerConfig) withDefaults() ServerConfig {
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = 30 * time.Second
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = 60 * time.Second
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = 64
	}
	if c.MaxInFlightBytes == 0 {
		c.MaxInFlightBytes = 128 << 20
	}
	return c
}

// Validate checks the configuration; errors name the bad field and the
// allowed range.
func (c ServerConfig) Validate() error {
	c = c.withDefaults()
	if len(c.Exports) == 0 {
		return errors.New("nbd: ServerConfig.Exports: at least one export is required")
	}
	seen := map[string]bool{}
	for _, e := range c.Exports {
		if err := e.Validate(); err != nil {
			return err
		}
		if seen[e.Name] {
			return fmt.Errorf("nbd: ServerConfig.Exports: name %q used twice", e.Name)
		}
		seen[e.Name] = true
	}
	if c.HandshakeTimeout < time.Second || c.HandshakeTimeout > time.Hour {
		return fmt.Errorf("nbd: ServerConfig.HandshakeTimeout %v: must be from 1s to 1h", c.HandshakeTimeout)
	}
	if c.DrainTimeout < time.Second || c.DrainTimeout > time.Hour {
		return fmt.Errorf("nbd: ServerConfig.DrainTimeout %v: must be from 1s to 1h", c.DrainTimeout)
	}
	if c.MaxInFlight < 1 || c.MaxInFlight > 4096 {
		return fmt.Errorf("nbd: ServerConfig.MaxInFlight %d: must be from 1 to 4096", c.MaxInFlight)
	}
	switch {
	case c.TLS > TLSRequire:
		return fmt.Errorf("nbd: ServerConfig.TLS %v: must be TLSOff, TLSOn or TLSRequire", c.TLS)
	case c.TLS != TLSOff && c.TLSConfig == nil:
		return fmt.Errorf("nbd: ServerConfig.TLSConfig: required when TLS is %v", c.TLS)
	case c.TLS != TLSOff && len(c.TLSConfig.Certificates) == 0 && c.TLSConfig.GetCertificate == nil && c.TLSConfig.GetConfigForClient == nil:
		return fmt.Errorf("nbd: ServerConfig.TLSConfig: has no server certificate (TLS is %v)", c.TLS)
	}
	if c.MaxInFlightBytes < DefaultMaxPayload || c.MaxInFlightBytes > 4<<30 {
		return fmt.Errorf("nbd: ServerConfig.MaxInFlightBytes %d: must be from %d to %d", c.MaxInFlightBytes, DefaultMaxPayload, int64(4<<30))
	}
	return nil
}

// Server serves NBD clients from a set of exports. It holds no per-connection
// state, so one Server serves any number of connections concurrently.
type Server struct {
	cfg     ServerConfig
	exports []*Export
}

// NewServer validates cfg and returns a Server.
func NewServer(cfg ServerConfig) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	s := &Server{cfg: cfg}
	for _, e := range cfg.Exports {
		e := e.withDefaults()
		s.exports = append(s.exports, &e)
	}
	return s, nil
}

// lookup finds an export by name; the empty name is the default export.
func (s *Server) lookup(name string) *Export {
	if name == "" {
		return s.exports[0]
	}
	for _, e := range s.exports {
		if e.Name == name {
			return e
		}
	}
	return nil
}

// ServeConn runs one client connection to its end and closes it: the
// handshake, then the transmission phase. When ctx ends, the connection
// stops gracefully: no new request is read, every request already read is
// answered, then the connection is closed. It never answers a request with
// an error merely because it is stopping; a client that reconnects resends
// what was not answered.
//
// A panic in any goroutine serving the connection closes the connection and
// is re-raised from ServeConn, so the caller's supervisor sees it.
//
// The returned error is nil for a clean end (the client disconnected or
// sent NBD_CMD_DISC, or ctx ended), otherwise it says what went wrong.
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) error {
	_, err := s.ServeConnHandoff(ctx, nc, nil)
	return err
}

// Handoff asks a connection served by ServeConnHandoff or ResumeConn to
// give itself up (Request) so that another process can resume it.
type Handoff struct {
	mu        sync.Mutex // guards the following
	requested bool
	onRequest func() // the serving connection's stop, once it serves
}

// NewHandoff returns a Handoff not yet requested.
func NewHandoff() *Handoff { return &Handoff{} }

// Request asks the connection to quiesce at the next request boundary and
// return as a Detached: when Request returns, the connection reads no
// further request. Safe to call more than once, and before the connection
// is served.
func (h *Handoff) Request() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.requested {
		return
	}
	h.requested = true
	if h.onRequest != nil {
		h.onRequest()
	}
}

// watch makes fn the stop a Request runs (at once if already requested);
// the returned function unregisters it.
func (h *Handoff) watch(fn func()) (stop func()) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.requested {
		fn()
		return func() {}
	}
	h.onRequest = fn
	return func() {
		h.mu.Lock()
		h.onRequest = nil
		h.mu.Unlock()
	}
}

// Detached is a connection given up at a request boundary: every request
// read has been answered, nothing more was read, and State has what a
// resumed connection needs. The caller owns File (the socket); the
// net.Conn it came from is closed.
type Detached struct {
	File  *os.File
	State ConnState
}

// ErrNotDetachable is returned when a connection asked to hand itself
// over cannot be (no descriptor); it is then closed.
var ErrNotDetachable = errors.New("nbd: connection cannot be handed over")

// ServeConnHandoff is ServeConn, and once h is requested (h may be nil)
// the connection is quiesced and returned as a Detached instead of being
// closed. A connection still in the handshake finishes it first. A
// connection that ends otherwise (the client left, a stop by ctx) returns
// a nil Detached.
func (s *Server) ServeConnHandoff(ctx context.Context, nc net.Conn, h *Handoff) (*Detached, error) {
	detached := false
	defer func() {
		if !detached {
			nc.Close()
		}
	}()
	d, err := s.serveConn(ctx, nc, h)
	detached = d != nil
	return d, err
}

// ResumeConn serves a connection another Server detached, from its state,
// straight into transmission (the client sees no handshake). The export
// is looked up by name; the block sizes the client was told stay as they
// were. h, when not nil, can detach it again.
func (s *Server) ResumeConn(ctx context.Context, nc net.Conn, st ConnState, h *Handoff) (*Detached, error) {
	exp := s.lookup(st.Export)
	if exp == nil {
		nc.Close()
		return nil, fmt.Errorf("nbd: resuming a connection: export %q is not served here", st.Export)
	}
	e := *exp
	e.BlockSize = st.BlockSize
	ss := &session{
		export: &e, flags: st.Flags, structured: st.Structured, extended: st.Extended,
		blockSizeAgreed: st.BlockSizeAgreed, metaContextID: st.MetaContextID,
	}
	log := s.cfg.Logger.With("remote", remoteName(nc))
	pr := &prefixReader{pre: st.ReadAhead, r: nc}
	c := newConn(s, nc, bufio.NewReaderSize(pr, 64<<10), ss, log)
	c.pre = pr
	log.Debug("transmission resumed", "export", e.Name, "read_ahead", len(st.ReadAhead))
	d, err := c.serve(ctx, h)
	if d == nil {
		nc.Close()
	}
	return d, err
}

// prefixReader reads pre, then r: a resumed connection's read-ahead, then
// its socket. What is left of pre when the connection is detached again
// is read-ahead too.
type prefixReader struct {
	pre []byte
	r   io.Reader
}

func (p *prefixReader) Read(b []byte) (int, error) {
	if len(p.pre) > 0 {
		n := copy(b, p.pre)
		p.pre = p.pre[n:]
		return n, nil
	}
	return p.r.Read(b)
}

func (s *Server) serveConn(ctx context.Context, nc net.Conn, h *Handoff) (*Detached, error) {
	log := s.cfg.Logger.With("remote", remoteName(nc))

	if ctx.Err() != nil {
		return nil, nil
	}
	stopHandshake := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Now()) })
	_ = nc.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	hc := &hsConn{nc: nc, br: bufio.NewReaderSize(nc, 64<<10), bw: bufio.NewWriterSize(nc, 4<<10)}
	st, err := s.handshake(ctx, hc)
	stopped := !stopHandshake()
	if err != nil {
		if hc.secured {
			defer hc.nc.Close() // a close_notify; nc is closed by the caller
		}
		if hc.refusedTLS > 0 && (errors.Is(err, errAbort) || isClosed(err)) {
			log.Info("plain-text client refused: TLS is required, and it left without STARTTLS", "options_refused", hc.refusedTLS)
			return nil, nil
		}
		switch {
		case errors.Is(err, errAbort):
			log.Debug("client aborted the handshake")
			return nil, nil
		case stopped:
			return nil, nil
		case errors.Is(err, ErrTLSRequired):
			log.Info("plain-text client refused: TLS is required, connection closed", "error", err)
			return nil, nil
		case errors.Is(err, errTLSHandshake):
			log.Warn("TLS handshake failed, connection closed", "error", err)
			return nil, nil
		case isClosed(err):
			log.Info("client disconnected during the handshake", "error", err)
			return nil, nil
		}
		var pe *ProtocolError
		if errors.As(err, &pe) || errors.Is(err, ErrMalformed) {
			log.Warn("bad handshake, connection closed", "error", err)
			return nil, nil
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			log.Warn("handshake timed out, connection closed", "timeout", s.cfg.HandshakeTimeout)
			return nil, nil
		}
		return nil, fmt.Errorf("nbd: handshake: %w", err)
	}
	_ = nc.SetDeadline(time.Time{})
	log.Debug("transmission started", "export", st.export.Name, "structured", st.structured, "extended", st.extended, "tls", hc.secured)

	c := newConn(s, hc.nc, hc.br, st, log)
	c.secured = hc.secured
	return c.serve(ctx, h)
}

func remoteName(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" && a.String() != "@" {
		return a.String()
	}
	if a := nc.LocalAddr(); a != nil {
		return "unix:" + a.String()
	}
	return "?"
}

// isClosed reports errors that mean the peer went away.
func isClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed) || isConnReset(err)
}
