// Proxy end-to-end tests: `keel proxy` processes of the built binary in
// front of a cluster of `keel server` processes (the harness of
// cluster_e2e_test.go), driven by fio, qemu-io and qemu-img through the
// proxy's NBD endpoint. They crash servers (the leader too) under fio's
// verifying load, overwrite, zero and discard ranges the proxy has cached,
// take the volume over from one proxy with another, take the quorum away,
// and crash the proxy under a connected qemu that reconnects.
//
// Every proxy's output is kept and shown when its test fails; every proxy
// is killed when its test ends; every wait polls a condition under a
// deadline.

package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	proxyUpTimeout   = 60 * time.Second // exec to "proxy serving"
	proxyStopTimeout = 30 * time.Second // SIGTERM to exit
	proxyLogTimeout  = 30 * time.Second // for a log line the proxy owes us
)

// fastFailover are server flags that let a new leader take over within a
// second or so of the old one's crash.
var fastFailover = []string{"--heartbeat-timeout", "300ms", "--election-timeout", "300ms", "--leader-lease-timeout", "150ms"}

// ---------------------------------------------------------------------------
// One proxy process.

// keelProxy is a `keel proxy` in front of a cluster, and its restarts: every
// run listens on the same address with the same flags.
type keelProxy struct {
	t      *testing.T
	name   string   // for messages
	listen string   // --listen: 127.0.0.1:PORT or unix:PATH
	http   string   // --http: status and metrics
	args   []string // every run's arguments
	log    *lineLog // the output of every run, each after a header line

	mu       sync.Mutex // guards the following
	cmd      *exec.Cmd
	exited   chan struct{} // closed once cmd has been waited for
	exitErr  error         // valid after exited is closed
	runs     int
	runStart int // where the current run's output starts in log
}

// startProxy starts a proxy named name on a free loopback port in front of
// every node of c (listed in --servers) and waits until it serves. flags
// go after the harness's own, so a later --writer or --listen wins.
func startProxy(t *testing.T, c *cluster, name string, flags ...string) *keelProxy {
	t.Helper()
	return startProxyOn(t, c, name, "", flags...)
}

// startProxyOn is startProxy on a given --listen address ("": a free
// loopback port, retried on another if it is taken meanwhile).
func startProxyOn(t *testing.T, c *cluster, name, listen string, flags ...string) *keelProxy {
	t.Helper()
	var servers []string
	for _, n := range c.nodes {
		servers = append(servers, n.http)
	}
	p := &keelProxy{t: t, name: name, log: &lineLog{}}
	t.Cleanup(p.cleanup)
	for attempt := 1; ; attempt++ {
		p.listen = listen
		if listen == "" {
			p.listen = loopback(freePort(t))
		}
		p.http = loopback(freePort(t))
		p.args = append([]string{"proxy", "--servers", strings.Join(servers, ","),
			"--listen", p.listen, "--http", p.http, "--writer", name}, flags...)
		p.start()
		if !p.waitServing() {
			return p
		}
		if attempt == 3 {
			t.Fatalf("proxy %s: ports taken three times:\n%s", name, p.log)
		}
		t.Logf("proxy %s: a port was taken; retrying", name)
	}
}

// uri is the proxy's export as libnbd, qemu and fio spell it.
func (p *keelProxy) uri() string {
	if path, ok := strings.CutPrefix(p.listen, "unix:"); ok {
		return "nbd+unix:///keel?socket=" + path
	}
	return "nbd://" + p.listen + "/keel"
}

// proxyStatus is what a proxy's GET /v1/status answers, as the tests read
// it.
type proxyStatus struct {
	Writer   string            `json:"writer"`
	Holding  bool              `json:"holding"`
	Fenced   string            `json:"fenced"`
	Counters map[string]uint64 `json:"counters"`
	Servers  []struct {
		HTTP string `json:"http"`
		Up   bool   `json:"up"`
	} `json:"servers"`
}

func (p *keelProxy) status() proxyStatus {
	p.t.Helper()
	var st proxyStatus
	if err := getJSON(p.http, "/v1/status", &st); err != nil {
		p.t.Fatalf("proxy %s status: %v", p.name, err)
	}
	return st
}

// counter reads one of the proxy's counters (cache_hits, retries, ...).
func (p *keelProxy) counter(name string) uint64 {
	p.t.Helper()
	st := p.status()
	v, ok := st.Counters[name]
	if !ok {
		p.t.Fatalf("proxy %s status has no counter %q: %v", p.name, name, st.Counters)
	}
	return v
}

