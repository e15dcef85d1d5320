package main

// End-to-end tests of `keel upgrade` on servers: each server of a
// three-node cluster is replaced in place, the leader handing leadership
// over first, while fio verifies through a proxy and a qemu-io session
// holds a connection to a server's own NBD port; broken binaries are
// refused and the node stays in the cluster.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
	"github.com/keelstore/keel/upgrade"
)

// serverWrapper starts each node from its own copy of the binary,
// UPGRADE_DIR/ID.keel, with a pid file and every generation's output
// appended straight to UPGRADE_DIR/ID.log (an upgraded process outlives
// the harness's pipe of its first ancestor). Anything else (the proxy)
// runs $KEEL_BIN as it is.
const serverWrapper = `#!/bin/sh
[ "$1" = server ] || exec "$KEEL_BIN" "$@"
id= prev=
for a in "$@"; do [ "$prev" = --id ] && id=$a; prev=$a; done
exec "$UPGRADE_DIR/$id.keel" "$@" --pid-file "$UPGRADE_DIR/$id.pid" >>"$UPGRADE_DIR/$id.log" 2>&1
`

// upgradeCluster is a cluster whose servers can be upgraded.
type upgradeCluster struct {
	*keeltest.TCluster
	dir string
}

func newUpgradeCluster(t testing.TB, bin string, flags ...string) *upgradeCluster {
	t.Helper()
	return newUpgradeClusterTLS(t, bin, false, flags...)
}

