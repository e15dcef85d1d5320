// Cluster end-to-end tests: several `keel server` processes of the built
// binary on loopback, each in its own directory, driven by real clients
// (fio, qemu-io, nbdcopy, nbdinfo) and by keel's own `cluster` and `verify`
// subcommands. They crash nodes with SIGKILL, stop them with SIGTERM, take
// the quorum away, grow and shrink the cluster under load, bring back a node
// that missed writes, and tamper with an image behind Keel's back.
//
// The processes, ports and waits come from keeltest (the binary is built
// once; KEEL_E2E_BIN and KEEL_E2E_RACE apply); the tool lookups and the
// command runners from e2e_test.go. Every node writes its output to a file
// that is shown when the test fails; every process is killed when its test
// ends; every wait polls a condition under a deadline. Ports come from
// keeltest's range below the ephemeral ones; a node that cannot bind one
// of its ports before it joined a cluster is started again on new ones.
//
// Tests that need entries out of the log start the servers with small
// --snapshot-threshold and --snapshot-interval, and read hashicorp/raft's
// file snapshot store (DIR/snapshots/*/meta.json) to know when a node has
// taken a snapshot: keel's status does not show the snapshot index.

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
	"github.com/keelstore/keel/services/keeltls"
	"github.com/keelstore/keel/services/proxy"
	"github.com/keelstore/keel/services/wire"
)

const (
	nodeUpTimeout     = 60 * time.Second // exec to answering HTTP, or to leading after --bootstrap
	nodeStopTimeout   = 30 * time.Second // SIGTERM to exit
	clusterTimeout    = 2 * time.Minute  // membership changes, elections, catching up
	fioTimeout        = 4 * time.Minute  // any one fio run
	snapshotTimeout   = 30 * time.Second // with --snapshot-interval 1s
	pollEvery         = 100 * time.Millisecond
	writeTimeoutShort = 2 * time.Second // --write-timeout of the quorum-loss test
)

// ---------------------------------------------------------------------------
// The cluster, from keeltest.

// newCluster bootstraps n1 and joins n2..nN, and waits until all are voters.
// Every server gets flags after --write-timeout 60s (a later flag wins):
// these tests are about data, not about how soon a write gives up, and on
// a loaded two-core machine, or under -race, leadership can move while
// fio runs.
func newCluster(t *testing.T, size string, n int, flags ...string) *keeltest.TCluster {
	t.Helper()
	return keeltest.MustCluster(t, keeltest.ClusterConfig{
		N: n, Size: size, Flags: append([]string{"--write-timeout", "60s"}, flags...),
		UpTimeout: nodeUpTimeout, Timeout: clusterTimeout, StopTimeout: nodeStopTimeout, PollEvery: pollEvery,
	})
}

// proxyStatusAt reads a proxy's GET /v1/status.
func proxyStatusAt(t *testing.T, addr string) (proxy.Status, error) {
	return proxyStatusWith(t, wire.NewClient(5*time.Second, nil), addr)
}

// proxyStatusWith reads a proxy's GET /v1/status with c.
func proxyStatusWith(t *testing.T, c *wire.Client, addr string) (proxy.Status, error) {
	var st proxy.Status
	err := c.Do(t.Context(), http.MethodGet, addr, "/v1/status", nil, &st)
	return st, err
}

// devClient is a client of keel dev's cluster with the certificate it
// made for the operator (DIR/tls/cli).
func devClient(t *testing.T, dir string) *wire.Client {
	t.Helper()
	b, err := keeltls.Load(filepath.Join(dir, "tls", "cli"))
	if err != nil {
		t.Fatalf("keel dev's certificates for the CLI: %v", err)
	}
	cfg, err := b.ClientConfig("")
	if err != nil {
		t.Fatal(err)
	}
	c := wire.NewClient(5*time.Second, cfg)
	t.Cleanup(c.HTTP.CloseIdleConnections)
	return c
}

// ---------------------------------------------------------------------------
// keel verify and keel cluster.

type verifyResult struct {
	result
	code    int               // exit status; -1 if it did not exit normally
	digests map[string]string // voter -> digest, from the table
}

// runVerify runs keel verify against via and parses its table.
func runVerify(t *testing.T, via *keeltest.Node) verifyResult {
	t.Helper()
	args := []string{"verify", "--http", via.HTTP, "--timeout", "60s"}
	if via.CertDir != "" { // cluster TLS: the node's client certificate
		args = append(args, "--cluster-tls", via.CertDir)
	}
	r := run(t, 90*time.Second, keeltest.MustBinary(t), args...)
	v := verifyResult{result: r, digests: map[string]string{}}
	var exit *exec.ExitError
	switch {
	case r.err == nil:
	case errors.As(r.err, &exit) && exit.Exited():
		v.code = exit.ExitCode()
	default:
		v.code = -1
	}
	for _, l := range strings.Split(r.stdout, "\n") {
		if f := strings.Fields(l); len(f) == 4 && f[0] != "VOTER" {
			v.digests[f[0]] = f[3]
		}
	}
	t.Logf("keel verify: exit %d\n%s%s", v.code, r.stdout, r.stderr)
	return v
}

