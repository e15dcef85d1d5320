package soak

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/anishathalye/porcupine"
)

// The model: each block is a register. Its state is a Value; a write sets
// it, a trim or a zero sets it to Zero, a read must return it. An
// operation whose outcome is unknown has its return at the end of the
// history (after the read-back), so it may take effect at any moment after
// its call, or never.

// input is one operation on one block as porcupine sees it.
type input struct {
	kind  Kind
	value Value // Write: the value written
}

// registerModel is the model of one block.
var registerModel = porcupine.Model{
	Init: func() interface{} { return Zero },
	Step: func(state, in, out interface{}) (bool, interface{}) {
		st, op := state.(Value), in.(input)
		switch op.kind {
		case Read:
			return out.(Value) == st, st
		case Write:
			return true, op.value
		default: // Trim, ZeroOp
			return true, Zero
		}
	},
	DescribeOperation: func(in, out interface{}) string {
		op := in.(input)
		switch op.kind {
		case Read:
			return fmt.Sprintf("read -> %v", out.(Value))
		case Write:
			return fmt.Sprintf("write %v", op.value)
		}
		return op.kind.String()
	},
	DescribeState: func(state interface{}) string { return state.(Value).String() },
}

// Report is the checker's verdict on a history.
type Report struct {
	// Ops counts operations by "kind/outcome" (read-back included).
	Ops map[string]int
	// Acked is the number of acknowledged writes, trims and zeroes.
	Acked int
	// Blocks is how many blocks the history touched.
	Blocks int
	// Lost lists blocks whose read-back holds neither the last acknowledged
	// change nor one that may have come after it, each with what it held.
	Lost []string
	// Corrupt lists reads that found a torn, misplaced or foreign tag.
	Corrupt []string
	// Violations lists the blocks whose history is not linearizable.
	Violations []uint64
	// Undecided lists blocks porcupine could not decide in time.
	Undecided []uint64
	// Unread lists blocks with acknowledged changes but no read-back.
	Unread []uint64
}

// OK reports whether the history passed: nothing lost, torn or out of
// order, every changed block read back.
func (r Report) OK() bool {
	return len(r.Lost) == 0 && len(r.Corrupt) == 0 && len(r.Violations) == 0 && len(r.Undecided) == 0 && len(r.Unread) == 0
}

func (r Report) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "blocks %d, acknowledged changes %d, lost %d, corrupt reads %d, violations %d, undecided %d, unread %d",
		r.Blocks, r.Acked, len(r.Lost), len(r.Corrupt), len(r.Violations), len(r.Undecided), len(r.Unread))
	for _, l := range r.Lost {
		fmt.Fprintf(&b, "\n  lost: %s", l)
	}
	for _, c := range r.Corrupt {
		fmt.Fprintf(&b, "\n  corrupt: %s", c)
	}
	if len(r.Violations) > 0 {
		fmt.Fprintf(&b, "\n  not linearizable: blocks %v", r.Violations)
	}
	return b.String()
}

// perBlock splits ops into porcupine operations per block, unknown
// outcomes ending after everything else.
//
// A write of unknown outcome whose value no read of its block returned
// (the read-back included) is left out: taking effect never is one of its
// outcomes, and in any linearization that includes it, it is overwritten
// before the next read (or the reads would return its value), so leaving
// it out changes no verdict. Each such write would otherwise stay open to
// the end and multiply the checker's search; a long soak has hundreds.
func perBlock(ops []Op) map[uint64][]porcupine.Operation {
	var end time.Duration
	seen := map[uint64]map[Value]bool{}
	for _, op := range ops {
		end = max(end, op.Return)
		if op.Kind == Read && op.Out == OK {
			for i, v := range op.Got {
				blk := op.Block + uint64(i)
				if seen[blk] == nil {
					seen[blk] = map[Value]bool{}
				}
				seen[blk][v] = true
			}
		}
	}
	out := map[uint64][]porcupine.Operation{}
	for _, op := range ops {
		if op.Kind == Flush || op.Kind == Read && op.Out != OK {
			continue
		}
		if op.Kind == Write && op.Out != OK && op.Blocks == 1 && !seen[op.Block][op.Value] {
			continue
		}
		ret := int64(op.Return)
		if op.Out != OK {
			ret = int64(end) + 1
		}
		for i := 0; i < op.Blocks; i++ {
			blk := op.Block + uint64(i)
			po := porcupine.Operation{ClientId: op.Client, Input: input{kind: op.Kind, value: op.Value}, Call: int64(op.Call), Return: ret}
			if op.Kind == Read {
				po.Output = op.Got[i]
			} else {
				po.Output = Zero
			}
			out[blk] = append(out[blk], po)
		}
	}
	return out
}

