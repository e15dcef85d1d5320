package main

// The client's workload: W writers, each owning every W-th block of the
// volume and writing its blocks in turn (so no block ever has two writes
// outstanding and the last acknowledged write of each is known exactly),
// plus R readers that read random blocks and check what they get. Every
// write carries a unique pattern derived from its sequence number, block
// and page, so any block read back says which write each of its pages
// holds, or that a page is corrupt or foreign.

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keelstore/keel/nbd"
)

const patternMagic = 0x4b45454c5354414c // "KEELSTAL"

// pageSize is the unit a read racing a write may tear at: the servers
// write the image with pwrite and read it with pread, which the kernel
// keeps atomic per page, no more. Each page of a block carries its own
// header, so a torn read says which write each page came from.
const pageSize = 4096

func pageOf(bs int) int { return min(bs, pageSize) }

// fillPattern fills b with write seq's pattern for block blk: per page a
// header (magic, seq, block, page) and a stream derived from all four.
func fillPattern(b []byte, seq, blk uint64) {
	ps := pageOf(len(b))
	for p := 0; p*ps < len(b); p++ {
		fillPage(b[p*ps:(p+1)*ps], seq, blk, uint64(p))
	}
}

func fillPage(b []byte, seq, blk, page uint64) {
	binary.LittleEndian.PutUint64(b[0:], patternMagic)
	binary.LittleEndian.PutUint64(b[8:], seq)
	binary.LittleEndian.PutUint64(b[16:], blk)
	binary.LittleEndian.PutUint64(b[24:], page)
	x := seq*0x9e3779b97f4a7c15 ^ blk<<20 ^ page ^ 1
	for i := 32; i+8 <= len(b); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(b[i:], x)
	}
}

// decodeBlock says which writes b holds: the lowest and highest write
// found in its pages (0 for a page of zeroes: never written). They differ
// only for a torn read. Any page that is neither zeroes nor a whole
// pattern of this block and page is an error.
func decodeBlock(b []byte, blk uint64, scratch []byte) (lo, hi uint64, err error) {
	ps := pageOf(len(b))
	for p := 0; p*ps < len(b); p++ {
		seq, err := decodePage(b[p*ps:(p+1)*ps], blk, uint64(p), scratch[:ps])
		if err != nil {
			return 0, 0, err
		}
		if p == 0 {
			lo, hi = seq, seq
		}
		lo, hi = min(lo, seq), max(hi, seq)
	}
	return lo, hi, nil
}

func decodePage(b []byte, blk, page uint64, scratch []byte) (uint64, error) {
	if binary.LittleEndian.Uint64(b) != patternMagic {
		for _, c := range b {
			if c != 0 {
				return 0, fmt.Errorf("block %d page %d holds neither zeroes nor a pattern (first bytes %x)", blk, page, b[:16])
			}
		}
		return 0, nil
	}
	seq, owner, at := binary.LittleEndian.Uint64(b[8:]), binary.LittleEndian.Uint64(b[16:]), binary.LittleEndian.Uint64(b[24:])
	if owner != blk || at != page {
		return 0, fmt.Errorf("block %d page %d holds page %d of write %d to block %d (misplaced)", blk, page, at, seq, owner)
	}
	fillPage(scratch, seq, blk, page)
	for i := range b {
		if b[i] != scratch[i] {
			return 0, fmt.Errorf("block %d page %d holds a corrupt copy of write %d (first difference at byte %d of the page)", blk, page, seq, i)
		}
	}
	return seq, nil
}

// blockState is what the client knows of one block.
type blockState struct {
	acked  atomic.Uint64 // the last acknowledged write (0: none)
	issued atomic.Uint64 // the last write sent (acked, failed or in flight)
}

// window collects what the client sees from a kill until the trial ends.
type window struct {
	kill      time.Time
	lastDone  time.Time     // the latest write completion seen
	recovered time.Duration // kill -> first completion of a write sent after the kill; 0: not yet
	recCh     chan struct{} // closed when recovered is set
	maxWrite  time.Duration // longest write latency among writes completing in the window
	maxRead   time.Duration
	maxGap    time.Duration // longest time without a write completing
	writes    int
}

