package replica

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica/rawimage"
)

// The state machine: every committed command is applied to the raw image
// (writes, trims, zeroes) or to the small metadata state (writer epoch,
// exactly-once request ids, the member registry). The image is the bulk of
// the state and is never copied into a snapshot; see snapshot.go.

// Errors an applied command can answer with. They are results, not
// failures of the node: the command was committed and deliberately refused.
var (
	// ErrStaleEpoch: the write carries an epoch other than the current
	// writer's (it was fenced), or epoch 0 while a writer holds the volume.
	ErrStaleEpoch = errors.New("replica: write fenced: stale writer epoch")
	// ErrWriterHeld: a claim without takeover while another writer holds
	// the volume.
	ErrWriterHeld = errors.New("replica: volume is held by another writer")
	// ErrOutOfRange: the command reaches past the end of the image.
	ErrOutOfRange = errors.New("replica: range outside the image")
)

// maxApplied bounds the exactly-once table of one writer. A writer that
// never advances AckedBelow would otherwise grow it without end; past this
// the oldest ids are forgotten (and logged).
const maxApplied = 1 << 20

// State is the metadata of the volume, as stored in a snapshot.
type State struct {
	// Index is the last log index applied to the image when the state was
	// captured.
	Index uint64 `json:"index"`
	// Size of the image in bytes.
	Size uint64 `json:"size"`
	// Epoch is the current writer's epoch: the log index of its claim.
	Epoch uint64 `json:"epoch"`
	// Writer is the current writer's name; "" when nobody holds the volume.
	Writer string `json:"writer"`
	// AckedBelow and Applied are the writer's exactly-once table: every
	// request id below AckedBelow, and those listed, were applied.
	AckedBelow uint64   `json:"acked_below"`
	Applied    []uint64 `json:"applied,omitempty"`
	// Nodes are the registered members, by id.
	Nodes map[string]NodeInfo `json:"nodes"`
}

// Result is what Apply returns for a command.
type Result struct {
	Index     uint64 // log index of the command
	Epoch     uint64 // the writer epoch after the command (Claim: the new one)
	Duplicate bool   // a request id already applied: nothing done again
	Err       error  // ErrStaleEpoch, ErrWriterHeld, ErrOutOfRange or nil
}

// FSMConfig configures an FSM.
type FSMConfig struct {
	// Image is the volume; the FSM writes to it.
	Image *rawimage.File
	// Log is the FSM's logger.
	Log hclog.Logger
	// OnFatal is called when the image cannot be written. The FSM then
	// never returns from Apply, so the entry is never counted as applied
	// and no later entry is applied either: the node must stop.
	OnFatal func(error)
	// Restore makes the local image match the cluster's for a snapshot
	// received from the leader (metadata only): it returns once the image
	// holds every write up to st.Index, or with an error. The FSM runs it in
	// the background, retrying until it succeeds or ctx ends (the node
	// stops), and applies nothing meanwhile; see FSM.Restore.
	Restore func(ctx context.Context, st State) error
}

// FSM is the volume's raft.FSM.
type FSM struct {
	cfg FSMConfig
	img *rawimage.File
	log hclog.Logger

	// mu is held for writing by Apply and by anything that needs the image
	// and the state not to move (Hash); readers of the state take it for
	// reading.
	mu         sync.RWMutex
	st         State // guarded by mu (Applied is kept in applied)
	applied    map[uint64]struct{}
	appliedIdx atomic.Uint64
	applies    atomic.Uint64 // commands applied since start (tests, metrics)
	bytes      atomic.Uint64 // bytes written, trimmed or zeroed since start

	notifyMu sync.Mutex
	notify   chan struct{} // closed and replaced on every apply

	pullMu     sync.Mutex    // guards the following
	pull       chan struct{} // non-nil while an image pull runs; closed when it ends
	pullFailed bool          // the pull ended without a complete image (node stopping)
	stopCtx    context.Context
	stopPull   context.CancelFunc
}

