package server

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/keelstore/keel/replica"
)

// startUpgradable runs a one-node server with a Raft listener, as `keel
// server` does, and waits until it leads.
func startUpgradable(t *testing.T, out io.Writer) (*Server, string) {
	t.Helper()
	listen := func() net.Listener {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	httpL, nbdL, raftL := listen(), listen(), listen()
	dir := filepath.Join(t.TempDir(), "n1")
	raftAddr := raftL.Addr().String()
	s, err := New(Config{
		Node: replica.NodeConfig{ID: "n1", Dir: dir, RaftAddr: raftAddr, Bootstrap: true, Size: 1 << 20,
			Self: replica.NodeInfo{ID: "n1", Raft: raftAddr, HTTP: httpL.Addr().String(), NBD: nbdL.Addr().String()}},
		HTTP: httpL, NBD: nbdL, Raft: raftL, VolumeSize: 1 << 20, DrainTimeout: 5 * time.Second,
		Log: hclog.New(&hclog.LoggerOptions{Name: "n1", Level: hclog.Info, Output: out}),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	waitLeader(t, s)
	return s, dir
}

// waitLeader waits for the holder to publish a node that leads.
func waitLeader(t *testing.T, s *Server) *replica.Node {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		n, err := s.holder.Get(ctx)
		if err != nil {
			t.Fatalf("no node: %v", err)
		}
		if n.IsLeader() {
			return n
		}
		select {
		case <-n.Raft().LeaderCh():
		case <-ctx.Done():
			t.Fatal("the node does not lead")
		}
	}
}

// The parent's side of a handover releases the directory (another
// process could lock it) and makes calls that need the node fail at once;
// Resume after a failed child opens the node again, waiting while the
// directory is still locked by someone else.
func TestHandoverReleasesAndResumeReopens(t *testing.T) {
	waiting := &signalOn{word: "still held", seen: make(chan struct{})}
	s, dir := startUpgradable(t, waiting)
	h := &handover{s: s}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	state, conns, err := h.Quiesce(ctx)
	if err != nil || len(state) != 0 || len(conns) != 0 {
		t.Fatalf("Quiesce = %q, %d connections, %v; want nothing and no error", state, len(conns), err)
	}
	if _, err := s.holder.Get(ctx); !errors.Is(err, ErrHandedOver) {
		t.Fatalf("Get after the release: %v, want ErrHandedOver at once", err)
	}
	// What the child does first: take the directory's lock.
	lock, err := os.OpenFile(filepath.Join(dir, "LOCK"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		t.Fatalf("the directory is still locked after the release: %v", err)
	}
	// The child fails while it holds the lock; the parent resumes, and its
	// node opens once the lock is gone.
	h.Resume(nil)
	select {
	case <-waiting.seen: // the reopen found the lock held, and waits
	case <-ctx.Done():
		t.Fatal("the reopen never waited for the lock")
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_UN); err != nil {
		t.Fatal(err)
	}
	n := waitLeader(t, s)
	res, err := n.Propose(ctx, &replica.Command{Kind: replica.KindWrite, Offset: 0, Data: make([]byte, 512)})
	if err != nil || res.Err != nil {
		t.Fatalf("a write after the reopen: %v, %v", err, res.Err)
	}
}

// The running node's transport holds the Raft listener: another lease is
// refused (RaftService.open waits on ErrLeaseHeld while a last run stops).
func TestLeaseHeldWhileNodeRuns(t *testing.T) {
	s, _ := startUpgradable(t, io.Discard)
	rl := s.rl
	if _, err := rl.Transport(s.cfg.Node.RaftAddr, nil); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("a lease while the node runs: %v, want ErrLeaseHeld", err)
	}
}

// signalOn closes seen the first time a log line holds word.
type signalOn struct {
	word string
	once sync.Once
	seen chan struct{}
}

func (w *signalOn) Write(p []byte) (int, error) {
	if strings.Contains(string(p), w.word) {
		w.once.Do(func() { close(w.seen) })
	}
	return len(p), nil
}
