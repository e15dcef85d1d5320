package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/replica/imagesync"
	"github.com/keelstore/keel/replica/rawimage"
	"github.com/keelstore/keel/services/wire"
)

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }

// Resyncer makes a node's image match the cluster's when it installs a
// snapshot (it is the node's replica.NodeConfig.Restore): it asks every
// registered peer for its status, keeps those that have applied at least
// the snapshot's index, and pulls the differing ranges from all of them in
// parallel. Its progress shows in the node's status.
type Resyncer struct {
	Self   string
	Client *wire.Client
	Log    hclog.Logger
	// Timeout bounds one resync attempt; raft retries a failed one.
	// Default 6h.
	Timeout time.Duration

	mu         sync.Mutex // guards the following
	status     *wire.SyncStatus
	totalMoved uint64 // bytes fetched by every resync since start
	resyncs    uint64 // resyncs finished since start
}

// Totals are the bytes fetched by, and the number of, resyncs finished
// since the process started.
func (r *Resyncer) Totals() (moved, count uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.totalMoved, r.resyncs
}

// Status is the current or last resync's progress, nil if none ran.
func (r *Resyncer) Status() *wire.SyncStatus {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.status == nil {
		return nil
	}
	s := *r.status
	return &s
}

func (r *Resyncer) update(f func(s *wire.SyncStatus)) {
	r.mu.Lock()
	f(r.status)
	r.mu.Unlock()
}

// Restore is the replica.NodeConfig.Restore of a keel server.
func (r *Resyncer) Restore(ctx context.Context, img *rawimage.File, st replica.State) error {
	timeout := r.Timeout
	if timeout == 0 {
		timeout = 6 * time.Hour
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	r.mu.Lock()
	r.status = &wire.SyncStatus{Active: true, Index: st.Index, BytesTotal: img.Size(), Started: time.Now()}
	r.mu.Unlock()

	peers, err := r.upToDatePeers(ctx, st)
	if err == nil {
		r.Log.Info("resyncing the image from peers", "index", st.Index, "peers", peers, "size", img.Size())
		var stats imagesync.Stats
		hc := r.syncClient()
		stats, err = imagesync.Sync(ctx, imagesync.Config{
			Image:  img,
			Peers:  peers,
			Client: hc,
			Log:    r.Log.Named("sync"),
			Progress: func(p imagesync.Progress) {
				r.update(func(s *wire.SyncStatus) {
					s.BytesCompared, s.BytesMoved, s.BytesZeroed = p.BytesCompared, p.BytesMoved, p.BytesZeroed
					s.RateBytesPerSec, s.Peers = p.RateBytesPerSec, p.Peers
				})
			},
		})
		if hc != nil {
			hc.CloseIdleConnections()
		}
		if err == nil {
			r.Log.Info("resync done", "index", st.Index, "moved", stats.Moved, "zeroed", stats.Zeroed,
				"compared", stats.Compared, "took", stats.Duration.Round(time.Millisecond))
			r.update(func(s *wire.SyncStatus) {
				s.BytesCompared, s.BytesMoved, s.BytesZeroed = stats.Compared, stats.Moved, stats.Zeroed
			})
		}
	}
	r.update(func(s *wire.SyncStatus) {
		s.Active, s.Finished = false, time.Now()
		if err != nil {
			s.Error = err.Error()
		}
		r.totalMoved += s.BytesMoved
		r.resyncs++
	})
	if err != nil {
		r.Log.Error("resync failed; raft will retry", "index", st.Index, "error", err)
	}
	return err
}

// syncClient is the image pull's HTTP client: imagesync's own (nil) over
// plain HTTP; over cluster TLS, one with the cluster client certificate.
func (r *Resyncer) syncClient() *http.Client {
	if r.Client.TLS == nil {
		return nil
	}
	return &http.Client{Transport: &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:     r.Client.TLS.Clone(),
		TLSHandshakeTimeout: 10 * time.Second,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     30 * time.Second,
	}}
}

// upToDatePeers returns the sync URLs of registered peers that have
// applied st.Index: copying from one that has not would lose writes.
func (r *Resyncer) upToDatePeers(ctx context.Context, st replica.State) ([]string, error) {
	var ids []string
	for id := range st.Nodes {
		if id != r.Self {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	var peers []string
	var errs []error
	for _, id := range ids {
		info := st.Nodes[id]
		sctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		s, err := r.Client.Status(sctx, info.HTTP)
		cancel()
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("%s: %w", id, err))
		case s.AppliedIndex < st.Index || (s.Sync != nil && s.Sync.Active):
			errs = append(errs, fmt.Errorf("%s: applied %d, need %d", id, s.AppliedIndex, st.Index))
		default:
			peers = append(peers, r.Client.BaseURL(info.HTTP)+"/v1/sync")
		}
	}
	if len(peers) == 0 {
		return nil, fmt.Errorf("no up-to-date peer to resync from: %w", errors.Join(errs...))
	}
	return peers, nil
}
