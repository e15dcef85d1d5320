package soak

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

const ms = time.Millisecond

func w(client int, blk uint64, v Value, call, ret time.Duration) Op {
	return Op{Client: client, Kind: Write, Block: blk, Blocks: 1, Value: v, Call: call, Return: ret, Out: OK}
}

func rd(client int, blk uint64, got Value, call, ret time.Duration) Op {
	return Op{Client: client, Kind: Read, Block: blk, Blocks: 1, Got: []Value{got}, Call: call, Return: ret, Out: OK}
}

func final(blk uint64, got Value, at time.Duration) Op {
	op := rd(9, blk, got, at, at+ms)
	op.Final = true
	return op
}

func unknown(op Op) Op { op.Out, op.Err = Unknown, "EIO"; return op }

var (
	a1 = MakeValue(1, 1)
	a2 = MakeValue(1, 2)
	b1 = MakeValue(2, 1)
)

func TestCheckPasses(t *testing.T) {
	for name, ops := range map[string][]Op{
		"sequential":                         {w(0, 3, a1, 0, ms), rd(1, 3, a1, 2*ms, 3*ms), w(0, 3, a2, 4*ms, 5*ms), final(3, a2, 10*ms)},
		"concurrent read sees the old value": {w(0, 3, a1, 0, ms), w(0, 3, a2, 2*ms, 6*ms), rd(1, 3, a1, 3*ms, 4*ms), final(3, a2, 10*ms)},
		"concurrent read sees the new value": {w(0, 3, a1, 0, ms), w(0, 3, a2, 2*ms, 6*ms), rd(1, 3, a2, 3*ms, 4*ms), final(3, a2, 10*ms)},
		"concurrent writes, either last":     {w(0, 3, a1, 0, 5*ms), w(1, 3, b1, ms, 4*ms), final(3, a1, 10*ms)},
		"unknown write never applied":        {w(0, 3, a1, 0, ms), unknown(w(0, 3, a2, 2*ms, 3*ms)), rd(1, 3, a1, 4*ms, 5*ms), final(3, a1, 10*ms)},
		"unknown write applied late":         {w(0, 3, a1, 0, ms), unknown(w(0, 3, a2, 2*ms, 3*ms)), rd(1, 3, a1, 4*ms, 5*ms), final(3, a2, 10*ms)},
		"unknown write read, then overwritten": {w(0, 3, a1, 0, ms), unknown(w(0, 3, a2, 2*ms, 3*ms)), rd(1, 3, a2, 4*ms, 5*ms),
			w(0, 3, b1, 6*ms, 7*ms), final(3, b1, 10*ms)},
		"trim reads zero": {w(0, 3, a1, 0, ms), {Client: 0, Kind: Trim, Block: 2, Blocks: 3, Call: 2 * ms, Return: 3 * ms, Out: OK},
			rd(1, 3, Zero, 4*ms, 5*ms), final(3, Zero, 10*ms), final(2, Zero, 10*ms), final(4, Zero, 10*ms)},
		"failed read says nothing": {w(0, 3, a1, 0, ms), {Client: 1, Kind: Read, Block: 3, Blocks: 1, Call: 2 * ms, Return: 3 * ms, Out: Unknown}, final(3, a1, 10*ms)},
		"multi-block read":         {w(0, 3, a1, 0, ms), w(0, 4, a2, 0, ms), {Client: 1, Kind: Read, Block: 3, Blocks: 2, Got: []Value{a1, a2}, Call: 2 * ms, Return: 3 * ms, Out: OK}, final(3, a1, 10*ms), final(4, a2, 10*ms)},
	} {
		t.Run(name, func(t *testing.T) {
			r := Check(ops, 10*time.Second)
			if !r.OK() {
				t.Fatalf("want a pass, got %v", r)
			}
		})
	}
}