// ErrStopping is returned for commands that arrive while an image pull is
// abandoned because the node stops: they are not applied (the node replays
// them after its next start, once the pull has finished).
var ErrStopping = errors.New("replica: node stopping before its image was complete")

var _ raft.FSM = (*FSM)(nil)

// NewFSM returns an FSM starting from st (the latest local snapshot's
// state, or a fresh one).
func NewFSM(cfg FSMConfig, st State) *FSM {
	f := &FSM{cfg: cfg, img: cfg.Image, log: cfg.Log, notify: make(chan struct{})}
	f.stopCtx, f.stopPull = context.WithCancel(context.Background())
	f.setState(st)
	return f
}

func (f *FSM) setState(st State) {
	if st.Nodes == nil {
		st.Nodes = map[string]NodeInfo{}
	}
	f.applied = make(map[uint64]struct{}, len(st.Applied))
	for _, id := range st.Applied {
		f.applied[id] = struct{}{}
	}
	st.Applied = nil
	st.Size = f.img.Size()
	f.st = st
	f.appliedIdx.Store(st.Index)
}

// Apply applies one committed log entry. It implements raft.FSM.
func (f *FSM) Apply(l *raft.Log) any {
	c, err := Decode(l.Data)
	if err != nil {
		// A malformed entry cannot come from our own encoder; refusing it
		// is the same on every node, so the replicas stay identical.
		f.log.Error("refusing malformed log entry", "index", l.Index, "error", err)
		f.advance(l.Index)
		return Result{Index: l.Index, Err: err}
	}
	if !f.awaitPull() {
		return Result{Index: l.Index, Err: ErrStopping}
	}
	f.applies.Add(1)
	f.mu.Lock()
	res := f.applyLocked(l.Index, &c)
	f.st.Index = l.Index
	f.mu.Unlock()
	f.advance(l.Index)
	return res
}

func (f *FSM) applyLocked(index uint64, c *Command) Result {
	res := Result{Index: index, Epoch: f.st.Epoch}
	switch c.Kind {
	case KindClaim:
		if f.st.Writer != "" && f.st.Writer != c.Writer && !c.Takeover {
			res.Err = fmt.Errorf("%w: %q holds it (epoch %d)", ErrWriterHeld, f.st.Writer, f.st.Epoch)
			return res
		}
		// Every claim starts a new exactly-once table: writes of the
		// earlier epoch are fenced from here on, so their request ids can
		// never come back, and a restarted writer numbers its requests
		// from 1 again.
		f.applied = map[uint64]struct{}{}
		f.st.AckedBelow = 0
		if f.st.Writer != "" && f.st.Writer != c.Writer {
			f.log.Info("writer fenced by takeover", "old", f.st.Writer, "new", c.Writer, "epoch", index)
		}
		f.st.Writer, f.st.Epoch = c.Writer, index
		res.Epoch = index
		return res
	case KindRelease:
		if c.Epoch == f.st.Epoch && f.st.Writer != "" {
			f.st.Writer = ""
			f.applied = map[uint64]struct{}{}
			f.st.AckedBelow = 0
		}
		return res
	case KindRegister:
		f.st.Nodes[c.Node.ID] = c.Node
		return res
	case KindForget:
		delete(f.st.Nodes, c.Node.ID)
		return res
	}

	// Writes, trims and zeroes.
	// Fencing: with no writer only epoch 0 (direct clients) may write;
	// with one, only its epoch.
	if (f.st.Writer == "" && c.Epoch != 0) || (f.st.Writer != "" && c.Epoch != f.st.Epoch) {
		res.Err = fmt.Errorf("%w: write epoch %d, current epoch %d (writer %q)", ErrStaleEpoch, c.Epoch, f.st.Epoch, f.st.Writer)
		return res
	}
	if c.Offset > f.st.Size || c.Length > f.st.Size-c.Offset {
		res.Err = fmt.Errorf("%w: %d bytes at %d, image is %d", ErrOutOfRange, c.Length, c.Offset, f.st.Size)
		return res
	}
	if c.Epoch != 0 && c.ReqID != 0 {
		if c.ReqID < f.st.AckedBelow {
			res.Duplicate = true
			return res
		}
		if _, ok := f.applied[c.ReqID]; ok {
			res.Duplicate = true
			return res
		}
	}
	var err error
	switch c.Kind {
	case KindWrite:
		err = f.img.WriteAt(c.Data, c.Offset, false)
	case KindTrim:
		// Zero, not Trim: rawimage's Trim does nothing where holes cannot
		// be punched, and every replica must end byte-identical.
		err = f.img.Zero(c.Offset, c.Length, 0)
	case KindZero:
		// Only NoHole: every replica must apply it and end identical, so
		// a zero is never refused here as not fast.
		err = f.img.Zero(c.Offset, c.Length, c.ZeroFlags&nbd.ZeroNoHole)
	}
	if err != nil {
		f.fatal(fmt.Errorf("applying %v of %d bytes at %d (index %d): %w", c.Kind, c.Length, c.Offset, index, err))
	}
	if c.Epoch != 0 && c.ReqID != 0 {
		f.recordLocked(c.ReqID, c.AckedBelow)
	}
	f.bytes.Add(c.Length)
	return res
}