// start runs the proxy and returns at once.
func (p *keelProxy) start() {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil && !p.exitedLocked() {
		p.t.Fatalf("proxy %s: started while still running", p.name)
	}
	p.runs++
	fmt.Fprintf(p.log, "=== run %d: keel %s\n", p.runs, strings.Join(p.args, " "))
	p.runStart = len(p.log.String())
	cmd := exec.Command(keelBin(p.t), p.args...)
	cmd.Stdout, cmd.Stderr = p.log, p.log
	if err := cmd.Start(); err != nil {
		p.t.Fatalf("proxy %s: start: %v", p.name, err)
	}
	exited := make(chan struct{})
	p.cmd, p.exited = cmd, exited
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		p.exitErr = err
		p.mu.Unlock()
		close(exited)
	}()
}

func (p *keelProxy) exitedLocked() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// runOutput is what the current (or last) run has printed.
func (p *keelProxy) runOutput() string {
	p.mu.Lock()
	start := p.runStart
	p.mu.Unlock()
	return p.log.String()[start:]
}

// waitServing waits until the current run logs "proxy serving". It reports
// whether the run could not bind its address, after it exited.
func (p *keelProxy) waitServing() (bindFailed bool) {
	p.t.Helper()
	p.mu.Lock()
	exited := p.exited
	p.mu.Unlock()
	deadline := time.Now().Add(proxyUpTimeout)
	for {
		if strings.Contains(p.runOutput(), "proxy serving") {
			return false
		}
		select {
		case <-exited:
			if strings.Contains(p.runOutput(), "address already in use") {
				return true
			}
			p.t.Fatalf("proxy %s exited while starting: %v\n%s", p.name, p.exitErrNow(), p.log)
		default:
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("proxy %s: no \"proxy serving\" within %v:\n%s", p.name, proxyUpTimeout, p.log)
		}
		time.Sleep(pollEvery)
	}
}

// waitLog waits until the current run's output contains s.
func (p *keelProxy) waitLog(s string) {
	p.t.Helper()
	poll(p.t, proxyLogTimeout, fmt.Sprintf("proxy %s logs %q", p.name, s), func() (bool, string) {
		out := p.runOutput()
		return strings.Contains(out, s), lastLines(out, 5)
	})
}

// restart starts the proxy again on the same address and waits until it
// serves.
func (p *keelProxy) restart() {
	p.t.Helper()
	p.start()
	if p.waitServing() {
		p.t.Fatalf("proxy %s: its address %s was taken on restart:\n%s", p.name, p.listen, p.log)
	}
}

// kill sends SIGKILL and waits for the process to be gone.
func (p *keelProxy) kill() {
	p.t.Helper()
	p.signalAndWait(syscall.SIGKILL)
}

// stop sends SIGTERM and asserts a clean exit (status 0) in time.
func (p *keelProxy) stop() {
	p.t.Helper()
	if err := p.signalAndWait(syscall.SIGTERM); err != nil {
		p.t.Errorf("proxy %s after SIGTERM: %v (want exit status 0)", p.name, err)
	}
}

func (p *keelProxy) signalAndWait(sig syscall.Signal) error {
	p.t.Helper()
	p.mu.Lock()
	cmd, exited := p.cmd, p.exited
	p.mu.Unlock()
	select {
	case <-exited:
		p.t.Fatalf("proxy %s exited before the test stopped it: %v", p.name, p.exitErrNow())
	default:
	}
	cmd.Process.Signal(sig)
	select {
	case <-exited:
	case <-time.After(proxyStopTimeout):
		cmd.Process.Kill()
		<-exited
		p.t.Fatalf("proxy %s did not exit within %v of %v", p.name, proxyStopTimeout, sig)
	}
	return p.exitErrNow()
}

func (p *keelProxy) exitErrNow() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exitErr
}

// cleanup kills the process if it still runs, fails the test on a panic or
// a data race in its output, and shows the output if the test failed.
func (p *keelProxy) cleanup() {
	p.mu.Lock()
	cmd, exited := p.cmd, p.exited
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	select {
	case <-exited:
	default:
		cmd.Process.Kill()
		<-exited
	}
	out := p.log.String()
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "panic:") || strings.HasPrefix(l, "fatal error:") || strings.Contains(l, "WARNING: DATA RACE") {
			p.t.Errorf("proxy %s output: %s", p.name, l)
		}
	}
	if p.t.Failed() {
		if len(out) > maxLogDump {
			out = fmt.Sprintf("(first %d bytes left out)\n%s", len(out)-maxLogDump, out[len(out)-maxLogDump:])
		}
		p.t.Logf("proxy %s output:\n%s", p.name, out)
	}
}

// ---------------------------------------------------------------------------
// Helpers.