// verifyOK asserts that keel verify exits 0 and prints OK for the voters.
func verifyOK(t *testing.T, via *keeltest.Node, voters ...string) {
	t.Helper()
	v := runVerify(t, via)
	if v.code != 0 {
		t.Errorf("keel verify exited %d (%v), want 0", v.code, v.err)
	}
	if want := fmt.Sprintf("OK: %d voters byte-identical", len(voters)); !strings.Contains(v.stdout, want) {
		t.Errorf("keel verify output lacks %q", want)
	}
	var got []string
	for id := range v.digests {
		got = append(got, id)
	}
	sort.Strings(got)
	want := slices.Clone(voters)
	sort.Strings(want)
	if !slices.Equal(got, want) {
		t.Errorf("keel verify checked voters %v, want %v", got, want)
	}
}

// ---------------------------------------------------------------------------
// Clients.

// qemuIO runs qemu-io with the given commands against uri.
func qemuIO(t *testing.T, uri string, cmds ...string) result {
	t.Helper()
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	return run(t, toolTimeout, tool(t, "qemu-io"), append(args, uri)...)
}

// qemuIOFailed reports whether qemu-io said a command failed (it exits
// non-zero, and prints "... failed: ...").
func qemuIOFailed(r result) bool {
	return r.err != nil || strings.Contains(r.stdout+r.stderr, "failed")
}

func mustQemuIO(t *testing.T, uri string, cmds ...string) {
	t.Helper()
	if r := qemuIO(t, uri, cmds...); qemuIOFailed(r) {
		t.Fatalf("qemu-io %q on %s: %v\n%s%s", cmds, uri, r.err, r.stdout, r.stderr)
	}
}

type fioJob struct {
	Name  string `json:"jobname"`
	Error int    `json:"error"`
	Read  struct {
		IOBytes int64 `json:"io_bytes"`
	} `json:"read"`
	Write struct {
		IOBytes int64 `json:"io_bytes"`
	} `json:"write"`
}

// fioRun is fio running in the background.
type fioRun struct {
	name   string
	out    string // the JSON report
	done   chan struct{}
	res    result
	cancel context.CancelFunc
}

// startFio starts one fio job against an NBD URI; the test's cleanup stops
// it and waits for it.
func startFio(t *testing.T, name, uri string, args ...string) *fioRun {
	t.Helper()
	f := &fioRun{name: name, out: filepath.Join(t.TempDir(), name+".json"), done: make(chan struct{})}
	args = append([]string{"--name=" + name, "--ioengine=nbd", "--uri=" + uri,
		"--output-format=json", "--output=" + f.out}, args...)
	ctx, cancel := context.WithTimeout(context.Background(), fioTimeout)
	f.cancel = cancel
	cmd := exec.CommandContext(ctx, tool(t, "fio"), args...)
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("fio %s: %v", name, err)
	}
	t.Logf("fio %s", strings.Join(args, " "))
	go func() {
		err := cmd.Wait()
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (deadline %v or test end)", err, fioTimeout)
		}
		f.res = result{stdout.String(), stderr.String(), err}
		close(f.done)
	}()
	t.Cleanup(func() { cancel(); <-f.done })
	return f
}

// wait waits for fio to end and asserts that it succeeded, reported no
// error and no verification problem; it returns the job's report.
func (f *fioRun) wait(t *testing.T) fioJob {
	t.Helper()
	<-f.done
	r := f.res
	if r.err != nil {
		t.Fatalf("fio %s: %v\nstdout:\n%s\nstderr:\n%s", f.name, r.err, r.stdout, r.stderr)
	}
	if strings.Contains(r.stdout+r.stderr, "verify:") {
		t.Errorf("fio %s mentioned verification problems:\n%s\n%s", f.name, r.stdout, r.stderr)
	}
	var rep struct {
		Jobs []fioJob `json:"jobs"`
	}
	b := readFile(t, f.out)
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatalf("fio %s json: %v\n%s", f.name, err, b)
	}
	if len(rep.Jobs) != 1 {
		t.Fatalf("fio %s reported %d jobs, want 1", f.name, len(rep.Jobs))
	}
	j := rep.Jobs[0]
	if j.Error != 0 {
		t.Errorf("fio %s: job error %d", f.name, j.Error)
	}
	t.Logf("fio %s: err=%d, wrote %d bytes, read (verified) %d bytes", f.name, j.Error, j.Write.IOBytes, j.Read.IOBytes)
	return j
}

// runFio runs one fio job to its end; see fioRun.wait.
func runFio(t *testing.T, name, uri string, args ...string) fioJob {
	t.Helper()
	return startFio(t, name, uri, args...).wait(t)
}

