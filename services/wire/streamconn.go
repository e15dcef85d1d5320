package wire

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica"
)

// The connections of the apply stream (the layout is in stream.go): the
// client end, Stream, and the server end, StreamServer.

// Errors of the apply stream.
var (
	// ErrStreamUnsupported: the server answered the upgrade with
	// something other than 101 (a build without the stream); use POST
	// /v1/apply with it.
	ErrStreamUnsupported = errors.New("wire: the server does not offer the apply stream")
	// ErrStreamClosed: the stream was closed (Close, or by the server);
	// the requests it carried have no answer and may be re-sent.
	ErrStreamClosed = errors.New("wire: apply stream closed")
)

// streamHandshakeTimeout bounds the upgrade when the caller's context has
// no deadline.
const streamHandshakeTimeout = 10 * time.Second

// Stream is the client end of an apply stream: Apply may be called from
// any number of goroutines at once, and each call gets its own answer,
// whatever the order the server answers in. Its one reader goroutine ends
// with the connection (Close, or an error), failing every call still
// waiting with the cause.
type Stream struct {
	conn  net.Conn
	br    *bufio.Reader
	level replica.Level // the server's
	done  chan struct{} // closed when the reader has returned

	wmu     sync.Mutex // guards the write queue
	wqueue  []*streamSend
	wspare  []*streamSend // the last batch's slice, for reuse
	writing bool          // a caller is writing the queue out
	vec     net.Buffers   // the writer's, reused
	scratch []byte        // the writer's gather buffer on a TLS connection
	batches uint64        // writes of the queue (one writev each on TCP)

	mu      sync.Mutex // guards the following
	next    uint64
	pending map[uint64]chan streamResult
	err     error // why the stream ended; set once
}

type streamResult struct {
	a   StreamAnswer
	err error
}

// streamSend is one request frame waiting in the write queue.
type streamSend struct {
	hdr      [FrameHeaderSize]byte
	cmd      [][]byte
	deadline time.Time // zero: none
	sent     chan error
}

// DialStream opens an apply stream to the server at addr over c's
// transport: its dialer (the chaos tests' hook) and, for an https
// address, its TLS configuration. A server that does not offer the
// stream gives ErrStreamUnsupported.
func (c *Client) DialStream(ctx context.Context, addr string) (*Stream, error) {
	u, err := url.Parse(c.BaseURL(addr))
	if err != nil {
		return nil, fmt.Errorf("apply stream to %s: %w", addr, err)
	}
	dial := (&net.Dialer{}).DialContext
	var tlsCfg *tls.Config
	if t, ok := c.HTTP.Transport.(*http.Transport); ok {
		if t.DialContext != nil {
			dial = t.DialContext
		}
		tlsCfg = t.TLSClientConfig
	}
	hctx, cancel := context.WithTimeout(ctx, streamHandshakeTimeout)
	defer cancel()
	conn, err := dial(hctx, "tcp", u.Host)
	if err != nil {
		return nil, fmt.Errorf("apply stream to %s: %w", addr, err)
	}
	if u.Scheme == "https" {
		cfg := &tls.Config{}
		if tlsCfg != nil {
			cfg = tlsCfg.Clone()
		}
		if cfg.ServerName == "" {
			cfg.ServerName = u.Hostname()
		}
		cfg.NextProtos = []string{"http/1.1"} // an upgrade is HTTP/1.1's; HTTP/2 has none
		tc := tls.Client(conn, cfg)
		if err := tc.HandshakeContext(hctx); err != nil {
			conn.Close()
			return nil, fmt.Errorf("apply stream to %s: TLS: %w", addr, err)
		}
		conn = tc
	}
	s, err := handshake(hctx, conn, u)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("apply stream to %s: %w", addr, err)
	}
	go s.read()
	return s, nil
}

