package soak

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keelstore/keel/nbd"
)

// ErrBadConfig is wrapped by every Validate error of this package.
var ErrBadConfig = errors.New("soak: bad config")

// WorkloadConfig describes the client side of a soak.
type WorkloadConfig struct {
	// Dial opens one NBD connection to the volume (the proxy); required.
	// It is called again, with a back-off, when a connection dies.
	Dial func(ctx context.Context) (*nbd.Client, error)
	// Conns is the number of NBD connections; default 3, range 1 to 64.
	Conns int
	// ClientsPerConn is the number of clients sharing each connection,
	// each with one operation in flight; default 2, range 1 to 64.
	ClientsPerConn int
	// HotBlocks is the size of the hot set: blocks 0..HotBlocks-1, where
	// most operations go; default 16, at least 1.
	HotBlocks uint64
	// Blocks is the volume's size in blocks; the cold range is
	// HotBlocks..Blocks-1. Required, more than HotBlocks+8.
	Blocks uint64
	// Seed seeds every client's choices.
	Seed uint64
	// OpTimeout bounds one operation; past it the outcome is unknown.
	// Default 2m (longer than the proxy's own time-outs, so a time-out
	// here means the proxy never answered).
	OpTimeout time.Duration
	// Logf, if set, hears of reconnections.
	Logf func(format string, args ...any)
}

// Validate names the first bad field.
func (c WorkloadConfig) Validate() error {
	c.defaults()
	switch {
	case c.Dial == nil:
		return fmt.Errorf("%w: WorkloadConfig.Dial is nil", ErrBadConfig)
	case c.Conns < 1 || c.Conns > 64:
		return fmt.Errorf("%w: WorkloadConfig.Conns %d: must be from 1 to 64", ErrBadConfig, c.Conns)
	case c.ClientsPerConn < 1 || c.ClientsPerConn > 64:
		return fmt.Errorf("%w: WorkloadConfig.ClientsPerConn %d: must be from 1 to 64", ErrBadConfig, c.ClientsPerConn)
	case c.Blocks <= c.HotBlocks+8:
		return fmt.Errorf("%w: WorkloadConfig.Blocks %d: must exceed HotBlocks+8 (%d)", ErrBadConfig, c.Blocks, c.HotBlocks+8)
	case c.OpTimeout < time.Second:
		return fmt.Errorf("%w: WorkloadConfig.OpTimeout %v: must be 1s or more", ErrBadConfig, c.OpTimeout)
	}
	return nil
}

func (c *WorkloadConfig) defaults() {
	if c.Conns == 0 {
		c.Conns = 3
	}
	if c.ClientsPerConn == 0 {
		c.ClientsPerConn = 2
	}
	if c.HotBlocks == 0 {
		c.HotBlocks = 16
	}
	if c.OpTimeout == 0 {
		c.OpTimeout = 2 * time.Minute
	}
	if c.Logf == nil {
		c.Logf = func(string, ...any) {}
	}
}

// Workload drives the volume and records every operation in a History.
type Workload struct {
	cfg  WorkloadConfig
	hist *History

	okWrites atomic.Uint64 // acknowledged changes so far, for progress
	errs     atomic.Uint64 // operations that failed so far
	reconns  atomic.Uint64
}

// NewWorkload checks cfg; Run starts the clients.
func NewWorkload(cfg WorkloadConfig, hist *History) (*Workload, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.defaults()
	return &Workload{cfg: cfg, hist: hist}, nil
}

// Progress is what the workload has done so far.
func (w *Workload) Progress() (acked, errs, reconnects uint64) {
	return w.okWrites.Load(), w.errs.Load(), w.reconns.Load()
}

// conn is one NBD connection shared by some clients; when it dies the
// first client to notice dials a new one.
type conn struct {
	w *Workload

	mu sync.Mutex // guards c
	c  *nbd.Client
}

// get returns a live client, dialing (with a back-off) until ctx ends.
func (cn *conn) get(ctx context.Context) (*nbd.Client, error) {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	if cn.c != nil {
		select {
		case <-cn.c.Done():
			cn.c.Close()
			cn.c = nil
			cn.w.reconns.Add(1)
		default:
			return cn.c, nil
		}
	}
	backoff := 50 * time.Millisecond
	for {
		c, err := cn.w.cfg.Dial(ctx)
		if err == nil {
			cn.c = c
			return c, nil
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
		backoff = min(2*backoff, time.Second)
	}
}

func (cn *conn) close() {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	if cn.c != nil {
		cn.c.Close()
		cn.c = nil
	}
}

// Run runs Conns×ClientsPerConn clients until ctx ends, then waits for
// their operations in flight (each bounded by OpTimeout).
func (w *Workload) Run(ctx context.Context) {
	var wg sync.WaitGroup
	conns := make([]*conn, w.cfg.Conns)
	for i := range conns {
		conns[i] = &conn{w: w}
	}
	for id := 0; id < w.cfg.Conns*w.cfg.ClientsPerConn; id++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.client(ctx, id, conns[id%w.cfg.Conns])
		}()
	}
	wg.Wait()
	for _, cn := range conns {
		cn.close()
	}
}

