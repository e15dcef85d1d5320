// Cluster end-to-end tests: several `keel server` processes of the built
// binary on loopback, each in its own directory, driven by real clients
// (fio, qemu-io, nbdcopy, nbdinfo) and by keel's own `cluster` and `verify`
// subcommands. They crash nodes with SIGKILL, stop them with SIGTERM, take
// the quorum away, grow and shrink the cluster under load, bring back a node
// that missed writes, and tamper with an image behind Keel's back.
//
// The binary, the tool lookups and the command runners come from
// e2e_test.go (KEEL_E2E_BIN and KEEL_E2E_RACE apply here too). Every node
// writes its output to a file that is shown when the test fails; every
// process is killed when its test ends; every wait polls a condition under a
// deadline.
//
// Ports come from a range below Linux's ephemeral ports (which start at
// 32768), beginning at a random point per run, each one checked free just
// before use; a node that cannot bind one of its ports before it joined a
// cluster is started again on new ones.
//
// Tests that need entries out of the log start the servers with small
// --snapshot-threshold and --snapshot-interval, and read hashicorp/raft's
// file snapshot store (DIR/snapshots/*/meta.json) to know when a node has
// taken a snapshot: keel's status does not show the snapshot index.

package main

import (
	"bufio"
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
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	nodeUpTimeout     = 60 * time.Second // exec to answering HTTP, or to leading after --bootstrap
	nodeStopTimeout   = 30 * time.Second // SIGTERM to exit
	clusterTimeout    = 2 * time.Minute  // membership changes, elections, catching up
	fioTimeout        = 4 * time.Minute  // any one fio run
	snapshotTimeout   = 30 * time.Second // with --snapshot-interval 1s
	pollEvery         = 100 * time.Millisecond
	maxLogDump        = 256 * kib       // of each node's output, shown on failure
	writeTimeoutShort = 2 * time.Second // --write-timeout of the quorum-loss test
)

// ---------------------------------------------------------------------------
// Ports.

var (
	portMu   sync.Mutex // guards portNext
	portNext int
)

// freePort returns a loopback TCP port that nothing listens on now. Ports
// are handed out once per run, in order from a random start in [20000,
// 32000).
func freePort(t *testing.T) int {
	t.Helper()
	portMu.Lock()
	defer portMu.Unlock()
	if portNext == 0 {
		portNext = 20000 + rand.IntN(10000)
	}
	for range 2000 {
		p := portNext
		if portNext++; portNext >= 32000 {
			portNext = 20000
		}
		if portFree(p) {
			return p
		}
	}
	t.Fatal("no free TCP port on 127.0.0.1 in [20000, 32000)")
	return 0
}

func portFree(p int) bool {
	l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
	if err != nil {
		return false
	}
	l.Close()
	return true
}

func loopback(p int) string { return fmt.Sprintf("127.0.0.1:%d", p) }

// ---------------------------------------------------------------------------
// One server process.

type node struct {
	t       *testing.T
	id      string
	dir     string // --dir; the image is dir/disk.img
	raft    string // HOST:PORT
	http    string
	nbd     string
	logPath string   // stdout and stderr of every run, appended
	flags   []string // given to every run, e.g. --write-timeout

	mu        sync.Mutex // guards the following
	cmd       *exec.Cmd
	exited    chan struct{} // closed once cmd has been waited for
	exitErr   error         // valid after exited is closed
	runs      int
	runOffset int64 // where the current run's output starts in logPath
}

func newNode(t *testing.T, id string, flags []string) *node {
	t.Helper()
	base := t.TempDir()
	n := &node{
		t: t, id: id, flags: flags,
		dir:     filepath.Join(base, id),
		logPath: filepath.Join(base, id+".log"),
	}
	n.pickPorts()
	t.Cleanup(n.cleanup)
	return n
}

func (n *node) pickPorts() {
	n.raft, n.http, n.nbd = loopback(freePort(n.t)), loopback(freePort(n.t)), loopback(freePort(n.t))
}

func (n *node) image() string { return filepath.Join(n.dir, "disk.img") }

// uri is the node's NBD export as libnbd, qemu and fio spell it.
func (n *node) uri() string { return "nbd://" + n.nbd + "/keel" }