// handshake asks for the upgrade on conn and reads the answer.
func handshake(ctx context.Context, conn net.Conn, u *url.URL) (*Stream, error) {
	if d, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	req, err := http.NewRequest(http.MethodPost, u.String()+StreamPath, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", StreamProtocol)
	req.Header.Set(LevelHeader, strconv.Itoa(int(Level)))
	if err := req.Write(conn); err != nil {
		return nil, fmt.Errorf("asking for the upgrade: %w", err)
	}
	br := bufio.NewReaderSize(conn, 64<<10)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return nil, fmt.Errorf("reading the upgrade's answer: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		return nil, fmt.Errorf("%w: %s: %s", ErrStreamUnsupported, resp.Status, strings.TrimSpace(string(body)))
	}
	if !strings.EqualFold(resp.Header.Get("Upgrade"), StreamProtocol) {
		return nil, fmt.Errorf("%w: upgraded to %q", ErrStreamUnsupported, resp.Header.Get("Upgrade"))
	}
	lv, _ := strconv.Atoi(resp.Header.Get(LevelHeader))
	if !stop() {
		return nil, fmt.Errorf("upgrade: %w", context.Cause(ctx))
	}
	_ = conn.SetDeadline(time.Time{})
	return &Stream{conn: conn, br: br, level: replica.Level(lv).Or(), done: make(chan struct{}),
		next: 1, pending: map[uint64]chan streamResult{}}, nil
}

// Level is the feature level the server said it speaks.
func (s *Stream) Level() replica.Level { return s.level }

// Done is closed once the stream has ended; Err then says why.
func (s *Stream) Done() <-chan struct{} { return s.done }

// Err is why the stream ended (nil while it runs).
func (s *Stream) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Close ends the stream (calls still waiting get ErrStreamClosed) and
// waits for its reader.
func (s *Stream) Close() error {
	s.fail(ErrStreamClosed)
	<-s.done
	return nil
}

// fail ends the stream with err (the first cause wins), answering every
// call still waiting.
func (s *Stream) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return
	}
	s.err = err
	for tag, ch := range s.pending {
		ch <- streamResult{err: err}
		delete(s.pending, tag)
	}
	s.conn.Close()
}

// read is the stream's one reader: it hands each answer to its call.
func (s *Stream) read() {
	defer close(s.done)
	var hdr [FrameHeaderSize]byte
	body := make([]byte, 0, 256)
	for {
		if _, err := io.ReadFull(s.br, hdr[:]); err != nil {
			s.fail(fmt.Errorf("%w: reading: %w", ErrStreamClosed, err))
			return
		}
		h, err := ParseFrameHeader(hdr[:])
		if err == nil && h.Kind != FrameAnswer {
			err = fmt.Errorf("%w: kind %d from the server", ErrBadFrame, h.Kind)
		}
		if err != nil {
			s.fail(err)
			return
		}
		if cap(body) < int(h.Length) {
			body = make([]byte, h.Length)
		}
		body = body[:h.Length]
		if _, err := io.ReadFull(s.br, body); err != nil {
			s.fail(fmt.Errorf("%w: reading an answer: %w", ErrStreamClosed, err))
			return
		}
		a, err := ParseAnswer(body)
		if err != nil {
			s.fail(err)
			return
		}
		if h.Tag == 0 {
			s.fail(fmt.Errorf("%w: the server closed it: %s", ErrStreamClosed, a.Response.Error))
			return
		}
		s.mu.Lock()
		if ch, ok := s.pending[h.Tag]; ok {
			ch <- streamResult{a: a}
			delete(s.pending, h.Tag)
		}
		s.mu.Unlock()
	}
}