// randomBytes returns n reproducible pseudo-random bytes.
func randomBytes(seed string, n int) []byte {
	var s [32]byte
	copy(s[:], seed)
	b := make([]byte, n)
	rand.NewChaCha8(s).Read(b)
	return b
}

// compareImages asserts that the files are byte-identical, reading them a
// few MiB at a time.
func compareImages(t *testing.T, paths ...string) {
	t.Helper()
	files := make([]*os.File, len(paths))
	for i, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files[i] = f
	}
	bufs := make([][]byte, len(paths))
	for i := range bufs {
		bufs[i] = make([]byte, 4*mib)
	}
	for off := int64(0); ; {
		var lens []int
		for i, f := range files {
			k, err := io.ReadFull(f, bufs[i])
			if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF {
				t.Fatal(err)
			}
			lens = append(lens, k)
		}
		for i := 1; i < len(files); i++ {
			if lens[i] != lens[0] {
				t.Errorf("%s and %s differ in length (at %d: %d and %d more bytes)", paths[0], paths[i], off, lens[0], lens[i])
				return
			}
			if !bytes.Equal(bufs[i][:lens[i]], bufs[0][:lens[0]]) {
				t.Errorf("%s and %s differ: %s (in the 4 MiB from %d)", paths[i], paths[0], firstDiff(bufs[i][:lens[i]], bufs[0][:lens[0]]), off)
				return
			}
		}
		if lens[0] == 0 {
			return
		}
		off += int64(lens[0])
	}
}

// ---------------------------------------------------------------------------
// The tests.

// TestClusterFioVerify writes through the leader and through a follower at
// once with fio verifying every block, then proves the three images equal
// twice: with keel verify, and byte by byte after a clean stop.
func TestClusterFioVerify(t *testing.T) {
	c := newCluster(t, "256M", 3)
	lead := c.MustLeader()
	follower := c.Followers(lead)[0]
	t.Logf("leader %s; fio also writes through follower %s", lead.ID, follower.ID)

	verifyArgs := []string{"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0"}
	random := startFio(t, "leader-randwrite", lead.URI(), append([]string{
		"--rw=randwrite", "--bs=4k", "--iodepth=32", "--offset=0", "--size=64M"}, verifyArgs...)...)
	seq := startFio(t, "follower-seqwrite", follower.URI(), append([]string{
		"--rw=write", "--bs=1M", "--iodepth=8", "--offset=128M", "--size=64M"}, verifyArgs...)...)
	for _, f := range []*fioRun{random, seq} {
		if j := f.wait(t); j.Write.IOBytes != 64*mib || j.Read.IOBytes != 64*mib {
			t.Errorf("fio %s wrote %d and verified %d bytes, want %d each", f.name, j.Write.IOBytes, j.Read.IOBytes, 64*mib)
		}
	}

	verifyOK(t, follower, "n1", "n2", "n3")
	c.MustStopAll()
	compareImages(t, c.Node("n1").Image(), c.Node("n2").Image(), c.Node("n3").Image())
	img := readFile(t, c.Node("n1").Image())
	for _, off := range []int{0, 128 * mib} {
		if bytes.Equal(img[off:off+mib], make([]byte, mib)) {
			t.Errorf("n1's image holds zeros at %d, where fio wrote", off)
		}
	}
}

// TestClusterLeaderKill crashes the leader with SIGKILL after a write:
// everything acknowledged must read back from the new leader at once, the
// cluster must take writes, and the crashed node must come back and match.
func TestClusterLeaderKill(t *testing.T) {
	nbdcopy := tool(t, "nbdcopy")
	const size = 64 * mib
	c := newCluster(t, "64M", 3)
	old := c.MustLeader()

	dir := t.TempDir()
	pattern := randomBytes("leader-kill", 24*mib)
	clear(pattern[8*mib : 9*mib]) // a run of zeros for nbdcopy's sparse detection
	src := filepath.Join(dir, "pattern.bin")
	if err := os.WriteFile(src, pattern, 0o644); err != nil {
		t.Fatal(err)
	}
	mustRun(t, toolTimeout, nbdcopy, "--flush", src, old.URI())

	c.MustKill(old)
	survivors := c.Followers(old)
	start := time.Now()
	lead := c.MustLeader(survivors...)
	t.Logf("killed leader %s; %s leads after %v", old.ID, lead.ID, time.Since(start).Round(time.Millisecond))

	// Acknowledged means committed on a quorum, so the new leader must
	// show all of it straight away.
	want := make([]byte, size)
	copy(want, pattern)
	out := filepath.Join(dir, "new-leader.bin")
	mustRun(t, toolTimeout, nbdcopy, lead.URI(), out)
	compareFile(t, "the pattern read back through the new leader "+lead.ID, out, want)

	mustQemuIO(t, lead.URI(), "write -P 0x5e 40M 4M")
	copy(want[40*mib:44*mib], bytes.Repeat([]byte{0x5e}, 4*mib))

	c.MustRestart(old)
	c.MustConverge()
	out = filepath.Join(dir, "restarted.bin")
	mustRun(t, toolTimeout, nbdcopy, old.URI(), out)
	compareFile(t, "the volume read back through the restarted "+old.ID, out, want)
	verifyOK(t, lead, "n1", "n2", "n3")
}