// waitCaughtUp waits until n follows the leader and has applied everything
// the leader had applied when the wait began. Unlike waitConverged it ends
// while writes go on.
func waitCaughtUp(t *testing.T, c *cluster, n *node) {
	t.Helper()
	lead := c.leader()
	st, err := lead.status()
	if err != nil {
		t.Fatalf("leader %s: %v", lead.id, err)
	}
	target := st.AppliedIndex
	poll(t, clusterTimeout, fmt.Sprintf("%s applies index %d (leader %s)", n.id, target, lead.id), func() (bool, string) {
		st, err := n.status()
		if err != nil {
			return false, err.Error()
		}
		syncing := st.Sync != nil && st.Sync.Active
		member := st.State == "Leader" || st.State == "Follower" && st.Leader != ""
		return member && st.AppliedIndex >= target && !syncing,
			fmt.Sprintf("%s leader %q applied %d syncing %v", st.State, st.Leader, st.AppliedIndex, syncing)
	})
}

// waitWrites waits until the cluster's leader has applied at least more
// entries beyond what it had applied when the wait began: writes are
// flowing.
func waitWrites(t *testing.T, c *cluster, more uint64) {
	t.Helper()
	lead := c.leader()
	st, err := lead.status()
	if err != nil {
		t.Fatalf("leader %s: %v", lead.id, err)
	}
	from := st.AppliedIndex
	poll(t, clusterTimeout, fmt.Sprintf("%d more writes applied on %s after index %d", more, lead.id, from), func() (bool, string) {
		st, err := lead.status()
		if err != nil {
			return false, err.Error()
		}
		return st.AppliedIndex >= from+more, fmt.Sprintf("%s applied %d", st.State, st.AppliedIndex)
	})
}

// mustQemuIOFail runs qemu-io and asserts that it reports a failure whose
// output contains want.
func mustQemuIOFail(t *testing.T, uri, want string, cmds ...string) result {
	t.Helper()
	r := qemuIO(t, uri, cmds...)
	if !qemuIOFailed(r) {
		t.Errorf("qemu-io %q on %s succeeded, want it to fail with %q\n%s%s", cmds, uri, want, r.stdout, r.stderr)
	} else if !strings.Contains(r.stdout+r.stderr, want) {
		t.Errorf("qemu-io %q on %s failed without %q in its output: %v\n%s%s", cmds, uri, want, r.err, r.stdout, r.stderr)
	}
	return r
}

// checkImageRange asserts that every node's image holds want at off.
func checkImageRange(t *testing.T, c *cluster, what string, off int64, want []byte) {
	t.Helper()
	for _, n := range c.nodes {
		f, err := os.Open(n.image())
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(want))
		_, err = f.ReadAt(got, off)
		f.Close()
		if err != nil {
			t.Fatalf("%s: reading %d bytes at %d: %v", n.image(), len(want), off, err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s's image at %d: %s: %s", n.id, off, what, firstDiff(got, want))
		}
	}
}

func fill(v byte, n int) []byte { return bytes.Repeat([]byte{v}, n) }

