package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sync/semaphore"
)

// The transmission phase of one connection. One reader loop (serve) reads
// requests and hands each to its own goroutine; replies go out in whatever
// order they complete, written by one goroutine at a time (see send).

// sparseReadMin is the smallest structured read for which holes are looked
// up and sent as NBD_REPLY_TYPE_OFFSET_HOLE instead of zero bytes. Smaller
// reads skip the lookup: it would cost more than the zeroes it saves.
const sparseReadMin = 64 << 10

// maxLoggedRejects is how many rejected requests one connection logs
// before it goes quiet about them.
const maxLoggedRejects = 10

type conn struct {
	s  *Server
	nc net.Conn
	// scratch gathers a batch of replies for a connection without writev
	// (TLS); only the goroutine writing replies touches it.
	scratch []byte
	br      *bufio.Reader
	pre     *prefixReader // a resumed connection's read-ahead not yet in br; nil if none
	st      *session
	log     hclog.Logger
	be      Backend
	exp     *Export
	caps    Caps // be.Capabilities(), fixed while serving
	// ctx is what backend calls get: cancelled (with a cause) only when no
	// answer can be delivered any more (see kill), not by a graceful stop.
	ctx    context.Context
	cancel context.CancelCauseFunc

	wmu      sync.Mutex          // guards the following
	queue    []*reply            // replies waiting for the writer
	spare    []*reply            // the previous batch's slice, reused
	writing  bool                // a goroutine is writing to the socket
	werr     error               // first write error; later replies are dropped
	jobs     chan job            // to idle workers; closed when reading ends
	nworkers int                 // workers started (reader goroutine only)
	bytes    *semaphore.Weighted // payload bytes in flight
	workers  sync.WaitGroup
	stopping atomic.Bool
	rejects  atomic.Int32
	// detaching: the stop is a handoff (see Handoff); atBoundary: the
	// reader stopped between two requests (reader goroutine only).
	detaching  atomic.Bool
	atBoundary bool
	// secured: nc is a TLS connection, which cannot be handed over.
	secured bool

	panicOnce sync.Once
	panicVal  *ConnPanic
}

// ConnPanic is what ServeConn re-raises when a goroutine serving the
// connection panicked: the original value and the stack where it happened.
type ConnPanic struct {
	Value any
	Stack []byte
}

func (p *ConnPanic) String() string {
	return fmt.Sprintf("nbd connection: panic: %v\n\noriginal stack:\n%s", p.Value, p.Stack)
}

func (p *ConnPanic) Error() string { return p.String() }

// reply is everything the writer sends for one request: one or more chunks
// with their payloads, as a vector for a single writev.
type reply struct {
	bufs    net.Buffers
	release []*[]byte // pooled buffers to return after the write
	after   func()    // runs once the reply is written or dropped
}

func newConn(s *Server, nc net.Conn, br *bufio.Reader, st *session, log hclog.Logger) *conn {
	return &conn{
		s: s, nc: nc, br: br, st: st, log: log,
		be:    st.export.Backend,
		exp:   st.export,
		caps:  st.export.Backend.Capabilities(),
		jobs:  make(chan job),
		bytes: semaphore.NewWeighted(s.cfg.MaxInFlightBytes),
	}
}

// Why a connection's backend context ends.
var (
	errConnLost     = errors.New("nbd: connection lost; the reply cannot be delivered")
	errDrainTimeout = errors.New("nbd: graceful stop ran past the drain timeout")
)

// kill ends the connection for good: the socket is closed and backend calls
// still running are cancelled with cause, since their answers can no longer
// reach the client. The socket closes first: a backend call that returns as
// soon as it is cancelled must find nowhere to write its reply.
func (c *conn) kill(cause error) {
	c.nc.Close()
	c.cancel(cause)
}

// recoverPanic, deferred at the top of every goroutine serving the
// connection, records a panic for serve to re-raise and closes the socket.
func (c *conn) recoverPanic() {
	if r := recover(); r != nil {
		c.panicOnce.Do(func() {
			c.panicVal = &ConnPanic{Value: r, Stack: debug.Stack()}
		})
		c.kill(fmt.Errorf("%w: a goroutine serving it panicked", errConnLost))
	}
}

