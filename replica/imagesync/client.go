package imagesync

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// peer is one source image, as seen by the syncing side.
type peer struct {
	idx  int
	base string // base URL without a trailing slash

	moved   atomic.Uint64 // bytes fetched from this peer
	mu      sync.Mutex    // guards the following
	strikes int           // consecutive failures
	dropped bool
	lastErr error
}

// peerError is a failure to be blamed on a peer, not on the local image.
// The segment goes to another peer; a permanent one drops the peer at once.
type peerError struct {
	peer      string
	permanent bool
	err       error
}

func (e *peerError) Error() string { return fmt.Sprintf("peer %s: %v", e.peer, e.err) }
func (e *peerError) Unwrap() error { return e.err }

func (p *peer) fail(permanent bool, err error) *peerError {
	return &peerError{peer: p.base, permanent: permanent, err: err}
}

func (p *peer) isDropped() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.dropped
}

// succeeded clears the peer's strikes.
func (p *peer) succeeded() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.strikes = 0
}

// failed records a failure and reports whether it dropped the peer now.
func (p *peer) failed(err *peerError, maxStrikes int) (droppedNow bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.lastErr = err
	p.strikes++
	if p.dropped || (!err.permanent && p.strikes < maxStrikes) {
		return false
	}
	p.dropped = true
	return true
}

func (p *peer) status() (dropped bool, lastErr error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.dropped, p.lastErr
}

// defaultClient has timeouts for connecting and handshakes; whole requests
// are bounded by Config.RequestTimeout.
func defaultClient(perPeer int) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   10 * time.Second,
		MaxIdleConnsPerHost:   perPeer,
		IdleConnTimeout:       90 * time.Second,
		ExpectContinueTimeout: time.Second,
	}}
}

// response is a successful answer whose body the caller reads and closes.
type response struct {
	body   io.ReadCloser
	length int64 // Content-Length, -1 when unknown
	cancel context.CancelFunc
}

func (r *response) Close() {
	r.body.Close()
	r.cancel()
}

// get asks peer p for endpoint?query and checks the status and the image
// size. Errors are *peerError, except a size mismatch, which is fatal.
func (s *syncer) get(ctx context.Context, p *peer, endpoint string, query url.Values) (*response, error) {
	rctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
	u := p.base + "/" + endpoint + "?" + query.Encode()
	req, err := http.NewRequestWithContext(rctx, http.MethodGet, u, nil)
	if err != nil {
		cancel()
		return nil, p.fail(true, err)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		cancel()
		return nil, p.fail(false, err)
	}
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		cancel()
		err := fmt.Errorf("%s %s: %s: %s", endpoint, query.Encode(), resp.Status, strings.TrimSpace(string(msg)))
		// 5xx is the peer's trouble and may pass; anything else means we
		// and the peer do not understand each other, which will not.
		if resp.StatusCode >= 500 {
			return nil, p.fail(false, err)
		}
		return nil, p.fail(true, fmt.Errorf("%w: %w", ErrPeerProtocol, err))
	}
	hs := resp.Header.Get(SizeHeader)
	size, perr := strconv.ParseUint(hs, 10, 64)
	if perr != nil {
		resp.Body.Close()
		cancel()
		return nil, p.fail(true, fmt.Errorf("%w: %s header %q is not a size", ErrPeerProtocol, SizeHeader, hs))
	}
	if size != s.size {
		resp.Body.Close()
		cancel()
		return nil, fmt.Errorf("%w: peer %s has %d bytes, the local image %d", ErrSizeMismatch, p.base, size, s.size)
	}
	return &response{body: resp.Body, length: resp.ContentLength, cancel: cancel}, nil
}

// fetchHashes appends the peer's hash records for seg to out.
func (s *syncer) fetchHashes(ctx context.Context, p *peer, seg *segment, out []sum) ([]sum, error) {
	n := int((seg.length + s.cfg.ChunkSize - 1) / s.cfg.ChunkSize)
	q := url.Values{}
	q.Set("offset", strconv.FormatUint(seg.off, 10))
	q.Set("length", strconv.FormatUint(seg.length, 10))
	q.Set("chunk", strconv.FormatUint(s.cfg.ChunkSize, 10))
	resp, err := s.get(ctx, p, "hashes", q)
	if err != nil {
		return nil, err
	}
	defer resp.Close()
	want := int64(n * recordSize)
	if resp.length >= 0 && resp.length != want {
		return nil, p.fail(true, fmt.Errorf("%w: hashes of %d+%d: Content-Length %d, want %d", ErrPeerProtocol, seg.off, seg.length, resp.length, want))
	}
	b, err := io.ReadAll(io.LimitReader(resp.body, want+1))
	if err != nil {
		return nil, p.fail(false, fmt.Errorf("reading hashes of %d+%d: %w", seg.off, seg.length, err))
	}
	if int64(len(b)) < want {
		return nil, p.fail(false, fmt.Errorf("hashes of %d+%d: short body, %d of %d bytes: %w", seg.off, seg.length, len(b), want, io.ErrUnexpectedEOF))
	}
	out, err = parseRecords(b, n, out)
	if err != nil {
		return nil, p.fail(true, err)
	}
	return out, nil
}

// fetchRange asks the peer for [off, off+length) and hands the open body to
// read, which must consume exactly length bytes. Short bodies and read
// errors are the peer's; errors returned by read are passed through.
func (s *syncer) fetchRange(ctx context.Context, p *peer, off, length uint64, read func(body *peerReader) error) error {
	q := url.Values{}
	q.Set("offset", strconv.FormatUint(off, 10))
	q.Set("length", strconv.FormatUint(length, 10))
	resp, err := s.get(ctx, p, "range", q)
	if err != nil {
		return err
	}
	defer resp.Close()
	if resp.length >= 0 && uint64(resp.length) != length {
		return p.fail(true, fmt.Errorf("%w: range %d+%d: Content-Length %d", ErrPeerProtocol, off, length, resp.length))
	}
	return read(&peerReader{r: resp.body, p: p, what: fmt.Sprintf("range %d+%d", off, length)})
}

// peerReader turns read errors from a peer's body into *peerError, so the
// caller can tell them from local write errors.
type peerReader struct {
	r    io.Reader
	p    *peer
	what string
}

func (r *peerReader) Read(b []byte) (int, error) {
	n, err := r.r.Read(b)
	if err != nil && err != io.EOF {
		err = r.p.fail(false, fmt.Errorf("reading %s: %w", r.what, err))
	}
	return n, err
}

// readFull is io.ReadFull that blames a short body on the peer.
func readFull(r *peerReader, b []byte) error {
	_, err := io.ReadFull(r, b)
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		var pe *peerError
		if !errors.As(err, &pe) {
			err = r.p.fail(false, fmt.Errorf("%s: short body: %w", r.what, io.ErrUnexpectedEOF))
		}
	}
	return err
}
