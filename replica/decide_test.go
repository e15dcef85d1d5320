package replica

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/cockroachdb/datadriven"
	"github.com/keelstore/keel/nbd"
)

// TestDecide runs the stories in testdata/*.txt through decideEntry: each
// command is encoded and decoded as it is in the Raft log (by a build of
// the story's level), decided at the next log index, and the result, the
// effect on the image and the state after it are printed.
//
// Directives:
//
//	init size=N [max-applied=N] [level=L]  a fresh state (log index 0), read by a build of level L (default CurrentLevel)
//	future kind=K level=L [ignorable]      a command of a kind (number) and level a newer build wrote
//	claim writer=W [takeover]
//	release epoch=E
//	write epoch=E req=R acked=A off=O data=S
//	trim|zero epoch=E req=R acked=A off=O len=L [nohole]
//	register id=I [raft=..] [http=..] [nbd=..]
//	forget id=I
//	failover                               a new leader: its no-op entry takes an index, the log goes on
//	restart                                the state goes through a snapshot and back
//
// Run with -rewrite to regenerate the expected output, then read the diff.
func TestDecide(t *testing.T) {
	datadriven.Walk(t, "testdata", func(t *testing.T, path string) {
		var st *fsmState
		var index uint64
		var level Level
		datadriven.RunTest(t, path, func(t *testing.T, d *datadriven.TestData) string {
			if d.Cmd != "init" && st == nil {
				d.Fatalf(t, "%s before init", d.Cmd)
			}
			var c Command
			switch d.Cmd {
			case "init":
				var size uint64
				d.ScanArgs(t, "size", &size)
				st, index, level = newFSMState(State{}, size), 0, CurrentLevel
				if d.HasArg("max-applied") {
					d.ScanArgs(t, "max-applied", &st.maxApplied)
				}
				if d.HasArg("level") {
					var l int
					d.ScanArgs(t, "level", &l)
					level = Level(l)
				}
				return "state: " + stateString(st)
			case "failover":
				index++
				return fmt.Sprintf("new leader's no-op entry at index %d; the log goes on\nstate: %s", index, stateString(st))
			case "restart":
				b, err := json.Marshal(st.state())
				if err != nil {
					d.Fatalf(t, "%v", err)
				}
				var snap State
				if err := json.Unmarshal(b, &snap); err != nil {
					d.Fatalf(t, "%v", err)
				}
				limit := st.maxApplied
				st = newFSMState(snap, st.Size)
				st.maxApplied = limit
				return "state: " + stateString(st)
			case "claim":
				c = Command{Kind: KindClaim, Takeover: d.HasArg("takeover")}
				d.ScanArgs(t, "writer", &c.Writer)
			case "release":
				c = Command{Kind: KindRelease}
				d.ScanArgs(t, "epoch", &c.Epoch)
			case "write", "trim", "zero":
				c = Command{Kind: map[string]Kind{"write": KindWrite, "trim": KindTrim, "zero": KindZero}[d.Cmd]}
				scanOptional(t, d, "epoch", &c.Epoch)
				scanOptional(t, d, "req", &c.ReqID)
				scanOptional(t, d, "acked", &c.AckedBelow)
				d.ScanArgs(t, "off", &c.Offset)
				if c.Kind == KindWrite {
					var data string
					d.ScanArgs(t, "data", &data)
					c.Data = []byte(data)
				} else {
					d.ScanArgs(t, "len", &c.Length)
				}
				if d.HasArg("nohole") {
					c.ZeroFlags = nbd.ZeroNoHole
				}
			case "register":
				c = Command{Kind: KindRegister}
				d.ScanArgs(t, "id", &c.Node.ID)
				for key, dst := range map[string]*string{"raft": &c.Node.Raft, "http": &c.Node.HTTP, "nbd": &c.Node.NBD} {
					if d.HasArg(key) {
						d.ScanArgs(t, key, dst)
					}
				}
			case "forget":
				c = Command{Kind: KindForget}
				d.ScanArgs(t, "id", &c.Node.ID)
			case "future":
				var kind, l int
				d.ScanArgs(t, "kind", &kind)
				d.ScanArgs(t, "level", &l)
				c = Command{Kind: Kind(kind), Level: Level(l), Ignorable: d.HasArg("ignorable"), Body: []byte("future")}
			default:
				d.Fatalf(t, "unknown directive %q", d.Cmd)
			}
			// As in the log: the FSM sees the decoded entry.
			logged, err := DecodeAt(c.Encode(nil), level)
			if err != nil && !errors.Is(err, ErrUnknownCommand) {
				d.Fatalf(t, "decoding the encoded command: %v", err)
			}
			index++
			res, eff := decideEntry(st, index, &logged, err)
			return fmt.Sprintf("%s\neffect: %s\nstate: %s", resultString(res), eff, stateString(st))
		})
	})
}

func scanOptional(t *testing.T, d *datadriven.TestData, key string, dst *uint64) {
	if d.HasArg(key) {
		d.ScanArgs(t, key, dst)
	}
}

func resultString(r Result) string {
	s := fmt.Sprintf("index %d: ", r.Index)
	switch {
	case r.Err != nil:
		s += "refused: " + r.Err.Error()
	case r.Duplicate:
		s += "duplicate (not applied again)"
	default:
		s += "ok"
	}
	return s + fmt.Sprintf(" (epoch %d)", r.Epoch)
}

func stateString(st *fsmState) string {
	writer := "none"
	if st.Writer != "" {
		writer = fmt.Sprintf("%q", st.Writer)
	}
	ids := make([]string, 0, len(st.Nodes))
	for id, n := range st.Nodes {
		ids = append(ids, fmt.Sprintf("%s{raft=%s http=%s nbd=%s}", id, n.Raft, n.HTTP, n.NBD))
	}
	sort.Strings(ids)
	return fmt.Sprintf("writer=%s epoch=%d acked_below=%d applied=%v nodes=[%s]",
		writer, st.Epoch, st.AckedBelow, st.appliedSorted(), strings.Join(ids, " "))
}