// Apply sends an encoded command (Command.EncodeCompat, or the versioned
// form to a server whose Level is at least replica.LevelVersioned), given
// as the parts it is made of (a write's header and its data: written
// together, not copied into one buffer), and waits for its answer,
// telling the server ctx's deadline. It answers like Client.Apply: an
// ApplyResponse (which may be a refusal), ErrRemoteNotLeader, or an error
// for a failed attempt (ErrStreamClosed among them when the stream ended
// first: the command may have been applied, and is re-sent with its
// request id).
func (s *Stream) Apply(ctx context.Context, cmd ...[]byte) (ApplyResponse, error) {
	n := 0
	for _, p := range cmd {
		n += len(p)
	}
	if n == 0 || n > MaxStreamCommand {
		return ApplyResponse{}, fmt.Errorf("apply stream: a command of %d bytes, want 1 to %d", n, MaxStreamCommand)
	}
	h := FrameHeader{Kind: FrameRequest, Length: uint32(n)}
	d, hasDeadline := ctx.Deadline()
	if hasDeadline {
		ms := time.Until(d).Milliseconds()
		if ms <= 0 {
			return ApplyResponse{}, fmt.Errorf("apply stream: %w", context.DeadlineExceeded)
		}
		h.Deadline = uint32(min(ms, 1<<32-1))
	}
	ch := make(chan streamResult, 1)
	s.mu.Lock()
	if s.err != nil {
		err := s.err
		s.mu.Unlock()
		return ApplyResponse{}, err
	}
	h.Tag = s.next
	s.next++
	s.pending[h.Tag] = ch
	s.mu.Unlock()

	if !hasDeadline {
		d = time.Time{}
	}
	if err := s.write(h, cmd, d); err != nil {
		s.fail(fmt.Errorf("%w: writing: %w", ErrStreamClosed, err)) // a frame cut short breaks the framing
	}
	select {
	case r := <-ch:
		if r.err != nil {
			return ApplyResponse{}, r.err
		}
		return r.a.result()
	case <-ctx.Done():
		s.mu.Lock()
		delete(s.pending, h.Tag) // a late answer is dropped
		s.mu.Unlock()
		return ApplyResponse{}, fmt.Errorf("apply stream: %w", context.Cause(ctx))
	}
}

// write sends one request frame and returns once it is written (cmd is
// the caller's again) or the write failed. Frames queue up while one
// caller writes: that caller writes the whole queue out, each round in
// one writev, so a proxy with 32 writes in flight makes a few system
// calls, not 32 (Client.writeQueued in package nbd does the same).
func (s *Stream) write(h FrameHeader, cmd [][]byte, deadline time.Time) error {
	f := &streamSend{cmd: cmd, deadline: deadline, sent: make(chan error, 1)}
	AppendFrameHeader(f.hdr[:0], h)
	s.wmu.Lock()
	s.wqueue = append(s.wqueue, f)
	if s.writing {
		s.wmu.Unlock()
		return <-f.sent // bounded by the batch's write deadline
	}
	s.writing = true
	s.wmu.Unlock()
	runtime.Gosched() // let the callers already on their way queue theirs behind this
	s.writeQueued()
	return <-f.sent
}

// writeQueued writes the queue out until it is empty; the caller set
// s.writing. A batch's write deadline is the latest of its frames' (none
// if one has none): a frame is never cut short for another's deadline,
// and a connection that takes no bytes at all still fails every frame by
// then.
func (s *Stream) writeQueued() {
	for {
		s.wmu.Lock()
		batch := s.wqueue
		if len(batch) == 0 {
			s.writing = false
			s.wmu.Unlock()
			return
		}
		s.wqueue, s.wspare = s.wspare[:0], nil
		s.batches++
		s.wmu.Unlock()

		v := s.vec[:0]
		var d time.Time
		for i, f := range batch {
			v = append(append(v, f.hdr[:]), f.cmd...) // one writev on a plain TCP connection
			if i == 0 || (!d.IsZero() && (f.deadline.IsZero() || f.deadline.After(d))) {
				d = f.deadline
			}
		}
		_ = s.conn.SetWriteDeadline(d)
		_, err := nbd.WriteBuffers(s.conn, v, &s.scratch) // few TLS records, not two per frame
		clear(v)                                          // drop the references to the callers' data
		s.vec = v[:0]
		for _, f := range batch {
			f.sent <- err
		}
		clear(batch)
		s.wmu.Lock()
		s.wspare = batch[:0]
		s.wmu.Unlock()
	}
}

