package imagesync

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sync/errgroup"
)

// Defaults for Config.
const (
	DefaultChunkSize        = 1 << 20
	DefaultSegmentSize      = 256 << 20
	DefaultPerPeer          = 4
	DefaultRequestTimeout   = 2 * time.Minute
	DefaultRetryBackoff     = 250 * time.Millisecond
	DefaultMaxPeerFailures  = 3
	DefaultProgressInterval = 500 * time.Millisecond
	// maxPerPeer bounds Config.PerPeer.
	maxPerPeer = 64
	// fetchSize is the most bytes one range request asks for: adjacent
	// differing chunks are fetched together up to this (at least one chunk).
	fetchSize = 16 << 20
)

// Config says what to sync from where. Zero values take the defaults.
type Config struct {
	// Image is the local image, made equal to the peers' images. Required.
	Image Image

	// Peers are the base URLs of the peers' sync handlers, for example
	// "http://127.0.0.1:7001/v1/sync". At least one, no duplicates.
	// Segments are spread over all of them.
	Peers []string

	// ChunkSize is the granularity of comparison and copying: a positive
	// multiple of 4096, at most 64 MiB. Default 1 MiB.
	ChunkSize uint64

	// SegmentSize is how much of the image one hashes request covers (one
	// unit of work for a peer): a multiple of ChunkSize, at most 1 GiB.
	// Default 256 MiB.
	SegmentSize uint64

	// PerPeer is how many requests run at once against each peer, 1 to 64.
	// Default 4.
	PerPeer int

	// Client makes the requests. Default: a client with connect and
	// handshake timeouts, its idle connections closed when Sync returns.
	Client *http.Client

	// RequestTimeout bounds one request, body included. Default 2 minutes.
	RequestTimeout time.Duration

	// RetryBackoff is how long a peer's worker waits after a failure before
	// it takes more work. Default 250ms.
	RetryBackoff time.Duration

	// MaxPeerFailures: a peer that fails this many requests in a row is
	// dropped for the rest of the sync, and a segment is not given again
	// to a peer it failed on this many times. Default 3. A peer that
	// answers outside the protocol (4xx, bad body) is dropped at once.
	MaxPeerFailures int

	// Log receives one line per peer failure and a summary. Default: none.
	Log hclog.Logger

	// Progress, if set, is called every ProgressInterval while the sync
	// runs and once more, with Done set, when it ends. Calls never overlap.
	Progress func(Progress)

	// ProgressInterval is the time between Progress calls. Default 500ms.
	ProgressInterval time.Duration
}

// Progress is a snapshot of a running sync.
type Progress struct {
	BytesTotal    uint64 // image size
	BytesCompared uint64 // bytes of the image compared so far (whole segments)
	// BytesMoved is data fetched over the network. Chunks the peer reports
	// as all zeroes are never fetched.
	BytesMoved uint64
	// BytesZeroed is the size of differing chunks that were made holes
	// locally, without fetching, because the peer's chunk is all zeroes.
	BytesZeroed uint64
	// RateBytesPerSec is BytesMoved per second, smoothed over a few
	// seconds; on the final report, the average over the whole sync.
	RateBytesPerSec float64
	Peers           int   // peers still in use
	Done            bool  // the final report: Sync is returning
	Err             error // on the final report, what Sync returns
}

// Stats summarise a finished (or failed) sync.
type Stats struct {
	Compared uint64 // bytes compared (the image size, when Sync succeeds)
	Moved    uint64 // bytes fetched over the network
	Zeroed   uint64 // bytes of differing all-zero chunks made holes locally
	// Chunks and ChunksDiffering count the chunks of completed segments,
	// as found by the comparison that completed them.
	Chunks, ChunksDiffering int
	Duration                time.Duration
	// PerPeer is the bytes moved from each peer, by base URL as given.
	PerPeer map[string]uint64
}

// withDefaults returns c with zero fields set to their defaults.
func (c Config) withDefaults() Config {
	if c.ChunkSize == 0 {
		c.ChunkSize = DefaultChunkSize
	}
	if c.SegmentSize == 0 {
		c.SegmentSize = max(DefaultSegmentSize/c.ChunkSize, 1) * c.ChunkSize
	}
	if c.PerPeer == 0 {
		c.PerPeer = DefaultPerPeer
	}
	if c.RequestTimeout == 0 {
		c.RequestTimeout = DefaultRequestTimeout
	}
	if c.RetryBackoff == 0 {
		c.RetryBackoff = DefaultRetryBackoff
	}
	if c.MaxPeerFailures == 0 {
		c.MaxPeerFailures = DefaultMaxPeerFailures
	}
	if c.ProgressInterval == 0 {
		c.ProgressInterval = DefaultProgressInterval
	}
	if c.Log == nil {
		c.Log = hclog.NewNullLogger()
	}
	return c
}

