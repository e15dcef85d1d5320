// Package nbdtest holds test harnesses for the nbd package and its users: an
// in-memory Backend that tracks allocation, and a raw protocol client that
// can send anything, including what a well-behaved client never would.
package nbdtest

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/keelstore/keel/nbd"
)

// BlockSize is the allocation granularity of Mem.
const BlockSize = 4096

// Mem is an in-memory nbd.Backend. Blocks never written are holes; trims
// and zeroes of whole blocks make holes again, like a sparse file.
type Mem struct {
	mu    sync.Mutex // guards the following
	data  []byte
	alloc []bool // per BlockSize block
	// Flushes counts Flush calls.
	Flushes int
	// FUAs counts writes, trims and zeroes that asked for FUA.
	FUAs int
}

// NewMem returns a Mem of size bytes, all holes.
func NewMem(size uint64) *Mem {
	return &Mem{data: make([]byte, size), alloc: make([]bool, (size+BlockSize-1)/BlockSize)}
}

var _ nbd.Backend = (*Mem)(nil)

func (m *Mem) Size() uint64 { return uint64(len(m.data)) }

// Capabilities: Mem can do everything (see WithCaps for less).
func (m *Mem) Capabilities() nbd.Caps { return nbd.CapsAll }

func (m *Mem) ReadAt(_ context.Context, p []byte, off uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(p, m.data[off:])
	return nil
}

func (m *Mem) WriteAt(_ context.Context, p []byte, off uint64, fua bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	for b := off / BlockSize; b*BlockSize < off+uint64(len(p)); b++ {
		m.alloc[b] = true
	}
	if fua {
		m.FUAs++
	}
	return nil
}

func (m *Mem) Flush(context.Context) error {
	m.mu.Lock()
	m.Flushes++
	m.mu.Unlock()
	return nil
}

func (m *Mem) Trim(ctx context.Context, off, length uint64, fua bool) error {
	return m.Zero(ctx, off, length, 0)
}

// Zero models a filesystem that punches holes and zeroes ranges in place,
// so a fast zero (nbd.ZeroFast) always goes ahead; tests wrap Mem to refuse
// it.
func (m *Mem) Zero(_ context.Context, off, length uint64, f nbd.ZeroFlags) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
	if f&nbd.ZeroNoHole != 0 {
		for b := off / BlockSize; b*BlockSize < off+length; b++ {
			m.alloc[b] = true
		}
	} else {
		first := (off + BlockSize - 1) / BlockSize
		for b := first; (b+1)*BlockSize <= off+length; b++ {
			m.alloc[b] = false
		}
	}
	if f&nbd.ZeroFUA != 0 {
		m.FUAs++
	}
	return nil
}

func (m *Mem) Extents(_ context.Context, off, length uint64) ([]nbd.Extent, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	end := min(off+length, m.Size())
	var out []nbd.Extent
	for pos := off; pos < end; {
		b := pos / BlockSize
		next := min((b+1)*BlockSize, end)
		var flags uint32
		if !m.alloc[b] {
			flags = nbd.StateHole | nbd.StateZero
		}
		if n := len(out); n > 0 && out[n-1].Flags == flags {
			out[n-1].Length += next - pos
		} else {
			out = append(out, nbd.Extent{Length: next - pos, Flags: flags})
		}
		pos = next
	}
	return out, nil
}

func (m *Mem) Cache(_ context.Context, off, length uint64) error { return nil }

// WithCaps returns b declaring caps instead of its own capabilities: for
// tests of what the server advertises and refuses.
func WithCaps(b nbd.Backend, caps nbd.Caps) nbd.Backend { return capped{b, caps} }

type capped struct {
	nbd.Backend
	caps nbd.Caps
}

func (c capped) Capabilities() nbd.Caps { return c.caps }

// Bytes returns a copy of the backend's contents.
func (m *Mem) Bytes() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.data...)
}

// Client is a raw NBD client for tests. It is not safe for concurrent use:
// send several requests, then read their replies.
type Client struct {
	Conn net.Conn
	br   *bufio.Reader

	// Set by the handshake.
	Structured, Extended bool
	Size                 uint64
	Flags                uint16
	MetaContextID        uint32

	pendingReads map[uint64]uint64 // cookie -> length of each read in flight
	readOffsets  map[uint64]uint64 // cookie -> offset (compact chunks lack it)
}

// NewClient wraps a connection to a server that has not yet greeted.
func NewClient(c net.Conn) *Client {
	return &Client{Conn: c, br: bufio.NewReader(c), pendingReads: map[uint64]uint64{}, readOffsets: map[uint64]uint64{}}
}

// Greet reads the server greeting and sends client flags.
func (c *Client) Greet(clientFlags uint32) (uint16, error) {
	b := make([]byte, 18)
	if _, err := io.ReadFull(c.br, b); err != nil {
		return 0, err
	}
	f, err := nbd.ParseServerGreeting(b)
	if err != nil {
		return 0, err
	}
	_, err = c.Conn.Write(be32(clientFlags))
	return f, err
}

