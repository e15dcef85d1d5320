package proxy

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/datadriven"

	"github.com/keelstore/keel/nbd"
)

// TestWriterState runs the writer state machine through the stories in
// testdata/writer_*.txt. Commands (t= is the time since the story began):
//
//	new [takeover]             a proxy starts (with --takeover)
//	start t=D                  the claim at start: what to do
//	write t=D                  a write arrives: what to do
//	claimed epoch=N            the claim was committed with epoch N
//	refused holder=W t=D       the claim was refused: W holds the volume
//	saw writer=W epoch=N       a server's status reports W's epoch N
//	stale-epoch                a write was refused for its stale epoch; the input is the server's detail
//	stop                       Serve ends: what to release
//	released                   the release was committed
//
// Each prints the action (if any) and the state after it.
func TestWriterState(t *testing.T) {
	datadriven.Walk(t, "testdata", func(t *testing.T, path string) {
		if !strings.HasPrefix(path[strings.LastIndex(path, "/")+1:], "writer_") {
			return
		}
		var w writerState
		begin := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		at := func(t *testing.T, d *datadriven.TestData) time.Time {
			var s string
			d.ScanArgs(t, "t", &s)
			dur, err := time.ParseDuration(s)
			if err != nil {
				d.Fatalf(t, "t=%s: %v", s, err)
			}
			return begin.Add(dur)
		}
		datadriven.RunTest(t, path, func(t *testing.T, d *datadriven.TestData) string {
			var out strings.Builder
			switch d.Cmd {
			case "new":
				w = newWriterState(d.HasArg("takeover"))
			case "start", "write":
				a := w.next(at(t, d), d.Cmd == "write")
				fmt.Fprintf(&out, "action: %s\n", describeAction(a))
			case "claimed":
				var e uint64
				d.ScanArgs(t, "epoch", &e)
				w.claimedEpoch(e)
			case "refused":
				var holder string
				d.ScanArgs(t, "holder", &holder)
				fmt.Fprintf(&out, "answer: %v\n", w.refused(holder, at(t, d)))
			case "saw":
				var writer string
				var e uint64
				d.ScanArgs(t, "writer", &writer)
				d.ScanArgs(t, "epoch", &e)
				if _, fenced := w.sawEpoch(writer, e); fenced {
					out.WriteString("fenced now\n")
				}
			case "stale-epoch":
				if w.fenced(strings.TrimSpace(d.Input)) {
					out.WriteString("fenced now\n")
				}
				fmt.Fprintf(&out, "answer: %v\n", w.fencedErr())
			case "stop":
				fmt.Fprintf(&out, "release epoch: %d\n", w.stop())
			case "released":
				w.released()
			default:
				d.Fatalf(t, "unknown command %q", d.Cmd)
			}
			fmt.Fprintf(&out, "state: %s\n", describeWriter(&w, begin))
			return out.String()
		})
	})
}

func describeAction(a writerAction) string {
	switch a.kind {
	case actWrite:
		return fmt.Sprintf("write with epoch %d", a.epoch)
	case actClaim:
		if a.takeover {
			return "claim as a takeover"
		}
		return "claim"
	case actRefuse:
		if !errors.Is(a.err, nbd.EPERM) {
			return fmt.Sprintf("refuse, NOT EPERM: %v", a.err)
		}
		return fmt.Sprintf("refuse without asking: %v", a.err)
	}
	return fmt.Sprintf("unknown action %d", a.kind)
}

// describeWriter prints the state in the words of writerState's comment.
func describeWriter(w *writerState, begin time.Time) string {
	var parts []string
	switch {
	case w.fencedBy != "":
		parts = append(parts, fmt.Sprintf("fenced (%s)", w.fencedBy))
	case w.epoch != 0:
		parts = append(parts, fmt.Sprintf("holding epoch %d", w.epoch))
	case !w.refusedAt.IsZero():
		parts = append(parts, fmt.Sprintf("held-by %q since %v", w.heldBy, w.refusedAt.Sub(begin)))
	default:
		parts = append(parts, "free")
	}
	if w.stopped {
		parts = append(parts, "stopped")
	}
	if w.holding() {
		parts = append(parts, "cache on")
	} else {
		parts = append(parts, "cache off")
	}
	if w.takeover && !w.claimed {
		parts = append(parts, "takes over at the first write")
	}
	return strings.Join(parts, ", ")
}
