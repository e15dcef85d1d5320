package supervise

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// flaky fails its first fails runs, then tells started and blocks until
// stopped.
type flaky struct {
	fails   int
	runs    int
	started chan struct{}
}

func (f *flaky) String() string { return "flaky" }

func (f *flaky) Serve(ctx context.Context) error {
	f.runs++
	if f.runs <= f.fails {
		if f.runs == 2 {
			panic("second run panics")
		}
		return errors.New("failed")
	}
	close(f.started)
	<-ctx.Done()
	return nil
}

// A failure and a panic that are each followed by a restart count twice
// for that service, under the child supervisor's name, in the counter the
// root was given.
func TestRestartsCountedPerService(t *testing.T) {
	var r Restarts
	root := New("root", hclog.NewNullLogger(), Policy{Restarts: &r, FailureBackoff: time.Millisecond})
	child := New("child", hclog.NewNullLogger(), Policy{FailureBackoff: time.Millisecond})
	f := &flaky{fails: 2, started: make(chan struct{})}
	child.Add(f)
	root.Add(child)
	ctx, cancel := context.WithCancel(context.Background())
	done := root.ServeBackground(ctx)
	select {
	case <-f.started:
	case <-time.After(30 * time.Second):
		t.Fatal("the flaky service never ran a third time")
	}
	cancel()
	<-done
	got := r.Counts()
	if len(got) != 1 || got[0].Supervisor != "child" || got[0].Service != "flaky" || got[0].N != 2 {
		t.Fatalf("restart counts %+v, want child/flaky: 2", got)
	}
}