// newUpgradeClusterTLS is newUpgradeCluster, with cluster TLS when tls.
func newUpgradeClusterTLS(t testing.TB, bin string, tls bool, flags ...string) *upgradeCluster {
	t.Helper()
	dir := t.TempDir()
	wrapper := filepath.Join(dir, "keel-server.sh")
	if err := os.WriteFile(wrapper, []byte(serverWrapper), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"n1", "n2", "n3"} {
		installBinary(t, bin, filepath.Join(dir, id+".keel"))
	}
	// A race-enabled binary sleeps 1s at exit by default: every upgrade
	// (the old process's exit, keel upgrade's own) would pay it.
	t.Setenv("GORACE", strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	u := &upgradeCluster{dir: dir}
	t.Cleanup(func() { u.cleanup(t) }) // runs after the cluster's own cleanup has killed the first generations
	u.TCluster = keeltest.MustCluster(t, keeltest.ClusterConfig{
		Bin: wrapper, N: 3, Size: "32M", Env: []string{"UPGRADE_DIR=" + dir, "KEEL_BIN=" + keeltest.MustBinary(t)}, TLS: tls,
		Flags:     append([]string{"--write-timeout", "60s"}, flags...),
		UpTimeout: nodeUpTimeout, Timeout: clusterTimeout, StopTimeout: nodeStopTimeout, PollEvery: pollEvery,
	})
	return u
}

func (u *upgradeCluster) path(n *keeltest.Node, ext string) string {
	return filepath.Join(u.dir, n.ID+ext)
}

func (u *upgradeCluster) pid(t testing.TB, n *keeltest.Node) int {
	t.Helper()
	pid, err := upgrade.ReadPID(u.path(n, ".pid"))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// upgrade installs bin as n's binary and runs `keel upgrade` on n.
func (u *upgradeCluster) upgrade(t *testing.T, n *keeltest.Node, bin string) result {
	t.Helper()
	installBinary(t, bin, u.path(n, ".keel"))
	return run(t, 2*time.Minute, keeltest.MustBinary(t), "upgrade", "--pid-file", u.path(n, ".pid"), "--timeout", "90s")
}

// cleanup stops the generations the harness did not start, then checks
// every log for a crash.
func (u *upgradeCluster) cleanup(t testing.TB) {
	for _, id := range []string{"n1", "n2", "n3"} {
		pidFile := filepath.Join(u.dir, id+".pid")
		if pid, err := upgrade.ReadPID(pidFile); err == nil && upgrade.Alive(pid) {
			_ = syscall.Kill(pid, syscall.SIGTERM)
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			if err := keeltest.Poll(ctx, 60*time.Second, 50*time.Millisecond, id+" stops", func() (bool, string, error) {
				return !upgrade.Alive(pid), "", nil
			}); err != nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
				t.Error(err)
			}
			cancel()
		}
		b, _ := os.ReadFile(filepath.Join(u.dir, id+".log"))
		out := string(b)
		if lines := keeltest.CrashLines(out); len(lines) > 0 {
			t.Errorf("%s log shows a crash:\n%s", id, strings.Join(lines, "\n"))
		}
		if t.Failed() {
			t.Logf("%s log (every generation):\n%s", id, out[max(0, len(out)-keeltest.MaxLogDump):])
		}
	}
}

// caughtUp waits until n follows the leader among the nodes (or leads) and
// has applied what the leader had applied when the wait began.
func (u *upgradeCluster) caughtUp(t testing.TB, n *keeltest.Node) {
	t.Helper()
	lead := u.MustLeader(u.Nodes()...)
	target := u.MustStatus(lead).AppliedIndex
	keeltest.MustPoll(t, clusterTimeout, n.ID+" caught up", func() (bool, string) {
		st, err := n.Status(t.Context())
		if err != nil {
			return false, err.Error()
		}
		syncing := st.Sync != nil && st.Sync.Active
		member := st.State == "Leader" || st.State == "Follower" && st.Leader != ""
		return member && st.AppliedIndex >= target && !syncing, fmt.Sprintf("%s leader %q applied %d/%d", st.State, st.Leader, st.AppliedIndex, target)
	})
}

// TestServerUpgradeUnderLoad upgrades each server of a three-node cluster
// 5 times, leader first in each round, alternating between two builds of
// different versions, while fio writes and verifies through a proxy: no
// I/O error, every block verified, each upgrade a new process of the other
// version, and keel verify finds the replicas identical at the end.
func TestServerUpgradeUnderLoad(t *testing.T) {
	binA := keeltest.MustBinary(t)
	binB := buildVersion(t, "upgrade-b")
	c := newUpgradeCluster(t, binA)
	p := c.MustProxy(keeltest.ProxyConfig{Name: "vm1"})
	runtime := "30s" // 15 upgrades take 5-10s here, 20-30s with -race
	if os.Getenv(keeltest.EnvRace) == "1" {
		runtime = "60s"
	}
	fio := startFio(t, "server-upgrades", p.URI(), "--rw=randwrite", "--bs=4k", "--size=8M", "--iodepth=8",
		"--verify=crc32c", "--verify_backlog=256", "--verify_state_save=0", "--loops=1000", "--time_based", "--runtime="+runtime)
	keeltest.MustPoll(t, 60*time.Second, "fio writes through the proxy", func() (bool, string) {
		st, err := proxyStatusAt(t, p.HTTP)
		return err == nil && st.Counters["writes"] > 0, fmt.Sprint(st.Counters, err)
	})
	bins := []string{binB, binA}
	versions := []string{"upgrade-b", "dev"}
	count := map[string]int{}
	for round := range 5 {
		lead := c.MustLeader(c.Nodes()...)
		order := []*keeltest.Node{lead}
		for _, n := range c.Nodes() {
			if n != lead {
				order = append(order, n)
			}
		}
		for _, n := range order {
			i := count[n.ID]
			count[n.ID]++
			before := c.pid(t, n)
			start := time.Now()
			r := c.upgrade(t, n, bins[i%2])
			if r.err != nil {
				t.Fatalf("round %d, %s (leader %v): %v\n%s%s", round+1, n.ID, n == lead, r.err, r.stdout, r.stderr)
			}
			if want := "(version " + versions[i%2] + ")"; !strings.Contains(r.stdout, want) {
				t.Fatalf("round %d, %s: keel upgrade reported %q, want %s", round+1, n.ID, r.stdout, want)
			}
			if after := c.pid(t, n); after == before || !upgrade.Alive(after) {
				t.Fatalf("round %d, %s: pid file names %d (was %d)", round+1, n.ID, after, before)
			}
			if v := c.MustStatus(n).Version; v != versions[i%2] {
				t.Fatalf("round %d, %s reports version %q, want %q", round+1, n.ID, v, versions[i%2])
			}
			took := time.Since(start)
			c.caughtUp(t, n) // the next upgrade must not take a second node out of the quorum
			t.Logf("round %d: upgraded %s (leader %v) in %v, caught up after %v: %s", round+1, n.ID, n == lead, took.Round(time.Millisecond),
				time.Since(start).Round(time.Millisecond), strings.TrimSpace(r.stdout))
			select {
			case <-fio.done:
				t.Fatalf("fio ended during round %d, before the last upgrade", round+1)
			default:
			}
		}
	}
	j := fio.wait(t)
	if j.Read.IOBytes == 0 {
		t.Error("fio verified nothing")
	}
	c.MustConverge(c.Nodes()...)
	verifyOK(t, c.Nodes()[0], "n1", "n2", "n3")
}

// TestServerUpgradeClusterTLS upgrades each server of a cluster with cluster TLS
// once, leader first, while fio writes and verifies through a proxy: the
// new process inherits the Raft listener and serves Raft and the API over
// TLS as the old one did.
func TestServerUpgradeClusterTLS(t *testing.T) {
	binA := keeltest.MustBinary(t)
	binB := buildVersion(t, "upgrade-b")
	c := newUpgradeClusterTLS(t, binA, true)
	p := c.MustProxy(keeltest.ProxyConfig{Name: "vm1"})
	fio := startFio(t, "server-upgrades-tls", p.URI(), "--rw=randwrite", "--bs=4k", "--size=8M", "--iodepth=8",
		"--verify=crc32c", "--verify_backlog=256", "--verify_state_save=0", "--loops=1000", "--time_based", "--runtime=25s")
	keeltest.MustPoll(t, 60*time.Second, "fio writes through the proxy", func() (bool, string) {
		n, err := p.Counter(t.Context(), "writes")
		return err == nil && n > 0, fmt.Sprint(n, err)
	})
	lead := c.MustLeader(c.Nodes()...)
	order := []*keeltest.Node{lead}
	for _, n := range c.Nodes() {
		if n != lead {
			order = append(order, n)
		}
	}
	for _, n := range order {
		before := c.pid(t, n)
		r := c.upgrade(t, n, binB)
		if r.err != nil {
			t.Fatalf("%s (leader %v): %v\n%s%s", n.ID, n == lead, r.err, r.stdout, r.stderr)
		}
		if after := c.pid(t, n); after == before || !upgrade.Alive(after) {
			t.Fatalf("%s: pid file names %d (was %d)", n.ID, after, before)
		}
		if v := c.MustStatus(n).Version; v != "upgrade-b" {
			t.Fatalf("%s reports version %q after the upgrade, want upgrade-b", n.ID, v)
		}
		c.caughtUp(t, n)
		t.Logf("upgraded %s (leader %v): %s", n.ID, n == lead, strings.TrimSpace(r.stdout))
	}
	writes := p.MustCounter("writes")
	keeltest.MustPoll(t, 60*time.Second, "fio writes after the last upgrade", func() (bool, string) {
		n, err := p.Counter(t.Context(), "writes")
		return err == nil && n > writes+100, fmt.Sprint(n, err)
	})
	select {
	case <-fio.done:
		t.Fatal("fio ended before the last upgrade was done")
	default:
	}
	j := fio.wait(t)
	if j.Read.IOBytes == 0 {
		t.Error("fio verified nothing")
	}
	c.MustConverge(c.Nodes()...)
	verifyOK(t, c.Nodes()[0], "n1", "n2", "n3")
}

// TestServerUpgradeRefusesBrokenBinary: on the leader, a binary that exits
// at start, hangs before ready, or dies right after ready (once the parent
// has released its stores, which it must then open again) is refused: the
// old process keeps running, stays in the cluster and serves, and a
// qemu-io session on that server's own NBD port keeps working throughout,
// and across two good upgrades after them.
func TestServerUpgradeRefusesBrokenBinary(t *testing.T) {
	binA := keeltest.MustBinary(t)
	binB := buildVersion(t, "upgrade-b")
	crash := filepath.Join(t.TempDir(), "crashchild")
	if r := run(t, 3*time.Minute, "go", "build", "-o", crash, "../../upgrade/upgradetest/crashchild"); r.err != nil {
		t.Fatalf("building crashchild: %v\n%s", r.err, r.stderr)
	}
	c := newUpgradeCluster(t, binA, "--upgrade-timeout", "5s")
	dir := t.TempDir()
	exits := filepath.Join(dir, "exits")
	hangs := filepath.Join(dir, "hangs")
	if err := os.WriteFile(exits, []byte("#!/bin/sh\necho broken build >&2\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(hangs, []byte("#!/bin/sh\nexec sleep 600\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	n := c.MustLeader(c.Nodes()...)
	q := startQemuSession(t, n.NBD)
	q.do("write -P 0x5a 0 64k", "wrote 65536/65536")
	before := c.pid(t, n)
	for i, tc := range []struct{ name, bin, want string }{
		{"exits at start", exits, "exit status 3"},
		{"hangs before ready", hangs, "timed out"},
		{"dies right after ready", crash, "exit status 3"},
	} {
		r := c.upgrade(t, n, tc.bin)
		if r.err == nil || !strings.Contains(r.stderr, tc.want) {
			t.Fatalf("%s: keel upgrade = %v, stderr %q; want a failure mentioning %q", tc.name, r.err, r.stderr, tc.want)
		}
		if now := c.pid(t, n); now != before || !upgrade.Alive(before) {
			t.Fatalf("%s: pid file names %d, old process %d alive=%v", tc.name, now, before, upgrade.Alive(before))
		}
		c.caughtUp(t, n)
		if v := c.MustStatus(n).Version; v != "dev" {
			t.Fatalf("%s: the node reports version %q, want dev", tc.name, v)
		}
		pat := fmt.Sprintf("0x%02x", 0x10+i)
		q.do("read -P 0x5a 0 64k", "read 65536/65536")
		q.do("write -P "+pat+" 1M 64k", "wrote 65536/65536")
		q.do("read -P "+pat+" 1M 64k", "read 65536/65536")
		t.Logf("%s: refused: %s", tc.name, strings.TrimSpace(r.stderr))
	}
	for i, bin := range []string{binB, binA} {
		if r := c.upgrade(t, n, bin); r.err != nil {
			t.Fatalf("good binary %d after the broken ones: %v\n%s", i+1, r.err, r.stderr)
		}
		c.caughtUp(t, n)
		pat := fmt.Sprintf("0x%02x", 0x30+i)
		q.do("read -P 0x5a 0 64k", "read 65536/65536")
		q.do("write -P "+pat+" 2M 64k", "wrote 65536/65536")
		q.do("read -P "+pat+" 2M 64k", "read 65536/65536")
	}
	q.close()
	log, _ := os.ReadFile(c.path(n, ".log"))
	got := 0
	for _, l := range strings.Split(string(log), "\n") {
		if strings.Contains(l, "connections quiesced for handover:") && strings.HasSuffix(l, " count=1") {
			got++
		}
	}
	if got != 3 {
		t.Errorf("%d handovers carried qemu-io's connection, want 3 (one taken back from the child that died, two upgrades)", got)
	}
	if !strings.Contains(string(log), "opening it again") {
		t.Error("the parent never reopened its node after the child died past ready")
	}
	c.MustConverge(c.Nodes()...)
	verifyOK(t, c.Nodes()[0], "n1", "n2", "n3")
}