func TestCheckFails(t *testing.T) {
	torn := make([]byte, BlockSize)
	Fill(torn, a1, 3)
	other := make([]byte, BlockSize)
	Fill(other, a2, 3)
	copy(torn[BlockSize/2:], other[BlockSize/2:])
	for name, tc := range map[string]struct {
		ops             []Op
		lost, violation bool
		corrupt         bool
		unread          bool
	}{
		"lost write":   {ops: []Op{w(0, 3, a1, 0, ms), w(0, 3, a2, 2*ms, 3*ms), final(3, a1, 10*ms)}, lost: true, violation: true},
		"lost to zero": {ops: []Op{w(0, 3, a1, 0, ms), final(3, Zero, 10*ms)}, lost: true, violation: true},
		"stale read after an acknowledged write": {ops: []Op{w(0, 3, a1, 0, ms), w(0, 3, a2, 2*ms, 3*ms),
			rd(1, 3, a1, 4*ms, 5*ms), final(3, a2, 10*ms)}, violation: true},
		"read goes back in time": {ops: []Op{w(0, 3, a1, 0, ms), w(1, 3, b1, 0, 20*ms),
			rd(2, 3, b1, 2*ms, 3*ms), rd(2, 3, a1, 4*ms, 5*ms), final(3, b1, 30*ms)}, violation: true},
		"torn tag": {ops: []Op{w(0, 3, a1, 0, ms), w(0, 3, a2, 2*ms, 6*ms), rd(1, 3, Decode(torn, 3), 3*ms, 4*ms), final(3, a2, 10*ms)},
			corrupt: true, violation: true},
		"value never written": {ops: []Op{w(0, 3, a1, 0, ms), final(3, b1, 10*ms)}, lost: true, violation: true},
		"not read back":       {ops: []Op{w(0, 3, a1, 0, ms)}, unread: true},
		// The unknown write a2 is read before the acknowledged b1 and
		// again after it: only a2 coming back after b1 would explain it.
		"unknown write seen after an overwrite": {ops: []Op{unknown(w(0, 3, a2, 0, ms)), rd(1, 3, a2, 2*ms, 3*ms),
			w(0, 3, b1, 4*ms, 5*ms), rd(1, 3, a2, 6*ms, 7*ms), final(3, b1, 10*ms)}, violation: true},
	} {
		t.Run(name, func(t *testing.T) {
			r := Check(tc.ops, 10*time.Second)
			if r.OK() {
				t.Fatalf("want a failure, got a pass: %v", r)
			}
			if got := len(r.Lost) > 0; got != tc.lost {
				t.Errorf("lost %v, want %v: %v", r.Lost, tc.lost, r)
			}
			if got := slices.Contains(r.Violations, 3); got != tc.violation {
				t.Errorf("violations %v, want block 3: %v", r.Violations, tc.violation)
			}
			if got := len(r.Corrupt) > 0; got != tc.corrupt {
				t.Errorf("corrupt %v, want %v", r.Corrupt, tc.corrupt)
			}
			if got := len(r.Unread) > 0; got != tc.unread {
				t.Errorf("unread %v, want %v", r.Unread, tc.unread)
			}
		})
	}
}

func TestTag(t *testing.T) {
	b := make([]byte, BlockSize)
	if got := Decode(b, 7); got != Zero {
		t.Fatalf("zeroes decode as %v", got)
	}
	v := MakeValue(3, 99)
	Fill(b, v, 7)
	if got := Decode(b, 7); got != v {
		t.Fatalf("decode %v, want %v", got, v)
	}
	if got := Decode(b, 8); got != Corrupt {
		t.Fatalf("misplaced block decodes as %v", got)
	}
	b[BlockSize-1] ^= 1
	if got := Decode(b, 7); got != Corrupt {
		t.Fatalf("flipped bit decodes as %v", got)
	}
	b2 := make([]byte, BlockSize)
	b2[100] = 1
	if got := Decode(b2, 7); got != Corrupt {
		t.Fatalf("garbage decodes as %v", got)
	}
}

func TestSaveFailure(t *testing.T) {
	ops := []Op{w(0, 3, a1, 0, ms), w(0, 3, a2, 2*ms, 3*ms), rd(1, 3, a1, 4*ms, 5*ms), final(3, a2, 10*ms)}
	r := Check(ops, 10*time.Second)
	dir := t.TempDir()
	html, err := SaveFailure(dir, ops, r)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(html)
	if err != nil || len(b) < 1000 {
		t.Fatalf("visualisation %s: %d bytes, %v", html, len(b), err)
	}
	back, err := LoadJSON(filepath.Join(dir, "history.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.EqualFunc(back, ops, func(a, b Op) bool {
		return a.Call == b.Call && a.Kind == b.Kind && a.Value == b.Value && slices.Equal(a.Got, b.Got)
	}) {
		t.Fatalf("history round trip: %+v", back)
	}
	if r2 := Check(back, 10*time.Second); !slices.Equal(r2.Violations, r.Violations) {
		t.Fatalf("reloaded history checks differently: %v vs %v", r2, r)
	}
}