// load drives the proxy through one NBD connection.
type load struct {
	c       *nbd.Client
	bs      uint64
	nblocks uint64
	writers int
	readers int
	reqTO   time.Duration
	blocks  []blockState
	seq     atomic.Uint64
	stop    atomic.Bool
	wg      sync.WaitGroup
	started []atomic.Int64 // per writer: start of its write in flight (unix ns), 0 when idle

	mu         sync.Mutex // guards the following
	win        *window
	lastDone   time.Time
	steady     reservoir // write latencies outside windows
	writes     uint64
	reads      uint64
	writeErrs  uint64
	readErrs   uint64
	mismatches uint64
	torn       uint64              // reads that raced a write to their block and hold pages of both (allowed)
	uncertain  map[uint64][]uint64 // block -> failed writes since its last ack
	problems   []string            // the first few errors and mismatches, for the report
}

func newLoad(c *nbd.Client, cfg *config) *load {
	n := c.Size() / cfg.bs
	return &load{
		c: c, bs: cfg.bs, nblocks: n, writers: cfg.writers, readers: cfg.readers, reqTO: cfg.requestTimeout,
		blocks: make([]blockState, n), started: make([]atomic.Int64, cfg.writers),
		uncertain: map[uint64][]uint64{}, steady: reservoir{max: 100000},
	}
}

func (l *load) problem(format string, args ...any) {
	if len(l.problems) < 20 {
		l.problems = append(l.problems, time.Now().Format("15:04:05.000")+" "+fmt.Sprintf(format, args...))
	}
}

// run starts the writers and readers; halt stops them after their current
// request.
func (l *load) run(ctx context.Context) {
	for w := range l.writers {
		l.wg.Add(1)
		go func() { defer l.wg.Done(); l.writer(ctx, w) }()
	}
	for r := range l.readers {
		l.wg.Add(1)
		go func() { defer l.wg.Done(); l.reader(ctx, uint64(r)) }()
	}
}

func (l *load) halt() {
	l.stop.Store(true)
	l.wg.Wait()
}

func (l *load) writer(ctx context.Context, w int) {
	buf := make([]byte, l.bs)
	per := l.nblocks / uint64(l.writers)
	for k := uint64(0); !l.stop.Load() && ctx.Err() == nil; k++ {
		blk := uint64(w) + uint64(l.writers)*(k%per)
		seq := l.seq.Add(1)
		fillPattern(buf, seq, blk)
		bst := &l.blocks[blk]
		bst.issued.Store(seq)
		start := time.Now()
		l.started[w].Store(start.UnixNano())
		rctx, cancel := context.WithTimeout(ctx, l.reqTO)
		err := l.c.WriteAt(rctx, buf, blk*l.bs, false)
		cancel()
		end := time.Now()
		l.started[w].Store(0)
		if err == nil {
			bst.acked.Store(seq)
		}
		l.mu.Lock()
		l.writes++
		if err != nil {
			l.uncertain[blk] = append(l.uncertain[blk], seq)
			if ctx.Err() == nil { // else the run was interrupted: not the proxy's failure
				l.writeErrs++
				l.problem("write %d to block %d failed after %v: %v", seq, blk, end.Sub(start).Round(time.Millisecond), err)
			}
		} else {
			delete(l.uncertain, blk)
		}
		if win := l.win; win != nil && end.After(win.kill) {
			win.writes++
			win.maxWrite = max(win.maxWrite, end.Sub(start))
			win.maxGap = max(win.maxGap, end.Sub(win.lastDone))
			win.lastDone = end
			if win.recovered == 0 && err == nil && start.After(win.kill) {
				win.recovered = end.Sub(win.kill)
				close(win.recCh)
			}
		} else if err == nil {
			l.steady.add(end.Sub(start))
		}
		l.lastDone = end
		l.mu.Unlock()
		if err != nil {
			time.Sleep(10 * time.Millisecond) // no hot loop when everything fails
		}
	}
}