// start runs `keel server` for this node with the given extra flags
// (--bootstrap, --join) and returns at once.
func (n *node) start(extra ...string) {
	n.t.Helper()
	args := append([]string{"server", "--dir", n.dir, "--id", n.id,
		"--raft", n.raft, "--http", n.http, "--nbd", n.nbd}, n.flags...)
	args = append(args, extra...)
	f, err := os.OpenFile(n.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		n.t.Fatal(err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd != nil && !n.exitedLocked() {
		n.t.Fatalf("%s: started while still running", n.id)
	}
	n.runs++
	if fi, err := f.Stat(); err == nil {
		n.runOffset = fi.Size()
	}
	fmt.Fprintf(f, "=== run %d: keel %s\n", n.runs, strings.Join(args, " "))
	cmd := exec.Command(keelBin(n.t), args...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		n.t.Fatalf("%s: start keel server: %v", n.id, err)
	}
	exited := make(chan struct{})
	n.cmd, n.exited = cmd, exited
	go func() {
		err := cmd.Wait()
		f.Close()
		n.mu.Lock()
		n.exitErr = err
		n.mu.Unlock()
		close(exited)
	}()
}

func (n *node) exitedLocked() bool {
	select {
	case <-n.exited:
		return true
	default:
		return false
	}
}

func (n *node) running() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.cmd != nil && !n.exitedLocked()
}

// exitState returns the channel closed at exit and, once closed, the error.
func (n *node) exitState() (<-chan struct{}, func() error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.exited, func() error {
		n.mu.Lock()
		defer n.mu.Unlock()
		return n.exitErr
	}
}

// output is everything the node has printed, over all its runs.
func (n *node) output() string {
	b, err := os.ReadFile(n.logPath)
	if err != nil {
		return fmt.Sprintf("(reading %s: %v)", n.logPath, err)
	}
	return string(b)
}

// runOutput is what the node has printed in its current (or last) run.
func (n *node) runOutput() string {
	n.mu.Lock()
	off := n.runOffset
	n.mu.Unlock()
	out := n.output()
	if int64(len(out)) < off {
		return out
	}
	return out[off:]
}

// kill sends SIGKILL and waits for the process to be gone.
func (n *node) kill() {
	n.t.Helper()
	n.signalAndWait(syscall.SIGKILL, nodeStopTimeout)
}

// stop sends SIGTERM and asserts a clean exit (status 0) in time.
func (n *node) stop() {
	n.t.Helper()
	if err := n.signalAndWait(syscall.SIGTERM, nodeStopTimeout); err != nil {
		n.t.Errorf("%s after SIGTERM: %v (want exit status 0)", n.id, err)
	}
}

func (n *node) signalAndWait(sig syscall.Signal, d time.Duration) error {
	n.t.Helper()
	n.mu.Lock()
	cmd, exited := n.cmd, n.exited
	n.mu.Unlock()
	if cmd == nil {
		n.t.Fatalf("%s: never started", n.id)
	}
	select {
	case <-exited:
		n.t.Fatalf("%s exited before the test stopped it: %v", n.id, n.exitErrNow())
	default:
	}
	cmd.Process.Signal(sig)
	select {
	case <-exited:
	case <-time.After(d):
		cmd.Process.Kill()
		<-exited
		n.t.Fatalf("%s did not exit within %v of %v", n.id, d, sig)
	}
	return n.exitErrNow()
}

func (n *node) exitErrNow() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.exitErr
}

// cleanup kills the process if it still runs, fails the test on a panic or
// a data race in its output, and shows the output if the test failed.
func (n *node) cleanup() {
	n.mu.Lock()
	cmd, exited := n.cmd, n.exited
	n.mu.Unlock()
	if cmd == nil {
		return
	}
	select {
	case <-exited:
	default:
		cmd.Process.Kill()
		<-exited
	}
	out := n.output()
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "panic:") || strings.HasPrefix(l, "fatal error:") || strings.Contains(l, "WARNING: DATA RACE") {
			n.t.Errorf("%s output: %s", n.id, l)
		}
	}
	if n.t.Failed() {
		if len(out) > maxLogDump {
			out = fmt.Sprintf("(first %d bytes left out)\n%s", len(out)-maxLogDump, out[len(out)-maxLogDump:])
		}
		n.t.Logf("%s output (%s):\n%s", n.id, n.logPath, out)
	}
}

// ---------------------------------------------------------------------------
// The HTTP API, as the tests read it.

type nodeStatus struct {
	Self struct {
		ID   string `json:"id"`
		Raft string `json:"raft"`
		HTTP string `json:"http"`
		NBD  string `json:"nbd"`
	} `json:"self"`
	State        string      `json:"state"`
	Leader       string      `json:"leader"`
	LastLogIndex uint64      `json:"last_log_index"`
	CommitIndex  uint64      `json:"commit_index"`
	AppliedIndex uint64      `json:"applied_index"`
	Sync         *syncStatus `json:"sync"`
}

type syncStatus struct {
	Active          bool    `json:"active"`
	BytesTotal      uint64  `json:"bytes_total"`
	BytesCompared   uint64  `json:"bytes_compared"`
	BytesMoved      uint64  `json:"bytes_moved"`
	RateBytesPerSec float64 `json:"rate_bytes_per_sec"`
	Peers           int     `json:"peers"`
	Error           string  `json:"error"`
}

type clusterView struct {
	Leader  string `json:"leader"`
	Members []struct {
		ID       string      `json:"id"`
		Raft     string      `json:"raft"`
		HTTP     string      `json:"http"`
		NBD      string      `json:"nbd"`
		Suffrage string      `json:"suffrage"`
		Status   *nodeStatus `json:"status"`
		Error    string      `json:"error"`
	} `json:"members"`
}

// voters lists the ids of the voters, sorted.
func (v clusterView) voters() []string {
	var ids []string
	for _, m := range v.Members {
		if m.Suffrage == "Voter" {
			ids = append(ids, m.ID)
		}
	}
	sort.Strings(ids)
	return ids
}

func (v clusterView) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "leader %q:", v.Leader)
	for _, m := range v.Members {
		fmt.Fprintf(&b, " %s/%s", m.ID, m.Suffrage)
		if m.Status != nil {
			fmt.Fprintf(&b, "/%s/applied=%d", m.Status.State, m.Status.AppliedIndex)
		} else {
			fmt.Fprintf(&b, "/(%s)", m.Error)
		}
	}
	return b.String()
}

