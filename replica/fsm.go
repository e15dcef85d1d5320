package replica

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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
// exactly-once request ids, the member registry). What a command does is
// decided in decide.go without I/O; this file carries it out. The image is
// the bulk of the state and is never copied into a snapshot (see
// FSM.Snapshot and FSM.Restore).

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
	Writer    string // ErrWriterHeld: the writer that holds the volume
}

// FSMConfig configures an FSM.
type FSMConfig struct {
	// Image is the volume; the FSM writes to it.
	Image *rawimage.File
	// Log is the FSM's logger.
	Log hclog.Logger
	// OnFatal is called when the image cannot be written, or a committed
	// entry is unknown to this build and not ignorable (ErrUnknownCommand).
	// The FSM then does not return from that Apply until it is stopped,
	// and applies nothing after it (nor takes a snapshot), so the entry is
	// never counted as applied: the node must stop.
	OnFatal func(error)
	// Level is the feature level the FSM reads entries at. Default
	// CurrentLevel; tests lower it to play an older build.
	Level Level
	// Restore makes the local image match the cluster's for a snapshot
	// received from the leader (metadata only): it returns once the image
	// holds every write up to st.Index, or with an error. The FSM runs it in
	// the background, retrying until it succeeds or ctx ends (the node
	// stops), and applies nothing meanwhile; see FSM.Restore.
	Restore func(ctx context.Context, st State) error
}

// FSM is the volume's raft.FSM: it decodes each committed entry once,
// lets decide (decide.go) rule on it, and carries the effect out on the
// image.
type FSM struct {
	cfg   FSMConfig
	img   *rawimage.File
	log   hclog.Logger
	level Level

	// applyMu is held by whatever changes the image or the state (Apply,
	// Restore) and by what needs neither to move (Paused, for as long as
	// keel verify hashes the image). mu, taken inside applyMu, guards the
	// state itself: held for writing only while it changes, so readers of
	// the state (status, metrics) never wait for a digest.
	applyMu    sync.Mutex
	mu         sync.RWMutex
	st         *fsmState // guarded by mu
	index      uint64    // guarded by mu: the last index applied to st
	appliedIdx atomic.Uint64
	applies    atomic.Uint64 // commands applied since start (tests, metrics)
	bytes      atomic.Uint64 // bytes written, trimmed or zeroed since start
	failed     atomic.Bool   // an entry could not be applied (fail): apply nothing more

	notifyMu sync.Mutex
	notify   chan struct{} // closed and replaced on every apply

	// ctx ends the background image pull; stop cancels it, and pulls
	// tracks the pull goroutine so Stop can wait for it.
	ctx   context.Context
	stop  context.CancelFunc
	pulls sync.WaitGroup

	pullMu     sync.Mutex    // guards the following
	pull       chan struct{} // non-nil while an image pull runs; closed when it ends
	pullFailed bool          // the pull ended without a complete image (node stopping)
}

// ErrStopping is the result of commands the FSM does not apply because the
// node stops: an image pull was abandoned, or an image write failed. They
// are not counted as applied (the node replays them after its next start).
var ErrStopping = errors.New("replica: node stopping before its image was complete")

// ErrImageFailed: an image write failed earlier, or an entry was unknown
// to this build, so the FSM takes no snapshot (it would claim the entry
// it did not apply).
var ErrImageFailed = errors.New("replica: the image could not be written; the node must stop")

var _ raft.BatchingFSM = (*FSM)(nil)

// NewFSM returns an FSM starting from st (the latest local snapshot's
// state, or a fresh one). ctx bounds the image pulls it runs in the
// background after a Restore; Stop ends them too and waits for them.
func NewFSM(ctx context.Context, cfg FSMConfig, st State) *FSM {
	f := &FSM{cfg: cfg, img: cfg.Image, log: cfg.Log, level: cfg.Level, notify: make(chan struct{})}
	if f.level == 0 {
		f.level = CurrentLevel
	}
	f.ctx, f.stop = context.WithCancel(ctx)
	f.setState(st)
	return f
}

func (f *FSM) setState(st State) {
	f.st = newFSMState(st, f.img.Size())
	f.index = st.Index
	f.appliedIdx.Store(st.Index)
}

// Apply applies one committed log entry. It implements raft.FSM.
func (f *FSM) Apply(l *raft.Log) any {
	if f.failed.Load() || !f.awaitPull() {
		return f.halt(l.Index)
	}
	c, derr := DecodeAt(l.Data, f.level)
	f.applyMu.Lock()
	f.mu.Lock()
	res, eff := decideEntry(f.st, l.Index, &c, derr)
	if eff.kind == effectHalt {
		f.mu.Unlock()
		f.applyMu.Unlock()
		f.fail(fmt.Errorf("index %d: %w", l.Index, derr), eff.note)
		return f.halt(l.Index)
	}
	if derr == nil {
		f.applies.Add(1)
	} else {
		// Malformed or skipped as ignorable: worth more than a note.
		f.log.Error(eff.note, "index", l.Index, "error", derr)
		eff.note = ""
	}
	if err := f.carryOut(l.Index, &c, eff); err != nil {
		f.mu.Unlock()
		f.applyMu.Unlock()
		f.fail(err, "IMAGE WRITE FAILED: this node stops applying; it must not serve")
		return f.halt(l.Index)
	}
	f.index = l.Index
	f.mu.Unlock()
	f.advance(l.Index) // before applyMu goes: Paused sees the index with the image
	f.applyMu.Unlock()
	return res
}