// reader reads random blocks and checks that each holds a write no older
// than the block's last acknowledged write when the read was sent, and no
// newer than its last write sent when the read was answered.
func (l *load) reader(ctx context.Context, r uint64) {
	buf, scratch := make([]byte, l.bs), make([]byte, l.bs)
	rng := rand.New(rand.NewPCG(r, uint64(time.Now().UnixNano())))
	for !l.stop.Load() && ctx.Err() == nil {
		blk := rng.Uint64N(l.nblocks)
		bst := &l.blocks[blk]
		low := bst.acked.Load()
		start := time.Now()
		rctx, cancel := context.WithTimeout(ctx, l.reqTO)
		err := l.c.ReadAt(rctx, buf, blk*l.bs)
		cancel()
		end := time.Now()
		high := bst.issued.Load()
		var bad error
		torn := false
		if err == nil {
			lo, hi, derr := decodeBlock(buf, blk, scratch)
			switch {
			case derr != nil:
				bad = derr
			case lo < low || hi > high:
				what := fmt.Sprintf("write %d", lo)
				if lo != hi {
					what = fmt.Sprintf("pages of writes %d to %d", lo, hi)
				}
				bad = fmt.Errorf("block %d holds %s; expected writes from %d (acknowledged before the read) to %d (sent last)", blk, what, low, high)
			default:
				// Pages of two writes, both of which the read may see: it
				// raced a write to the block, which NBD allows.
				torn = lo != hi
			}
		}
		l.mu.Lock()
		l.reads++
		if torn {
			l.torn++
		}
		switch {
		case err != nil:
			if ctx.Err() == nil {
				l.readErrs++
				l.problem("read of block %d failed after %v: %v", blk, end.Sub(start).Round(time.Millisecond), err)
			}
		case bad != nil:
			l.mismatches++
			l.problem("read mismatch: %v", bad)
		}
		if win := l.win; win != nil && end.After(win.kill) {
			win.maxRead = max(win.maxRead, end.Sub(start))
		}
		l.mu.Unlock()
		if err != nil {
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// open starts a window at the kill, which is about to happen.
func (l *load) open(kill time.Time) *window {
	l.mu.Lock()
	defer l.mu.Unlock()
	w := &window{kill: kill, lastDone: l.lastDone, recCh: make(chan struct{})}
	if w.lastDone.IsZero() {
		w.lastDone = kill
	}
	l.win = w
	return w
}

// close ends the window, counting writes still in flight and the time
// since the last completion.
func (l *load) close() window {
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	w := l.win
	l.win = nil
	for i := range l.started {
		if s := l.started[i].Load(); s != 0 {
			w.maxWrite = max(w.maxWrite, now.Sub(time.Unix(0, s)))
		}
	}
	w.maxGap = max(w.maxGap, now.Sub(w.lastDone))
	return *w
}

// completions returns the number of writes answered so far.
func (l *load) completions() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.writes
}

// verify reads every block through c and checks it holds its last
// acknowledged write (or, for a block whose later write failed, that
// failed write). It runs after halt. It returns the blocks checked, how
// many were wrong, and the first few of those.
func (l *load) verify(ctx context.Context, c *nbd.Client) (checked, nbad uint64, bad []string, err error) {
	const chunk = 1 << 20
	per := max(1, chunk/l.bs)
	var mu sync.Mutex
	var next atomic.Uint64
	var wg sync.WaitGroup
	var firstErr error
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf, scratch := make([]byte, per*l.bs), make([]byte, l.bs)
			for {
				first := next.Add(per) - per
				if first >= l.nblocks || ctx.Err() != nil {
					return
				}
				n := min(per, l.nblocks-first)
				rctx, cancel := context.WithTimeout(ctx, l.reqTO)
				err := c.ReadAt(rctx, buf[:n*l.bs], first*l.bs)
				cancel()
				if err != nil {
					mu.Lock()
					firstErr = fmt.Errorf("reading blocks %d..%d: %w", first, first+n-1, err)
					mu.Unlock()
					return
				}
				for i := range n {
					blk := first + i
					seq, hi, derr := decodeBlock(buf[i*l.bs:(i+1)*l.bs], blk, scratch)
					if derr == nil && seq != hi {
						derr = fmt.Errorf("block %d holds pages of writes %d to %d after the load stopped (torn)", blk, seq, hi)
					}
					want := l.blocks[blk].acked.Load()
					ok := derr == nil && seq == want
					if derr == nil && !ok {
						l.mu.Lock()
						for _, u := range l.uncertain[blk] {
							ok = ok || u == seq
						}
						l.mu.Unlock()
					}
					mu.Lock()
					checked++
					if !ok {
						nbad++
						if len(bad) < 20 && derr != nil {
							bad = append(bad, derr.Error())
						} else if len(bad) < 20 {
							bad = append(bad, fmt.Sprintf("block %d holds write %d; its last acknowledged write is %d", blk, seq, want))
						}
					}
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	return checked, nbad, bad, firstErr
}

// reservoir keeps a uniform sample of at most max durations.
type reservoir struct {
	max  int
	n    uint64
	vals []time.Duration
}

func (r *reservoir) add(d time.Duration) {
	r.n++
	if len(r.vals) < r.max {
		r.vals = append(r.vals, d)
		return
	}
	if i := rand.Uint64N(r.n); i < uint64(r.max) {
		r.vals[i] = d
	}
}
