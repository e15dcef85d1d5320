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

// readable returns the node once its image can be read: running, not in
// the middle of a resync (which leaves the image a mix of old and new
// ranges), and, on a leader, holding every write committed before the
// read (replica.Node.ReadBarrier). It waits up to WriteTimeout, then fails
// with EIO.
func (v *Volume) readable() (*replica.Node, error) {
	n := v.Holder.Peek()
	if n == nil || n.Resyncing() {
		var err error
		if n, err = v.waitReadable(); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), v.WriteTimeout)
	defer cancel()
	if err := n.ReadBarrier(ctx); err != nil {
		// No quorum to commit the barrier: reads keep working (promise 2),
		// from what this node has applied.
		v.Log.Debug("read without a barrier", "error", err)
	}
	return n, nil
}

func (v *Volume) waitReadable() (*replica.Node, error) {
	ctx, cancel := context.WithTimeout(context.Background(), v.WriteTimeout)
	defer cancel()
	for {
		n, err := v.Holder.Get(ctx)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", nbd.EIO, err)
		}
		if !n.Resyncing() {
			return n, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: the image is being resynced from peers", nbd.EIO)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (v *Volume) ReadAt(p []byte, off uint64) error {
	n, err := v.readable()
	if err != nil {
		return err
	}
	return n.Image().ReadAt(p, off)
}

func (v *Volume) WriteAt(p []byte, off uint64, fua bool) error {
	if len(p) <= replica.MaxCommandData {
		return v.apply(&replica.Command{Kind: replica.KindWrite, Offset: off, Data: p})
	}
	var g errgroup.Group
	for done := 0; done < len(p); done += replica.MaxCommandData {
		part := p[done:min(done+replica.MaxCommandData, len(p))]
		at := off + uint64(done)
		g.Go(func() error {
			return v.apply(&replica.Command{Kind: replica.KindWrite, Offset: at, Data: part})
		})
	}
	return g.Wait()
}

func (v *Volume) Flush() error { return nil }

func (v *Volume) Trim(off, length uint64, fua bool) error {
	return v.apply(&replica.Command{Kind: replica.KindTrim, Offset: off, Length: length})
}

func (v *Volume) Zero(off, length uint64, f nbd.ZeroFlags) error {
	c := &replica.Command{Kind: replica.KindZero, Offset: off, Length: length}
	if f&nbd.ZeroNoHole != 0 {
		c.ZeroFlags = replica.ZeroNoHole
	}
	return v.apply(c)
}

func (v *Volume) Extents(off, length uint64) ([]nbd.Extent, error) {
	n, err := v.readable()
	if err != nil {
		return nil, err
	}
	return nbdserve.LocalImage{Image: n.Image()}.Extents(off, length)
}

func (v *Volume) Cache(off, length uint64) error { return nil }

// apply commits c through the leader, wherever it is, within WriteTimeout,
// trying again while the node is not running or the leader cannot be
// reached; a refusal by the state machine is the answer, not retried.
func (v *Volume) apply(c *replica.Command) error {
	ctx, cancel := context.WithTimeout(context.Background(), v.WriteTimeout)
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