// client is one client: one operation at a time, chosen from its own
// random stream.
func (w *Workload) client(ctx context.Context, id int, cn *conn) {
	rng := rand.New(rand.NewPCG(w.cfg.Seed, uint64(id)+1))
	buf := make([]byte, 8*BlockSize)
	var seq uint32
	for ctx.Err() == nil {
		c, err := cn.get(ctx)
		if err != nil {
			return
		}
		op := w.choose(rng, id)
		if op.Kind == Write {
			seq++
			op.Value = MakeValue(uint32(id)+1, seq)
		}
		w.do(c, op, buf)
	}
}

// choose picks the next operation: 70% on the hot set; writes 45%, reads
// 35%, flushes, trims and zeroes 20%; cold trims, zeroes and reads span up
// to 8 blocks.
func (w *Workload) choose(rng *rand.Rand, id int) Op {
	op := Op{Client: id, Blocks: 1}
	hot := rng.IntN(10) < 7
	if hot {
		op.Block = rng.Uint64N(w.cfg.HotBlocks)
	} else {
		op.Block = w.cfg.HotBlocks + rng.Uint64N(w.cfg.Blocks-w.cfg.HotBlocks-8)
	}
	switch p := rng.IntN(100); {
	case p < 45:
		op.Kind = Write
	case p < 80:
		op.Kind = Read
	case p < 86:
		op.Kind = Flush
	case p < 93:
		op.Kind = Trim
	default:
		op.Kind = ZeroOp
	}
	if !hot && op.Kind != Write {
		op.Blocks = 1 + rng.IntN(8)
	}
	return op
}

// do runs op on c and records it.
func (w *Workload) do(c *nbd.Client, op Op, buf []byte) {
	ctx, cancel := context.WithTimeout(context.Background(), w.cfg.OpTimeout)
	defer cancel()
	off, n := op.Block*BlockSize, uint64(op.Blocks)*BlockSize
	b := buf[:n]
	if op.Kind == Write {
		Fill(b, op.Value, op.Block)
	}
	op.Call = w.hist.Now()
	var err error
	switch op.Kind {
	case Read:
		err = c.ReadAt(ctx, b, off)
	case Write:
		err = c.WriteAt(ctx, b, off, false)
	case Trim:
		err = c.Trim(ctx, off, n, false)
	case ZeroOp:
		err = c.Zero(ctx, off, n, 0)
	case Flush:
		err = c.Flush(ctx)
	}
	op.Return = w.hist.Now()
	if err != nil {
		op.Out, op.Err = Unknown, err.Error()
		op.Got = nil
		w.errs.Add(1)
	} else {
		op.Out = OK
		if op.Kind == Read {
			op.Got = make([]Value, op.Blocks)
			for i := range op.Got {
				op.Got[i] = Decode(b[i*BlockSize:(i+1)*BlockSize], op.Block+uint64(i))
			}
		}
		if op.Mutates() {
			w.okWrites.Add(1)
		}
	}
	w.hist.Add(op)
}

// ReadBack reads every block the history changed, through one new
// connection, retrying a failed read until ctx ends; each read is recorded
// as a Final op. It returns the number of reads that failed.
func ReadBack(ctx context.Context, dial func(context.Context) (*nbd.Client, error), hist *History, client int) (failed int, err error) {
	changed := map[uint64]bool{}
	for _, op := range hist.Ops() {
		if op.Mutates() {
			for i := 0; i < op.Blocks; i++ {
				changed[op.Block+uint64(i)] = true
			}
		}
	}
	w := &Workload{hist: hist, cfg: WorkloadConfig{Dial: dial, OpTimeout: time.Minute, Logf: func(string, ...any) {}}}
	cn := &conn{w: w}
	defer cn.close()
	buf := make([]byte, BlockSize)
	for blk := range changed {
		for {
			c, err := cn.get(ctx)
			if err != nil {
				return failed, fmt.Errorf("soak: read-back: %w", err)
			}
			op := Op{Client: client, Kind: Read, Block: blk, Blocks: 1, Final: true}
			op.Call = hist.Now()
			rctx, cancel := context.WithTimeout(ctx, time.Minute)
			err = c.ReadAt(rctx, buf, blk*BlockSize)
			cancel()
			op.Return = hist.Now()
			if err == nil {
				op.Out, op.Got = OK, []Value{Decode(buf, blk)}
				hist.Add(op)
				break
			}
			failed++
			op.Out, op.Err, op.Final = Unknown, err.Error(), false
			hist.Add(op)
			if ctx.Err() != nil {
				return failed, fmt.Errorf("soak: read-back: %w", ctx.Err())
			}
		}
	}
	return failed, nil
}