// recordLocked notes reqID as applied and forgets ids below ackedBelow.
func (f *FSM) recordLocked(reqID, ackedBelow uint64) {
	f.applied[reqID] = struct{}{}
	if ackedBelow > f.st.AckedBelow {
		f.st.AckedBelow = ackedBelow
		for id := range f.applied {
			if id < ackedBelow {
				delete(f.applied, id)
			}
		}
	}
	if len(f.applied) > maxApplied {
		ids := f.appliedSorted()
		cut := ids[len(ids)-maxApplied]
		f.log.Warn("writer does not advance its acknowledged id; forgetting old request ids", "below", cut)
		f.st.AckedBelow = cut
		for _, id := range ids {
			if id < cut {
				delete(f.applied, id)
			}
		}
	}
}

func (f *FSM) appliedSorted() []uint64 {
	ids := make([]uint64, 0, len(f.applied))
	for id := range f.applied {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	return ids
}

// fatal reports an image failure and never returns: the entry must not
// count as applied, and nothing after it may be applied.
func (f *FSM) fatal(err error) {
	f.log.Error("IMAGE WRITE FAILED: this node stops applying; it must not serve", "error", err)
	if f.cfg.OnFatal != nil {
		f.cfg.OnFatal(err)
	}
	select {} // the node is being stopped; never apply past a lost write
}

func (f *FSM) advance(index uint64) {
	f.appliedIdx.Store(index)
	f.notifyMu.Lock()
	close(f.notify)
	f.notify = make(chan struct{})
	f.notifyMu.Unlock()
}

// Applies counts the commands applied since the FSM was created.
func (f *FSM) Applies() uint64 { return f.applies.Load() }

// AppliedBytes counts the bytes written, trimmed or zeroed since start.
func (f *FSM) AppliedBytes() uint64 { return f.bytes.Load() }

// AppliedIndex is the last log index applied to the image.
func (f *FSM) AppliedIndex() uint64 { return f.appliedIdx.Load() }

// WaitApplied returns once the index has been applied, or with ctx's error.
func (f *FSM) WaitApplied(ctx context.Context, index uint64) error {
	for {
		f.notifyMu.Lock()
		ch := f.notify
		f.notifyMu.Unlock()
		if f.appliedIdx.Load() >= index {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// State returns a copy of the current metadata state.
func (f *FSM) State() State {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.stateLocked()
}

func (f *FSM) stateLocked() State {
	st := f.st
	st.Nodes = make(map[string]NodeInfo, len(f.st.Nodes))
	for k, v := range f.st.Nodes {
		st.Nodes[k] = v
	}
	st.Applied = f.appliedSorted()
	return st
}

// Paused runs fn while no command is applied, with the state as of then.
// keel verify uses it to hash an image that does not move underneath.
func (f *FSM) Paused(fn func(st State) error) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return fn(f.stateLocked())
}

// Snapshot captures the metadata; the image itself is made durable by
// Persist. It implements raft.FSM.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	if !f.awaitPull() {
		return nil, ErrStopping
	}
	return &fsmSnapshot{st: f.State(), img: f.img}, nil
}

// awaitPull waits for a running image pull; false if it was abandoned.
func (f *FSM) awaitPull() bool {
	f.pullMu.Lock()
	ch := f.pull
	f.pullMu.Unlock()
	if ch == nil {
		return true
	}
	<-ch
	f.pullMu.Lock()
	defer f.pullMu.Unlock()
	if f.pullFailed {
		return false
	}
	f.pull = nil
	return true
}

// Pulling reports whether an image pull is running.
func (f *FSM) Pulling() bool {
	f.pullMu.Lock()
	defer f.pullMu.Unlock()
	return f.pull != nil
}

// Stop abandons a running image pull so raft can shut down; commands that
// were waiting for it are not applied.
func (f *FSM) Stop() { f.stopPull() }

type fsmSnapshot struct {
	st  State
	img *rawimage.File
}

// Persist makes every write up to the snapshot's index durable in the image
// (fdatasync; later writes may be included, which replay tolerates), then
// records the metadata.
func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if err := s.img.Sync(); err != nil {
		sink.Cancel()
		return fmt.Errorf("replica: snapshot: %w", err)
	}
	if err := json.NewEncoder(sink).Encode(s.st); err != nil {
		sink.Cancel()
		return fmt.Errorf("replica: snapshot: writing state: %w", err)
	}
	return sink.Close()
}

