package imagesync

import (
	"context"
	"sync"
)

// segment is one unit of work: compare (and copy what differs in) a run of
// the image against one peer.
type segment struct {
	off, length uint64
	// failures counts, per peer index, how often this segment failed there.
	failures []int
}

// queue hands segments to peer workers, in image order. A segment that
// fails on a peer goes back to the front: other peers take it next, while
// the peer it failed on takes fresh work first and tries it again only when
// nothing else is left, and never after maxFail failures there. It is safe
// for concurrent use.
type queue struct {
	maxFail int

	mu       sync.Mutex // guards the following
	pending  []*segment // in image order, retried segments first
	inflight int        // taken, neither done nor retried
	changed  chan struct{}
}

func newQueue(size, segSize uint64, peers, maxFail int) *queue {
	q := &queue{maxFail: maxFail, changed: make(chan struct{})}
	for off := uint64(0); off < size; off += segSize {
		q.pending = append(q.pending, &segment{
			off:      off,
			length:   min(segSize, size-off),
			failures: make([]int, peers),
		})
	}
	return q
}

// broadcastLocked wakes every waiting take.
func (q *queue) broadcastLocked() {
	close(q.changed)
	q.changed = make(chan struct{})
}

// take returns the next segment peer may work on. It waits while there is
// nothing for peer but other workers still hold segments that may come
// back. It returns false when there is nothing left that peer may do, when
// gone reports true (the peer was dropped), or when ctx ends.
func (q *queue) take(ctx context.Context, peer int, gone func() bool) (*segment, bool) {
	for {
		q.mu.Lock()
		if gone() || ctx.Err() != nil {
			q.mu.Unlock()
			return nil, false
		}
		// The first segment that failed least on this peer: fresh work
		// before what failed here, which other peers get first.
		best := -1
		for i, s := range q.pending {
			if s.failures[peer] < q.maxFail && (best < 0 || s.failures[peer] < q.pending[best].failures[peer]) {
				best = i
				if s.failures[peer] == 0 {
					break
				}
			}
		}
		if best >= 0 {
			s := q.pending[best]
			q.pending = append(q.pending[:best], q.pending[best+1:]...)
			q.inflight++
			q.mu.Unlock()
			return s, true
		}
		if q.inflight == 0 {
			// Nothing can come back: what is pending stays out of reach.
			q.mu.Unlock()
			return nil, false
		}
		ch := q.changed
		q.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, false
		}
	}
}

// done retires a segment taken with take.
func (q *queue) done(s *segment) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.inflight--
	q.broadcastLocked()
}

// retry puts a segment that failed on peer back at the front.
func (q *queue) retry(s *segment, peer int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	s.failures[peer]++
	q.inflight--
	q.pending = append([]*segment{s}, q.pending...)
	q.broadcastLocked()
}

// wake makes waiting takes look again (a peer was dropped).
func (q *queue) wake() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.broadcastLocked()
}

// left reports the segments not done: how many and how many bytes.
func (q *queue) left() (n int, bytes uint64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, s := range q.pending {
		bytes += s.length
	}
	return len(q.pending) + q.inflight, bytes
}