var httpClient = &http.Client{Timeout: 5 * time.Second}

func getJSON(addr, path string, out any) error {
	resp, err := httpClient.Get("http://" + addr + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16*mib))
	if err != nil {
		return fmt.Errorf("GET %s%s: %w", addr, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s%s: %s: %s", addr, path, resp.Status, bytes.TrimSpace(body))
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("GET %s%s: %w\n%s", addr, path, err, body)
	}
	return nil
}

func (n *node) status() (nodeStatus, error) {
	var s nodeStatus
	return s, getJSON(n.http, "/v1/status", &s)
}

func (n *node) cluster() (clusterView, error) {
	var v clusterView
	return v, getJSON(n.http, "/v1/cluster", &v)
}

// metric reads one unlabelled gauge or counter from the node's /metrics.
func (n *node) metric(t *testing.T, name string) float64 {
	t.Helper()
	resp, err := httpClient.Get("http://" + n.http + "/metrics")
	if err != nil {
		t.Fatalf("%s /metrics: %v", n.id, err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, mib)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == name {
			v, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				t.Fatalf("%s /metrics: %s: %v", n.id, sc.Text(), err)
			}
			return v
		}
	}
	t.Fatalf("%s /metrics has no %s (%v)", n.id, name, sc.Err())
	return 0
}

// snapshotIndex is the highest log index among the node's raft snapshots,
// 0 if it has none.
func (n *node) snapshotIndex(t *testing.T) uint64 {
	t.Helper()
	metas, err := filepath.Glob(filepath.Join(n.dir, "snapshots", "*", "meta.json"))
	if err != nil {
		t.Fatal(err)
	}
	var best uint64
	for _, p := range metas {
		var m struct{ Index uint64 }
		b, err := os.ReadFile(p)
		if err != nil || json.Unmarshal(b, &m) != nil {
			continue // a snapshot being written
		}
		best = max(best, m.Index)
	}
	return best
}

// ---------------------------------------------------------------------------
// Waiting.

// poll calls cond until it reports done, failing the test after timeout
// with the last state cond described.
func poll(t *testing.T, timeout time.Duration, what string, cond func() (done bool, state string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		done, state := cond()
		if done {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v; last: %s", what, timeout, state)
		}
		time.Sleep(pollEvery)
	}
}

// waitUp waits until the node answers /v1/status, and for a bootstrapping
// node until it leads. It reports whether the node could not bind one of its
// ports, after killing it.
func (n *node) waitUp(leading bool) (bindFailed bool) {
	n.t.Helper()
	exited, exitErr := n.exitState()
	deadline := time.Now().Add(nodeUpTimeout)
	for {
		select {
		case <-exited:
			if strings.Contains(n.runOutput(), "address already in use") {
				return true
			}
			n.t.Fatalf("%s exited while starting: %v\n%s", n.id, exitErr(), n.runOutput())
		default:
		}
		st, err := n.status()
		if err == nil && (!leading || st.State == "Leader") {
			return false
		}
		if strings.Contains(n.runOutput(), "address already in use") {
			n.mu.Lock()
			n.cmd.Process.Kill() // it may be exiting by itself meanwhile
			n.mu.Unlock()
			<-exited
			return true
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("%s not up within %v: status %+v, %v", n.id, nodeUpTimeout, st, err)
		}
		time.Sleep(pollEvery)
	}
}

// startFresh starts a node on an empty directory with --bootstrap or
// --join, retrying on new ports if one of its ports was taken meanwhile.
func (n *node) startFresh(extra ...string) {
	n.t.Helper()
	leading := slices.Contains(extra, "--bootstrap")
	for attempt := 1; ; attempt++ {
		n.start(extra...)
		if !n.waitUp(leading) {
			return
		}
		// A joining node binds its Raft port only after it joined: the
		// cluster then knows an address nobody serves.
		if !leading && strings.Contains(n.runOutput(), "raft transport") {
			n.t.Fatalf("%s could not bind its Raft port after joining:\n%s", n.id, n.output())
		}
		if attempt == 3 {
			n.t.Fatalf("%s: ports taken three times:\n%s", n.id, n.output())
		}
		n.t.Logf("%s: a port was taken; retrying on new ones", n.id)
		if err := os.RemoveAll(n.dir); err != nil {
			n.t.Fatal(err)
		}
		n.pickPorts()
	}
}

// restart starts a node again on its existing directory.
func (n *node) restart() {
	n.t.Helper()
	n.start()
	if n.waitUp(false) {
		n.t.Fatalf("%s: a port of the restarted node was taken:\n%s", n.id, n.output())
	}
}

// ---------------------------------------------------------------------------
// A cluster.

type cluster struct {
	t     *testing.T
	flags []string // given to every server
	nodes []*node
}

// newCluster bootstraps n1 and joins n2..nN, and waits until all are voters.
// Every server gets flags after --write-timeout 60s (a later flag wins):
// these tests are about data, not about how soon a write gives up, and on
// a loaded two-core machine, or under -race, leadership can move while
// fio runs.
func newCluster(t *testing.T, size string, n int, flags ...string) *cluster {
	t.Helper()
	c := &cluster{t: t, flags: append([]string{"--write-timeout", "60s"}, flags...)}
	first := c.add("n1")
	first.startFresh("--bootstrap", "--size", size)
	for i := 2; i <= n; i++ {
		c.join(fmt.Sprintf("n%d", i), first)
	}
	var ids []string
	for _, nd := range c.nodes {
		ids = append(ids, nd.id)
	}
	c.waitVoters(first, ids, nil)
	return c
}