// Validate reports the first field that is out of range, zero values
// standing for their defaults.
func (c Config) Validate() error {
	c = c.withDefaults()
	switch {
	case c.Image == nil:
		return errors.New("imagesync: Config.Image is required")
	case len(c.Peers) == 0:
		return errors.New("imagesync: Config.Peers is empty; give at least one peer")
	case c.ChunkSize%Align != 0 || c.ChunkSize > MaxChunk:
		return fmt.Errorf("imagesync: Config.ChunkSize %d must be a multiple of %d from %d to %d", c.ChunkSize, Align, Align, MaxChunk)
	case c.SegmentSize%c.ChunkSize != 0 || c.SegmentSize > MaxHashSpan:
		return fmt.Errorf("imagesync: Config.SegmentSize %d must be a multiple of ChunkSize (%d) up to %d", c.SegmentSize, c.ChunkSize, MaxHashSpan)
	case c.PerPeer < 1 || c.PerPeer > maxPerPeer:
		return fmt.Errorf("imagesync: Config.PerPeer %d must be from 1 to %d", c.PerPeer, maxPerPeer)
	case c.RequestTimeout < 0:
		return fmt.Errorf("imagesync: Config.RequestTimeout %v must be positive", c.RequestTimeout)
	case c.RetryBackoff < 0:
		return fmt.Errorf("imagesync: Config.RetryBackoff %v must not be negative", c.RetryBackoff)
	case c.MaxPeerFailures < 1:
		return fmt.Errorf("imagesync: Config.MaxPeerFailures %d must be at least 1", c.MaxPeerFailures)
	case c.ProgressInterval < 0:
		return fmt.Errorf("imagesync: Config.ProgressInterval %v must be positive", c.ProgressInterval)
	}
	seen := map[string]bool{}
	for i, p := range c.Peers {
		u, err := url.Parse(p)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
			return fmt.Errorf("imagesync: Config.Peers[%d] %q must be an http or https URL without query", i, p)
		}
		base := strings.TrimRight(p, "/")
		if seen[base] {
			return fmt.Errorf("imagesync: Config.Peers[%d] %q is listed twice", i, p)
		}
		seen[base] = true
	}
	return nil
}

// syncer is one run of Sync.
type syncer struct {
	cfg    Config
	img    Image
	size   uint64
	client *http.Client
	log    hclog.Logger
	q      *queue
	peers  []*peer

	compared, moved, zeroed atomic.Uint64
	chunks, differing       atomic.Int64
}

// Sync makes cfg.Image equal to the peers' images, fetching only the chunks
// that differ, and syncs it to stable storage. It fails when the peers'
// image size differs from the local one, when the local image fails, when
// ctx ends (returning ctx's error), or when every peer has failed before
// the whole image was compared; in every case what was already copied
// stays, and a later Sync resumes from it. Stats are filled in either way.
func Sync(ctx context.Context, cfg Config) (Stats, error) {
	if err := cfg.Validate(); err != nil {
		return Stats{}, err
	}
	cfg = cfg.withDefaults()
	start := time.Now()
	s := &syncer{
		cfg:    cfg,
		img:    cfg.Image,
		size:   cfg.Image.Size(),
		client: cfg.Client,
		log:    cfg.Log,
	}
	if s.client == nil {
		s.client = defaultClient(cfg.PerPeer)
		defer s.client.CloseIdleConnections()
	}
	for i, p := range cfg.Peers {
		s.peers = append(s.peers, &peer{idx: i, base: strings.TrimRight(p, "/")})
	}
	s.q = newQueue(s.size, cfg.SegmentSize, len(s.peers), cfg.MaxPeerFailures)
	s.log.Info("image sync starting", "bytes", s.size, "peers", len(s.peers),
		"chunk", cfg.ChunkSize, "segment", cfg.SegmentSize, "per_peer", cfg.PerPeer)

	stopProgress := s.startProgress(start)
	err := s.run(ctx)
	if err == nil {
		if serr := s.img.Sync(); serr != nil {
			err = fmt.Errorf("imagesync: syncing the local image: %w", serr)
		}
	}
	stopProgress(err)

	st := s.stats(time.Since(start))
	if err != nil {
		s.log.Error("image sync failed", "compared", st.Compared, "moved", st.Moved, "zeroed", st.Zeroed, "error", err)
	} else {
		s.log.Info("image sync done", "compared", st.Compared, "moved", st.Moved, "zeroed", st.Zeroed,
			"chunks", st.Chunks, "differing", st.ChunksDiffering, "duration", st.Duration)
	}
	return st, err
}