// result turns an answer into what Client.Apply would have returned.
func (a StreamAnswer) result() (ApplyResponse, error) {
	switch a.Status {
	case StreamAnswered:
		return a.Response, nil
	case StreamNotLeader:
		return ApplyResponse{}, fmt.Errorf("%w (leader: %q): %s", ErrRemoteNotLeader, a.Leader, a.Response.Error)
	}
	return ApplyResponse{}, fmt.Errorf("apply stream: %s", a.Response.Error)
}

// StreamApplier answers one request of an apply stream: cmd is the
// frame's command (a buffer of its own, which the applier may keep), ctx
// carries the frame's deadline.
type StreamApplier func(ctx context.Context, cmd []byte) StreamAnswer

// MaxStreamInflight bounds the requests of one connection being applied
// at once (and so the memory their commands hold: 64 MiB of 1 MiB
// writes); the server reads the next frame once one is answered.
const MaxStreamInflight = 64

// StreamServer is the server end: its ServeHTTP takes the upgrade on an
// HTTP API route (StreamPath) and serves the connection, calling Apply
// for each request on one of the connection's workers (up to
// MaxStreamInflight at once) and answering as each ends.
// It owns every connection it upgraded (net/http forgets hijacked
// connections): Close stops them and waits.
type StreamServer struct {
	// Apply answers each request. Required.
	Apply StreamApplier
	// Level is the feature level said in the upgrade's answer.
	Level replica.Level
	// Log gets one line per connection closed for a broken frame.
	// Default: discard.
	Log hclog.Logger

	wg sync.WaitGroup // every connection being served

	mu     sync.Mutex // guards the following
	conns  map[net.Conn]struct{}
	closed bool
}

func (s *StreamServer) log() hclog.Logger {
	if s.Log == nil {
		return hclog.NewNullLogger()
	}
	return s.Log
}

// ServeHTTP takes the upgrade and serves the connection until it ends.
func (s *StreamServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !headerHas(r.Header, "Connection", "upgrade") || !strings.EqualFold(r.Header.Get("Upgrade"), StreamProtocol) {
		w.Header().Set("Upgrade", StreamProtocol)
		WriteJSON(w, http.StatusUpgradeRequired, ErrorBody{Error: "the apply stream needs Connection: Upgrade and Upgrade: " + StreamProtocol})
		return
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		WriteJSON(w, http.StatusInternalServerError, ErrorBody{Error: "apply stream: " + err.Error()})
		return
	}
	_ = conn.SetDeadline(time.Time{}) // net/http's; before add, so that it never clears Close's
	if !s.add(conn) {
		conn.Close() // stopping: the client dials again elsewhere
		return
	}
	defer s.wg.Done()
	defer s.remove(conn)
	ans := "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + StreamProtocol +
		"\r\n" + LevelHeader + ": " + strconv.Itoa(int(s.Level)) + "\r\n\r\n"
	if _, err := conn.Write([]byte(ans)); err != nil {
		conn.Close()
		return
	}
	s.serveConn(r.Context(), conn, brw.Reader)
}

