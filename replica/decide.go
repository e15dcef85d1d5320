package replica

import (
	"errors"
	"fmt"
	"sort"

	"github.com/keelstore/keel/nbd"
)

// The state machine's decisions, with no I/O: decide takes the metadata
// state and one committed command and says what the command answers and
// what must be done to the image. FSM.Apply carries the effect out (and
// halts the node if the image cannot be written); the scenario files in
// testdata/ drive decide alone.

// maxApplied bounds the exactly-once table of one writer. A writer that
// never advances AckedBelow would otherwise grow it without end; past this
// the oldest ids are forgotten (and logged).
const maxApplied = 1 << 20

// fsmState is the metadata state decide reads and changes. It is State
// with the exactly-once table held as a set.
type fsmState struct {
	Size       uint64
	Epoch      uint64
	Writer     string
	AckedBelow uint64
	applied    map[uint64]struct{}
	Nodes      map[string]NodeInfo
	// maxApplied bounds applied (the package's maxApplied; scenario tests
	// lower it).
	maxApplied int
}

func newFSMState(st State, size uint64) *fsmState {
	s := &fsmState{
		Size: size, Epoch: st.Epoch, Writer: st.Writer, AckedBelow: st.AckedBelow,
		applied: make(map[uint64]struct{}, len(st.Applied)), Nodes: make(map[string]NodeInfo, len(st.Nodes)),
		maxApplied: maxApplied,
	}
	for _, id := range st.Applied {
		s.applied[id] = struct{}{}
	}
	for k, v := range st.Nodes {
		s.Nodes[k] = v
	}
	return s
}

// state returns a copy as a State (Index is the caller's to fill in).
func (s *fsmState) state() State {
	st := State{Size: s.Size, Epoch: s.Epoch, Writer: s.Writer, AckedBelow: s.AckedBelow, Applied: s.appliedSorted()}
	st.Nodes = make(map[string]NodeInfo, len(s.Nodes))
	for k, v := range s.Nodes {
		st.Nodes[k] = v
	}
	return st
}