// TestClusterQuorumLoss kills two of three nodes: the survivor keeps
// serving reads and fails writes in bounded time. Once the others are back,
// the failed write is either wholly there or wholly absent, the same on
// every node, and the cluster takes writes again.
func TestClusterQuorumLoss(t *testing.T) {
	c := newCluster(t, "64M", 3, "--write-timeout", writeTimeoutShort.String())
	survivor := c.MustLeader()
	mustQemuIO(t, survivor.URI(), "write -P 0xa1 0 4M")
	c.MustConverge()

	killed := c.Followers(survivor)
	for _, n := range killed {
		c.MustKill(n)
	}
	t.Logf("killed %s and %s; %s survives", killed[0].ID, killed[1].ID, survivor.ID)

	mustQemuIO(t, survivor.URI(), "read -P 0xa1 0 4M")
	start := time.Now()
	r := qemuIO(t, survivor.URI(), "write -P 0xb2 1M 1M")
	took := time.Since(start)
	t.Logf("write without a quorum: %v after %v\n%s%s", r.err, took.Round(time.Millisecond), r.stdout, r.stderr)
	if !qemuIOFailed(r) {
		t.Errorf("a write on %s without a quorum succeeded", survivor.ID)
	}
	if took > 15*time.Second {
		t.Errorf("the write without a quorum took %v to fail, want under 15s (--write-timeout %v)", took, writeTimeoutShort)
	}
	// Nothing is applied before it is committed.
	mustQemuIO(t, survivor.URI(), "read -P 0xa1 0 4M")

	for _, n := range killed {
		c.MustRestart(n)
	}
	lead := c.MustLeader()
	c.MustConverge()
	var outcomes []string
	seen := map[string]bool{}
	for _, n := range c.Nodes() {
		isOld := !qemuIOFailed(qemuIO(t, n.URI(), "read -P 0xa1 1M 1M"))
		isNew := !qemuIOFailed(qemuIO(t, n.URI(), "read -P 0xb2 1M 1M"))
		switch {
		case isOld:
			outcomes, seen["old"] = append(outcomes, n.ID+": old"), true
		case isNew:
			outcomes, seen["new"] = append(outcomes, n.ID+": new"), true
		default:
			t.Errorf("%s: the failed write's range holds neither the old bytes nor the new ones", n.ID)
		}
		mustQemuIO(t, n.URI(), "read -P 0xa1 0 1M", "read -P 0xa1 2M 2M")
	}
	t.Logf("the failed write's range after recovery: %s", strings.Join(outcomes, ", "))
	if len(seen) > 1 {
		t.Errorf("the nodes disagree about the failed write: %s", strings.Join(outcomes, ", "))
	}
	verifyOK(t, lead, "n1", "n2", "n3")

	writer := killed[0]
	mustQemuIO(t, writer.URI(), "write -P 0xc3 8M 1M")
	c.MustConverge()
	for _, n := range c.Nodes() {
		mustQemuIO(t, n.URI(), "read -P 0xc3 8M 1M")
	}
}