// Check checks a history: per block, linearizability as a register (each
// block within timeout), torn tags, and that the read-back (the ops marked
// Final) holds for every block a value that may legally be last.
func Check(ops []Op, timeout time.Duration) Report {
	r := Report{Ops: map[string]int{}}
	for _, op := range ops {
		r.Ops[op.Kind.String()+"/"+op.Out.String()]++
		if op.Mutates() && op.Out == OK {
			r.Acked++
		}
		for i, v := range op.Got {
			if v == Corrupt {
				r.Corrupt = append(r.Corrupt, fmt.Sprintf("block %d read by client %d at %v", op.Block+uint64(i), op.Client, op.Call))
			}
		}
	}
	blocks := perBlock(ops)
	r.Blocks = len(blocks)
	ids := make([]uint64, 0, len(blocks))
	for b := range blocks {
		ids = append(ids, b)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	for _, b := range ids {
		switch porcupine.CheckOperationsTimeout(registerModel, blocks[b], timeout) {
		case porcupine.Illegal:
			r.Violations = append(r.Violations, b)
		case porcupine.Unknown:
			r.Undecided = append(r.Undecided, b)
		}
	}
	r.Lost, r.Unread = lost(ops)
	return r
}

// lost compares each block's read-back with the changes that may be its
// last: any change C (acknowledged or unknown) such that no acknowledged
// change began after C returned; Zero too if nothing was acknowledged.
func lost(ops []Op) (lostBlocks []string, unread []uint64) {
	type change struct {
		v     Value
		ret   time.Duration
		known bool
	}
	changes := map[uint64][]change{}
	lastAckCall := map[uint64]time.Duration{}
	final := map[uint64]Value{}
	for _, op := range ops {
		for i := 0; i < op.Blocks; i++ {
			blk := op.Block + uint64(i)
			switch {
			case op.Kind == Read && op.Final && op.Out == OK:
				final[blk] = op.Got[i]
			case op.Mutates():
				v := op.Value
				if op.Kind != Write {
					v = Zero
				}
				changes[blk] = append(changes[blk], change{v: v, ret: op.Return, known: op.Out == OK})
				if op.Out == OK {
					if c, ok := lastAckCall[blk]; !ok || op.Call > c {
						lastAckCall[blk] = op.Call
					}
				}
			}
		}
	}
	var blks []uint64
	for b := range changes {
		blks = append(blks, b)
	}
	sort.Slice(blks, func(i, j int) bool { return blks[i] < blks[j] })
	for _, b := range blks {
		ack, anyAck := lastAckCall[b]
		got, read := final[b]
		if !read {
			if anyAck {
				unread = append(unread, b)
			}
			continue
		}
		if got == Corrupt {
			continue // counted as corrupt
		}
		legal := !anyAck && got == Zero
		var want []string
		for _, c := range changes[b] {
			if !c.known || c.ret >= ack {
				if c.v == got {
					legal = true
				}
				if c.known {
					want = append(want, c.v.String())
				}
			}
		}
		if !legal {
			lostBlocks = append(lostBlocks, fmt.Sprintf("block %d holds %v; the last acknowledged: %s", b, got, strings.Join(want, " or ")))
		}
	}
	return lostBlocks, unread
}

// SaveFailure writes the history (history.json) and porcupine's
// visualisation of the failing blocks (linearizability.html, or of every
// block when none failed the register check) into dir, and returns the
// HTML's path.
func SaveFailure(dir string, ops []Op, r Report) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("soak: %w", err)
	}
	if err := SaveJSON(filepath.Join(dir, "history.json"), ops); err != nil {
		return "", err
	}
	blocks := perBlock(ops)
	show := map[uint64]bool{}
	for _, b := range append(append([]uint64(nil), r.Violations...), r.Undecided...) {
		show[b] = true
	}
	var hist []porcupine.Operation
	var parts [][]porcupine.Operation
	for b, h := range blocks {
		if len(show) == 0 || show[b] {
			hist = append(hist, h...)
			parts = append(parts, h)
		}
	}
	model := registerModel
	model.Partition = func([]porcupine.Operation) [][]porcupine.Operation { return parts }
	_, info := porcupine.CheckOperationsVerbose(model, hist, time.Minute)
	path := filepath.Join(dir, "linearizability.html")
	if err := porcupine.VisualizePath(model, info, path); err != nil {
		return "", fmt.Errorf("soak: visualisation: %w", err)
	}
	return path, nil
}