// verifyOKSettled is verifyOK for clusters with fastFailover timings, where
// a loaded machine sees an election now and then: keel verify answers
// "no leader" (exit 2) during one, and is asked again, up to three times.
func verifyOKSettled(t *testing.T, c *cluster, voters ...string) {
	t.Helper()
	var v verifyResult
	for try := 1; try <= 3; try++ {
		lead := c.leader()
		c.waitConverged()
		if v = runVerify(t, lead); v.code != 2 || !strings.Contains(v.stderr, "no leader") {
			break
		}
	}
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

// mustQemuIOSoon is mustQemuIO for writes that set a test up through a
// proxy with a short --write-timeout: on a loaded machine a commit can
// take longer than that now and then, so it tries three times.
func mustQemuIOSoon(t *testing.T, uri string, cmds ...string) {
	t.Helper()
	for try := 1; ; try++ {
		r := qemuIO(t, uri, cmds...)
		if !qemuIOFailed(r) {
			return
		}
		if try == 3 {
			t.Fatalf("qemu-io %q on %s failed three times: %v\n%s%s", cmds, uri, r.err, r.stdout, r.stderr)
		}
		t.Logf("qemu-io %q on %s failed (try %d of 3): %v\n%s%s", cmds, uri, try, r.err, r.stdout, r.stderr)
	}
}

// ---------------------------------------------------------------------------
// The tests.

// TestProxyFioFailover runs fio's verifying random writes through a proxy
// while servers crash one at a time with SIGKILL and come back: the leader,
// a follower, then the new leader. fio must see no error and no bad block,
// and the replicas must end byte-identical.
func TestProxyFioFailover(t *testing.T) {
	c := newCluster(t, "128M", 3, fastFailover...)
	p := startProxy(t, c, "fio")
	p.waitLog("holding the volume")
	// fio must outlive three crash-and-catch-up cycles (about 6 s each
	// here, up to twice that when the machine is loaded): 45 s.

	load := startFio(t, "failover", p.uri(), "--rw=randwrite", "--bs=4k", "--iodepth=16",
		"--offset=0", "--size=32M", "--time_based", "--runtime=45",
		"--verify=crc32c", "--verify_fatal=1", "--verify_backlog=512", "--verify_state_save=0")

	crash := func(what string, victim *node) {
		t.Helper()
		waitWrites(t, c, 200)
		select {
		case <-load.done:
			load.wait(t)
			t.Fatalf("fio ended before the crash of %s (%s); the test needs it running", victim.id, what)
		default:
		}
		start := time.Now()
		victim.kill()
		lead := c.leader(c.followers(victim)...)
		t.Logf("killed %s (%s); %s leads after %v", victim.id, what, lead.id, time.Since(start).Round(time.Millisecond))
		waitWrites(t, c, 200) // the proxy writes through the new leader
		victim.restart()
		waitCaughtUp(t, c, victim)
		t.Logf("%s is back and caught up %v after the crash", victim.id, time.Since(start).Round(time.Millisecond))
	}
	// Each node crashes once: the leader, a follower that has not crashed
	// yet, then whichever node leads by then.
	first := c.leader()
	crash("the leader", first)
	followers := c.followers(c.leader())
	follower := followers[0]
	for _, n := range followers {
		if n != first {
			follower = n
			break
		}
	}
	crash("a follower", follower)
	crash("the new leader", c.leader())

	j := load.wait(t)
	if j.Write.IOBytes == 0 || j.Read.IOBytes == 0 {
		t.Errorf("fio wrote %d and verified %d bytes, want both above 0", j.Write.IOBytes, j.Read.IOBytes)
	}
	counters := p.status().Counters
	t.Logf("proxy counters: %v", counters)
	if counters["retries"] == 0 {
		t.Errorf("the proxy re-sent no command although two leaders were killed under fio's load")
	}
	// Once at start and once after each crash of a leader.
	if n := strings.Count(p.runOutput(), "leader found"); n < 3 {
		t.Errorf("the proxy logged \"leader found\" %d times, want at least 3 (two leaders were killed)", n)
	}
	p.stop()
	if !strings.Contains(p.runOutput(), "released the volume") {
		t.Errorf("the proxy did not log releasing the volume on SIGTERM")
	}
	verifyOKSettled(t, c, "n1", "n2", "n3")
	c.stopAll()
	compareImages(t, c.node("n1").image(), c.node("n2").image(), c.node("n3").image())
}

// TestProxyQemu copies an image into the volume with qemu-img through the
// proxy and compares it back, then overwrites, zeroes and discards ranges
// the proxy has just read (and so cached): every later read must show the
// new contents, through new connections too, and the servers' images must
// end equal to what was written.
func TestProxyQemu(t *testing.T) {
	qemuImg := tool(t, "qemu-img")
	nbdcopy := tool(t, "nbdcopy")
	const size = 64 * mib
	c := newCluster(t, "64M", 3)
	p := startProxy(t, c, "qemu")
	p.waitLog("holding the volume")

	dir := t.TempDir()
	src := randomBytes("proxy-qemu", 32*mib)
	clear(src[8*mib : 9*mib]) // a run of zeros: qemu-img writes it as a zero request
	srcPath := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(srcPath, src, 0o644); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	copy(want, src)
	mustRun(t, toolTimeout, qemuImg, "convert", "-n", "-f", "raw", "-O", "raw", srcPath, p.uri())
	// The volume is larger than the file; compare checks that the rest
	// reads as zeros. It reads everything through the proxy's cache.
	mustRun(t, toolTimeout, qemuImg, "compare", "-f", "raw", "-F", "raw", srcPath, p.uri())

	// 40M: overwrite part of a cached range, across a cache block boundary
	// (blocks are 64 KiB), in one connection and in the next.
	mustQemuIO(t, p.uri(), "write -P 0x41 40M 1M", "read -P 0x41 40M 1M",
		"write -P 0x42 41020k 8k", // 40M+60k: ends in the next block
		"read -P 0x41 40M 60k", "read -P 0x42 41020k 8k", "read -P 0x41 41028k 956k")
	cached := func(cmds ...string) {
		t.Helper()
		hits := p.counter("cache_hits")
		mustQemuIO(t, p.uri(), cmds...)
		if now := p.counter("cache_hits"); now == hits {
			t.Errorf("qemu-io %q: no cache hit (cache_hits stays %d), although the proxy read the range last", cmds, hits)
		}
	}
	cached("read -P 0x42 41020k 8k")
	mustQemuIO(t, p.uri(), "write -P 0x43 40M 512k")
	mustQemuIO(t, p.uri(), "read -P 0x43 40M 512k", "read -P 0x41 41472k 512k")
	cached("read -P 0x43 40M 512k")
	copy(want[40*mib:], fill(0x43, 512*kib))
	copy(want[40*mib+512*kib:], fill(0x41, 512*kib))

	// 42M: zero a cached range, one aligned run and one unaligned.
	mustQemuIO(t, p.uri(), "write -P 0x51 42M 1M", "read -P 0x51 42M 1M")
	mustQemuIO(t, p.uri(), "write -z 43072k 128k", "write -z 43310k 10k") // 42M+64k, 42M+302k
	mustQemuIO(t, p.uri(), "read -P 0x51 42M 64k", "read -P 0 43072k 128k", "read -P 0x51 43200k 110k",
		"read -P 0 43310k 10k", "read -P 0x51 43320k 712k")
	cached("read -P 0 43072k 128k", "read -P 0 43310k 10k")
	copy(want[42*mib:], fill(0x51, mib))
	clear(want[42*mib+64*kib : 42*mib+192*kib])
	clear(want[42*mib+302*kib : 42*mib+312*kib])

	// 44M: discard a cached range (keel zeroes what is discarded).
	mustQemuIO(t, p.uri(), "write -P 0x61 44M 1M", "read -P 0x61 44M 1M")
	// The discarded half is a hole now, which the proxy's NBD server
	// learns from a replica's block status and answers without a read.
	mustQemuIO(t, p.uri(), "discard 44M 512k", "read -P 0 44M 512k", "read -P 0x61 45568k 512k")
	mustQemuIO(t, p.uri(), "read -P 0 44M 512k")
	cached("read -P 0x61 45568k 512k")
	copy(want[44*mib+512*kib:], fill(0x61, 512*kib))

	// 4M: overwrite what qemu-img compare read through the cache.
	cached("read -v 4M 16")
	mustQemuIO(t, p.uri(), "write -P 0x71 4M 64k", "read -P 0x71 4M 64k")
	cached("read -P 0x71 4M 64k")
	copy(want[4*mib:], fill(0x71, 64*kib))

	out := filepath.Join(dir, "via-proxy.raw")
	mustRun(t, toolTimeout, nbdcopy, p.uri(), out)
	compareFile(t, "the volume read back through the proxy", out, want)

	c.waitConverged()
	for _, n := range c.nodes {
		compareFile(t, n.id+"'s image", n.image(), want)
	}
	verifyOK(t, c.leader(), "n1", "n2", "n3")
}

// TestProxyTakeover: a second proxy under another writer name reads but
// may not write; a third with --takeover fences the first, which notices
// by itself: its writes fail with EPERM and never land, and it stops
// serving from its cache.
//
// A proxy that does not hold the volume reads at least what the leader had
// logged when the read began, so B (and C before its first write, as a
// migration's destination would) read A's acknowledged writes at once,
// without waiting for the cluster to converge.
func TestProxyTakeover(t *testing.T) {
	c := newCluster(t, "64M", 3)
	a := startProxy(t, c, "A")
	a.waitLog("holding the volume")
	mustQemuIO(t, a.uri(), "write -P 0xaa 0 1M", "read -P 0xaa 0 1M") // A caches it

	b := startProxy(t, c, "B")
	b.waitLog("volume held by another writer")
	mustQemuIO(t, b.uri(), "read -P 0xaa 0 1M")
	r := mustQemuIOFail(t, b.uri(), "Operation not permitted", "write -P 0xbb 0 64k")
	t.Logf("write through B (not the writer): %v\n%s%s", r.err, r.stdout, r.stderr)
	c.waitConverged()
	checkImageRange(t, c, "A's write, after B's refused one", 0, fill(0xaa, mib))
	mustQemuIO(t, a.uri(), "read -P 0xaa 0 1M")
	mustQemuIO(t, b.uri(), "read -P 0xaa 0 1M")
	if st := b.status(); st.Holding || st.Fenced != "" {
		t.Errorf("B's status: holding %v, fenced %q; want neither", st.Holding, st.Fenced)
	}

	// C (--takeover) takes the volume over at its first write, not at
	// start: until then A keeps writing (a migration's source runs until
	// it is paused) and C reads what A acknowledged.
	cc := startProxy(t, c, "C", "--takeover")
	cc.waitLog("takes it over at its first write")
	if st := cc.status(); st.Holding {
		t.Errorf("C holds the volume before its first write")
	}
	mustQemuIO(t, a.uri(), "write -P 0xa2 6M 64k")
	mustQemuIO(t, cc.uri(), "read -P 0xa2 6M 64k", "read -P 0xaa 0 1M")
	mustQemuIO(t, cc.uri(), "write -P 0xcc 0 1M", "read -P 0xcc 0 1M")
	if st := cc.status(); !st.Holding {
		t.Errorf("C's status after --takeover: not holding")
	}

	// A learns of the later claim from the servers' status, before any
	// write of its own is refused.
	a.waitLog("fenced")
	if st := a.status(); st.Holding || st.Fenced == "" {
		t.Errorf("A's status after the takeover: holding %v, fenced %q; want fenced", st.Holding, st.Fenced)
	}
	// 0xaa through A could only come from its cache, which a fenced proxy
	// must no longer use, or from a replica behind C's write.
	mustQemuIO(t, a.uri(), "read -P 0xcc 0 1M")
	mustQemuIO(t, b.uri(), "read -P 0xcc 0 1M")

	r = mustQemuIOFail(t, a.uri(), "Operation not permitted", "write -P 0xdd 0 64k")
	t.Logf("write through A after C took over: %v\n%s%s", r.err, r.stdout, r.stderr)
	mustQemuIOFail(t, a.uri(), "Operation not permitted", "write -P 0xdd 2M 64k")
	mustQemuIOFail(t, b.uri(), "Operation not permitted", "write -P 0xbb 2M 64k")
	mustQemuIO(t, cc.uri(), "write -P 0xce 4M 64k", "read -P 0xcc 0 1M", "read -P 0 2M 64k")

	c.waitConverged()
	checkImageRange(t, c, "C's write", 0, fill(0xcc, mib))
	checkImageRange(t, c, "no write of A or B after the takeover", 2*mib, make([]byte, 64*kib))
	checkImageRange(t, c, "C's second write", 4*mib, fill(0xce, 64*kib))
	mustQemuIO(t, a.uri(), "read -P 0xcc 0 1M", "read -P 0 2M 64k", "read -P 0xce 4M 64k")
	mustQemuIO(t, b.uri(), "read -P 0xcc 0 1M", "read -P 0 2M 64k", "read -P 0xce 4M 64k")
	verifyOK(t, c.leader(), "n1", "n2", "n3")
}

// TestProxyNoQuorum kills two of three servers behind a proxy: reads go on,
// a write fails with EIO within the proxy's --write-timeout. Once the
// servers are back, the failed write is wholly there or wholly absent on
// every node, and the same proxy writes again without a restart.
func TestProxyNoQuorum(t *testing.T) {
	c := newCluster(t, "64M", 3)
	// --attempt-timeout must not exceed --write-timeout, and its default
	// (5s) does; see the report on this test.
	p := startProxy(t, c, "nq", "--write-timeout", writeTimeoutShort.String(), "--attempt-timeout", "1s")
	p.waitLog("holding the volume")
	mustQemuIOSoon(t, p.uri(), "write -P 0xa1 0 4M")
	c.waitConverged()

	survivor := c.leader()
	killed := c.followers(survivor)
	for _, n := range killed {
		n.kill()
	}
	t.Logf("killed %s and %s; %s survives", killed[0].id, killed[1].id, survivor.id)

	// The proxy has not read this range yet: the read goes to the survivor.
	mustQemuIO(t, p.uri(), "read -P 0xa1 0 4M")
	start := time.Now()
	r := mustQemuIOFail(t, p.uri(), "Input/output error", "write -P 0xb2 1M 1M")
	took := time.Since(start)
	t.Logf("write without a quorum: %v after %v\n%s%s", r.err, took.Round(time.Millisecond), r.stdout, r.stderr)
	if limit := writeTimeoutShort + 6*time.Second; took > limit {
		t.Errorf("the write without a quorum took %v to fail, want under %v (--write-timeout %v)", took, limit, writeTimeoutShort)
	}
	mustQemuIO(t, p.uri(), "read -P 0xa1 0 1M", "read -P 0xa1 2M 2M")

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
	// The proxy shows what the servers hold.
	for v := range seen {
		pattern := map[string]string{"old": "0xa1", "new": "0xb2"}[v]
		mustQemuIO(t, p.uri(), "read -P "+pattern+" 1M 1M")
	}

	// The same proxy writes again: it found the new leader by itself.
	mustQemuIOSoon(t, p.uri(), "write -P 0xc3 8M 1M")
	mustQemuIO(t, p.uri(), "read -P 0xc3 8M 1M")
	c.waitConverged()
	checkImageRange(t, c, "the write after recovery", 8*mib, fill(0xc3, mib))
	verifyOK(t, lead, "n1", "n2", "n3")
}

// TestProxyRestart crashes the proxy with SIGKILL while qemu-io holds a
// connection to it and starts a new one on the same unix socket under the
// same writer name: qemu reconnects, and writes before and after the crash
// land and read back.
func TestProxyRestart(t *testing.T) {
	c := newCluster(t, "64M", 3)
	sock := filepath.Join(shortTempDir(t), "proxy.sock")
	p := startProxyOn(t, c, "restart", "unix:"+sock)
	p.waitLog("holding the volume")

	// The json: filename names the nbd driver itself, so no -f raw.
	qemuIOBin := tool(t, "qemu-io")
	image := fmt.Sprintf(`json:{"driver":"nbd","server":{"type":"unix","path":%q},"export":"keel","reconnect-delay":20}`, sock)
	const pause = 4000 // ms: qemu-io sleeps this long between its writes
	type qemuResult struct {
		r    result
		took time.Duration
	}
	done := make(chan qemuResult, 1)
	go func() {
		start := time.Now()
		r := run(t, toolTimeout, qemuIOBin, "-c", "write -P 0x11 0 1M", "-c", fmt.Sprintf("sleep %d", pause),
			"-c", "write -P 0x22 4M 1M", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 4M 1M", image)
		done <- qemuResult{r, time.Since(start)}
	}()

	// Once the first write has landed, crash the proxy and start another.
	poll(t, 30*time.Second, "qemu-io's first write lands on the leader", func() (bool, string) {
		r := qemuIO(t, c.leader().uri(), "read -P 0x11 0 1M")
		return !qemuIOFailed(r), strings.TrimSpace(r.stdout + r.stderr)
	})
	select {
	case q := <-done:
		t.Fatalf("qemu-io ended before the proxy was killed (after %v): %v\n%s%s", q.took, q.r.err, q.r.stdout, q.r.stderr)
	default:
	}
	p.kill()
	p.restart()
	p.waitLog("holding the volume")
	t.Logf("proxy restarted")

	var q qemuResult
	select {
	case q = <-done:
	case <-time.After(toolTimeout + 10*time.Second):
		t.Fatal("qemu-io did not end")
	}
	t.Logf("qemu-io took %v: %v\n%s%s", q.took.Round(time.Millisecond), q.r.err, q.r.stdout, q.r.stderr)
	if qemuIOFailed(q.r) {
		t.Errorf("qemu-io across the proxy's restart failed: %v", q.r.err)
	}
	if n := strings.Count(q.r.stdout, "read 1048576/1048576 bytes"); n != 2 {
		t.Errorf("qemu-io reported %d verified reads of 1 MiB, want 2", n)
	}
	mustQemuIO(t, p.uri(), "read -P 0x11 0 1M", "read -P 0x22 4M 1M")
	c.waitConverged()
	checkImageRange(t, c, "the write before the crash", 0, fill(0x11, mib))
	checkImageRange(t, c, "the write after the crash", 4*mib, fill(0x22, mib))
}

// TestProxyRefuses: bad flags, and servers that never answer, end the
// proxy at once with a message that names the problem.
func TestProxyRefuses(t *testing.T) {
	refused := func(what string, want []string, args ...string) {
		t.Helper()
		r := run(t, 60*time.Second, keelBin(t), append([]string{"proxy"}, args...)...)
		var exit *exec.ExitError
		switch {
		case r.err == nil:
			t.Errorf("%s: exited 0, want a refusal\n%s%s", what, r.stdout, r.stderr)
		case !errors.As(r.err, &exit) || !exit.Exited():
			t.Errorf("%s: %v; want a prompt non-zero exit\n%s", what, r.err, r.stderr)
		}
		msg := strings.ToLower(strings.ReplaceAll(r.stderr, "-", ""))
		for _, w := range want {
			// "--write-timeout" is named either as the flag or as its
			// field, WriteTimeout.
			if !strings.Contains(msg, strings.ToLower(strings.ReplaceAll(w, "-", ""))) {
				t.Errorf("%s: stderr lacks %q:\n%s", what, w, r.stderr)
			}
		}
		t.Logf("%s: %v: %s", what, r.err, lastLines(r.stderr, 3))
	}
	dead := loopback(freePort(t)) // nothing listens there
	listen := func() []string { return []string{"--listen", loopback(freePort(t))} }

	refused("no --servers", []string{"servers"}, listen()...)
	refused("--cache bogus", []string{"--cache", "bogus"}, append(listen(), "--servers", dead, "--cache", "bogus")...)
	refused("--write-timeout 1ms", []string{"write-timeout", "1ms"}, append(listen(), "--servers", dead, "--write-timeout", "1ms")...)
	start := time.Now()
	refused("servers that never answer", []string{"no keel server answered", dead},
		append(listen(), "--servers", dead, "--connect-timeout", "2s")...)
	if took := time.Since(start); took > 20*time.Second {
		t.Errorf("with --connect-timeout 2s and no server the proxy took %v to give up", took)
	}
}

// TestProxyCacheAfterUncertainWrite: a write that failed with EIO (no
// quorum) may still land later, when its old leader leads again. The proxy
// must not keep serving the old bytes of that range from its cache.
func TestProxyCacheAfterUncertainWrite(t *testing.T) {
	c := newCluster(t, "64M", 3, "--heartbeat-timeout", "2s", "--election-timeout", "2s", "--leader-lease-timeout", "1s")
	p := startProxy(t, c, "cfw", "--write-timeout", "2s")
	p.waitLog("holding the volume")
	mustQemuIOSoon(t, p.uri(), "write -P 0xa1 0 4M")
	c.waitConverged()
	old := c.leader()
	killed := c.followers(old)
	for _, n := range killed {
		n.kill()
	}
	mustQemuIOFail(t, p.uri(), "Input/output error", "write -P 0xb2 1M 1M")
	st, err := old.status()
	if err != nil {
		t.Fatal(err)
	}
	if st.LastLogIndex <= st.CommitIndex {
		t.Fatalf("the failed write did not reach %s's log (last %d, commit %d): the case this test is about did not happen", old.id, st.LastLogIndex, st.CommitIndex)
	}
	mustQemuIO(t, p.uri(), "read -P 0xa1 1M 1M") // may fill the cache with the old bytes
	killed[0].restart()                          // its log is shorter: old must lead again
	if l := c.leader(old, killed[0]); l != old {
		t.Fatalf("%s leads, want %s (the only log with the failed write)", l.id, old.id)
	}
	c.waitConverged(old, killed[0])
	mustQemuIO(t, old.uri(), "read -P 0xb2 1M 1M") // the write landed after all
	mustQemuIO(t, p.uri(), "read -P 0xb2 1M 1M")   // and the proxy shows it
}

// TestProxyNbdinfo: what libnbd sees through the proxy: the same features
// as on a server (structured replies, base:allocation, multi-conn, flush,
// FUA, trim, zero, fast zero, cache), and a block status map equal to the
// leader's.
func TestProxyNbdinfo(t *testing.T) {
	c := newCluster(t, "64M", 3)
	// Given only a follower's address, the proxy finds the leader and the
	// other servers by itself.
	p := startProxy(t, c, "info", "--servers", c.followers(c.leader())[0].http)
	p.waitLog("holding the volume")
	poll(t, clusterTimeout, "the proxy knows all three servers", func() (bool, string) {
		st := p.status()
		return len(st.Servers) == 3, fmt.Sprintf("%+v", st)
	})
	mustQemuIO(t, p.uri(), "write -P 0x42 1M 3M", "write -P 0x43 20M 64k", "write -z 2M 512k")
	info := getInfo(t, p.uri())
	e := info.Exports[0]
	for _, f := range []struct {
		what      string
		got, want any
	}{
		{"structured", info.Structured, true}, {"export-size", e.Size, int64(64 * mib)},
		{"is_read_only", e.IsReadOnly, false}, {"can_multi_conn", e.CanMultiConn, true},
		{"can_flush", e.CanFlush, true}, {"can_fua", e.CanFUA, true}, {"can_trim", e.CanTrim, true},
		{"can_zero", e.CanZero, true}, {"can_fast_zero", e.CanFastZero, true}, {"can_cache", e.CanCache, true},
		{"can_df", e.CanDF, true},
	} {
		if f.got != f.want {
			t.Errorf("through the proxy: %s = %v, want %v", f.what, f.got, f.want)
		}
	}
	if !contains(e.Contexts, "base:allocation") {
		t.Errorf("contexts = %q, want base:allocation", e.Contexts)
	}
	c.waitConverged()
	nbdinfo := tool(t, "nbdinfo")
	viaProxy := mustRun(t, toolTimeout, nbdinfo, "--map", p.uri())
	direct := mustRun(t, toolTimeout, nbdinfo, "--map", c.leader().uri())
	if viaProxy != direct {
		t.Errorf("nbdinfo --map through the proxy:\n%s\ndirect to the leader:\n%s", viaProxy, direct)
	}
	if !strings.Contains(viaProxy, "data") || !strings.Contains(viaProxy, "hole") {
		t.Errorf("map through the proxy has no data or no hole extents:\n%s", viaProxy)
	}
}