// OptReply is one option reply.
type OptReply struct {
	nbd.OptionReplyHeader
	Data []byte
}

// Option sends an option and reads replies until a final one (ACK or error).
func (c *Client) Option(opt uint32, data []byte) ([]OptReply, error) {
	if _, err := c.Conn.Write(nbd.AppendOption(nil, opt, data)); err != nil {
		return nil, err
	}
	var out []OptReply
	for {
		h := make([]byte, 20)
		if _, err := io.ReadFull(c.br, h); err != nil {
			return out, err
		}
		rh, err := nbd.ParseOptionReplyHeader(h)
		if err != nil {
			return out, err
		}
		if rh.Option != opt {
			return out, fmt.Errorf("reply for option %d, sent %d", rh.Option, opt)
		}
		d := make([]byte, rh.Length)
		if _, err := io.ReadFull(c.br, d); err != nil {
			return out, err
		}
		out = append(out, OptReply{rh, d})
		if rh.Type == nbd.RepAck || nbd.IsRepErr(rh.Type) {
			return out, nil
		}
	}
}

// StartTLS sends NBD_OPT_STARTTLS and, once it is acknowledged, runs the
// TLS handshake: the client goes on over TLS.
func (c *Client) StartTLS(cfg *tls.Config) error {
	rs, err := c.Option(nbd.OptStartTLS, nil)
	if err != nil {
		return err
	}
	if last := rs[len(rs)-1]; last.Type != nbd.RepAck {
		return fmt.Errorf("NBD_OPT_STARTTLS refused: %#x %s", last.Type, last.Data)
	}
	tc := tls.Client(c.Conn, cfg)
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	c.Conn, c.br = tc, bufio.NewReader(tc)
	return nil
}

// Handshake describes what Connect negotiates.
type Handshake struct {
	Export     string
	Structured bool
	Extended   bool
	Meta       bool // select base:allocation
	BlockSize  bool // request NBD_INFO_BLOCK_SIZE (promising to honour it)
	// TLS, when set, sends NBD_OPT_STARTTLS first and goes on over TLS.
	TLS *tls.Config
}

// Connect runs a whole handshake ending in NBD_OPT_GO.
func (c *Client) Connect(h Handshake) error {
	if _, err := c.Greet(nbd.ClientFixedNewstyle | nbd.ClientNoZeroes); err != nil {
		return err
	}
	final := func(rs []OptReply, err error) ([]OptReply, error) {
		if err != nil {
			return rs, err
		}
		if last := rs[len(rs)-1]; last.Type != nbd.RepAck {
			return rs, fmt.Errorf("option %d refused: %#x %s", last.Option, last.Type, last.Data)
		}
		return rs, nil
	}
	if h.TLS != nil {
		if err := c.StartTLS(h.TLS); err != nil {
			return err
		}
	}
	if h.Extended {
		if _, err := final(c.Option(nbd.OptExtendedHeaders, nil)); err != nil {
			return err
		}
		c.Extended, c.Structured = true, true
	} else if h.Structured {
		if _, err := final(c.Option(nbd.OptStructuredReply, nil)); err != nil {
			return err
		}
		c.Structured = true
	}
	if h.Meta {
		rs, err := final(c.Option(nbd.OptSetMetaContext, nbd.AppendMetaContextRequest(nil,
			nbd.MetaContextRequest{Export: h.Export, Queries: []string{nbd.MetaContextBaseAllocation}})))
		if err != nil {
			return err
		}
		for _, r := range rs {
			if r.Type == nbd.RepMetaContext && len(r.Data) >= 4 {
				c.MetaContextID = be32u(r.Data)
			}
		}
	}
	req := nbd.ExportRequest{Name: h.Export}
	if h.BlockSize {
		req.Infos = []uint16{nbd.InfoBlockSize}
	}
	rs, err := final(c.Option(nbd.OptGo, nbd.AppendExportRequest(nil, req)))
	if err != nil {
		return err
	}
	for _, r := range rs {
		if r.Type == nbd.RepInfo && len(r.Data) == 12 && r.Data[0] == 0 && r.Data[1] == byte(nbd.InfoExport) {
			c.Size = be64u(r.Data[2:])
			c.Flags = uint16(r.Data[10])<<8 | uint16(r.Data[11])
		}
	}
	return nil
}

// Send sends one request and its payload.
func (c *Client) Send(r nbd.Request, payload []byte) error {
	if r.Type == nbd.CmdRead {
		c.pendingReads[r.Cookie] = r.Length
		c.readOffsets[r.Cookie] = r.Offset
	}
	b := nbd.AppendRequest(nil, r, c.Extended)
	_, err := c.Conn.Write(append(b, payload...))
	return err
}