func (c *conn) serve(ctx context.Context, h *Handoff) (*Detached, error) {
	// Backend calls outlive ctx (a graceful stop answers what was read)
	// but keep its values.
	c.ctx, c.cancel = context.WithCancelCause(context.WithoutCancel(ctx))
	defer c.cancel(nil)
	// A graceful stop interrupts a blocked read; readLoop then finishes the
	// request it was in the middle of, if any, and reads no more.
	stopRead := context.AfterFunc(ctx, func() {
		c.stopping.Store(true)
		_ = c.nc.SetReadDeadline(time.Now())
		if h := c.s.cfg.Hooks.Stopping; h != nil {
			h()
		}
	})
	// A handoff stops reading the same way, and then gives the
	// connection up instead of closing it.
	stopDetach := func() {}
	if h != nil {
		stopDetach = h.watch(func() {
			c.detaching.Store(true)
			c.stopping.Store(true)
			_ = c.nc.SetReadDeadline(time.Now())
		})
	}
	readErr := func() (err error) {
		defer c.recoverPanic()
		return c.readLoop()
	}()
	stopRead()
	stopDetach()
	close(c.jobs)

	// Every request read gets its answer before the connection closes,
	// bounded by the drain timeout in case the client stops reading. The
	// last reply is written by the worker that queued it (see send).
	drained := make(chan struct{})
	go func() { c.workers.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(c.s.cfg.DrainTimeout):
		c.log.Warn("requests still in flight after the drain timeout; closing", "timeout", c.s.cfg.DrainTimeout)
		c.kill(errDrainTimeout)
		<-drained
	}
	c.wmu.Lock()
	werr := c.werr
	c.wmu.Unlock()
	if c.panicVal == nil && readErr == nil && werr == nil && c.atBoundary && c.detaching.Load() && c.ctx.Err() == nil {
		d, err := c.detach()
		switch {
		case err == nil:
			return d, nil
		case errors.Is(err, errNotTLSDetachable):
			c.log.Info("TLS connection drained for the handover and closed (every request read was answered; the client reconnects)")
		default:
			c.log.Warn("could not hand the connection over; closing it (the client reconnects)", "error", err)
		}
	}
	c.nc.Close()

	if c.panicVal != nil {
		panic(c.panicVal)
	}
	if readErr != nil {
		return nil, readErr
	}
	if werr != nil && !isClosed(werr) {
		return nil, fmt.Errorf("nbd: writing replies: %w", werr)
	}
	return nil, nil
}

// detach gives the quiesced connection up: its state, with what the
// reader had read ahead, and a descriptor of its socket (nc is closed).
//
// A TLS connection is never detached (errNotTLSDetachable): its session
// keys and sequence numbers live in this process's crypto/tls state. It
// has drained like any other (every request read was answered) and is
// closed; the client reconnects to whoever accepts next.
func (c *conn) detach() (*Detached, error) {
	if c.secured {
		return nil, errNotTLSDetachable
	}
	fc, ok := c.nc.(interface{ File() (*os.File, error) })
	if !ok {
		return nil, fmt.Errorf("%w: a %T has no descriptor", ErrNotDetachable, c.nc)
	}
	ra, err := c.br.Peek(c.br.Buffered())
	if err != nil {
		return nil, fmt.Errorf("%w: read-ahead: %w", ErrNotDetachable, err)
	}
	ra = append([]byte(nil), ra...)
	if c.pre != nil {
		ra = append(ra, c.pre.pre...) // read ahead of br: the stream goes on there
	}
	if len(ra) > maxReadAhead {
		return nil, fmt.Errorf("%w: %d bytes read ahead, more than %d", ErrNotDetachable, len(ra), maxReadAhead)
	}
	f, err := fc.File()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNotDetachable, err)
	}
	_ = c.nc.Close()
	st := ConnState{
		Export: c.exp.Name, Structured: c.st.structured, Extended: c.st.extended,
		BlockSizeAgreed: c.st.blockSizeAgreed, Flags: c.st.flags, MetaContextID: c.st.metaContextID,
		BlockSize: c.exp.BlockSize, ReadAhead: ra,
	}
	c.log.Debug("connection quiesced for handoff", "read_ahead", len(ra))
	return &Detached{File: f, State: st}, nil
}