// TestClusterGrowShrinkUnderLoad goes from three voters to four and back to
// three while fio writes and verifies through the leader.
func TestClusterGrowShrinkUnderLoad(t *testing.T) {
	const trailing = 4096
	c := newCluster(t, "512M", 3, "--snapshot-threshold", "1024", "--snapshot-interval", "1s",
		"--trailing-logs", strconv.Itoa(trailing))
	lead := c.MustLeader()
	runFio(t, "fill", lead.URI(), "--rw=write", "--bs=1M", "--iodepth=8", "--size=256M")
	fillIndex := c.MustConverge()

	load := startFio(t, "load", lead.URI(), "--rw=randwrite", "--bs=4k", "--iodepth=16",
		"--offset=0", "--size=64M", "--time_based", "--runtime=30",
		"--verify=crc32c", "--verify_fatal=1", "--verify_backlog=1024", "--verify_state_save=0")

	// A new node replays the log while the leader still has all of it, and
	// resyncs the image from its peers once it does not. Wait until the
	// leader has compacted past the fill (raft-wal then drops the 64 MiB
	// segments it filled), so that n4 must resync under load.
	keeltest.MustPoll(t, snapshotTimeout, fmt.Sprintf("leader %s snapshots past index %d", lead.ID, fillIndex+trailing), func() (bool, string) {
		i := c.MustSnapshotIndex(lead)
		return i > fillIndex+trailing, fmt.Sprintf("newest snapshot at index %d", i)
	})
	t.Logf("filled to index %d; leader's newest snapshot is at index %d", fillIndex, c.MustSnapshotIndex(lead))

	via := c.Followers(lead)[0]
	n4 := c.MustJoin("n4", via)
	t.Logf("n4 joined through %s", via.ID)
	var sawSync, sawNonvoter bool
	var moved, total uint64
	c.MustVoters(lead, []string{"n1", "n2", "n3", "n4"}, func(v wire.ClusterStatus) {
		for _, m := range v.Members {
			if m.ID != "n4" {
				continue
			}
			sawNonvoter = sawNonvoter || m.Suffrage == "Nonvoter"
			if m.Status != nil && m.Status.Sync != nil {
				s := m.Status.Sync
				sawSync = sawSync || s.Active
				moved, total = max(moved, s.BytesMoved), s.BytesTotal
			}
		}
	})
	if !sawNonvoter {
		t.Logf("n4 was never seen as a non-voter (promoted between two looks)")
	}
	out := n4.RunOutput()
	resynced := strings.Contains(out, "resyncing the image from peers") && strings.Contains(out, "resync done")
	if resynced {
		t.Logf("n4 caught up by an image resync (status showed it active: %v; %d of %d bytes moved)", sawSync, moved, total)
	} else {
		t.Errorf("n4 caught up without an image resync although the leader had compacted its log past the fill")
	}

	lead = c.MustLeader()
	var victim *keeltest.Node
	for _, n := range c.Followers(lead) {
		if n != n4 {
			victim = n
			break
		}
	}
	mustRun(t, 60*time.Second, keeltest.MustBinary(t), "cluster", "remove", victim.ID, "--http", lead.HTTP)
	var remaining []string
	for _, n := range c.Nodes() {
		if n != victim {
			remaining = append(remaining, n.ID)
		}
	}
	c.MustVoters(lead, remaining, nil)
	if v, err := lead.ClusterStatus(t.Context()); err == nil {
		for _, m := range v.Members {
			if m.ID == victim.ID {
				t.Errorf("%s is still a member after keel cluster remove: %s", victim.ID, keeltest.DescribeCluster(v))
			}
		}
	}
	c.MustStop(victim)
	select {
	case <-load.done:
		t.Logf("fio's load ended before %s was removed", victim.ID)
	default:
		t.Logf("removed %s while fio's load ran", victim.ID)
	}

	j := load.wait(t)
	if j.Write.IOBytes == 0 || j.Read.IOBytes == 0 {
		t.Errorf("fio load wrote %d and verified %d bytes, want both above 0", j.Write.IOBytes, j.Read.IOBytes)
	}
	lead = c.MustLeader()
	c.MustConverge()
	verifyOK(t, lead, remaining...)
}

// TestClusterReturningNode stops a node, writes 32 MiB while it is away
// (half over old data), waits until the leader's log no longer reaches back
// to it, and restarts it: it must resync by moving about what changed, not
// the 1 GiB volume, and keep its image sparse.
//
// It runs on raft-boltdb: raft-wal keeps compacted entries readable until
// their whole 64 MiB segment goes, so on it a node away for 32 MiB of
// writes catches up from the log (which moves even less).
func TestClusterReturningNode(t *testing.T) {
	const trailing = 256
	c := newCluster(t, "1G", 3, "--log-store", "bolt", "--snapshot-threshold", "1024",
		"--snapshot-interval", "1s", "--trailing-logs", strconv.Itoa(trailing))
	lead := c.MustLeader()
	runFio(t, "first", lead.URI(), "--rw=write", "--bs=1M", "--iodepth=8", "--size=64M")
	c.MustConverge()

	away := c.Followers(lead)[len(c.Followers(lead))-1]
	st, err := away.Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	c.MustStop(away)
	t.Logf("stopped %s at applied index %d", away.ID, st.AppliedIndex)

	over := startFio(t, "overwrite", lead.URI(), "--rw=randwrite", "--bs=4k", "--iodepth=32", "--offset=48M", "--size=16M")
	fresh := startFio(t, "new", lead.URI(), "--rw=write", "--bs=4k", "--iodepth=32", "--offset=256M", "--size=16M")
	over.wait(t)
	fresh.wait(t)

	// Entries up to the snapshot less TrailingLogs leave the log; once
	// those reach past what the stopped node has, it needs a resync.
	need := st.AppliedIndex + trailing + 1
	keeltest.MustPoll(t, snapshotTimeout, fmt.Sprintf("leader %s snapshots past index %d", lead.ID, need), func() (bool, string) {
		i := c.MustSnapshotIndex(lead)
		return i > need, fmt.Sprintf("newest snapshot at index %d", i)
	})

	c.MustRestart(away)
	c.MustConverge()
	moved := c.MustMetric(away, "keel_resync_bytes_moved_total")
	alloc := allocatedBytes(t, away.Image())
	t.Logf("%s: resync moved %.0f bytes; image has %d bytes allocated of %d", away.ID, moved, alloc, 1<<30)
	if !strings.Contains(away.RunOutput(), "resync done") {
		t.Errorf("%s caught up without an image resync although the leader compacted past it", away.ID)
	} else if moved == 0 {
		t.Errorf("%s resynced but keel_resync_bytes_moved_total is 0; 32 MiB changed while it was away", away.ID)
	}
	if moved >= 256*mib {
		t.Errorf("%s moved %.0f bytes to catch up, want well under 256 MiB (32 MiB changed)", away.ID, moved)
	}
	if alloc >= 256*mib {
		t.Errorf("%s's image has %d bytes allocated, want it sparse (about 80 MiB of data)", away.ID, alloc)
	}
	verifyOK(t, lead, "n1", "n2", "n3")
}