// headerHas reports whether a comma-separated header holds token.
func headerHas(h http.Header, key, token string) bool {
	for _, v := range h.Values(key) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

func (s *StreamServer) add(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if s.conns == nil {
		s.conns = map[net.Conn]struct{}{}
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	return true
}

func (s *StreamServer) remove(c net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
}

// Close stops every connection as a graceful stop does: no new request is
// read, each one already read is answered, then the connection is
// closed; a client re-sends what it had not sent yet elsewhere. It
// refuses new upgrades and returns once every connection has ended.
func (s *StreamServer) Close() {
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		_ = c.SetReadDeadline(time.Unix(1, 0)) // ends the reader; the answers still go out
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// serveConn is one connection's reader loop; each request is applied on
// a worker goroutine, which writes its answer. It returns once the reader
// has stopped and every request read has been answered.
//
// Workers outlive their request and take the next (up to
// MaxStreamInflight of them): a fresh goroutine per request would grow
// its stack again through the Raft call path every time. Answers written
// while another is being written queue up and go out together in one
// Write.
func (s *StreamServer) serveConn(ctx context.Context, conn net.Conn, br *bufio.Reader) {
	ctx, cancel := context.WithCancel(ctx)
	aw := &answerWriter{conn: conn}
	type job struct {
		h   FrameHeader
		cmd []byte
	}
	jobs := make(chan job)
	var applies sync.WaitGroup
	defer func() {
		close(jobs)
		applies.Wait()
		cancel()
		conn.Close()
	}()
	sem := make(chan struct{}, MaxStreamInflight)
	do := func(j job) {
		defer func() { <-sem }()
		actx := ctx
		if j.h.Deadline > 0 {
			var cancel context.CancelFunc
			actx, cancel = context.WithTimeout(ctx, time.Duration(j.h.Deadline)*time.Millisecond)
			defer cancel()
		}
		aw.answer(j.h.Tag, s.Apply(actx, j.cmd))
	}
	worker := func(j job) {
		defer applies.Done()
		do(j)
		for j := range jobs {
			do(j)
		}
	}
	workers := 0
	var hdr [FrameHeaderSize]byte
	for {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return // closed by the client, cut, or Close
		}
		h, err := ParseFrameHeader(hdr[:])
		if err == nil && h.Kind != FrameRequest {
			err = fmt.Errorf("%w: kind %d from a client", ErrBadFrame, h.Kind)
		}
		if err != nil {
			s.log().Warn("apply stream: closing a connection that sent a bad frame", "remote", conn.RemoteAddr().String(), "error", err)
			aw.answer(0, StreamAnswer{Status: StreamFailed, Response: ApplyResponse{Error: err.Error()}})
			return
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return
		}
		cmd := make([]byte, h.Length) // becomes the command: read once, kept by the applier
		if _, err := io.ReadFull(br, cmd); err != nil {
			<-sem
			return // cut mid-frame: nothing of it is applied
		}
		j := job{h, cmd}
		select {
		case jobs <- j: // an idle worker took it
		default:
			if workers < MaxStreamInflight {
				workers++
				applies.Add(1)
				go worker(j)
			} else {
				jobs <- j // sem says one of them is about to be free
			}
		}
	}
}

// answerWriter writes a stream connection's answers: whoever finds it
// idle writes what is queued until nothing is, the others only queue.
type answerWriter struct {
	conn net.Conn

	mu      sync.Mutex
	queued  []byte
	spare   []byte
	writing bool
	failed  bool
}

// answer queues a's frame for tag and, unless another caller is writing,
// writes the queue out. A failed write closes the connection: the client
// is gone, and the reader ends too.
func (w *answerWriter) answer(tag uint64, a StreamAnswer) {
	w.mu.Lock()
	w.queued = AppendAnswer(w.queued, tag, a)
	if w.writing || w.failed {
		w.mu.Unlock()
		return
	}
	w.writing = true
	// Raft answers the writes it committed together at once; let the
	// other workers it woke queue theirs before this one writes.
	w.mu.Unlock()
	runtime.Gosched()
	w.mu.Lock()
	for len(w.queued) > 0 {
		b := w.queued
		w.queued, w.spare = w.spare[:0], nil
		w.mu.Unlock()
		_ = w.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
		_, err := w.conn.Write(b)
		w.mu.Lock()
		if cap(b) <= 1<<20 {
			w.spare = b[:0]
		}
		if err != nil {
			w.failed = true
			w.queued = nil
			w.conn.Close()
		}
	}
	w.writing = false
	w.mu.Unlock()
}