// readFull reads len(p) bytes. When a graceful stop interrupts it before the
// first byte it returns errStopped; in the middle of a message it carries on
// (bounded by the drain timeout) so the request is not cut in half.
func (c *conn) readFull(p []byte, atBoundary bool) error {
	got := 0
	for got < len(p) {
		n, err := c.br.Read(p[got:])
		got += n
		if err == nil {
			continue
		}
		if errors.Is(err, os.ErrDeadlineExceeded) && c.stopping.Load() {
			if atBoundary && got == 0 {
				return errStopped
			}
			_ = c.nc.SetReadDeadline(time.Now().Add(c.s.cfg.DrainTimeout))
			continue
		}
		if err == io.EOF && got > 0 {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	return nil
}

var errStopped = errors.New("nbd: stopped")

func (c *conn) readLoop() error {
	hdrSize := RequestSize
	if c.st.extended {
		hdrSize = ExtRequestSize
	}
	hdr := make([]byte, hdrSize)
	for {
		if c.stopping.Load() {
			c.atBoundary = true
			return nil
		}
		err := c.readFull(hdr, true)
		switch {
		case err == nil:
		case errors.Is(err, errStopped):
			c.atBoundary = true
			return nil
		case err == io.EOF:
			c.log.Debug("client disconnected")
			return nil
		case errors.Is(err, net.ErrClosed):
			return nil // closed on our side: a failed write or a panic, logged there
		case isClosed(err):
			c.log.Info("client disconnected in the middle of a request", "error", err)
			c.kill(fmt.Errorf("%w: %v", errConnLost, err))
			return nil
		default:
			c.kill(fmt.Errorf("%w: %v", errConnLost, err))
			return fmt.Errorf("nbd: reading request: %w", err)
		}
		req, err := ParseRequest(hdr, c.st.extended)
		if err != nil {
			c.log.Warn("bad request header, connection closed", "error", err)
			return nil
		}
		if h := c.s.cfg.Hooks.HeaderRead; h != nil {
			h(req)
		}
		if req.Type == CmdDisc {
			c.log.Debug("client sent NBD_CMD_DISC")
			return nil
		}

		// Payload: read it whole (into a pooled buffer) or, when the
		// request is refused, consume it so the stream stays in step.
		plen := req.PayloadLength(c.st.extended)
		errno := c.check(req)
		if plen > uint64(c.exp.BlockSize.Maximum) && c.st.extended {
			c.log.Warn("request payload larger than the advertised maximum, connection closed", "length", plen)
			return nil
		}
		var payload *[]byte
		if plen > 0 {
			if errno == 0 {
				payload, err = c.readPayload(int(plen))
			} else {
				err = c.discard(plen)
			}
			if err != nil {
				c.kill(fmt.Errorf("%w: %v", errConnLost, err))
				if isClosed(err) {
					c.log.Info("client disconnected in the middle of a request", "error", err)
					return nil
				}
				return fmt.Errorf("nbd: reading request payload: %w", err)
			}
		}
		if errno != 0 {
			c.reject(req, errno)
			continue
		}

		c.dispatch(job{req, payload})
	}
}

// job is a valid request on its way to a worker.
type job struct {
	req     Request
	payload *[]byte
}

// dispatch hands j to an idle worker, starts a new one while fewer than
// MaxInFlight exist, or else waits for one to be free. Workers live as long
// as the connection: a goroutine per request would pay for growing a fresh
// stack every time.
func (c *conn) dispatch(j job) {
	select {
	case c.jobs <- j:
		return
	default:
	}
	if c.nworkers < c.s.cfg.MaxInFlight {
		c.nworkers++
		c.workers.Add(1)
		go c.work(j)
		return
	}
	c.jobs <- j
}

// work serves first, then whatever dispatch hands it, until the reader is done.
func (c *conn) work(first job) {
	defer c.workers.Done()
	defer c.recoverPanic()
	c.handle(first.req, first.payload)
	for j := range c.jobs {
		c.handle(j.req, j.payload)
	}
}

func (c *conn) readPayload(n int) (*[]byte, error) {
	if err := c.bytes.Acquire(context.Background(), int64(n)); err != nil {
		return nil, err
	}
	p := getBuf(n)
	if err := c.readFull(*p, false); err != nil {
		putBuf(p)
		c.bytes.Release(int64(n))
		return nil, err
	}
	return p, nil
}

func (c *conn) discard(n uint64) error {
	var buf [32 << 10]byte
	for n > 0 {
		k := min(n, uint64(len(buf)))
		if err := c.readFull(buf[:k], false); err != nil {
			return err
		}
		n -= k
	}
	return nil
}

// check validates a request against the session and the export. It is a
// pure decision: the error to answer with, or 0 to go ahead.
func (c *conn) check(r Request) Errno {
	return checkRequest(r, c.st, c.exp.Backend.Size(), c.exp.BlockSize)
}

// checkRequest refuses, with EINVAL, every command and flag the session's
// transmission flags (st.flags) did not advertise, and changes to a
// read-only export with EPERM.
func checkRequest(r Request, st *session, size uint64, bs BlockSize) Errno {
	const known = CmdFlagFUA | CmdFlagNoHole | CmdFlagDF | CmdFlagReqOne | CmdFlagFastZero | CmdFlagPayloadLen
	if r.Flags&^known != 0 {
		return EINVAL
	}
	adv := func(f uint16) bool { return st.flags&f != 0 }
	// Flags that belong to one command only, and only when advertised.
	var allowed uint16
	if adv(TFlagSendFUA) {
		allowed |= CmdFlagFUA
	}
	switch r.Type {
	case CmdRead:
		if st.structured {
			allowed |= CmdFlagDF
		}
	case CmdWrite:
		allowed |= CmdFlagPayloadLen
	case CmdWriteZeroes:
		allowed |= CmdFlagNoHole
		if adv(TFlagSendFastZero) {
			allowed |= CmdFlagFastZero
		}
	case CmdBlockStatus:
		allowed |= CmdFlagReqOne
	case CmdFlush, CmdTrim, CmdCache:
	default:
		return EINVAL // unknown command
	}
	if r.Flags&^allowed != 0 {
		return EINVAL
	}
	if st.extended && r.Type == CmdWrite && r.Flags&CmdFlagPayloadLen == 0 {
		return EINVAL // extended writes must carry their payload flag
	}
	if r.Type == CmdFlush {
		if !adv(TFlagSendFlush) || r.Offset != 0 || r.Length != 0 {
			return EINVAL
		}
		return 0
	}
	writes := r.Type == CmdWrite || r.Type == CmdTrim || r.Type == CmdWriteZeroes
	if writes && adv(TFlagReadOnly) {
		return EPERM
	}
	if (r.Type == CmdTrim && !adv(TFlagSendTrim)) || (r.Type == CmdWriteZeroes && !adv(TFlagSendWriteZeroes)) ||
		(r.Type == CmdCache && !adv(TFlagSendCache)) {
		return EINVAL // not advertised
	}
	if r.Offset > size || r.Length > size-r.Offset {
		if r.Type == CmdWrite || r.Type == CmdWriteZeroes {
			return ENOSPC
		}
		return EINVAL
	}
	if st.blockSizeAgreed && bs.Minimum > 1 {
		m := uint64(bs.Minimum)
		if r.Offset%m != 0 || r.Length%m != 0 {
			return EINVAL
		}
	}
	switch r.Type {
	case CmdRead:
		if r.Length > uint64(bs.Maximum) {
			if st.structured {
				return EOVERFLOW
			}
			return EINVAL
		}
	case CmdWrite:
		if r.Length > uint64(bs.Maximum) {
			return EINVAL
		}
	case CmdBlockStatus:
		if st.metaContextID == 0 || r.Length == 0 {
			return EINVAL
		}
	}
	return 0
}

// reject answers a refused request and logs it (the first few per
// connection; a client looping on bad requests must not flood the log).
func (c *conn) reject(r Request, errno Errno) {
	if n := c.rejects.Add(1); n <= maxLoggedRejects {
		c.log.Warn("request refused", "command", cmdName(r.Type), "flags", fmt.Sprintf("%#x", r.Flags),
			"offset", r.Offset, "length", r.Length, "error", errno.Error())
		if n == maxLoggedRejects {
			c.log.Warn("further refused requests on this connection are not logged")
		}
	}
	c.sendError(r, errno, "")
}

// handle serves one valid request and queues its reply.
func (c *conn) handle(r Request, payload *[]byte) {
	if h := c.s.cfg.Hooks.BeforeRequest; h != nil {
		h(c.exp.Name, r)
	}
	var err error
	switch r.Type {
	case CmdRead:
		c.handleRead(r)
		return
	case CmdWrite:
		if payload != nil { // a zero-length write has none and does nothing
			err = c.be.WriteAt(c.ctx, *payload, r.Offset, r.Flags&CmdFlagFUA != 0)
			putBuf(payload)
			c.bytes.Release(int64(r.Length))
		}
	case CmdFlush:
		err = c.be.Flush(c.ctx)
	case CmdTrim:
		if r.Length > 0 {
			err = c.be.Trim(c.ctx, r.Offset, r.Length, r.Flags&CmdFlagFUA != 0)
		}
	case CmdWriteZeroes:
		if r.Length > 0 {
			var zf ZeroFlags
			if r.Flags&CmdFlagNoHole != 0 {
				zf |= ZeroNoHole
			}
			if r.Flags&CmdFlagFastZero != 0 {
				zf |= ZeroFast
			}
			if r.Flags&CmdFlagFUA != 0 {
				zf |= ZeroFUA
			}
			err = c.be.Zero(c.ctx, r.Offset, r.Length, zf)
		}
	case CmdCache:
		if r.Length > 0 {
			err = c.be.Cache(c.ctx, r.Offset, r.Length)
		}
	case CmdBlockStatus:
		c.handleBlockStatus(r)
		return
	}
	if err != nil {
		c.backendError(r, err)
		return
	}
	c.sendOK(r)
}

func (c *conn) backendError(r Request, err error) {
	errno := ErrnoOf(err)
	if errno == ENOTSUP && r.Type == CmdWriteZeroes {
		c.log.Debug("fast zero refused", "offset", r.Offset, "length", r.Length)
	} else {
		c.log.Error("backend failed", "command", cmdName(r.Type), "offset", r.Offset, "length", r.Length, "error", err)
	}
	c.sendError(r, errno, err.Error())
}

func (c *conn) handleRead(r Request) {
	n := int(r.Length)
	bufp := c.acquire(n)
	buf := (*bufp)[:n]
	rep := &reply{release: []*[]byte{bufp}}
	done := func() { c.bytes.Release(int64(n)) }

	if !c.st.structured {
		if err := c.be.ReadAt(c.ctx, buf, r.Offset); err != nil {
			putBuf(bufp)
			done()
			c.backendError(r, err)
			return
		}
		rep.bufs = net.Buffers{AppendSimpleReply(nil, 0, r.Cookie), buf}
		c.send(rep, done)
		return
	}

	// Structured: data chunks, and hole chunks for sparse ranges of larger
	// reads unless the client asked for one unfragmented chunk.
	if n == 0 {
		rep.bufs = net.Buffers{AppendChunkHeader(nil, c.st.extended, ReplyFlagDone, ReplyTypeNone, r.Cookie, r.Offset, 0)}
		c.send(rep, done)
		return
	}
	var extents []Extent
	if n >= sparseReadMin && r.Flags&CmdFlagDF == 0 && c.caps.Has(CapExtents) {
		if ex, err := c.be.Extents(c.ctx, r.Offset, r.Length); err == nil {
			extents = clipExtents(ex, r.Length)
		}
	}
	if len(extents) == 0 {
		extents = []Extent{{Length: r.Length}}
	}
	off := uint64(0)
	for i, e := range extents {
		last := i == len(extents)-1
		flags := uint16(0)
		if last {
			flags = ReplyFlagDone
		}
		if e.Flags&StateZero != 0 {
			h := AppendChunkHeader(nil, c.st.extended, flags, ReplyTypeOffsetHole, r.Cookie, r.Offset, 12)
			rep.bufs = append(rep.bufs, AppendOffsetHole(h, r.Offset+off, uint32(e.Length)))
		} else {
			seg := buf[off : off+e.Length]
			if err := c.be.ReadAt(c.ctx, seg, r.Offset+off); err != nil {
				putBuf(bufp)
				done()
				c.backendError(r, err)
				return
			}
			h := AppendChunkHeader(nil, c.st.extended, flags, ReplyTypeOffsetData, r.Cookie, r.Offset, 8+e.Length)
			rep.bufs = append(rep.bufs, be.AppendUint64(h, r.Offset+off), seg)
		}
		off += e.Length
	}
	c.send(rep, done)
}

// acquire takes n bytes of the in-flight budget and a pooled buffer.
func (c *conn) acquire(n int) *[]byte {
	_ = c.bytes.Acquire(context.Background(), int64(n))
	return getBuf(n)
}

// clipExtents trims a backend's extents to exactly cover [0, length) of the
// request, merging neighbours with equal flags.
func clipExtents(ex []Extent, length uint64) []Extent {
	var out []Extent
	var covered uint64
	for _, e := range ex {
		if covered >= length || e.Length == 0 {
			break
		}
		l := min(e.Length, length-covered)
		out = pushExtent(out, Extent{Length: l, Flags: e.Flags})
		covered += l
	}
	if covered < length {
		// The backend stopped early: the rest is reported as data.
		out = pushExtent(out, Extent{Length: length - covered})
	}
	return out
}

// alignExtents makes every extent boundary a multiple of the minimum block
// size bs, as the protocol requires of block status. ex starts at absolute
// offset off. A block that straddles extents gets the flags they all share
// (hole or zero only where every part is).
func alignExtents(ex []Extent, off, bs uint64) []Extent {
	if bs <= 1 {
		return ex
	}
	var out []Extent
	var partial Extent // a block under construction
	havePartial := false
	pos := off
	for _, e := range ex {
		start, end := pos, pos+e.Length
		pos = end
		for start < end {
			if havePartial || start%bs != 0 {
				blockEnd := (start/bs + 1) * bs
				seg := min(blockEnd, end) - start
				if !havePartial {
					partial, havePartial = Extent{Flags: e.Flags}, true
				}
				partial.Flags &= e.Flags
				partial.Length += seg
				start += seg
				if start == blockEnd {
					out = pushExtent(out, partial)
					havePartial = false
				}
				continue
			}
			if whole := (end - start) / bs * bs; whole > 0 {
				out = pushExtent(out, Extent{Length: whole, Flags: e.Flags})
				start += whole
				continue
			}
			partial, havePartial = Extent{Length: end - start, Flags: e.Flags}, true
			start = end
		}
	}
	if havePartial {
		out = pushExtent(out, partial)
	}
	return out
}

// pushExtent appends e, merging it into the last extent when flags match.
func pushExtent(out []Extent, e Extent) []Extent {
	if n := len(out); n > 0 && out[n-1].Flags == e.Flags {
		out[n-1].Length += e.Length
		return out
	}
	return append(out, e)
}

func (c *conn) handleBlockStatus(r Request) {
	ex, err := c.be.Extents(c.ctx, r.Offset, r.Length)
	if err != nil {
		c.backendError(r, err)
		return
	}
	length := r.Length
	if !c.st.extended {
		// 32-bit descriptors: never describe more than fits.
		length = min(length, uint64(0xffffffff)/uint64(c.exp.BlockSize.Minimum)*uint64(c.exp.BlockSize.Minimum))
	}
	ex = alignExtents(clipExtents(ex, length), r.Offset, uint64(c.exp.BlockSize.Minimum))
	if r.Flags&CmdFlagReqOne != 0 {
		ex = ex[:1]
	}
	if len(ex) > MaxExtents {
		ex = ex[:MaxExtents]
	}
	var payload []byte
	typ := ReplyTypeBlockStatus
	if c.st.extended {
		typ = ReplyTypeBlockStatusExt
		payload = AppendBlockStatusExt(make([]byte, 0, 8+16*len(ex)), c.st.metaContextID, ex)
	} else {
		payload = AppendBlockStatus(make([]byte, 0, 4+8*len(ex)), c.st.metaContextID, ex)
	}
	h := AppendChunkHeader(nil, c.st.extended, ReplyFlagDone, typ, r.Cookie, r.Offset, uint64(len(payload)))
	c.send(&reply{bufs: net.Buffers{h, payload}}, nil)
}

func (c *conn) sendOK(r Request) {
	var h []byte
	if c.st.extended {
		h = AppendChunkHeader(nil, true, ReplyFlagDone, ReplyTypeNone, r.Cookie, r.Offset, 0)
	} else {
		h = AppendSimpleReply(nil, 0, r.Cookie)
	}
	c.send(&reply{bufs: net.Buffers{h}}, nil)
}

// sendError answers r with errno: an error chunk with a message when
// structured replies are in use, else a simple reply.
func (c *conn) sendError(r Request, errno Errno, msg string) {
	if !c.st.structured {
		c.send(&reply{bufs: net.Buffers{AppendSimpleReply(nil, errno, r.Cookie)}}, nil)
		return
	}
	if msg == "" {
		msg = errno.Error()
	}
	p := AppendErrorChunk(nil, errno, msg)
	h := AppendChunkHeader(nil, c.st.extended, ReplyFlagDone, ReplyTypeError, r.Cookie, r.Offset, uint64(len(p)))
	c.send(&reply{bufs: net.Buffers{h, p}}, nil)
}

// send queues a reply and, unless another goroutine is already writing,
// becomes the connection's writer until the queue is empty. So one
// goroutine at a time writes to the socket, replies that pile up meanwhile
// go out together in one writev, and no reply waits for a goroutine to be
// woken. after runs once the reply is written (or dropped because the
// connection failed).
func (c *conn) send(rep *reply, after func()) {
	rep.after = after
	c.wmu.Lock()
	c.queue = append(c.queue, rep)
	if c.writing {
		c.wmu.Unlock()
		return
	}
	c.writing = true
	var vec net.Buffers
	for len(c.queue) > 0 {
		batch := c.queue
		c.queue = c.spare[:0]
		werr := c.werr
		c.wmu.Unlock()

		if werr == nil {
			vec = vec[:0]
			for _, r := range batch {
				vec = append(vec, r.bufs...)
			}
			if _, err := writeVec(c.nc, vec, &c.scratch); err != nil {
				werr = err
				c.kill(fmt.Errorf("%w: %v", errConnLost, err)) // the reader sees it and stops
			}
			clear(vec)
		}
		for _, r := range batch {
			for _, b := range r.release {
				putBuf(b)
			}
			if r.after != nil {
				r.after()
			}
		}
		clear(batch)

		c.wmu.Lock()
		c.spare = batch[:0]
		if werr != nil && c.werr == nil {
			c.werr = werr
			if isClosed(werr) {
				c.log.Info("client disconnected before its replies were sent", "unsent", len(batch), "error", werr)
			} else {
				c.log.Warn("writing replies failed; connection closed", "error", werr)
			}
		}
	}
	c.writing = false
	c.wmu.Unlock()
}

func isConnReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

func cmdName(t uint16) string {
	switch t {
	case CmdRead:
		return "READ"
	case CmdWrite:
		return "WRITE"
	case CmdDisc:
		return "DISC"
	case CmdFlush:
		return "FLUSH"
	case CmdTrim:
		return "TRIM"
	case CmdCache:
		return "CACHE"
	case CmdWriteZeroes:
		return "WRITE_ZEROES"
	case CmdBlockStatus:
		return "BLOCK_STATUS"
	}
	return fmt.Sprintf("command %d", t)
}
