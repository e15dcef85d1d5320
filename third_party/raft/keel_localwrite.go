package raft

// This file is Keel's patch (see third_party/KEEL-PATCH.md in Keel): the
// leader writes its own log in parallel with replicating it, as the Raft
// thesis allows (section 10.2.1), instead of fsyncing first and sending
// after.
//
// dispatchLogs stages new entries where the replicators can read them,
// tells them, and hands the entries to localWriter, one goroutine per
// term that stores batches in order. The leader counts itself toward a
// quorum only once its own StoreLogs (and so its fsync) has returned, and
// it applies and acknowledges an entry only once the entry is committed
// and in its own log, so an acknowledged entry is durable on a quorum and
// on the leader, as before. What changes is only that the followers' writes
// and the leader's overlap.

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-metrics/compat"
)

// localWriterQueue is how many dispatched batches may wait for the
// leader's own log before dispatchLogs blocks.
const localWriterQueue = 64

// localWriterBatch is about how many entries the writer stores at once.
const localWriterBatch = 256

// stagedLogs are entries dispatched by the leader and not yet in its log
// store, in index order. Replication reads them from here.
type stagedLogs struct {
	mu    sync.Mutex
	first uint64 // index of logs[0]
	logs  []*Log
}

func (s *stagedLogs) add(logs []*Log) {
	s.mu.Lock()
	if len(s.logs) == 0 {
		s.first = logs[0].Index
	}
	s.logs = append(s.logs, logs...)
	s.mu.Unlock()
}

// get copies the staged entry index into out; false if it is not staged.
func (s *stagedLogs) get(index uint64, out *Log) bool {
	if s == nil {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if index < s.first || index-s.first >= uint64(len(s.logs)) {
		return false
	}
	*out = *s.logs[index-s.first]
	return true
}

// stored unstages the entries up to index: they are in the store now.
func (s *stagedLogs) stored(index uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if index < s.first {
		return
	}
	n := index - s.first + 1
	if n > uint64(len(s.logs)) {
		n = uint64(len(s.logs))
	}
	for i := range s.logs[:n] {
		s.logs[i] = nil // the futures own them; do not keep them alive here
	}
	if n == uint64(len(s.logs)) {
		s.logs = s.logs[:0]
	} else {
		s.logs = s.logs[n:]
	}
	s.first = index + 1
}

// localWriter stores the leader's dispatched batches in its own log.
type localWriter struct {
	r          *Raft
	staged     *stagedLogs
	commitment *commitment
	commitCh   chan struct{}

	ch     chan []*Log   // batches to store, in index order
	done   chan struct{} // closed when run returns
	failed chan error    // the first StoreLogs error, for the leader loop

	durable  atomic.Uint64 // the last index in the leader's own log
	stopping atomic.Bool
	stopped  bool // stop has run (leader loop only)
	lost     bool // a dispatched batch was never stored (read after done)
}

func (r *Raft) newLocalWriter() *localWriter {
	w := &localWriter{
		r:          r,
		staged:     &stagedLogs{},
		commitment: r.leaderState.commitment,
		commitCh:   r.leaderState.commitCh,
		ch:         make(chan []*Log, localWriterQueue),
		done:       make(chan struct{}),
		failed:     make(chan error, 1),
	}
	w.durable.Store(r.getLastIndex())
	r.goFunc(w.run)
	return w
}

func (w *localWriter) run() {
	defer close(w.done)
	var batch []*Log
	for logs := range w.ch {
		// What queued up while the last batch was stored goes in one
		// StoreLogs, so one fsync, as the leader's own dispatch batches
		// did before.
		batch = append(batch[:0], logs...)
	more:
		for len(batch) < localWriterBatch {
			select {
			case logs, ok := <-w.ch:
				if !ok {
					break more
				}
				batch = append(batch, logs...)
			default:
				break more
			}
		}
		if w.lost || w.stopping.Load() {
			// Once a batch is missing, later ones must not follow it; and
			// on step-down the queue is dropped rather than waited for.
			w.lost = true
			continue
		}
		start := time.Now()
		if err := w.r.logs.StoreLogs(batch); err != nil {
			w.lost = true
			select {
			case w.failed <- err:
			default:
			}
			continue
		}
		metrics.MeasureSince([]string{"raft", "leader", "localStore"}, start)
		last := batch[len(batch)-1].Index
		for i := range batch {
			batch[i] = nil
		}
		w.staged.stored(last)
		w.durable.Store(last)
		w.commitment.match(w.r.localID, last)
		// The quorum may have committed these already without the leader;
		// the leader loop applies them only now.
		asyncNotifyCh(w.commitCh)
	}
}

// enqueue hands a dispatched batch to the writer; false on shutdown.
func (w *localWriter) enqueue(logs []*Log) bool {
	select {
	case w.ch <- logs:
		return true
	case <-w.r.shutdownCh:
		return false
	}
}

// stopLocalWriter ends the leader's writer when it steps down: it waits
// for the batch being stored, drops the rest, and if anything dispatched
// was not stored, sets the last log back to what the store holds. The
// node must not act as a follower (store what a leader sends) before this.
func (r *Raft) stopLocalWriter() {
	w := r.leaderState.local
	if w == nil || w.stopped {
		return
	}
	w.stopped = true
	w.stopping.Store(true)
	close(w.ch)
	<-w.done
	if !w.lost {
		return
	}
	last, err := r.logs.LastIndex()
	if err != nil {
		r.logger.Error("failed to read the last index after step-down", "error", err)
		return
	}
	snapIndex, snapTerm := r.getLastSnapshot()
	if last <= snapIndex {
		r.setLastLog(snapIndex, snapTerm)
		return
	}
	var l Log
	if err := r.logs.GetLog(last, &l); err != nil {
		r.logger.Error("failed to read the last log after step-down", "index", last, "error", err)
		return
	}
	r.setLastLog(last, l.Term)
}

// getLog reads entry index for a follower: staged by the leader, or else
// from the store. The writer unstages only after storing, so every index
// up to the last log is in one or the other.
func (r *Raft) getReplLog(s *followerReplication, index uint64, out *Log) error {
	if s.staged.get(index, out) {
		return nil
	}
	return r.logs.GetLog(index, out)
}