// TestClusterVerifyDetectsTampering flips bytes in one stopped node's image
// and asserts that keel verify notices and names that node.
func TestClusterVerifyDetectsTampering(t *testing.T) {
	c := newCluster(t, "64M", 3, "--snapshot-threshold", "256", "--snapshot-interval", "1s")
	lead := c.MustLeader()
	mustQemuIO(t, lead.URI(), "write -P 0x6b 0 1M")
	written := c.MustConverge()

	// On start a node replays its log after its newest snapshot; the
	// tampered bytes must lie before it, or the replay mends them. 512
	// more entries make each node snapshot within its next interval.
	runFio(t, "filler", lead.URI(), "--rw=randwrite", "--bs=4k", "--iodepth=32", "--offset=16M", "--size=2M")
	n2 := c.Node("n2")
	keeltest.MustPoll(t, snapshotTimeout, fmt.Sprintf("n2 snapshots past index %d", written), func() (bool, string) {
		i := c.MustSnapshotIndex(n2)
		return i >= written, fmt.Sprintf("newest snapshot at index %d", i)
	})
	c.MustConverge()
	verifyOK(t, lead, "n1", "n2", "n3")
	c.MustStopAll()

	f, err := os.OpenFile(n2.Image(), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 16)
	if _, err := f.ReadAt(b, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, bytes.Repeat([]byte{0x6b}, 16)) {
		t.Fatalf("n2's image holds % x at 4096, want the written 0x6b", b)
	}
	for i := range b {
		b[i] ^= 0xff
	}
	if _, err := f.WriteAt(b, 4096); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}

	for _, n := range c.Nodes() {
		if err := n.Start(); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range c.Nodes() {
		if err := n.WaitUp(t.Context(), false); err != nil {
			t.Fatal(err)
		}
	}
	lead = c.MustLeader()
	c.MustConverge()
	v := runVerify(t, lead)
	if v.code != 1 {
		t.Errorf("keel verify exited %d, want 1 (images differ)", v.code)
	}
	d1, d2, d3 := v.digests["n1"], v.digests["n2"], v.digests["n3"]
	if d1 == "" || d1 != d3 || d2 == d1 {
		t.Errorf("keel verify digests n1=%q n2=%q n3=%q, want n1 and n3 equal and n2 different", d1, d2, d3)
	}
}

// TestClusterServerRefuses: a second process on a node's directory, and a
// fresh directory with neither --bootstrap nor --join.
func TestClusterServerRefuses(t *testing.T) {
	c := newCluster(t, "16M", 1)
	n1 := c.Node("n1")
	refused := func(what, want string, args ...string) {
		t.Helper()
		r := run(t, 30*time.Second, keeltest.MustBinary(t), args...)
		var exit *exec.ExitError
		switch {
		case r.err == nil:
			t.Errorf("%s: exited 0, want a refusal\n%s%s", what, r.stdout, r.stderr)
		case !errors.As(r.err, &exit) || !exit.Exited():
			t.Errorf("%s: %v; want a prompt non-zero exit\n%s", what, r.err, r.stderr)
		}
		for _, w := range strings.Split(want, "|") {
			if !strings.Contains(r.stderr, w) {
				t.Errorf("%s: stderr lacks %q:\n%s", what, w, r.stderr)
			}
		}
		t.Logf("%s: %v: %s", what, r.err, lastLines(r.stderr, 3))
	}
	other := func() []string {
		return []string{"--raft", keeltest.MustFreeAddr(t), "--http", keeltest.MustFreeAddr(t), "--nbd", keeltest.MustFreeAddr(t)}
	}

	refused("second process on a node's directory", "in use by another process",
		append([]string{"server", "--dir", n1.Dir, "--id", "n1"}, other()...)...)
	if st, err := n1.Status(t.Context()); err != nil || st.State != "Leader" {
		t.Errorf("the first process after the refusal: %+v, %v; want it still leading", st, err)
	}
	mustQemuIO(t, n1.URI(), "write -P 0x17 0 64k", "read -P 0x17 0 64k")

	refused("fresh directory without --bootstrap or --join", "--bootstrap|--join",
		append([]string{"server", "--dir", filepath.Join(t.TempDir(), "fresh"), "--id", "n9"}, other()...)...)
	for _, bad := range []string{"512K", "5G", "lots"} {
		refused("--log-cache "+bad, "--log-cache",
			append([]string{"server", "--dir", filepath.Join(t.TempDir(), "fresh"), "--id", "n9", "--bootstrap", "--size", "16M", "--log-cache", bad}, other()...)...)
	}
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	ls := strings.Split(strings.TrimSpace(s), "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, "\n")
}

// devPorts returns P such that the ports keel dev uses from --base-port P
// are free: P..P+3, P+100..P+102, P+200..P+202, P+300.
func devPorts(t *testing.T) int {
	t.Helper()
	for range 100 {
		p := keeltest.MustFreePort(t)
		if p+202 >= 32768 {
			continue
		}
		ok := true
		for _, q := range []int{0, 1, 2, 3, 100, 101, 102, 200, 201, 202, 300} {
			ok = ok && keeltest.PortFree(p+q)
		}
		if ok {
			return p
		}
	}
	t.Fatal("no free block of ports for keel dev")
	return 0
}

// childPIDs lists the processes whose parent is pid.
func childPIDs(t *testing.T, pid int) []int {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, e := range entries {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...; comm may hold spaces and parentheses.
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) > 1 && f[1] == strconv.Itoa(pid) {
			out = append(out, child)
		}
	}
	return out
}

