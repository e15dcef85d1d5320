package server

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sync/errgroup"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/nbdserve"
	"github.com/keelstore/keel/services/wire"
)

// Volume serves the replicated volume over NBD on any node.
//
// Reads come from this node's image. Writes, trims and zeroes become Raft
// commands proposed through replica.Node.Propose: on the leader they are
// applied directly; on a follower they are forwarded to the leader's HTTP
// API (Forwarder), and the follower answers only once it has applied the
// command itself, so a client connected to a follower reads its own
// writes. Either way a write is acknowledged only after it is
// committed on a quorum (and so durable in the quorum's logs, which is why
// FLUSH and FUA need no further work). Without a leader, writes wait up to
// WriteTimeout and then fail with EIO; reads keep working.
//
// Clients connected straight to a server write with epoch 0: accepted only
// while no writer (keel proxy) holds the volume, refused with EPERM once one
// does. They get no exactly-once guarantee across failovers; writes are
// absolute overwrites, so a resent write is harmless unless the client
// itself overlapped writes in flight.
type Volume struct {
	Holder       *NodeHolder
	SizeBytes    uint64
	WriteTimeout time.Duration
	Log          hclog.Logger
}

var _ nbd.Backend = (*Volume)(nil)

func (v *Volume) Size() uint64 { return v.SizeBytes }

// Capabilities: everything. Flush and FUA cost nothing (a write is answered
// once it is durable in a quorum's logs) and act across connections; Cache
// is a hint this backend ignores; extents come from this node's image. A
// fast zero is honoured, see Zero.
func (v *Volume) Capabilities() nbd.Caps { return nbd.CapsAll }

// readable returns the node once its image can be read: running, not in
// the middle of a resync (which leaves the image a mix of old and new
// ranges), and, on a leader, holding every write committed before the
// read (replica.Node.ReadBarrier). It waits up to WriteTimeout (and while
// ctx, the NBD connection's, lasts), then fails with EIO.
func (v *Volume) readable(ctx context.Context) (*replica.Node, error) {
	ctx, cancel := context.WithTimeout(ctx, v.WriteTimeout)
	defer cancel()
	n := v.Holder.Peek()
	if n == nil || n.Resyncing() || n.Replaying() {
		var err error
		if n, err = v.waitReadable(ctx); err != nil {
			return nil, err
		}
	}
	if err := n.ReadBarrier(ctx); err != nil {
		// No quorum to commit the barrier: reads keep working (promise 2),
		// from what this node has applied.
		v.Log.Debug("read without a barrier", "error", err)
	}
	return n, nil
}

func (v *Volume) waitReadable(ctx context.Context) (*replica.Node, error) {
	for {
		n, err := v.Holder.Get(ctx)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", nbd.EIO, err)
		}
		if !n.Resyncing() && !n.Replaying() {
			return n, nil
		}
		select {
		case <-ctx.Done():
			if n.Replaying() {
				return nil, fmt.Errorf("%w: the node is applying its log again after a restart", nbd.EIO)
			}
			return nil, fmt.Errorf("%w: the image is being resynced from peers", nbd.EIO)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (v *Volume) ReadAt(ctx context.Context, p []byte, off uint64) error {
	n, err := v.readable(ctx)
	if err != nil {
		return err
	}
	return n.Image().ReadAt(p, off)
}

func (v *Volume) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	if len(p) <= replica.MaxCommandData {
		return v.apply(ctx, &replica.Command{Kind: replica.KindWrite, Offset: off, Data: p})
	}
	var g errgroup.Group
	for done := 0; done < len(p); done += replica.MaxCommandData {
		part := p[done:min(done+replica.MaxCommandData, len(p))]
		at := off + uint64(done)
		g.Go(func() error {
			return v.apply(ctx, &replica.Command{Kind: replica.KindWrite, Offset: at, Data: part})
		})
	}
	return g.Wait()
}

func (v *Volume) Flush(context.Context) error { return nil }

func (v *Volume) Trim(ctx context.Context, off, length uint64, fua bool) error {
	return v.apply(ctx, &replica.Command{Kind: replica.KindTrim, Offset: off, Length: length})
}

// Zero is always fast, so nbd.ZeroFast needs no check: the command carries
// no data (a few dozen bytes in the log, whatever the length), and each
// replica applies it with fallocate, punching a hole or zeroing the range.
// Even where a replica's filesystem can do neither and writes zeroes, that
// is the same local work a write of the range would do, without moving the
// data through the network and the log. So it is always serviced in less
// time than the corresponding write, which is what the protocol asks of a
// fast zero. (Refusing in the FSM is not an option: every replica must
// apply the same command.) FUA needs nothing: committed means durable.
func (v *Volume) Zero(ctx context.Context, off, length uint64, f nbd.ZeroFlags) error {
	return v.apply(ctx, &replica.Command{Kind: replica.KindZero, Offset: off, Length: length, ZeroFlags: f & nbd.ZeroNoHole})
}

func (v *Volume) Extents(ctx context.Context, off, length uint64) ([]nbd.Extent, error) {
	n, err := v.readable(ctx)
	if err != nil {
		return nil, err
	}
	return nbdserve.LocalImage{Image: n.Image()}.Extents(ctx, off, length)
}

func (v *Volume) Cache(context.Context, uint64, uint64) error { return nil }

// apply commits c through the leader, wherever it is, within WriteTimeout
// (and while ctx, the NBD connection's, lasts), trying again while the node
// is not running or the leader cannot be reached; a refusal by the state
// machine is the answer, not retried.
func (v *Volume) apply(ctx context.Context, c *replica.Command) error {
	ctx, cancel := context.WithTimeout(ctx, v.WriteTimeout)
	defer cancel()
	var last error
	for attempt := 0; ; attempt++ {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				v.Log.Warn("write not committed within the write timeout", "timeout", v.WriteTimeout, "last_error", last)
				return fmt.Errorf("%w: write not committed within %v: %v", nbd.EIO, v.WriteTimeout, last)
			case <-time.After(min(time.Duration(attempt)*20*time.Millisecond, 200*time.Millisecond)):
			}
		}
		n, err := v.Holder.Get(ctx)
		if err != nil {
			last = err
			continue
		}
		res, err := n.Propose(ctx, c)
		if err != nil {
			last = err
			continue
		}
		return wire.NBDError(res.Err)
	}
}