func (s *fsmState) appliedSorted() []uint64 {
	ids := make([]uint64, 0, len(s.applied))
	for id := range s.applied {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	return ids
}

// effectKind is what a command does to the image.
type effectKind uint8

const (
	effectNone  effectKind = iota // metadata only, a refusal or a duplicate
	effectWrite                   // write Data at Offset
	effectZero                    // zero Length bytes at Offset
	// effectHalt: the entry is committed but this build cannot apply it;
	// the node must stop applying (and count it unapplied) until a build
	// that knows it runs. Skipping it would let the replicas diverge.
	effectHalt
)

// effect is what FSM.Apply must do after a decision.
type effect struct {
	kind   effectKind
	offset uint64
	length uint64 // bytes written or zeroed
	data   []byte // effectWrite; aliases the command's data
	noHole bool   // effectZero: keep the range allocated
	// note is a fact worth one log line (a writer fenced by a takeover,
	// request ids forgotten past maxApplied); "" for none.
	note string
}

func (e effect) String() string {
	var s string
	switch e.kind {
	case effectNone:
		s = "none"
	case effectWrite:
		s = fmt.Sprintf("write %d bytes at %d %q", e.length, e.offset, e.data)
	case effectZero:
		s = fmt.Sprintf("zero %d bytes at %d", e.length, e.offset)
		if e.noHole {
			s += " (no hole)"
		}
	case effectHalt:
		s = "halt (not applied; the node stops applying)"
	}
	if e.note != "" {
		s += "; note: " + e.note
	}
	return s
}

// decideEntry rules on one committed entry as it came out of DecodeAt:
//
//   - decoded (err nil): decide.
//   - malformed (ErrBadCommand): no build's encoder wrote it, so every
//     node refuses it alike; it is answered with the error and counted
//     as applied, and the replicas stay identical.
//   - unknown (ErrUnknownCommand: a newer build wrote it, after every
//     member reported that level, so this node was older than it said or
//     was downgraded since): an ignorable one is skipped, alike on every
//     node that does not know it, and its proposer promised that skipping
//     changes nothing this build reads; any other halts the node (it is
//     not counted as applied, and applies nothing after it) until a build
//     that knows it runs. Never a guess, never a silent skip.
func decideEntry(st *fsmState, index uint64, c *Command, err error) (Result, effect) {
	switch {
	case err == nil:
		return decide(st, index, c)
	case errors.Is(err, ErrUnknownCommand) && c.Ignorable:
		return Result{Index: index, Epoch: st.Epoch, Err: err},
			effect{note: fmt.Sprintf("skipping ignorable %v of level %d that this build does not know", c.Kind, c.Level)}
	case errors.Is(err, ErrUnknownCommand):
		return Result{Index: index, Epoch: st.Epoch, Err: err},
			effect{kind: effectHalt, note: fmt.Sprintf("%v of level %d is committed but unknown to this build: upgrade this node", c.Kind, c.Level)}
	default:
		return Result{Index: index, Epoch: st.Epoch, Err: err}, effect{note: "refusing malformed log entry"}
	}
}

// decide applies c, committed at index, to st and returns the command's
// result and what to do to the image. It does no I/O.
func decide(st *fsmState, index uint64, c *Command) (Result, effect) {
	res := Result{Index: index, Epoch: st.Epoch}
	switch c.Kind {
	case KindClaim:
		return decideClaim(st, index, c)
	case KindRelease:
		if c.Epoch == st.Epoch && st.Writer != "" {
			st.Writer = ""
			st.applied = map[uint64]struct{}{}
			st.AckedBelow = 0
		}
		return res, effect{}
	case KindRegister:
		st.Nodes[c.Node.ID] = c.Node
		return res, effect{}
	case KindForget:
		delete(st.Nodes, c.Node.ID)
		return res, effect{}
	case KindWrite, KindTrim, KindZero:
	default:
		// Decode refuses unknown kinds; a Command built in memory may not.
		res.Err = fmt.Errorf("%w: unknown kind %d", ErrBadCommand, uint8(c.Kind))
		return res, effect{}
	}

	// Writes, trims and zeroes.
	// Fencing: with no writer only epoch 0 (direct clients) may write;
	// with one, only its epoch.
	if (st.Writer == "" && c.Epoch != 0) || (st.Writer != "" && c.Epoch != st.Epoch) {
		res.Err = fmt.Errorf("%w: write epoch %d, current epoch %d (writer %q)", ErrStaleEpoch, c.Epoch, st.Epoch, st.Writer)
		return res, effect{}
	}
	length := c.Length
	if c.Kind == KindWrite {
		length = uint64(len(c.Data))
	}
	if c.Offset > st.Size || length > st.Size-c.Offset {
		res.Err = fmt.Errorf("%w: %d bytes at %d, image is %d", ErrOutOfRange, length, c.Offset, st.Size)
		return res, effect{}
	}
	exactlyOnce := c.Epoch != 0 && c.ReqID != 0
	if exactlyOnce {
		if _, seen := st.applied[c.ReqID]; seen || c.ReqID < st.AckedBelow {
			res.Duplicate = true
			return res, effect{}
		}
	}
	var eff effect
	switch c.Kind {
	case KindWrite:
		eff = effect{kind: effectWrite, offset: c.Offset, length: length, data: c.Data}
	case KindTrim:
		// Zero, not trim: rawimage's Trim does nothing where holes cannot
		// be punched, and every replica must end byte-identical.
		eff = effect{kind: effectZero, offset: c.Offset, length: length}
	case KindZero:
		eff = effect{kind: effectZero, offset: c.Offset, length: length, noHole: c.ZeroFlags&nbd.ZeroNoHole != 0}
	}
	if exactlyOnce {
		eff.note = record(st, c.ReqID, c.AckedBelow)
	}
	return res, eff
}

// decideClaim: a claim by another writer needs takeover; the same writer
// may claim again (a restarted proxy). The epoch is the claim's index.
func decideClaim(st *fsmState, index uint64, c *Command) (Result, effect) {
	res := Result{Index: index, Epoch: st.Epoch}
	if st.Writer != "" && st.Writer != c.Writer && !c.Takeover {
		res.Err, res.Writer = fmt.Errorf("%w: %q holds it (epoch %d)", ErrWriterHeld, st.Writer, st.Epoch), st.Writer
		return res, effect{}
	}
	var eff effect
	if st.Writer != "" && st.Writer != c.Writer {
		eff.note = fmt.Sprintf("writer %q (epoch %d) fenced by takeover", st.Writer, st.Epoch)
	}
	// Every claim starts a new exactly-once table: writes of the earlier
	// epoch are fenced from here on, so their request ids can never come
	// back, and a restarted writer numbers its requests from 1 again.
	st.applied = map[uint64]struct{}{}
	st.AckedBelow = 0
	st.Writer, st.Epoch = c.Writer, index
	res.Epoch = index
	return res, eff
}

// record notes reqID as applied and forgets ids below ackedBelow; past
// st.maxApplied ids it forgets the oldest, and says so in the note.
func record(st *fsmState, reqID, ackedBelow uint64) (note string) {
	st.applied[reqID] = struct{}{}
	if ackedBelow > st.AckedBelow {
		st.AckedBelow = ackedBelow
		for id := range st.applied {
			if id < ackedBelow {
				delete(st.applied, id)
			}
		}
	}
	if len(st.applied) > st.maxApplied {
		ids := st.appliedSorted()
		cut := ids[len(ids)-st.maxApplied]
		st.AckedBelow = cut
		for _, id := range ids {
			if id < cut {
				delete(st.applied, id)
			}
		}
		note = fmt.Sprintf("writer does not advance its acknowledged id; request ids below %d forgotten", cut)
	}
	return note
}