func startDev(t *testing.T, args ...string) *keeltest.Proc {
	t.Helper()
	return keeltest.MustStart(t, keeltest.ProcConfig{Name: "keel dev", Args: append([]string{"dev"}, args...)})
}

// mustRunDev starts keel dev on a 64 MiB volume in dir and waits until its
// cluster and proxy run. A port taken meanwhile by someone else makes it
// retry on other ports (three attempts). It returns keel dev, its base
// port and when the attempt that came up started.
func mustRunDev(t *testing.T, dir string) (d *keeltest.Proc, base int, started time.Time) {
	t.Helper()
	for attempt := 1; ; attempt++ {
		base, started = devPorts(t), time.Now()
		d = startDev(t, "--dir", dir, "--size", "64M", "--base-port", strconv.Itoa(base))
		var up, died bool
		deadline := time.Now().Add(clusterTimeout)
		for !up && !died && time.Now().Before(deadline) {
			select {
			case <-d.Done():
				died = true
			case <-time.After(pollEvery):
				up = strings.Contains(d.Output(), "three-node cluster is running, with a proxy")
			}
		}
		if up {
			return d, base, started
		}
		if !died {
			t.Fatalf("keel dev did not print \"three-node cluster is running, with a proxy\" within %v", clusterTimeout)
		}
		if !strings.Contains(d.Output(), "address already in use") || attempt == 3 {
			t.Fatalf("keel dev exited while starting: %v", d.Err())
		}
		t.Logf("keel dev: a port was taken; retrying on others")
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
	}
}

