package replica_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/replica/rawimage"
	"github.com/keelstore/keel/replica/replicatest"
)

func write(epoch, req, acked, off uint64, data []byte) *replica.Command {
	return &replica.Command{Kind: replica.KindWrite, Epoch: epoch, ReqID: req, AckedBelow: acked, Offset: off, Data: data}
}

func mustApply(t *testing.T, c *replicatest.Cluster, cmd *replica.Command) replica.Result {
	t.Helper()
	res, err := c.Apply(cmd)
	if err != nil {
		t.Fatalf("apply %v: %v", cmd.Kind, err)
	}
	return res
}

func readImage(t *testing.T, n *replica.Node, off, length uint64) []byte {
	t.Helper()
	b := make([]byte, length)
	if err := n.Image().ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestReplicatedWritesConverge(t *testing.T) {
	c := replicatest.New(t, 3, replicatest.Options{})
	data := bytes.Repeat([]byte("keel"), 1024)
	for i := uint64(0); i < 20; i++ {
		if res := mustApply(t, c, write(0, 0, 0, i*8192, data)); res.Err != nil {
			t.Fatalf("write %d: %v", i, res.Err)
		}
	}
	mustApply(t, c, &replica.Command{Kind: replica.KindTrim, Offset: 0, Length: 8192})
	mustApply(t, c, &replica.Command{Kind: replica.KindZero, Offset: 8192, Length: 8192, ZeroFlags: nbd.ZeroNoHole})
	res := mustApply(t, c, &replica.Command{Kind: replica.KindWrite, Offset: c.Size - 512, Data: make([]byte, 1024)})
	if !errors.Is(res.Err, replica.ErrOutOfRange) {
		t.Errorf("write past the end: %v, want ErrOutOfRange", res.Err)
	}
	c.WaitConverged()
	for _, id := range []string{"n1", "n2", "n3"} {
		n := c.Node(id)
		if got := readImage(t, n, 16384, 4096); !bytes.Equal(got, data) {
			t.Errorf("%s: data at 16384 wrong", id)
		}
		if got := readImage(t, n, 0, 16384); !bytes.Equal(got, make([]byte, 16384)) {
			t.Errorf("%s: trimmed/zeroed range not zero", id)
		}
	}
}

func TestFencingAndTakeover(t *testing.T) {
	c := replicatest.New(t, 3, replicatest.Options{})
	d := []byte("abcd")
	a := mustApply(t, c, &replica.Command{Kind: replica.KindClaim, Writer: "proxy-a"})
	if a.Err != nil || a.Epoch == 0 {
		t.Fatalf("claim a: %+v", a)
	}
	if r := mustApply(t, c, write(a.Epoch, 1, 0, 0, d)); r.Err != nil {
		t.Fatalf("write by the writer: %v", r.Err)
	}
	if r := mustApply(t, c, write(0, 0, 0, 512, d)); !errors.Is(r.Err, replica.ErrStaleEpoch) {
		t.Errorf("direct write while held: %v, want ErrStaleEpoch", r.Err)
	}
	if r := mustApply(t, c, &replica.Command{Kind: replica.KindClaim, Writer: "proxy-b"}); !errors.Is(r.Err, replica.ErrWriterHeld) {
		t.Errorf("claim without takeover: %v, want ErrWriterHeld", r.Err)
	}
	b := mustApply(t, c, &replica.Command{Kind: replica.KindClaim, Writer: "proxy-b", Takeover: true})
	if b.Err != nil || b.Epoch <= a.Epoch {
		t.Fatalf("takeover: %+v", b)
	}
	if r := mustApply(t, c, write(a.Epoch, 2, 0, 1024, []byte("old!"))); !errors.Is(r.Err, replica.ErrStaleEpoch) {
		t.Errorf("fenced writer's write: %v, want ErrStaleEpoch", r.Err)
	}
	if r := mustApply(t, c, write(b.Epoch, 1, 0, 2048, d)); r.Err != nil || r.Duplicate {
		t.Errorf("new writer's first write (req 1 again, new table): %+v", r)
	}
	mustApply(t, c, &replica.Command{Kind: replica.KindRelease, Epoch: a.Epoch}) // stale release: ignored
	if r := mustApply(t, c, write(0, 0, 0, 512, d)); !errors.Is(r.Err, replica.ErrStaleEpoch) {
		t.Errorf("direct write after a stale release: %v", r.Err)
	}
	mustApply(t, c, &replica.Command{Kind: replica.KindRelease, Epoch: b.Epoch})
	if r := mustApply(t, c, write(0, 0, 0, 512, d)); r.Err != nil {
		t.Errorf("direct write after release: %v", r.Err)
	}
	c.WaitConverged()
	if got := readImage(t, c.Node("n2"), 1024, 4); bytes.Equal(got, []byte("old!")) {
		t.Error("a fenced write landed")
	}
	st := c.Node("n3").FSM().State()
	if st.Writer != "" || st.Epoch != b.Epoch {
		t.Errorf("state after release: writer %q epoch %d", st.Writer, st.Epoch)
	}
}

func TestExactlyOnce(t *testing.T) {
	c := replicatest.New(t, 3, replicatest.Options{})
	a := mustApply(t, c, &replica.Command{Kind: replica.KindClaim, Writer: "w"})
	mustApply(t, c, write(a.Epoch, 5, 1, 0, []byte("first")))
	mustApply(t, c, write(a.Epoch, 6, 1, 4096, []byte("later")))
	// A retry of request 5 (after a failover) must not apply again.
	if r := mustApply(t, c, write(a.Epoch, 5, 1, 0, []byte("again"))); !r.Duplicate || r.Err != nil {
		t.Errorf("retried request: %+v, want Duplicate", r)
	}
	// Ids below AckedBelow are forgotten but still refused.
	mustApply(t, c, write(a.Epoch, 7, 7, 8192, []byte("x")))
	if r := mustApply(t, c, write(a.Epoch, 6, 7, 4096, []byte("stale"))); !r.Duplicate {
		t.Errorf("request below acked: %+v, want Duplicate", r)
	}
	c.WaitConverged()
	if got := readImage(t, c.Node("n1"), 0, 5); string(got) != "first" {
		t.Errorf("image holds %q, want the first write only", got)
	}
	if st := c.Node("n2").FSM().State(); st.AckedBelow != 7 || len(st.Applied) != 1 {
		t.Errorf("exactly-once table: acked below %d, applied %v", st.AckedBelow, st.Applied)
	}
	// The same writer claiming again (a restarted proxy numbering its
	// requests from 1 again) starts a new table: its request 5 is new,
	// and the old epoch's retries are fenced.
	a2 := mustApply(t, c, &replica.Command{Kind: replica.KindClaim, Writer: "w"})
	if r := mustApply(t, c, write(a2.Epoch, 5, 1, 0, []byte("again"))); r.Duplicate || r.Err != nil {
		t.Errorf("request 5 after the writer re-claimed: %+v, want applied", r)
	}
	if r := mustApply(t, c, write(a.Epoch, 8, 7, 0, []byte("stale"))); !errors.Is(r.Err, replica.ErrStaleEpoch) {
		t.Errorf("old epoch after re-claim: %+v, want ErrStaleEpoch", r)
	}
	c.WaitConverged()
	if got := readImage(t, c.Node("n3"), 0, 5); string(got) != "again" {
		t.Errorf("image holds %q after the re-claimed writer's request 5", got)
	}
}

// Propose on a follower goes through the leader and returns only once the
// follower has applied the command: it reads its own write at once. A
// refusal comes back as the state machine's sentinel.
func TestProposeOnFollowerReadsItsWrites(t *testing.T) {
	c := replicatest.New(t, 3, replicatest.Options{})
	l := c.WaitLeader()
	var f *replica.Node
	for _, id := range []string{"n1", "n2", "n3"} {
		if id != l.ID() {
			f = c.Node(id)
			break
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := uint64(0); i < 10; i++ {
		data := bytes.Repeat([]byte{byte(i + 1)}, 4096)
		res, err := f.Propose(ctx, write(0, 0, 0, i*4096, data))
		for err != nil && errors.Is(err, replica.ErrNotLeader) && ctx.Err() == nil {
			// A leader that lost its lease on a loaded machine: the write
			// is an absolute overwrite, so sending it again is safe.
			time.Sleep(20 * time.Millisecond)
			res, err = f.Propose(ctx, write(0, 0, 0, i*4096, data))
		}
		if err != nil || res.Err != nil {
			t.Fatalf("propose on follower %s: %v / %v", f.ID(), err, res.Err)
		}
		if f.FSM().AppliedIndex() < res.Index {
			t.Fatalf("follower answered before applying index %d (applied %d)", res.Index, f.FSM().AppliedIndex())
		}
		if got := readImage(t, f, i*4096, 4096); !bytes.Equal(got, data) {
			t.Fatalf("follower does not read its own write %d", i)
		}
	}
	claim, err := f.Propose(ctx, &replica.Command{Kind: replica.KindClaim, Writer: "w"})
	if err != nil || claim.Err != nil || claim.Epoch == 0 {
		t.Fatalf("claim through follower: %+v, %v", claim, err)
	}
	if res, err := f.Propose(ctx, write(0, 0, 0, 0, []byte("x"))); err != nil || !errors.Is(res.Err, replica.ErrStaleEpoch) {
		t.Errorf("direct write through follower while held: %+v, %v; want ErrStaleEpoch", res, err)
	}
	// The caller's deadline travels with the command: an expired one is
	// refused by the leader before anything is proposed, on the leader and
	// through a follower alike.
	expired, cancelExpired := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancelExpired()
	last := l.Raft().LastIndex()
	for _, n := range []*replica.Node{l, f} {
		if _, err := n.Propose(expired, write(claim.Epoch, 1, 0, 0, []byte("late"))); !errors.Is(err, replica.ErrNoLeader) {
			t.Errorf("propose on %s with an expired deadline: %v, want ErrNoLeader", n.ID(), err)
		}
	}
	if got := l.Raft().LastIndex(); got != last {
		t.Errorf("a command with an expired deadline reached the log (last index %d, was %d)", got, last)
	}
	c.WaitConverged()
	if got := readImage(t, f, 0, 4); bytes.Equal(got, []byte("late")) {
		t.Error("a command with an expired deadline was applied")
	}
}

func TestLeaderLossAndReturn(t *testing.T) {
	c := replicatest.New(t, 3, replicatest.Options{})
	old := c.WaitLeader()
	mustApply(t, c, write(0, 0, 0, 0, []byte("before")))
	oldID := old.ID()
	c.Stop(oldID)
	n := c.WaitLeader()
	if n.ID() == oldID {
		t.Fatal("stopped node still leader")
	}
	mustApply(t, c, write(0, 0, 0, 4096, []byte("during")))
	c.Start(oldID, false)
	mustApply(t, c, write(0, 0, 0, 8192, []byte("after")))
	c.WaitConverged()
	if got := readImage(t, c.Node(oldID), 4096, 6); string(got) != "during" {
		t.Errorf("returned node missed the write made while it was down: %q", got)
	}
}

func TestQuorumLossRefusesWrites(t *testing.T) {
	c := replicatest.New(t, 3, replicatest.Options{})
	l := c.WaitLeader()
	mustApply(t, c, write(0, 0, 0, 0, []byte("committed")))
	var others []string
	for _, id := range []string{"n1", "n2", "n3"} {
		if id != l.ID() {
			others = append(others, id)
		}
	}
	c.Partition([]string{l.ID()}, others)
	c.Partition([]string{others[0]}, []string{others[1]})
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	_, err := l.Apply(ctx, write(0, 0, 0, 4096, []byte("lost")))
	cancel()
	if err == nil {
		t.Fatal("a write was acknowledged without a quorum")
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("refusal took %v", time.Since(start))
	}
	// Reads still work from the local image.
	if got := readImage(t, l, 0, 9); string(got) != "committed" {
		t.Errorf("read during quorum loss: %q", got)
	}
	c.Heal()
	mustApply(t, c, write(0, 0, 0, 8192, []byte("healed")))
	c.WaitConverged()
}

func TestRestartReplaysOnlyAfterSnapshot(t *testing.T) {
	c := replicatest.New(t, 3, replicatest.Options{})
	for i := uint64(0); i < 10; i++ {
		mustApply(t, c, write(0, 0, 0, i*4096, []byte{byte(i + 1)}))
	}
	c.WaitConverged()
	n := c.Node("n2")
	if err := n.Raft().Snapshot().Error(); err != nil {
		t.Fatal(err)
	}
	for i := uint64(10); i < 13; i++ {
		mustApply(t, c, write(0, 0, 0, i*4096, []byte{byte(i + 1)}))
	}
	c.WaitConverged()
	c.Stop("n2")
	n = c.Start("n2", false)
	c.WaitConverged()
	if got := n.FSM().Applies(); got != 3 {
		t.Errorf("after restart %d commands were applied again, want the 3 after the snapshot", got)
	}
	if got := readImage(t, n, 12*4096, 1); got[0] != 13 {
		t.Errorf("last write missing after restart")
	}
}

func TestFarBehindNodeResyncs(t *testing.T) {
	c := replicatest.New(t, 3, replicatest.Options{Size: 16 << 20, Config: func(cfg *replica.NodeConfig) {
		// raft-wal keeps serving compacted entries until their segment is
		// dropped, so a short absence never needs a snapshot with it; bolt
		// forgets them at once, which forces the snapshot path here.
		cfg.LogStore = replica.LogStoreBolt
		cfg.TrailingLogs = 8
		cfg.SnapshotThreshold = 16
		cfg.SnapshotInterval = 50 * time.Millisecond
	}})
	mustApply(t, c, write(0, 0, 0, 0, bytes.Repeat([]byte{1}, 4096)))
	c.WaitConverged()
	c.Stop("n3")
	for i := uint64(0); i < 100; i++ {
		mustApply(t, c, write(0, 0, 0, (i%20)*65536, bytes.Repeat([]byte{byte(i)}, 4096)))
	}
	c.WaitConverged()
	for _, id := range []string{"n1", "n2"} { // no log left to catch up from
		if err := c.Node(id).Raft().Snapshot().Error(); err != nil {
			t.Fatal(err)
		}
	}
	c.Start("n3", false)
	mustApply(t, c, write(0, 0, 0, 1<<20, []byte("after")))
	c.WaitConverged()
	if moved := c.Moved["n3"]; moved == 0 || moved > 40*65536 {
		t.Errorf("resync moved %d bytes; want only the ~20 changed 64 KiB chunks of a 16 MiB image", moved)
	}
}

func TestDirLockedAndFatalImage(t *testing.T) {
	c := replicatest.New(t, 1, replicatest.Options{})
	n := c.Node("n1")
	_, tr := raft.NewInmemTransport("x")
	_, err := replica.OpenNode(context.Background(), replica.NodeConfig{ID: "n1", Dir: n.Dir(), Transport: tr})
	if !errors.Is(err, replica.ErrDirLocked) {
		t.Errorf("second node on the same dir: %v, want ErrDirLocked", err)
	}

	// An image that cannot be written stops the FSM on that entry.
	dir := t.TempDir()
	img, err := rawimage.Open(dir+"/img", rawimage.Options{Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	fatal := make(chan error, 1)
	f := replica.NewFSM(context.Background(), replica.FSMConfig{Image: img, Log: hclog.NewNullLogger(), OnFatal: func(e error) { fatal <- e }}, replica.State{})
	img.Close()
	returned := make(chan any, 1)
	go func() {
		returned <- f.Apply(&raft.Log{Index: 1, Data: write(0, 0, 0, 0, []byte("x")).Encode(nil)})
	}()
	select {
	case err := <-fatal:
		if !errors.Is(err, os.ErrClosed) {
			t.Errorf("fatal error %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("OnFatal not called for a failed image write")
	}
	select {
	case <-returned:
		t.Error("Apply returned after a failed write: the entry would count as applied")
	case <-time.After(100 * time.Millisecond):
	}
	if f.AppliedIndex() != 0 {
		t.Error("failed entry counted as applied")
	}
	if _, err := f.Snapshot(); !errors.Is(err, replica.ErrImageFailed) {
		t.Errorf("snapshot after a failed write: %v, want ErrImageFailed", err)
	}
	// Stopping releases raft's FSM goroutine, without counting the entry.
	f.Stop()
	if res := (<-returned).(replica.Result); !errors.Is(res.Err, replica.ErrStopping) {
		t.Errorf("failed Apply answered %+v after Stop, want ErrStopping", res)
	}
	if f.AppliedIndex() != 0 {
		t.Error("failed entry counted as applied after Stop")
	}
}

// A leader elected after the old one died may hold committed entries it
// has not applied yet; ReadBarrier returns only once its image holds every
// write acknowledged before the call, and costs nothing more in that term.
func TestReadBarrierOnNewLeader(t *testing.T) {
	c := replicatest.New(t, 3, replicatest.Options{})
	old := c.WaitLeader()
	var want [][]byte
	for i := uint64(0); i < 32; i++ {
		data := bytes.Repeat([]byte{byte(i + 1)}, 64<<10)
		mustApply(t, c, write(0, 0, 0, i*(64<<10), data))
		want = append(want, data)
	}
	c.Stop(old.ID())
	l := c.WaitLeader()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	before := l.Raft().LastIndex()
	if err := l.ReadBarrier(ctx); err != nil {
		t.Fatalf("read barrier on the new leader %s: %v", l.ID(), err)
	}
	if l.Raft().LastIndex() <= before {
		t.Errorf("the first read barrier of the term committed no barrier entry (last index %d, was %d)", l.Raft().LastIndex(), before)
	}
	for i, w := range want {
		if got := readImage(t, l, uint64(i)*(64<<10), 64<<10); !bytes.Equal(got, w) {
			t.Fatalf("block %d on the new leader after the barrier: not the acknowledged write", i)
		}
	}
	after := l.Raft().LastIndex()
	if err := l.ReadBarrier(ctx); err != nil || l.Raft().LastIndex() != after {
		t.Errorf("a second read barrier in the same term: %v, last index %d -> %d (want no new entry)", err, after, l.Raft().LastIndex())
	}
	for _, n := range []string{"n1", "n2", "n3"} {
		if n != l.ID() && n != old.ID() {
			if err := c.Node(n).ReadBarrier(ctx); err != nil {
				t.Errorf("read barrier on follower %s: %v", n, err)
			}
		}
	}
}

// TestPausedHoldsAppliesNotReaders: while keel verify hashes the image
// (Paused), no command is applied, but the state can still be read, so
// status and metrics do not stall for the length of a digest.
func TestPausedHoldsAppliesNotReaders(t *testing.T) {
	f, _ := newFSM(t)
	f.Apply(&raft.Log{Index: 1, Data: write(0, 0, 0, 0, []byte("a")).Encode(nil)})

	inside, release, paused := make(chan struct{}), make(chan struct{}), make(chan error, 1)
	go func() {
		paused <- f.Paused(func(st replica.State) error {
			if st.Index != 1 {
				t.Errorf("Paused sees index %d, want 1", st.Index)
			}
			close(inside)
			<-release
			return nil
		})
	}()
	waitClosed(t, inside, "Paused to start")
	applied := make(chan any, 1)
	go func() { applied <- f.Apply(&raft.Log{Index: 2, Data: write(0, 0, 0, 0, []byte("b")).Encode(nil)}) }()

	read := make(chan replica.State, 1)
	go func() { read <- f.State() }()
	select {
	case st := <-read:
		if st.Index != 1 {
			t.Errorf("State during Paused: index %d, want 1", st.Index)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("State blocked while Paused ran")
	}
	select {
	case <-applied:
		t.Fatal("a command was applied while Paused ran")
	default:
	}
	close(release)
	if err := <-paused; err != nil {
		t.Fatal(err)
	}
	select {
	case <-applied:
	case <-time.After(10 * time.Second):
		t.Fatal("Apply did not go on after Paused returned")
	}
	if got := f.AppliedIndex(); got != 2 {
		t.Errorf("applied index %d after Paused, want 2", got)
	}
}

func waitClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}

// TestApplyBatch: raft hands the FSM the entries it committed together;
// commands are applied in order with their own results, and the
// configuration entries among them (which Apply never sees) change
// nothing and answer nil.
func TestApplyBatch(t *testing.T) {
	f, img := newFSM(t)
	out := f.ApplyBatch([]*raft.Log{
		{Index: 1, Type: raft.LogCommand, Data: write(0, 0, 0, 0, []byte("a")).Encode(nil)},
		{Index: 2, Type: raft.LogConfiguration, Data: []byte("not a command")},
		{Index: 3, Type: raft.LogCommand, Data: write(0, 0, 0, 4096, []byte("b")).Encode(nil)},
	})
	if len(out) != 3 || out[1] != nil {
		t.Fatalf("results %v, want three with nil for the configuration", out)
	}
	for i, want := range map[int]uint64{0: 1, 2: 3} {
		if r, ok := out[i].(replica.Result); !ok || r.Index != want || r.Err != nil {
			t.Errorf("result %d: %#v, want index %d and no error", i, out[i], want)
		}
	}
	if got := f.AppliedIndex(); got != 3 {
		t.Errorf("applied index %d, want 3", got)
	}
	b := make([]byte, 1)
	for off, want := range map[uint64]string{0: "a", 4096: "b"} {
		if err := img.ReadAt(b, off); err != nil || string(b) != want {
			t.Errorf("image at %d: %q, %v; want %q", off, b, err, want)
		}
	}
}

// newFSM is an FSM over a fresh 1 MiB image; a fatal error fails the test.
// The test's end stops the FSM and closes the image.
func newFSM(t *testing.T) (*replica.FSM, *rawimage.File) {
	t.Helper()
	img, err := rawimage.Open(t.TempDir()+"/img", rawimage.Options{Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	f := replica.NewFSM(context.Background(), replica.FSMConfig{Image: img, Log: hclog.NewNullLogger(), OnFatal: func(e error) { t.Error(e) }}, replica.State{})
	t.Cleanup(f.Stop)
	return f, img
}