// run drives the workers until the queue is drained, ctx ends, a fatal
// error happens, or no peer can take what is left.
func (s *syncer) run(ctx context.Context) error {
	g, gctx := errgroup.WithContext(ctx)
	for _, p := range s.peers {
		for range s.cfg.PerPeer {
			g.Go(func() error { return s.worker(gctx, p) })
		}
	}
	err := g.Wait()
	if ctx.Err() != nil {
		return fmt.Errorf("imagesync: %w", ctx.Err())
	}
	if err != nil {
		return err
	}
	if n, bytes := s.q.left(); n > 0 {
		var errs []error
		for _, p := range s.peers {
			dropped, last := p.status()
			switch {
			case last == nil:
				errs = append(errs, fmt.Errorf("peer %s: no failure, but every segment left failed there %d times", p.base, s.cfg.MaxPeerFailures))
			case dropped:
				errs = append(errs, fmt.Errorf("dropped: %w", last))
			default:
				errs = append(errs, fmt.Errorf("last failure: %w", last))
			}
		}
		return fmt.Errorf("%w: %d segments (%d bytes) not compared: %w", ErrNoPeers, n, bytes, errors.Join(errs...))
	}
	return nil
}

// worker takes segments for peer p until nothing is left for it.
func (s *syncer) worker(ctx context.Context, p *peer) error {
	w := &work{buf: make([]byte, max(s.cfg.ChunkSize, readPiece))}
	w.summer = newChunkSummer(s.img, w.buf)
	for {
		seg, ok := s.q.take(ctx, p.idx, p.isDropped)
		if !ok {
			return nil
		}
		err := s.segment(ctx, p, w, seg)
		if err == nil {
			p.succeeded()
			s.q.done(seg)
			continue
		}
		s.q.retry(seg, p.idx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var pe *peerError
		if !errors.As(err, &pe) {
			return err // the local image failed, or the sizes differ
		}
		if p.failed(pe, s.cfg.MaxPeerFailures) {
			s.log.Error("dropping sync peer", "peer", p.base, "error", pe.err)
			s.q.wake()
			return nil
		}
		if p.isDropped() { // by another of its workers
			return nil
		}
		s.log.Warn("sync peer failed; its segment goes back to the queue", "peer", p.base,
			"offset", seg.off, "length", seg.length, "error", pe.err)
		t := time.NewTimer(s.cfg.RetryBackoff)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
	}
}

// work is a worker's reusable state.
type work struct {
	buf    []byte
	summer *chunkSummer
	remote []sum
	local  []sum
	alloc  []bool
}

// segment compares seg against peer p and copies what differs.
func (s *syncer) segment(ctx context.Context, p *peer, w *work, seg *segment) error {
	var err error
	if w.remote, err = s.fetchHashes(ctx, p, seg, w.remote[:0]); err != nil {
		return err
	}
	chunk := s.cfg.ChunkSize
	if w.local, w.alloc, err = w.summer.sums(seg.off, seg.length, chunk, w.local[:0], w.alloc[:0]); err != nil {
		return fmt.Errorf("imagesync: hashing the local image at %d+%d: %w", seg.off, seg.length, err)
	}
	differs := func(i int) bool { return w.remote[i] != w.local[i] }
	chunkAt := func(i int) (off, length uint64) {
		off = seg.off + uint64(i)*chunk
		return off, min(chunk, seg.off+seg.length-off)
	}
	n, differing := len(w.remote), 0
	for i := 0; i < n; {
		if err := ctx.Err(); err != nil {
			return err
		}
		if !differs(i) {
			i++
			continue
		}
		if w.remote[i].zero {
			off, length := chunkAt(i)
			if err := zeroRange(s.img, off, length); err != nil {
				return fmt.Errorf("imagesync: punching a hole in the local image at %d+%d: %w", off, length, err)
			}
			s.zeroed.Add(length)
			differing++
			i++
			continue
		}
		// A run of differing data chunks, fetched with one request.
		j := i + 1
		for j < n && differs(j) && !w.remote[j].zero && uint64(j-i+1)*chunk <= fetchSize {
			j++
		}
		off, _ := chunkAt(i)
		endOff, endLen := chunkAt(j - 1)
		err := s.fetchRange(ctx, p, off, endOff+endLen-off, func(body *peerReader) error {
			for k := i; k < j; k++ {
				coff, clen := chunkAt(k)
				b := w.buf[:clen]
				if err := readFull(body, b); err != nil {
					return err
				}
				s.moved.Add(clen)
				p.moved.Add(clen)
				if err := writeSparse(s.img, b, coff, w.alloc[k]); err != nil {
					return fmt.Errorf("imagesync: writing the local image at %d+%d: %w", coff, clen, err)
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		differing += j - i
		i = j
	}
	s.compared.Add(seg.length)
	s.chunks.Add(int64(n))
	s.differing.Add(int64(differing))
	return nil
}

// writeSparse writes p at off, leaving 4 KiB blocks of zeroes as holes:
// punched when the chunk had allocated blocks before, skipped when it was
// all hole already.
func writeSparse(img Image, p []byte, off uint64, allocated bool) error {
	block := func(i int) []byte { return p[i:min(i+Align, len(p))] }
	for i := 0; i < len(p); {
		zero := isZero(block(i))
		j := i + len(block(i))
		for j < len(p) && isZero(block(j)) == zero {
			j += len(block(j))
		}
		var err error
		switch {
		case !zero:
			err = img.WriteAt(p[i:j], off+uint64(i), false)
		case allocated:
			err = zeroRange(img, off+uint64(i), uint64(j-i))
		}
		if err != nil {
			return err
		}
		i = j
	}
	return nil
}

// zeroRange makes [off, off+length) of img read as zeroes, as a hole where
// the filesystem can punch one.
func zeroRange(img Image, off, length uint64) error {
	if z, ok := img.(zeroer); ok {
		return z.Zero(off, length, 0)
	}
	return img.Trim(off, length, false)
}

func (s *syncer) livePeers() int {
	n := 0
	for _, p := range s.peers {
		if !p.isDropped() {
			n++
		}
	}
	return n
}

func (s *syncer) progress() Progress {
	return Progress{
		BytesTotal:    s.size,
		BytesCompared: s.compared.Load(),
		BytesMoved:    s.moved.Load(),
		BytesZeroed:   s.zeroed.Load(),
		Peers:         s.livePeers(),
	}
}

// startProgress reports progress every ProgressInterval until the returned
// function is called; that reports once more, as the final report.
func (s *syncer) startProgress(start time.Time) (stop func(err error)) {
	if s.cfg.Progress == nil {
		return func(error) {}
	}
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(s.cfg.ProgressInterval)
		defer t.Stop()
		var rate float64
		lastMoved, lastAt := uint64(0), start
		for {
			select {
			case <-quit:
				return
			case now := <-t.C:
				pr := s.progress()
				dt := now.Sub(lastAt).Seconds()
				if dt > 0 {
					inst := float64(pr.BytesMoved-lastMoved) / dt
					// Exponential smoothing with a time constant of 3s.
					a := 1 - math.Exp(-dt/3)
					if lastAt == start {
						a = 1
					}
					rate += a * (inst - rate)
				}
				lastMoved, lastAt = pr.BytesMoved, now
				pr.RateBytesPerSec = rate
				s.cfg.Progress(pr)
			}
		}
	})
	return func(err error) {
		close(quit)
		wg.Wait()
		pr := s.progress()
		if d := time.Since(start).Seconds(); d > 0 {
			pr.RateBytesPerSec = float64(pr.BytesMoved) / d
		}
		pr.Done, pr.Err = true, err
		s.cfg.Progress(pr)
	}
}

func (s *syncer) stats(d time.Duration) Stats {
	st := Stats{
		Compared:        s.compared.Load(),
		Moved:           s.moved.Load(),
		Zeroed:          s.zeroed.Load(),
		Chunks:          int(s.chunks.Load()),
		ChunksDiffering: int(s.differing.Load()),
		Duration:        d,
		PerPeer:         map[string]uint64{},
	}
	for i, p := range s.peers {
		st.PerPeer[s.cfg.Peers[i]] = p.moved.Load()
	}
	return st
}