// TestClusterDev runs keel dev, uses the cluster and the proxy it starts,
// and stops it with SIGINT: the three servers and the proxy must exit with
// it.
func TestClusterDev(t *testing.T) {
	nbdinfo := tool(t, "nbdinfo")
	dir := filepath.Join(t.TempDir(), "dev")
	d, base, _ := mustRunDev(t, dir)
	children := childPIDs(t, d.Pid())
	t.Cleanup(func() {
		for _, pid := range children {
			syscall.Kill(pid, syscall.SIGKILL) // gone already unless the test failed
		}
	})
	t.Logf("keel dev (pid %d) runs servers %v from base port %d", d.Pid(), children, base)
	if len(children) != 4 {
		t.Errorf("keel dev has %d child processes, want 3 servers and a proxy", len(children))
	}
	if !strings.Contains(d.Output(), "nbd://"+keeltest.Loopback(base)) {
		t.Errorf("keel dev does not print the proxy's address nbd://%s:\n%s", keeltest.Loopback(base), d.Output())
	}
	cliTLS := filepath.Join(dir, "tls", "cli")
	if abs, _ := filepath.Abs(cliTLS); !strings.Contains(d.Output(), "export KEEL_CLUSTER_TLS="+abs) {
		t.Errorf("keel dev does not say how to point the CLI at its certificates (%s):\n%s", abs, d.Output())
	}
	api := devClient(t, dir)
	// Cluster TLS is on: plain HTTP is refused.
	if _, err := wire.NewClient(5*time.Second, nil).Status(t.Context(), keeltest.Loopback(base+200)); err == nil {
		t.Error("keel dev's n1 answered plain HTTP")
	}
	if got := strings.TrimSpace(mustRun(t, toolTimeout, nbdinfo, "--size", "nbd://"+keeltest.Loopback(base))); got != strconv.Itoa(64*mib) {
		t.Errorf("nbdinfo --size through the proxy = %s, want %d", got, 64*mib)
	}
	// A write and a read through the proxy, and the same bytes on a server.
	mustQemuIO(t, "nbd://"+keeltest.Loopback(base), "write -P 0x5a 1M 64k", "read -P 0x5a 1M 64k")
	mustQemuIO(t, "nbd://"+keeltest.Loopback(base+1), "read -P 0x5a 1M 64k")
	ps, err := proxyStatusWith(t, api, keeltest.Loopback(base+300))
	if err != nil {
		t.Fatalf("proxy status: %v", err)
	} else if !ps.Holding || ps.Leader == "" || len(ps.Servers) != 3 {
		t.Errorf("proxy status: %+v, want holding, a leader and 3 servers", ps)
	}
	// Once every server has applied the write (as the proxy sees it),
	// reads of uncached ranges spread over all three.
	keeltest.MustPoll(t, clusterTimeout, "every server applied the proxy's last write", func() (bool, string) {
		var err error
		if ps, err = proxyStatusWith(t, api, keeltest.Loopback(base+300)); err != nil {
			return false, err.Error()
		}
		for _, sv := range ps.Servers {
			if !sv.Up || sv.Applied < ps.LastAckedIndex {
				return false, fmt.Sprintf("%+v", ps)
			}
		}
		return true, ""
	})
	var reads []string
	for i := 0; i < 12; i++ {
		reads = append(reads, fmt.Sprintf("read %dM 1M", 8+i))
	}
	mustQemuIO(t, "nbd://"+keeltest.Loopback(base), reads...)
	if ps, err = proxyStatusWith(t, api, keeltest.Loopback(base+300)); err != nil {
		t.Fatalf("proxy status: %v", err)
	}
	for i, sv := range ps.Servers {
		if sv.Reads == 0 {
			t.Errorf("server %d answered no reads after 12 uncached reads through the proxy: %+v", i, ps)
		}
	}
	out := mustRun(t, 60*time.Second, keeltest.MustBinary(t), "cluster", "status", "--http", keeltest.Loopback(base+200), "--cluster-tls", cliTLS)
	t.Logf("keel cluster status:\n%s", out)
	voters := 0
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 2 && f[1] == "Voter" {
			voters++
		}
	}
	if voters != 3 {
		t.Errorf("keel cluster status lists %d voters, want 3", voters)
	}

	// A server killed under keel dev is started again; the cluster and the
	// proxy keep serving (they do not all stop, as they once did).
	m := regexp.MustCompile(`n2 (\d+)  n3`).FindStringSubmatch(d.Output())
	if m == nil {
		t.Fatalf("keel dev did not print the servers' pids:\n%s", d.Output())
	}
	n2pid, _ := strconv.Atoi(m[1])
	if err := syscall.Kill(n2pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill -9 n2 (pid %d): %v", n2pid, err)
	}
	mustQemuIO(t, "nbd://"+keeltest.Loopback(base), "write -P 0x6b 2M 64k", "read -P 0x6b 2M 64k")
	keeltest.MustPoll(t, clusterTimeout, "keel dev restarted n2 and it caught up", func() (bool, string) {
		if !strings.Contains(d.Output(), "n2 restarted (pid") {
			return false, "no restart reported yet"
		}
		lead, err := api.Status(t.Context(), keeltest.Loopback(base+200))
		if err != nil {
			return false, err.Error()
		}
		st, err := api.Status(t.Context(), keeltest.Loopback(base+201))
		if err != nil {
			return false, err.Error()
		}
		return st.AppliedIndex >= lead.AppliedIndex && lead.AppliedIndex > 0, fmt.Sprintf("n2 applied %d, n1 %d", st.AppliedIndex, lead.AppliedIndex)
	})
	mustQemuIO(t, "nbd://"+keeltest.Loopback(base+2), "read -P 0x6b 2M 64k")
	if d.Exited() {
		t.Fatalf("keel dev exited after one of its servers was killed:\n%s", d.Output())
	}
	children = childPIDs(t, d.Pid())
	if len(children) != 4 {
		t.Errorf("after the restart keel dev has %d child processes, want 3 servers and a proxy", len(children))
	}

	if err := d.StopWith(os.Interrupt, 30*time.Second); errors.Is(err, keeltest.ErrTimeout) || errors.Is(err, keeltest.ErrExited) {
		t.Fatalf("keel dev: %v", err)
	} else if err != nil {
		t.Errorf("keel dev after SIGINT: %v, want exit status 0", err)
	}
	for _, pid := range children {
		// keel dev waits for its servers, so they are reaped by now.
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("server process %d still exists after keel dev exited (kill 0: %v)", pid, err)
		}
	}
	for _, q := range []int{0, 1, 2, 3, 100, 101, 102, 200, 201, 202, 300} {
		if c, err := net.DialTimeout("tcp", keeltest.Loopback(base+q), time.Second); err == nil {
			c.Close()
			t.Errorf("port %d still accepts connections after keel dev exited", base+q)
		}
	}
}