func (s *fsmSnapshot) Release() {}

// Restore installs a snapshot sent by the leader. It implements raft.FSM.
//
// The stream carries only the metadata; the image must be pulled from the
// peers, which can take far longer than raft waits for an install to be
// acknowledged. So Restore records the state, starts the pull in the
// background and returns; every later Apply (and Snapshot) waits for the
// pull to finish, so nothing is applied to an incomplete image and no
// snapshot claims one. A failed pull is retried until it succeeds or the
// node stops; the node's resync marker covers a crash in the middle.
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	st, err := ReadState(rc)
	if err != nil {
		return err
	}
	if st.Size != 0 && st.Size != f.img.Size() {
		return fmt.Errorf("replica: snapshot is of a %d-byte volume, local image is %d bytes", st.Size, f.img.Size())
	}
	if f.cfg.Restore == nil {
		return errors.New("replica: snapshot restore needs an image source, none configured")
	}
	if !f.awaitPull() { // a previous pull, if any, ends first
		return ErrStopping
	}
	// The state is the snapshot's from now on, but the applied index stays
	// where it was until the image holds the snapshot's writes: status,
	// promotion and followers' read-your-writes waits all go by it.
	f.mu.Lock()
	prev := f.appliedIdx.Load()
	f.setState(st)
	f.appliedIdx.Store(prev)
	f.mu.Unlock()

	done := make(chan struct{})
	f.pullMu.Lock()
	f.pull, f.pullFailed = done, false
	f.pullMu.Unlock()
	go func() {
		defer close(done)
		backoff := time.Second
		for attempt := 1; ; attempt++ {
			err := f.cfg.Restore(f.stopCtx, st)
			if err == nil {
				f.advance(st.Index)
				f.log.Info("restored from snapshot", "index", st.Index, "writer", st.Writer, "epoch", st.Epoch, "attempts", attempt)
				return
			}
			if f.stopCtx.Err() != nil {
				f.pullMu.Lock()
				f.pullFailed = true
				f.pullMu.Unlock()
				return
			}
			f.log.Error("pulling the image for a snapshot failed; retrying", "index", st.Index, "attempt", attempt, "error", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
			case <-f.stopCtx.Done():
			}
			backoff = min(2*backoff, 30*time.Second)
		}
	}()
	return nil
}

// ReadState decodes a snapshot's metadata.
func ReadState(r io.Reader) (State, error) {
	var st State
	if err := json.NewDecoder(r).Decode(&st); err != nil {
		return st, fmt.Errorf("replica: reading snapshot state: %w", err)
	}
	return st, nil
}