func (c *cluster) add(id string) *node {
	n := newNode(c.t, id, c.flags)
	c.nodes = append(c.nodes, n)
	return n
}

// join starts a new node that joins through via's HTTP address.
func (c *cluster) join(id string, via *node) *node {
	c.t.Helper()
	n := c.add(id)
	n.startFresh("--join", via.http)
	return n
}

func (c *cluster) node(id string) *node {
	for _, n := range c.nodes {
		if n.id == id {
			return n
		}
	}
	c.t.Fatalf("no node %s", id)
	return nil
}

func (c *cluster) running() []*node {
	var out []*node
	for _, n := range c.nodes {
		if n.running() {
			out = append(out, n)
		}
	}
	return out
}

// waitVoters waits until via's view of the cluster has exactly the given
// voters, a leader, and a status from each; observe, if not nil, sees every
// view on the way.
func (c *cluster) waitVoters(via *node, ids []string, observe func(clusterView)) clusterView {
	c.t.Helper()
	want := slices.Clone(ids)
	sort.Strings(want)
	var v clusterView
	poll(c.t, clusterTimeout, fmt.Sprintf("voters %v via %s", want, via.id), func() (bool, string) {
		var err error
		if v, err = via.cluster(); err != nil {
			return false, err.Error()
		}
		if observe != nil {
			observe(v)
		}
		if v.Leader == "" || !slices.Equal(v.voters(), want) {
			return false, v.String()
		}
		for _, m := range v.Members {
			if m.Status == nil {
				return false, v.String()
			}
		}
		return true, ""
	})
	return v
}

// leader waits until one of among leads and the others follow it.
func (c *cluster) leader(among ...*node) *node {
	c.t.Helper()
	if len(among) == 0 {
		among = c.running()
	}
	var lead *node
	poll(c.t, clusterTimeout, "a leader that the others follow", func() (bool, string) {
		lead = nil
		var states []string
		sts := map[string]nodeStatus{}
		for _, n := range among {
			st, err := n.status()
			if err != nil {
				return false, fmt.Sprintf("%s: %v", n.id, err)
			}
			sts[n.id] = st
			states = append(states, fmt.Sprintf("%s:%s(leader %q)", n.id, st.State, st.Leader))
			if st.State == "Leader" {
				lead = n
			}
		}
		if lead == nil {
			return false, strings.Join(states, " ")
		}
		for _, st := range sts {
			if st.Leader != lead.id {
				return false, strings.Join(states, " ")
			}
		}
		return true, ""
	})
	return lead
}

// followers returns the running nodes other than lead.
func (c *cluster) followers(lead *node) []*node {
	var out []*node
	for _, n := range c.running() {
		if n != lead {
			out = append(out, n)
		}
	}
	return out
}

// waitConverged waits until the nodes given (every running node if none)
// agree on a leader and a commit index that covers the leader's whole log,
// and have applied the same index, and returns that index.
//
// The applied index is the image's: Raft's own entries (the no-op a new
// leader appends, configuration changes) do not reach it. So it equals the
// commit index, or stays below it when such entries end the log; then the
// nodes must hold still for a second.
func (c *cluster) waitConverged(nodes ...*node) uint64 {
	c.t.Helper()
	if len(nodes) == 0 {
		nodes = c.running()
	}
	var index uint64
	var last string
	var since time.Time
	poll(c.t, clusterTimeout, "every node applies what the leader committed", func() (bool, string) {
		var states []string
		var lead *nodeStatus
		sts := make([]nodeStatus, len(nodes))
		for i, n := range nodes {
			st, err := n.status()
			if err != nil {
				return false, fmt.Sprintf("%s: %v", n.id, err)
			}
			sts[i] = st
			states = append(states, fmt.Sprintf("%s:%s(leader %q) last=%d commit=%d applied=%d",
				n.id, st.State, st.Leader, st.LastLogIndex, st.CommitIndex, st.AppliedIndex))
			if st.State == "Leader" {
				lead = &sts[i]
			}
		}
		state := strings.Join(states, " ")
		if lead == nil || lead.CommitIndex != lead.LastLogIndex {
			return false, state
		}
		for _, st := range sts {
			if st.Leader != lead.Self.ID || st.CommitIndex != lead.CommitIndex || st.AppliedIndex != sts[0].AppliedIndex {
				return false, state
			}
		}
		index = lead.AppliedIndex
		if index == lead.CommitIndex {
			return true, ""
		}
		if state != last {
			last, since = state, time.Now()
		}
		return time.Since(since) >= time.Second, state
	})
	return index
}

// stopAll stops every running node with SIGTERM at once and asserts clean
// exits.
func (c *cluster) stopAll() {
	c.t.Helper()
	var wg sync.WaitGroup
	errs := make([]error, len(c.nodes))
	for i, n := range c.running() {
		n.mu.Lock()
		cmd, exited := n.cmd, n.exited
		n.mu.Unlock()
		cmd.Process.Signal(syscall.SIGTERM)
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case <-exited:
				if err := n.exitErrNow(); err != nil {
					errs[i] = fmt.Errorf("%s after SIGTERM: %w (want exit status 0)", n.id, err)
				}
			case <-time.After(nodeStopTimeout):
				cmd.Process.Kill()
				<-exited
				errs[i] = fmt.Errorf("%s did not exit within %v of SIGTERM", n.id, nodeStopTimeout)
			}
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			c.t.Error(err)
		}
	}
}

