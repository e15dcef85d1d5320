package proxy

import (
	"fmt"
	"time"

	"github.com/keelstore/keel/nbd"
)

// claimBackoff is how long after a refused claim the proxy answers writes
// with EPERM without asking the servers again: a guest retrying a write
// in a loop must not turn into a storm of claims through Raft.
const claimBackoff = time.Second

// writerState decides the proxy's part as the volume's one writer. It does
// no I/O and knows time only as the now its callers pass in: the proxy
// asks it what to do before each write (next), carries that out (stamps
// the write with the epoch, sends a claim, or refuses the write), and
// tells it what came back (claimed, refused, fenced) and what the servers
// report (sawEpoch). It is not safe for concurrent use; the proxy guards
// it with a mutex and never holds that across I/O.
//
// The states, as the scenarios in testdata/writer_*.txt walk them:
//
//	free     not holding; the next write (or the claim at start) claims
//	held-by  a claim was refused: writes are EPERM, and for claimBackoff
//	         answered so without asking (a takeover claim does not wait)
//	holding  epoch != 0: writes carry the epoch; the read cache is on
//	fenced   a later claim fenced this proxy: writes are EPERM and the
//	         cache is off, for good
//	stopped  Serve ended (after the release): no more claims, for good
type writerState struct {
	takeover bool          // --takeover: the first claim at a write fences whoever holds the volume
	backoff  time.Duration // see claimBackoff

	epoch     uint64    // the epoch held; 0 while not holding
	claimed   bool      // a claim succeeded once: a takeover is made only before that
	heldBy    string    // who held the volume at the last refused claim ("" if not said)
	refusedAt time.Time // when the last claim was refused; zero if none was
	fencedBy  string    // why this proxy was fenced; "" while it is not
	stopped   bool      // the proxy stopped: no more claims
}

func newWriterState(takeover bool) writerState {
	return writerState{takeover: takeover, backoff: claimBackoff}
}

// actionKind is what the proxy must do for a write (or the claim at start).
type actionKind int

const (
	actWrite  actionKind = iota // send the command stamped with epoch
	actClaim                    // send a claim (a takeover if so marked), then report claimed or refused
	actRefuse                   // answer err without asking the servers
)

// writerAction is what next tells the proxy to do.
type writerAction struct {
	kind     actionKind
	epoch    uint64 // actWrite: the epoch to stamp
	takeover bool   // actClaim: claim as a takeover
	err      error  // actRefuse: why (wraps nbd.EPERM)
}

// next says what to do for a write (atWrite) or for the claim at start
// (!atWrite, never a takeover).
func (w *writerState) next(now time.Time, atWrite bool) writerAction {
	switch {
	case w.fencedBy != "":
		return writerAction{kind: actRefuse, err: w.fencedErr()}
	case w.stopped:
		return writerAction{kind: actRefuse, err: fmt.Errorf("%w: the proxy has stopped and released the volume", nbd.EPERM)}
	case w.epoch != 0:
		return writerAction{kind: actWrite, epoch: w.epoch}
	}
	takeover := atWrite && w.takeover && !w.claimed
	if !takeover && !w.refusedAt.IsZero() && now.Sub(w.refusedAt) < w.backoff {
		return writerAction{kind: actRefuse, err: w.heldErr()}
	}
	return writerAction{kind: actClaim, takeover: takeover}
}

// claimedEpoch records a claim that succeeded with the given epoch. A
// fenced or stopped proxy stays so (the proxy serializes claims with its
// stop, so this does not happen).
func (w *writerState) claimedEpoch(epoch uint64) {
	if w.fencedBy != "" || w.stopped {
		return
	}
	w.epoch, w.claimed = epoch, true
	w.heldBy, w.refusedAt = "", time.Time{}
}

// refused records a claim refused because holder holds the volume, and
// returns the write's answer.
func (w *writerState) refused(holder string, now time.Time) error {
	w.heldBy, w.refusedAt = holder, now
	return w.heldErr()
}

// sawEpoch takes a writer and epoch a server reports: a claim later than
// the one this proxy holds fenced it (even under its own name: a second
// process re-claimed it). It returns the detail when this fenced the
// proxy just now.
func (w *writerState) sawEpoch(writer string, epoch uint64) (detail string, fenced bool) {
	if w.epoch == 0 || epoch <= w.epoch {
		return "", false
	}
	detail = fmt.Sprintf("writer %q claimed epoch %d after this proxy's %d", writer, epoch, w.epoch)
	return detail, w.fenced(detail)
}

// fenced records that a takeover fenced this proxy (a write was refused
// for its stale epoch, or a later epoch was seen); it reports whether the
// proxy was not fenced before.
func (w *writerState) fenced(detail string) bool {
	w.epoch = 0
	if w.fencedBy != "" {
		return false
	}
	w.fencedBy = detail
	return true
}

// stop ends claiming and returns the epoch to release (0: none held).
func (w *writerState) stop() uint64 {
	w.stopped = true
	return w.epoch
}

// released records that the release of the held epoch was committed.
func (w *writerState) released() { w.epoch = 0 }

// holding reports whether the proxy is the volume's writer (and so may
// use its read cache).
func (w *writerState) holding() bool { return w.epoch != 0 }

func (w *writerState) fencedErr() error {
	if w.fencedBy == "" {
		return nil
	}
	return fmt.Errorf("%w: this proxy was fenced by a takeover (%s)", nbd.EPERM, w.fencedBy)
}

func (w *writerState) heldErr() error {
	if w.heldBy == "" {
		return fmt.Errorf("%w: the volume is held by another writer", nbd.EPERM)
	}
	return fmt.Errorf("%w: the volume is held by writer %q", nbd.EPERM, w.heldBy)
}
