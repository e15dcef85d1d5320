// Proxy end-to-end tests: `keel proxy` processes of the built binary in
// front of a cluster of `keel server` processes (keeltest's Cluster and
// Proxy), driven by fio, qemu-io and qemu-img through the
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
	"testing"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
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
// Proxies, from keeltest.

// startProxy starts a proxy named name (its --writer) on a free loopback
// port in front of every node of c (listed in --servers) and waits until it
// serves. flags go after the harness's own, so a later --writer or
// --listen wins.
func startProxy(t *testing.T, c *keeltest.TCluster, name string, flags ...string) *keeltest.TProxy {
	t.Helper()
	return startProxyOn(t, c, name, "", flags...)
}

// startProxyOn is startProxy on a given --listen address ("": a free
// loopback port, retried on another if it is taken meanwhile).
func startProxyOn(t *testing.T, c *keeltest.TCluster, name, listen string, flags ...string) *keeltest.TProxy {
	t.Helper()
	return c.MustProxy(keeltest.ProxyConfig{Name: name, Listen: listen, Flags: flags})
}

// ---------------------------------------------------------------------------
// Helpers.

// waitWrites waits until the cluster's leader has applied at least more
// entries beyond what it had applied when the wait began: writes are
// flowing.
func waitWrites(t *testing.T, c *keeltest.TCluster, more uint64) {
	t.Helper()
	lead := c.MustLeader()
	st, err := lead.Status(t.Context())
	if err != nil {
		t.Fatalf("leader %s: %v", lead.ID, err)
	}
	from := st.AppliedIndex
	keeltest.MustPoll(t, clusterTimeout, fmt.Sprintf("%d more writes applied on %s after index %d", more, lead.ID, from), func() (bool, string) {
		st, err := lead.Status(t.Context())
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
func checkImageRange(t *testing.T, c *keeltest.TCluster, what string, off int64, want []byte) {
	t.Helper()
	for _, n := range c.Nodes() {
		f, err := os.Open(n.Image())
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(want))
		_, err = f.ReadAt(got, off)
		f.Close()
		if err != nil {
			t.Fatalf("%s: reading %d bytes at %d: %v", n.Image(), len(want), off, err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s's image at %d: %s: %s", n.ID, off, what, firstDiff(got, want))
		}
	}
}

func fill(v byte, n int) []byte { return bytes.Repeat([]byte{v}, n) }

// verifyOKSettled is verifyOK for clusters with fastFailover timings, where
// a loaded machine sees an election now and then: keel verify answers
// "no leader" (exit 2) during one, and is asked again, up to three times.
func verifyOKSettled(t *testing.T, c *keeltest.TCluster, voters ...string) {
	t.Helper()
	var v verifyResult
	for try := 1; try <= 3; try++ {
		lead := c.MustLeader()
		c.MustConverge()
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
	p.MustWaitLog("holding the volume")
	// fio must outlive three crash-and-catch-up cycles (about 6 s each
	// here, up to twice that when the machine is loaded): 45 s.

	load := startFio(t, "failover", p.URI(), "--rw=randwrite", "--bs=4k", "--iodepth=16",
		"--offset=0", "--size=32M", "--time_based", "--runtime=45",
		"--verify=crc32c", "--verify_fatal=1", "--verify_backlog=512", "--verify_state_save=0")

	crash := func(what string, victim *keeltest.Node) {
		t.Helper()
		waitWrites(t, c, 200)
		select {
		case <-load.done:
			load.wait(t)
			t.Fatalf("fio ended before the crash of %s (%s); the test needs it running", victim.ID, what)
		default:
		}
		start := time.Now()
		c.MustKill(victim)
		lead := c.MustLeader(c.Followers(victim)...)
		t.Logf("killed %s (%s); %s leads after %v", victim.ID, what, lead.ID, time.Since(start).Round(time.Millisecond))
		waitWrites(t, c, 200) // the proxy writes through the new leader
		c.MustRestart(victim)
		c.MustCatchUp(victim)
		t.Logf("%s is back and caught up %v after the crash", victim.ID, time.Since(start).Round(time.Millisecond))
	}
	// Each node crashes once: the leader, a follower that has not crashed
	// yet, then whichever node leads by then.
	first := c.MustLeader()
	crash("the leader", first)
	followers := c.Followers(c.MustLeader())
	follower := followers[0]
	for _, n := range followers {
		if n != first {
			follower = n
			break
		}
	}
	crash("a follower", follower)
	crash("the new leader", c.MustLeader())

	j := load.wait(t)
	if j.Write.IOBytes == 0 || j.Read.IOBytes == 0 {
		t.Errorf("fio wrote %d and verified %d bytes, want both above 0", j.Write.IOBytes, j.Read.IOBytes)
	}
	counters := p.MustStatus().Counters
	t.Logf("proxy counters: %v", counters)
	if counters["retries"] == 0 {
		t.Errorf("the proxy re-sent no command although two leaders were killed under fio's load")
	}
	// Once at start and once after each crash of a leader.
	if n := strings.Count(p.RunOutput(), "leader found"); n < 3 {
		t.Errorf("the proxy logged \"leader found\" %d times, want at least 3 (two leaders were killed)", n)
	}
	p.MustStop()
	if !strings.Contains(p.RunOutput(), "released the volume") {
		t.Errorf("the proxy did not log releasing the volume on SIGTERM")
	}
	verifyOKSettled(t, c, "n1", "n2", "n3")
	c.MustStopAll()
	compareImages(t, c.Node("n1").Image(), c.Node("n2").Image(), c.Node("n3").Image())
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
	p.MustWaitLog("holding the volume")

	dir := t.TempDir()
	src := randomBytes("proxy-qemu", 32*mib)
	clear(src[8*mib : 9*mib]) // a run of zeros: qemu-img writes it as a zero request
	srcPath := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(srcPath, src, 0o644); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	copy(want, src)
	mustRun(t, toolTimeout, qemuImg, "convert", "-n", "-f", "raw", "-O", "raw", srcPath, p.URI())
	// The volume is larger than the file; compare checks that the rest
	// reads as zeros. It reads everything through the proxy's cache.
	mustRun(t, toolTimeout, qemuImg, "compare", "-f", "raw", "-F", "raw", srcPath, p.URI())

	// 40M: overwrite part of a cached range, across a cache block boundary
	// (blocks are 64 KiB), in one connection and in the next.
	mustQemuIO(t, p.URI(), "write -P 0x41 40M 1M", "read -P 0x41 40M 1M",
		"write -P 0x42 41020k 8k", // 40M+60k: ends in the next block
		"read -P 0x41 40M 60k", "read -P 0x42 41020k 8k", "read -P 0x41 41028k 956k")
	cached := func(cmds ...string) {
		t.Helper()
		hits := p.MustCounter("cache_hits")
		mustQemuIO(t, p.URI(), cmds...)
		if now := p.MustCounter("cache_hits"); now == hits {
			t.Errorf("qemu-io %q: no cache hit (cache_hits stays %d), although the proxy read the range last", cmds, hits)
		}
	}
	cached("read -P 0x42 41020k 8k")
	mustQemuIO(t, p.URI(), "write -P 0x43 40M 512k")
	mustQemuIO(t, p.URI(), "read -P 0x43 40M 512k", "read -P 0x41 41472k 512k")
	cached("read -P 0x43 40M 512k")
	copy(want[40*mib:], fill(0x43, 512*kib))
	copy(want[40*mib+512*kib:], fill(0x41, 512*kib))

	// 42M: zero a cached range, one aligned run and one unaligned.
	mustQemuIO(t, p.URI(), "write -P 0x51 42M 1M", "read -P 0x51 42M 1M")
	mustQemuIO(t, p.URI(), "write -z 43072k 128k", "write -z 43310k 10k") // 42M+64k, 42M+302k
	mustQemuIO(t, p.URI(), "read -P 0x51 42M 64k", "read -P 0 43072k 128k", "read -P 0x51 43200k 110k",
		"read -P 0 43310k 10k", "read -P 0x51 43320k 712k")
	cached("read -P 0 43072k 128k", "read -P 0 43310k 10k")
	copy(want[42*mib:], fill(0x51, mib))
	clear(want[42*mib+64*kib : 42*mib+192*kib])
	clear(want[42*mib+302*kib : 42*mib+312*kib])

	// 44M: discard a cached range (keel zeroes what is discarded).
	mustQemuIO(t, p.URI(), "write -P 0x61 44M 1M", "read -P 0x61 44M 1M")
	// The discarded half is a hole now, which the proxy's NBD server
	// learns from a replica's block status and answers without a read.
	mustQemuIO(t, p.URI(), "discard 44M 512k", "read -P 0 44M 512k", "read -P 0x61 45568k 512k")
	mustQemuIO(t, p.URI(), "read -P 0 44M 512k")
	cached("read -P 0x61 45568k 512k")
	copy(want[44*mib+512*kib:], fill(0x61, 512*kib))

	// 4M: overwrite what qemu-img compare read through the cache.
	cached("read -v 4M 16")
	mustQemuIO(t, p.URI(), "write -P 0x71 4M 64k", "read -P 0x71 4M 64k")
	cached("read -P 0x71 4M 64k")
	copy(want[4*mib:], fill(0x71, 64*kib))

	out := filepath.Join(dir, "via-proxy.raw")
	mustRun(t, toolTimeout, nbdcopy, p.URI(), out)
	compareFile(t, "the volume read back through the proxy", out, want)

	c.MustConverge()
	for _, n := range c.Nodes() {
		compareFile(t, n.ID+"'s image", n.Image(), want)
	}
	verifyOK(t, c.MustLeader(), "n1", "n2", "n3")
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
	a.MustWaitLog("holding the volume")
	mustQemuIO(t, a.URI(), "write -P 0xaa 0 1M", "read -P 0xaa 0 1M") // A caches it

	b := startProxy(t, c, "B")
	b.MustWaitLog("volume held by another writer")
	mustQemuIO(t, b.URI(), "read -P 0xaa 0 1M")
	r := mustQemuIOFail(t, b.URI(), "Operation not permitted", "write -P 0xbb 0 64k")
	t.Logf("write through B (not the writer): %v\n%s%s", r.err, r.stdout, r.stderr)
	c.MustConverge()
	checkImageRange(t, c, "A's write, after B's refused one", 0, fill(0xaa, mib))
	mustQemuIO(t, a.URI(), "read -P 0xaa 0 1M")
	mustQemuIO(t, b.URI(), "read -P 0xaa 0 1M")
	if st := b.MustStatus(); st.Holding || st.Fenced != "" {
		t.Errorf("B's status: holding %v, fenced %q; want neither", st.Holding, st.Fenced)
	}

	// C (--takeover) takes the volume over at its first write, not at
	// start: until then A keeps writing (a migration's source runs until
	// it is paused) and C reads what A acknowledged.
	cc := startProxy(t, c, "C", "--takeover")
	cc.MustWaitLog("takes it over at its first write")
	if st := cc.MustStatus(); st.Holding {
		t.Errorf("C holds the volume before its first write")
	}
	mustQemuIO(t, a.URI(), "write -P 0xa2 6M 64k")
	mustQemuIO(t, cc.URI(), "read -P 0xa2 6M 64k", "read -P 0xaa 0 1M")
	mustQemuIO(t, cc.URI(), "write -P 0xcc 0 1M", "read -P 0xcc 0 1M")
	if st := cc.MustStatus(); !st.Holding {
		t.Errorf("C's status after --takeover: not holding")
	}

	// A learns of the later claim from the servers' status, before any
	// write of its own is refused.
	a.MustWaitLog("fenced")
	if st := a.MustStatus(); st.Holding || st.Fenced == "" {
		t.Errorf("A's status after the takeover: holding %v, fenced %q; want fenced", st.Holding, st.Fenced)
	}
	// 0xaa through A could only come from its cache, which a fenced proxy
	// must no longer use, or from a replica behind C's write.
	mustQemuIO(t, a.URI(), "read -P 0xcc 0 1M")
	mustQemuIO(t, b.URI(), "read -P 0xcc 0 1M")

	r = mustQemuIOFail(t, a.URI(), "Operation not permitted", "write -P 0xdd 0 64k")
	t.Logf("write through A after C took over: %v\n%s%s", r.err, r.stdout, r.stderr)
	mustQemuIOFail(t, a.URI(), "Operation not permitted", "write -P 0xdd 2M 64k")
	mustQemuIOFail(t, b.URI(), "Operation not permitted", "write -P 0xbb 2M 64k")
	mustQemuIO(t, cc.URI(), "write -P 0xce 4M 64k", "read -P 0xcc 0 1M", "read -P 0 2M 64k")

	c.MustConverge()
	checkImageRange(t, c, "C's write", 0, fill(0xcc, mib))
	checkImageRange(t, c, "no write of A or B after the takeover", 2*mib, make([]byte, 64*kib))
	checkImageRange(t, c, "C's second write", 4*mib, fill(0xce, 64*kib))
	mustQemuIO(t, a.URI(), "read -P 0xcc 0 1M", "read -P 0 2M 64k", "read -P 0xce 4M 64k")
	mustQemuIO(t, b.URI(), "read -P 0xcc 0 1M", "read -P 0 2M 64k", "read -P 0xce 4M 64k")
	verifyOK(t, c.MustLeader(), "n1", "n2", "n3")
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
	p.MustWaitLog("holding the volume")
	mustQemuIOSoon(t, p.URI(), "write -P 0xa1 0 4M")
	c.MustConverge()

	survivor := c.MustLeader()
	killed := c.Followers(survivor)
	for _, n := range killed {
		c.MustKill(n)
	}
	t.Logf("killed %s and %s; %s survives", killed[0].ID, killed[1].ID, survivor.ID)

	// The proxy has not read this range yet: the read goes to the survivor.
	mustQemuIO(t, p.URI(), "read -P 0xa1 0 4M")
	start := time.Now()
	r := mustQemuIOFail(t, p.URI(), "Input/output error", "write -P 0xb2 1M 1M")
	took := time.Since(start)
	t.Logf("write without a quorum: %v after %v\n%s%s", r.err, took.Round(time.Millisecond), r.stdout, r.stderr)
	if limit := writeTimeoutShort + 6*time.Second; took > limit {
		t.Errorf("the write without a quorum took %v to fail, want under %v (--write-timeout %v)", took, limit, writeTimeoutShort)
	}
	mustQemuIO(t, p.URI(), "read -P 0xa1 0 1M", "read -P 0xa1 2M 2M")

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
	// The proxy shows what the servers hold.
	for v := range seen {
		pattern := map[string]string{"old": "0xa1", "new": "0xb2"}[v]
		mustQemuIO(t, p.URI(), "read -P "+pattern+" 1M 1M")
	}

	// The same proxy writes again: it found the new leader by itself.
	mustQemuIOSoon(t, p.URI(), "write -P 0xc3 8M 1M")
	mustQemuIO(t, p.URI(), "read -P 0xc3 8M 1M")
	c.MustConverge()
	checkImageRange(t, c, "the write after recovery", 8*mib, fill(0xc3, mib))
	verifyOK(t, lead, "n1", "n2", "n3")
}

// TestProxyRestart crashes the proxy with SIGKILL while qemu-io holds a
// connection to it and starts a new one on the same unix socket under the
// same writer name: qemu reconnects, and writes before and after the crash
// land and read back.
func TestProxyRestart(t *testing.T) {
	c := newCluster(t, "64M", 3)
	sock := filepath.Join(keeltest.MustSocketDir(t), "proxy.sock")
	p := startProxyOn(t, c, "restart", "unix:"+sock)
	p.MustWaitLog("holding the volume")

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
	keeltest.MustPoll(t, 30*time.Second, "qemu-io's first write lands on the leader", func() (bool, string) {
		r := qemuIO(t, c.MustLeader().URI(), "read -P 0x11 0 1M")
		return !qemuIOFailed(r), strings.TrimSpace(r.stdout + r.stderr)
	})
	select {
	case q := <-done:
		t.Fatalf("qemu-io ended before the proxy was killed (after %v): %v\n%s%s", q.took, q.r.err, q.r.stdout, q.r.stderr)
	default:
	}
	p.MustKill()
	p.MustRestart()
	p.MustWaitLog("holding the volume")
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
	mustQemuIO(t, p.URI(), "read -P 0x11 0 1M", "read -P 0x22 4M 1M")
	c.MustConverge()
	checkImageRange(t, c, "the write before the crash", 0, fill(0x11, mib))
	checkImageRange(t, c, "the write after the crash", 4*mib, fill(0x22, mib))
}

// TestProxyRefuses: bad flags, and servers that never answer, end the
// proxy at once with a message that names the problem.
func TestProxyRefuses(t *testing.T) {
	refused := func(what string, want []string, args ...string) {
		t.Helper()
		r := run(t, 60*time.Second, keeltest.MustBinary(t), append([]string{"proxy"}, args...)...)
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
	dead := keeltest.MustFreeAddr(t) // nothing listens there
	listen := func() []string { return []string{"--listen", keeltest.MustFreeAddr(t)} }

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
	p.MustWaitLog("holding the volume")
	mustQemuIOSoon(t, p.URI(), "write -P 0xa1 0 4M")
	c.MustConverge()
	old := c.MustLeader()
	killed := c.Followers(old)
	for _, n := range killed {
		c.MustKill(n)
	}
	mustQemuIOFail(t, p.URI(), "Input/output error", "write -P 0xb2 1M 1M")
	st, err := old.Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if st.LastLogIndex <= st.CommitIndex {
		t.Fatalf("the failed write did not reach %s's log (last %d, commit %d): the case this test is about did not happen", old.ID, st.LastLogIndex, st.CommitIndex)
	}
	mustQemuIO(t, p.URI(), "read -P 0xa1 1M 1M") // may fill the cache with the old bytes
	c.MustRestart(killed[0])                     // its log is shorter: old must lead again
	if l := c.MustLeader(old, killed[0]); l != old {
		t.Fatalf("%s leads, want %s (the only log with the failed write)", l.ID, old.ID)
	}
	c.MustConverge(old, killed[0])
	mustQemuIO(t, old.URI(), "read -P 0xb2 1M 1M") // the write landed after all
	mustQemuIO(t, p.URI(), "read -P 0xb2 1M 1M")   // and the proxy shows it
}

// TestProxyNbdinfo: what libnbd sees through the proxy: the same features
// as on a server (structured replies, base:allocation, multi-conn, flush,
// FUA, trim, zero, fast zero, cache), and a block status map equal to the
// leader's.
func TestProxyNbdinfo(t *testing.T) {
	c := newCluster(t, "64M", 3)
	// Given only a follower's address, the proxy finds the leader and the
	// other servers by itself.
	p := startProxy(t, c, "info", "--servers", c.Followers(c.MustLeader())[0].HTTP)
	p.MustWaitLog("holding the volume")
	keeltest.MustPoll(t, clusterTimeout, "the proxy knows all three servers", func() (bool, string) {
		st := p.MustStatus()
		return len(st.Servers) == 3, fmt.Sprintf("%+v", st)
	})
	mustQemuIO(t, p.URI(), "write -P 0x42 1M 3M", "write -P 0x43 20M 64k", "write -z 2M 512k")
	info := getInfo(t, p.URI())
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
	c.MustConverge()
	nbdinfo := tool(t, "nbdinfo")
	viaProxy := mustRun(t, toolTimeout, nbdinfo, "--map", p.URI())
	direct := mustRun(t, toolTimeout, nbdinfo, "--map", c.MustLeader().URI())
	if viaProxy != direct {
		t.Errorf("nbdinfo --map through the proxy:\n%s\ndirect to the leader:\n%s", viaProxy, direct)
	}
	if !strings.Contains(viaProxy, "data") || !strings.Contains(viaProxy, "hole") {
		t.Errorf("map through the proxy has no data or no hole extents:\n%s", viaProxy)
	}
}