// ---------------------------------------------------------------------------
// keel verify and keel cluster.

type verifyResult struct {
	result
	code    int               // exit status; -1 if it did not exit normally
	digests map[string]string // voter -> digest, from the table
}

// runVerify runs keel verify against via and parses its table.
func runVerify(t *testing.T, via *node) verifyResult {
	t.Helper()
	r := run(t, 90*time.Second, keelBin(t), "verify", "--http", via.http, "--timeout", "60s")
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
func verifyOK(t *testing.T, via *node, voters ...string) {
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
	lead := c.leader()
	follower := c.followers(lead)[0]
	t.Logf("leader %s; fio also writes through follower %s", lead.id, follower.id)

	verifyArgs := []string{"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0"}
	random := startFio(t, "leader-randwrite", lead.uri(), append([]string{
		"--rw=randwrite", "--bs=4k", "--iodepth=32", "--offset=0", "--size=64M"}, verifyArgs...)...)
	seq := startFio(t, "follower-seqwrite", follower.uri(), append([]string{
		"--rw=write", "--bs=1M", "--iodepth=8", "--offset=128M", "--size=64M"}, verifyArgs...)...)
	for _, f := range []*fioRun{random, seq} {
		if j := f.wait(t); j.Write.IOBytes != 64*mib || j.Read.IOBytes != 64*mib {
			t.Errorf("fio %s wrote %d and verified %d bytes, want %d each", f.name, j.Write.IOBytes, j.Read.IOBytes, 64*mib)
		}
	}

	verifyOK(t, follower, "n1", "n2", "n3")
	c.stopAll()
	compareImages(t, c.node("n1").image(), c.node("n2").image(), c.node("n3").image())
	img := readFile(t, c.node("n1").image())
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
	old := c.leader()

	dir := t.TempDir()
	pattern := randomBytes("leader-kill", 24*mib)
	clear(pattern[8*mib : 9*mib]) // a run of zeros for nbdcopy's sparse detection
	src := filepath.Join(dir, "pattern.bin")
	if err := os.WriteFile(src, pattern, 0o644); err != nil {
		t.Fatal(err)
	}
	mustRun(t, toolTimeout, nbdcopy, "--flush", src, old.uri())

	old.kill()
	survivors := c.followers(old)
	start := time.Now()
	lead := c.leader(survivors...)
	t.Logf("killed leader %s; %s leads after %v", old.id, lead.id, time.Since(start).Round(time.Millisecond))

	// Acknowledged means committed on a quorum, so the new leader must
	// show all of it straight away.
	want := make([]byte, size)
	copy(want, pattern)
	out := filepath.Join(dir, "new-leader.bin")
	mustRun(t, toolTimeout, nbdcopy, lead.uri(), out)
	compareFile(t, "the pattern read back through the new leader "+lead.id, out, want)

	mustQemuIO(t, lead.uri(), "write -P 0x5e 40M 4M")
	copy(want[40*mib:44*mib], bytes.Repeat([]byte{0x5e}, 4*mib))

	old.restart()
	c.waitConverged()
	out = filepath.Join(dir, "restarted.bin")
	mustRun(t, toolTimeout, nbdcopy, old.uri(), out)
	compareFile(t, "the volume read back through the restarted "+old.id, out, want)
	verifyOK(t, lead, "n1", "n2", "n3")
}

// TestClusterQuorumLoss kills two of three nodes: the survivor keeps
// serving reads and fails writes in bounded time. Once the others are back,
// the failed write is either wholly there or wholly absent, the same on
// every node, and the cluster takes writes again.
func TestClusterQuorumLoss(t *testing.T) {
	c := newCluster(t, "64M", 3, "--write-timeout", writeTimeoutShort.String())
	survivor := c.leader()
	mustQemuIO(t, survivor.uri(), "write -P 0xa1 0 4M")
	c.waitConverged()

	killed := c.followers(survivor)
	for _, n := range killed {
		n.kill()
	}
	t.Logf("killed %s and %s; %s survives", killed[0].id, killed[1].id, survivor.id)

	mustQemuIO(t, survivor.uri(), "read -P 0xa1 0 4M")
	start := time.Now()
	r := qemuIO(t, survivor.uri(), "write -P 0xb2 1M 1M")
	took := time.Since(start)
	t.Logf("write without a quorum: %v after %v\n%s%s", r.err, took.Round(time.Millisecond), r.stdout, r.stderr)
	if !qemuIOFailed(r) {
		t.Errorf("a write on %s without a quorum succeeded", survivor.id)
	}
	if took > 15*time.Second {
		t.Errorf("the write without a quorum took %v to fail, want under 15s (--write-timeout %v)", took, writeTimeoutShort)
	}
	// Nothing is applied before it is committed.
	mustQemuIO(t, survivor.uri(), "read -P 0xa1 0 4M")

	for _, n := range killed {
		n.restart()
	}
	lead := c.leader()
	c.waitConverged()
	var outcomes []string
	seen := map[string]bool{}
	for _, n := range c.nodes {
		isOld := !qemuIOFailed(qemuIO(t, n.uri(), "read -P 0xa1 1M 1M"))
		isNew := !qemuIOFailed(qemuIO(t, n.uri(), "read -P 0xb2 1M 1M"))
		switch {
		case isOld:
			outcomes, seen["old"] = append(outcomes, n.id+": old"), true
		case isNew:
			outcomes, seen["new"] = append(outcomes, n.id+": new"), true
		default:
			t.Errorf("%s: the failed write's range holds neither the old bytes nor the new ones", n.id)
		}
		mustQemuIO(t, n.uri(), "read -P 0xa1 0 1M", "read -P 0xa1 2M 2M")
	}
	t.Logf("the failed write's range after recovery: %s", strings.Join(outcomes, ", "))
	if len(seen) > 1 {
		t.Errorf("the nodes disagree about the failed write: %s", strings.Join(outcomes, ", "))
	}
	verifyOK(t, lead, "n1", "n2", "n3")

	writer := killed[0]
	mustQemuIO(t, writer.uri(), "write -P 0xc3 8M 1M")
	c.waitConverged()
	for _, n := range c.nodes {
		mustQemuIO(t, n.uri(), "read -P 0xc3 8M 1M")
	}
}

// TestClusterGrowShrinkUnderLoad goes from three voters to four and back to
// three while fio writes and verifies through the leader.
func TestClusterGrowShrinkUnderLoad(t *testing.T) {
	const trailing = 4096
	c := newCluster(t, "512M", 3, "--snapshot-threshold", "1024", "--snapshot-interval", "1s",
		"--trailing-logs", strconv.Itoa(trailing))
	lead := c.leader()
	runFio(t, "fill", lead.uri(), "--rw=write", "--bs=1M", "--iodepth=8", "--size=256M")
	fillIndex := c.waitConverged()

	load := startFio(t, "load", lead.uri(), "--rw=randwrite", "--bs=4k", "--iodepth=16",
		"--offset=0", "--size=64M", "--time_based", "--runtime=30",
		"--verify=crc32c", "--verify_fatal=1", "--verify_backlog=1024", "--verify_state_save=0")

	// A new node replays the log while the leader still has all of it, and
	// resyncs the image from its peers once it does not. Wait until the
	// leader has compacted past the fill (raft-wal then drops the 64 MiB
	// segments it filled), so that n4 must resync under load.
	poll(t, snapshotTimeout, fmt.Sprintf("leader %s snapshots past index %d", lead.id, fillIndex+trailing), func() (bool, string) {
		i := lead.snapshotIndex(t)
		return i > fillIndex+trailing, fmt.Sprintf("newest snapshot at index %d", i)
	})
	t.Logf("filled to index %d; leader's newest snapshot is at index %d", fillIndex, lead.snapshotIndex(t))

	via := c.followers(lead)[0]
	n4 := c.join("n4", via)
	t.Logf("n4 joined through %s", via.id)
	var sawSync, sawNonvoter bool
	var moved, total uint64
	c.waitVoters(lead, []string{"n1", "n2", "n3", "n4"}, func(v clusterView) {
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
	out := n4.runOutput()
	resynced := strings.Contains(out, "resyncing the image from peers") && strings.Contains(out, "resync done")
	if resynced {
		t.Logf("n4 caught up by an image resync (status showed it active: %v; %d of %d bytes moved)", sawSync, moved, total)
	} else {
		t.Errorf("n4 caught up without an image resync although the leader had compacted its log past the fill")
	}

	lead = c.leader()
	var victim *node
	for _, n := range c.followers(lead) {
		if n != n4 {
			victim = n
			break
		}
	}
	mustRun(t, 60*time.Second, keelBin(t), "cluster", "remove", victim.id, "--http", lead.http)
	var remaining []string
	for _, n := range c.nodes {
		if n != victim {
			remaining = append(remaining, n.id)
		}
	}
	c.waitVoters(lead, remaining, nil)
	if v, err := lead.cluster(); err == nil {
		for _, m := range v.Members {
			if m.ID == victim.id {
				t.Errorf("%s is still a member after keel cluster remove: %s", victim.id, v)
			}
		}
	}
	victim.stop()
	select {
	case <-load.done:
		t.Logf("fio's load ended before %s was removed", victim.id)
	default:
		t.Logf("removed %s while fio's load ran", victim.id)
	}

	j := load.wait(t)
	if j.Write.IOBytes == 0 || j.Read.IOBytes == 0 {
		t.Errorf("fio load wrote %d and verified %d bytes, want both above 0", j.Write.IOBytes, j.Read.IOBytes)
	}
	lead = c.leader()
	c.waitConverged()
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
	lead := c.leader()
	runFio(t, "first", lead.uri(), "--rw=write", "--bs=1M", "--iodepth=8", "--size=64M")
	c.waitConverged()

	away := c.followers(lead)[len(c.followers(lead))-1]
	st, err := away.status()
	if err != nil {
		t.Fatal(err)
	}
	away.stop()
	t.Logf("stopped %s at applied index %d", away.id, st.AppliedIndex)

	over := startFio(t, "overwrite", lead.uri(), "--rw=randwrite", "--bs=4k", "--iodepth=32", "--offset=48M", "--size=16M")
	fresh := startFio(t, "new", lead.uri(), "--rw=write", "--bs=4k", "--iodepth=32", "--offset=256M", "--size=16M")
	over.wait(t)
	fresh.wait(t)

	// Entries up to the snapshot less TrailingLogs leave the log; once
	// those reach past what the stopped node has, it needs a resync.
	need := st.AppliedIndex + trailing + 1
	poll(t, snapshotTimeout, fmt.Sprintf("leader %s snapshots past index %d", lead.id, need), func() (bool, string) {
		i := lead.snapshotIndex(t)
		return i > need, fmt.Sprintf("newest snapshot at index %d", i)
	})

	away.restart()
	c.waitConverged()
	moved := away.metric(t, "keel_resync_bytes_moved_total")
	alloc := allocatedBytes(t, away.image())
	t.Logf("%s: resync moved %.0f bytes; image has %d bytes allocated of %d", away.id, moved, alloc, 1<<30)
	if !strings.Contains(away.runOutput(), "resync done") {
		t.Errorf("%s caught up without an image resync although the leader compacted past it", away.id)
	} else if moved == 0 {
		t.Errorf("%s resynced but keel_resync_bytes_moved_total is 0; 32 MiB changed while it was away", away.id)
	}
	if moved >= 256*mib {
		t.Errorf("%s moved %.0f bytes to catch up, want well under 256 MiB (32 MiB changed)", away.id, moved)
	}
	if alloc >= 256*mib {
		t.Errorf("%s's image has %d bytes allocated, want it sparse (about 80 MiB of data)", away.id, alloc)
	}
	verifyOK(t, lead, "n1", "n2", "n3")
}

// TestClusterVerifyDetectsTampering flips bytes in one stopped node's image
// and asserts that keel verify notices and names that node.
func TestClusterVerifyDetectsTampering(t *testing.T) {
	c := newCluster(t, "64M", 3, "--snapshot-threshold", "256", "--snapshot-interval", "1s")
	lead := c.leader()
	mustQemuIO(t, lead.uri(), "write -P 0x6b 0 1M")
	written := c.waitConverged()

	// On start a node replays its log after its newest snapshot; the
	// tampered bytes must lie before it, or the replay mends them. 512
	// more entries make each node snapshot within its next interval.
	runFio(t, "filler", lead.uri(), "--rw=randwrite", "--bs=4k", "--iodepth=32", "--offset=16M", "--size=2M")
	n2 := c.node("n2")
	poll(t, snapshotTimeout, fmt.Sprintf("n2 snapshots past index %d", written), func() (bool, string) {
		i := n2.snapshotIndex(t)
		return i >= written, fmt.Sprintf("newest snapshot at index %d", i)
	})
	c.waitConverged()
	verifyOK(t, lead, "n1", "n2", "n3")
	c.stopAll()

	f, err := os.OpenFile(n2.image(), os.O_RDWR, 0)
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

	for _, n := range c.nodes {
		n.start()
	}
	for _, n := range c.nodes {
		if n.waitUp(false) {
			t.Fatalf("%s: a port of the restarted node was taken:\n%s", n.id, n.output())
		}
	}
	lead = c.leader()
	c.waitConverged()
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
	n1 := c.node("n1")
	refused := func(what, want string, args ...string) {
		t.Helper()
		r := run(t, 30*time.Second, keelBin(t), args...)
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
		return []string{"--raft", loopback(freePort(t)), "--http", loopback(freePort(t)), "--nbd", loopback(freePort(t))}
	}

	refused("second process on a node's directory", "in use by another process",
		append([]string{"server", "--dir", n1.dir, "--id", "n1"}, other()...)...)
	if st, err := n1.status(); err != nil || st.State != "Leader" {
		t.Errorf("the first process after the refusal: %+v, %v; want it still leading", st, err)
	}
	mustQemuIO(t, n1.uri(), "write -P 0x17 0 64k", "read -P 0x17 0 64k")

	refused("fresh directory without --bootstrap or --join", "--bootstrap|--join",
		append([]string{"server", "--dir", filepath.Join(t.TempDir(), "fresh"), "--id", "n9"}, other()...)...)
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
		p := freePort(t)
		if p+202 >= 32768 {
			continue
		}
		ok := true
		for _, q := range []int{0, 1, 2, 3, 100, 101, 102, 200, 201, 202, 300} {
			ok = ok && portFree(p+q)
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

// devProcess is a running keel dev.
type devProcess struct {
	cmd            *exec.Cmd
	stdout, stderr *lineLog
	exited         chan struct{} // closed once cmd has been waited for
	exitErr        error         // valid after exited is closed
}

func startDev(t *testing.T, args ...string) *devProcess {
	t.Helper()
	d := &devProcess{stdout: &lineLog{}, stderr: &lineLog{}, exited: make(chan struct{})}
	d.cmd = exec.Command(keelBin(t), append([]string{"dev"}, args...)...)
	d.cmd.Stdout, d.cmd.Stderr = d.stdout, d.stderr
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		d.exitErr = d.cmd.Wait()
		close(d.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-d.exited:
		default:
			d.cmd.Process.Kill()
			<-d.exited
		}
		if t.Failed() {
			t.Logf("keel dev stdout:\n%s\nstderr:\n%s", d.stdout, d.stderr)
		}
	})
	return d
}

// TestClusterDev runs keel dev, uses the cluster and the proxy it starts,
// and stops it with SIGINT: the three servers and the proxy must exit with
// it.
func TestClusterDev(t *testing.T) {
	nbdinfo := tool(t, "nbdinfo")
	dir := filepath.Join(t.TempDir(), "dev")
	var base int
	var d *devProcess
	for attempt := 1; ; attempt++ {
		base = devPorts(t)
		d = startDev(t, "--dir", dir, "--size", "64M", "--base-port", strconv.Itoa(base))
		var up, died bool
		deadline := time.Now().Add(clusterTimeout)
		for !up && !died && time.Now().Before(deadline) {
			select {
			case <-d.exited:
				died = true
			case <-time.After(pollEvery):
				up = strings.Contains(d.stdout.String(), "three-node cluster is running, with a proxy")
			}
		}
		if up {
			break
		}
		if !died {
			t.Fatalf("keel dev did not print \"three-node cluster is running, with a proxy\" within %v", clusterTimeout)
		}
		if !strings.Contains(d.stderr.String(), "address already in use") || attempt == 3 {
			t.Fatalf("keel dev exited while starting: %v", d.exitErr)
		}
		t.Logf("keel dev: a port was taken; retrying on others")
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
	}
	children := childPIDs(t, d.cmd.Process.Pid)
	t.Cleanup(func() {
		for _, pid := range children {
			syscall.Kill(pid, syscall.SIGKILL) // gone already unless the test failed
		}
	})
	t.Logf("keel dev (pid %d) runs servers %v from base port %d", d.cmd.Process.Pid, children, base)
	if len(children) != 4 {
		t.Errorf("keel dev has %d child processes, want 3 servers and a proxy", len(children))
	}
	if !strings.Contains(d.stdout.String(), "nbd://"+loopback(base)) {
		t.Errorf("keel dev does not print the proxy's address nbd://%s:\n%s", loopback(base), d.stdout)
	}
	if got := strings.TrimSpace(mustRun(t, toolTimeout, nbdinfo, "--size", "nbd://"+loopback(base))); got != strconv.Itoa(64*mib) {
		t.Errorf("nbdinfo --size through the proxy = %s, want %d", got, 64*mib)
	}
	// A write and a read through the proxy, and the same bytes on a server.
	mustQemuIO(t, "nbd://"+loopback(base), "write -P 0x5a 1M 64k", "read -P 0x5a 1M 64k")
	mustQemuIO(t, "nbd://"+loopback(base+1), "read -P 0x5a 1M 64k")
	type proxyStatus struct {
		Holding bool   `json:"holding"`
		Leader  string `json:"leader"`
		Acked   uint64 `json:"last_acked_index"`
		Servers []struct {
			Up      bool   `json:"up"`
			Applied uint64 `json:"applied_index"`
			Reads   uint64 `json:"reads"`
		} `json:"servers"`
	}
	var ps proxyStatus
	if err := getJSON(loopback(base+300), "/v1/status", &ps); err != nil {
		t.Fatalf("proxy status: %v", err)
	} else if !ps.Holding || ps.Leader == "" || len(ps.Servers) != 3 {
		t.Errorf("proxy status: %+v, want holding, a leader and 3 servers", ps)
	}
	// Once every server has applied the write (as the proxy sees it),
	// reads of uncached ranges spread over all three.
	poll(t, clusterTimeout, "every server applied the proxy's last write", func() (bool, string) {
		ps = proxyStatus{}
		if err := getJSON(loopback(base+300), "/v1/status", &ps); err != nil {
			return false, err.Error()
		}
		for _, sv := range ps.Servers {
			if !sv.Up || sv.Applied < ps.Acked {
				return false, fmt.Sprintf("%+v", ps)
			}
		}
		return true, ""
	})
	var reads []string
	for i := 0; i < 12; i++ {
		reads = append(reads, fmt.Sprintf("read %dM 1M", 8+i))
	}
	mustQemuIO(t, "nbd://"+loopback(base), reads...)
	if err := getJSON(loopback(base+300), "/v1/status", &ps); err != nil {
		t.Fatalf("proxy status: %v", err)
	}
	for i, sv := range ps.Servers {
		if sv.Reads == 0 {
			t.Errorf("server %d answered no reads after 12 uncached reads through the proxy: %+v", i, ps)
		}
	}
	out := mustRun(t, 60*time.Second, keelBin(t), "cluster", "status", "--http", loopback(base+200))
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

	d.cmd.Process.Signal(os.Interrupt)
	select {
	case <-d.exited:
		if d.exitErr != nil {
			t.Errorf("keel dev after SIGINT: %v, want exit status 0", d.exitErr)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("keel dev did not exit within 30s of SIGINT")
	}
	for _, pid := range children {
		// keel dev waits for its servers, so they are reaped by now.
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("server process %d still exists after keel dev exited (kill 0: %v)", pid, err)
		}
	}
	for _, q := range []int{0, 1, 2, 3, 100, 101, 102, 200, 201, 202, 300} {
		if c, err := net.DialTimeout("tcp", loopback(base+q), time.Second); err == nil {
			c.Close()
			t.Errorf("port %d still accepts connections after keel dev exited", base+q)
		}
	}
}