// Result is a whole reply to one request.
type Result struct {
	Cookie  uint64
	Err     nbd.Errno
	Message string
	// Chunks lists the chunk types received (structured replies).
	Chunks []uint16
	// Data is a read's data assembled from data and hole chunks, with
	// Holes the number of bytes that came as holes.
	Data  []byte
	Holes uint64
	// Extents from a block status reply.
	Extents []nbd.Extent
}

// Recv reads chunks until one request's reply is complete. Chunks of other
// requests interleaved with it are a test failure for this simple client,
// so tests read replies of concurrent requests with RecvAny.
func (c *Client) Recv() (*Result, error) {
	partial := map[uint64]*Result{}
	for {
		res, done, err := c.recvChunk(partial)
		if err != nil || done {
			return res, err
		}
	}
}

func (c *Client) recvChunk(partial map[uint64]*Result) (*Result, bool, error) {
	var m [4]byte
	if _, err := io.ReadFull(c.br, m[:]); err != nil {
		return nil, false, err
	}
	n := nbd.ReplyHeaderSize(be32u(m[:]))
	if n == 0 {
		return nil, false, fmt.Errorf("bad reply magic %x", m)
	}
	h := make([]byte, n)
	copy(h, m[:])
	if _, err := io.ReadFull(c.br, h[4:]); err != nil {
		return nil, false, err
	}
	rep, err := nbd.ParseReply(h)
	if err != nil {
		return nil, false, err
	}
	res := partial[rep.Cookie]
	if res == nil {
		res = &Result{Cookie: rep.Cookie}
		partial[rep.Cookie] = res
	}
	if rep.Magic == nbd.MagicSimpleReply {
		res.Err = rep.Error
		if l, ok := c.pendingReads[rep.Cookie]; ok {
			delete(c.pendingReads, rep.Cookie)
			if rep.Error == 0 {
				res.Data = make([]byte, l)
				if _, err := io.ReadFull(c.br, res.Data); err != nil {
					return nil, false, err
				}
			}
		}
		return res, true, nil
	}
	if rep.Length > 64<<20 {
		return nil, false, fmt.Errorf("chunk payload of %d bytes", rep.Length)
	}
	p := make([]byte, rep.Length)
	if _, err := io.ReadFull(c.br, p); err != nil {
		return nil, false, err
	}
	res.Chunks = append(res.Chunks, rep.Type)
	switch rep.Type {
	case nbd.ReplyTypeOffsetData, nbd.ReplyTypeOffsetHole:
		l := c.pendingReads[rep.Cookie]
		if res.Data == nil {
			res.Data = make([]byte, l)
		}
		if len(p) < 8 {
			return nil, false, errors.New("short content chunk")
		}
		base := be64u(p) - c.readOffsets[rep.Cookie]
		if c.Extended && rep.Offset != c.readOffsets[rep.Cookie] {
			return nil, false, fmt.Errorf("extended chunk offset %d, request offset %d", rep.Offset, c.readOffsets[rep.Cookie])
		}
		if base > l {
			return nil, false, fmt.Errorf("content chunk at %d outside the request", be64u(p))
		}
		if rep.Type == nbd.ReplyTypeOffsetData {
			copy(res.Data[base:], p[8:])
		} else {
			if len(p) != 12 {
				return nil, false, errors.New("hole chunk length")
			}
			res.Holes += uint64(be32u(p[8:]))
		}
	case nbd.ReplyTypeBlockStatus, nbd.ReplyTypeBlockStatusExt:
		_, ex, err := nbd.ParseBlockStatus(p, rep.Type == nbd.ReplyTypeBlockStatusExt)
		if err != nil {
			return nil, false, err
		}
		res.Extents = ex
	case nbd.ReplyTypeNone:
	default:
		if rep.Type&(1<<15) != 0 {
			e, msg, err := nbd.ParseErrorChunk(p)
			if err != nil {
				return nil, false, err
			}
			res.Err, res.Message = e, msg
		} else {
			return nil, false, fmt.Errorf("unknown chunk type %d", rep.Type)
		}
	}
	if rep.Flags&nbd.ReplyFlagDone != 0 {
		delete(partial, rep.Cookie)
		delete(c.pendingReads, rep.Cookie)
		delete(c.readOffsets, rep.Cookie)
		return res, true, nil
	}
	return res, false, nil
}

// RecvAll reads n complete replies, in whatever order they come.
func (c *Client) RecvAll(n int) ([]*Result, error) {
	partial := map[uint64]*Result{}
	var out []*Result
	for len(out) < n {
		res, done, err := c.recvChunk(partial)
		if err != nil {
			return out, err
		}
		if done {
			out = append(out, res)
		}
	}
	return out, nil
}

// Do sends one request and waits for its reply.
func (c *Client) Do(r nbd.Request, payload []byte) (*Result, error) {
	if err := c.Send(r, payload); err != nil {
		return nil, err
	}
	return c.Recv()
}

func be32(v uint32) []byte { return []byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)} }
func be32u(b []byte) uint32 {
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}
func be64u(b []byte) uint64 { return uint64(be32u(b))<<32 | uint64(be32u(b[4:])) }