// ApplyBatch applies the entries raft committed together, in order. It
// implements raft.BatchingFSM, which makes raft answer the batch's
// writers together once it is applied, rather than one by one between
// image writes: their answers then leave the leader in one write.
// Configuration entries come here too; they change nothing in the FSM.
func (f *FSM) ApplyBatch(logs []*raft.Log) []any {
	out := make([]any, len(logs))
	for i, l := range logs {
		if l.Type == raft.LogCommand {
			out[i] = f.Apply(l)
		}
	}
	return out
}

// carryOut does to the image what decide said.
func (f *FSM) carryOut(index uint64, c *Command, eff effect) error {
	if eff.note != "" {
		f.log.Info(eff.note, "index", index, "kind", c.Kind)
	}
	var err error
	switch eff.kind {
	case effectNone:
		return nil
	case effectWrite:
		err = f.img.WriteAt(eff.data, eff.offset, false)
	case effectZero:
		// Only NoHole: every replica must apply it and end identical, so
		// a zero is never refused here as not fast.
		var flags nbd.ZeroFlags
		if eff.noHole {
			flags = nbd.ZeroNoHole
		}
		err = f.img.Zero(eff.offset, eff.length, flags)
	}
	if err != nil {
		return fmt.Errorf("applying %v of %d bytes at %d (index %d): %w", c.Kind, eff.length, eff.offset, index, err)
	}
	f.bytes.Add(eff.length)
	return nil
}

// fail reports an entry the FSM could not apply (the image could not be
// written, or the entry is unknown to this build): from now on nothing is
// applied and no snapshot taken, so the entry is never counted as applied.
func (f *FSM) fail(err error, msg string) {
	f.failed.Store(true)
	f.log.Error(msg, "error", err)
	if f.cfg.OnFatal != nil {
		f.cfg.OnFatal(err)
	}
}

// halt answers an entry the FSM will not apply (the image failed, or an
// image pull was abandoned) without counting it as applied. After a
// failure it holds raft's FSM goroutine until Stop, so raft applies
// nothing further while the node is being stopped.
func (f *FSM) halt(index uint64) Result {
	if f.failed.Load() {
		<-f.ctx.Done()
	}
	return Result{Index: index, Err: ErrStopping}
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
	st := f.st.state()
	st.Index = f.index
	return st
}

// Paused runs fn while no command is applied, with the state as of then.
// keel verify uses it to hash an image that does not move underneath.
// Readers of the state (State, AppliedIndex) are not held up meanwhile.
func (f *FSM) Paused(fn func(st State) error) error {
	f.applyMu.Lock()
	defer f.applyMu.Unlock()
	return fn(f.State())
}

// Snapshot captures the metadata; the image itself is made durable by
// Persist. It implements raft.FSM.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	if f.failed.Load() {
		return nil, ErrImageFailed
	}
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

// Stop abandons a running image pull so raft can shut down, and waits for
// the pull's goroutine to return; commands that were waiting for it are
// not applied.
func (f *FSM) Stop() {
	f.stop()
	f.pulls.Wait()
}

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
	f.applyMu.Lock()
	f.mu.Lock()
	prev := f.appliedIdx.Load()
	f.setState(st)
	f.appliedIdx.Store(prev)
	f.mu.Unlock()
	f.applyMu.Unlock()

	done := make(chan struct{})
	f.pullMu.Lock()
	f.pull, f.pullFailed = done, false
	f.pullMu.Unlock()
	f.pulls.Add(1)
	go func() {
		defer f.pulls.Done()
		defer close(done)
		f.pullImage(st)
	}()
	return nil
}

// pullImage runs the configured Restore until it succeeds or f.ctx ends
// (then the pull is marked failed and waiting applies give up).
func (f *FSM) pullImage(st State) {
	backoff := time.Second
	for attempt := 1; ; attempt++ {
		err := f.cfg.Restore(f.ctx, st)
		if err == nil {
			f.advance(st.Index)
			f.log.Info("restored from snapshot", "index", st.Index, "writer", st.Writer, "epoch", st.Epoch, "attempts", attempt)
			return
		}
		if f.ctx.Err() != nil {
			f.pullMu.Lock()
			f.pullFailed = true
			f.pullMu.Unlock()
			return
		}
		f.log.Error("pulling the image for a snapshot failed; retrying", "index", st.Index, "attempt", attempt, "error", err, "retry_in", backoff)
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-f.ctx.Done():
			t.Stop()
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// ReadState decodes a snapshot's metadata.
func ReadState(r io.Reader) (State, error) {
	var st State
	if err := json.NewDecoder(r).Decode(&st); err != nil {
		return st, fmt.Errorf("replica: reading snapshot state: %w", err)
	}
	return st, nil
}
