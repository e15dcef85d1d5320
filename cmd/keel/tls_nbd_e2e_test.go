// NBD over TLS end to end: `keel serve --tls require` and a cluster of
// `keel server --tls require` behind a `keel proxy` whose own links to the
// servers run over TLS, driven by real clients (libnbd's nbdinfo, qemu-img
// and qemu-io with a tls-creds-x509 object), with certificates from
// services/keeltls. Plain clients, clients without a certificate and
// clients with a certificate from another CA are refused.

package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
	"github.com/keelstore/keel/services/keeltls"
	"github.com/keelstore/keel/upgrade"
)

// tlsDirs are the certificate directories of one test, in qemu's and
// nbdkit's layout.
type tlsDirs struct {
	node    string // ca-cert.pem, server and client certificates for 127.0.0.1
	caOnly  string // ca-cert.pem alone: trusts the server, shows no certificate
	foreign string // ca-cert.pem of the test's CA, a client certificate of another CA
}

func makeTLSDirs(t *testing.T) tlsDirs {
	t.Helper()
	root := t.TempDir()
	ca, other := filepath.Join(root, "ca"), filepath.Join(root, "other-ca")
	d := tlsDirs{node: filepath.Join(root, "node"), caOnly: filepath.Join(root, "ca-only"), foreign: filepath.Join(root, "foreign")}
	for _, c := range []string{ca, other} {
		if err := keeltls.CreateCA(c, keeltls.CAOptions{Name: filepath.Base(c)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := keeltls.CreateCert(ca, d.node, keeltls.CertOptions{Name: "node", Hosts: []string{"127.0.0.1", "localhost"}}); err != nil {
		t.Fatal(err)
	}
	if err := keeltls.CreateCert(other, d.foreign, keeltls.CertOptions{Name: "stranger", Client: true}); err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(filepath.Join(ca, keeltls.CACert))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(d.caOnly, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{d.caOnly, d.foreign} {
		if err := os.WriteFile(filepath.Join(dir, keeltls.CACert), caPEM, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

// qemuTLS are qemu-img's and qemu-io's arguments for an NBD export at addr
// (HOST:PORT) over TLS with the certificates in dir.
func qemuTLS(addr, dir string) []string {
	host, port, _ := strings.Cut(addr, ":")
	return []string{
		"--object", "tls-creds-x509,id=tls0,dir=" + dir + ",endpoint=client",
		"--image-opts", fmt.Sprintf("driver=nbd,host=%s,port=%s,export=keel,tls-creds=tls0", host, port),
	}
}

// nbdsURI is libnbd's URI for the export at addr over TLS with dir.
func nbdsURI(addr, dir string) string {
	return "nbds://" + addr + "/keel?tls-certificates=" + dir
}

// checkQemuIO runs qemu-io's write and read-back of 64 KiB of 0x5a at
// offset 0 against addr over TLS.
func checkQemuIO(t *testing.T, addr, dir string) {
	t.Helper()
	args := append(qemuTLS(addr, dir), "-c", "write -P 0x5a 0 64k", "-c", "read -P 0x5a 0 64k")
	// qemu-io takes the image last, and --image-opts before it.
	out := mustRun(t, toolTimeout, tool(t, "qemu-io"), args...)
	t.Logf("qemu-io over TLS:\n%s", out)
	if strings.Contains(out, "failed") || strings.Count(out, "wrote 65536/65536") != 1 || strings.Count(out, "read 65536/65536") != 1 {
		t.Errorf("qemu-io over TLS did not write and read back 64 KiB:\n%s", out)
	}
}

// refused runs a client that must fail, and returns what it printed.
func refused(t *testing.T, what, name string, args ...string) string {
	t.Helper()
	r := run(t, toolTimeout, name, args...)
	if r.err == nil {
		t.Errorf("%s: %s succeeded; want it refused\n%s", what, filepath.Base(name), r.stdout)
	}
	return r.stdout + r.stderr
}

// TestServeTLS: keel serve --tls require --tls-verify-peer with nbdinfo,
// qemu-img and qemu-io over TLS; plain, certificate-less and foreign
// clients refused.
func TestServeTLS(t *testing.T) {
	nbdinfo, qemuImg := tool(t, "nbdinfo"), tool(t, "qemu-img")
	d := makeTLSDirs(t)
	image := filepath.Join(t.TempDir(), "disk.img")
	addr := keeltest.MustFreeAddr(t)
	s := &keelServer{t: t, image: image, tcp: addr, name: "keel"}
	s.p = keeltest.MustStart(t, keeltest.ProcConfig{Name: "keel serve", Args: []string{
		"serve", "--file", image, "--size", "16M", "--listen", addr,
		"--tls", "require", "--tls-certificates", d.node, "--tls-verify-peer",
	}})
	t.Cleanup(s.stop)
	s.waitReady() // NBD_OPT_ABORT is answered before TLS too

	if got := strings.TrimSpace(mustRun(t, toolTimeout, nbdinfo, "--size", nbdsURI(addr, d.node))); got != strconv.Itoa(16*mib) {
		t.Errorf("nbdinfo --size over TLS = %s, want %d", got, 16*mib)
	}
	out := mustRun(t, toolTimeout, qemuImg, append([]string{"info"}, qemuTLS(addr, d.node)...)...)
	if !strings.Contains(out, "virtual size: 16 MiB") {
		t.Errorf("qemu-img info over TLS:\n%s", out)
	}
	checkQemuIO(t, addr, d.node)

	// Refusals, each with the server still serving after it.
	if msg := refused(t, "plain client", nbdinfo, "--size", "nbd://"+addr+"/keel"); !strings.Contains(strings.ToLower(msg), "tls") {
		t.Errorf("plain nbdinfo against --tls require: the error does not mention TLS:\n%s", msg)
	}
	refused(t, "client without a certificate", nbdinfo, "--size", nbdsURI(addr, d.caOnly))
	// (gnutls, like Go, sends no certificate the server's list of CAs
	// does not name, so this one is refused as certificate-less; nbd's
	// TestTLSClient has a foreign certificate sent and rejected.)
	refused(t, "client with another CA's certificate", nbdinfo, "--size", nbdsURI(addr, d.foreign))
	refused(t, "qemu-img without a certificate", qemuImg, append([]string{"info"}, qemuTLS(addr, d.caOnly)...)...)
	for _, want := range []string{"plain-text client refused", "TLS handshake failed"} {
		if !strings.Contains(s.p.Output(), want) {
			t.Errorf("keel serve did not log %q", want)
		}
	}
	if got := strings.TrimSpace(mustRun(t, toolTimeout, nbdinfo, "--size", nbdsURI(addr, d.node))); got != strconv.Itoa(16*mib) {
		t.Errorf("nbdinfo after the refusals = %s", got)
	}

	s.stop()
	checkFill(t, "written over TLS", readFile(t, image), 0, 64*kib, 0x5a)
}

// TestProxyTLS: three servers with --tls require --tls-verify-peer, and a
// proxy with --tls-certificates: qemu-io reaches the proxy over TLS, and the
// proxy's reads reach the servers over TLS with its client certificate (a
// plain link would be refused).
func TestProxyTLS(t *testing.T) {
	nbdinfo := tool(t, "nbdinfo")
	d := makeTLSDirs(t)
	c := keeltest.MustCluster(t, keeltest.ClusterConfig{N: 3, Size: "64M",
		Flags: []string{"--tls", "require", "--tls-certificates", d.node, "--tls-verify-peer"}})
	p := startProxy(t, c, "tls", "--tls-certificates", d.node, "--cache", "0")
	if !strings.Contains(p.Output(), "upstream_tls=true") {
		t.Errorf("the proxy does not say its links to the servers use TLS:\n%s", p.Output())
	}

	checkQemuIO(t, p.Listen, d.node)
	if n := p.MustCounter("remote_reads"); n == 0 {
		t.Error("the proxy read nothing from the servers; the upstream TLS links were not exercised")
	}
	refused(t, "plain client of the proxy", nbdinfo, "--size", "nbd://"+p.Listen+"/keel")
	lead := c.MustLeader()
	refused(t, "plain client of a server", nbdinfo, "--size", lead.URI())
	if got := strings.TrimSpace(mustRun(t, toolTimeout, nbdinfo, "--size", nbdsURI(lead.NBD, d.node))); got != strconv.Itoa(64*mib) {
		t.Errorf("nbdinfo over TLS to %s = %s, want %d", lead.ID, got, 64*mib)
	}
}

// TestTLSFlagsRefused: bad TLS flags and certificate directories are one
// clear sentence and a non-zero exit, before anything is served.
func TestTLSFlagsRefused(t *testing.T) {
	d := makeTLSDirs(t)
	mismatched := filepath.Join(t.TempDir(), "mismatched")
	if err := os.MkdirAll(mismatched, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{keeltls.CACert, keeltls.ServerCert} {
		copyFile(t, filepath.Join(d.node, f), filepath.Join(mismatched, f))
	}
	copyFile(t, filepath.Join(d.foreign, keeltls.ClientKey), filepath.Join(mismatched, keeltls.ServerKey))
	empty := t.TempDir()
	image := filepath.Join(t.TempDir(), "disk.img")
	serve := []string{"serve", "--file", image, "--size", "1M", "--listen", keeltest.MustFreeAddr(t)}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"require without certificates", []string{"--tls", "require"}, "--tls require needs --tls-certificates DIR"},
		{"bad mode", []string{"--tls", "maybe"}, `--tls "maybe": must be off, on or require`},
		{"verify-peer without certificates", []string{"--tls-verify-peer"}, "--tls-verify-peer needs --tls-certificates DIR"},
		{"empty directory", []string{"--tls-certificates", empty}, keeltls.CACert},
		{"no server certificate", []string{"--tls-certificates", d.caOnly}, "has no server-cert.pem and server-key.pem"},
		{"key that does not match", []string{"--tls-certificates", mismatched}, keeltls.ServerKey},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := run(t, toolTimeout, keelBin(t), append(serve, tc.args...)...)
			msg := strings.TrimSpace(r.stderr)
			if r.err == nil {
				t.Fatalf("keel serve %v exited 0", tc.args)
			}
			if !strings.Contains(msg, tc.want) || strings.Count(msg, "\n") > 0 {
				t.Errorf("keel serve %v: stderr %q, want one line with %q", tc.args, msg, tc.want)
			}
		})
	}
	r := run(t, toolTimeout, keelBin(t), "proxy", "--servers", "127.0.0.1:1", "--upstream-tls")
	if r.err == nil || !strings.Contains(r.stderr, "--upstream-tls needs --tls-certificates DIR") {
		t.Errorf("keel proxy --upstream-tls without a directory: %v %q", r.err, r.stderr)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestServeUpgradeTLS: a TLS connection cannot be handed to the new
// process (its session keys stay in the old one), so at each upgrade of
// `keel serve --tls require` it is drained and closed, and qemu-io
// (reconnect-delay set) reconnects over TLS to the new process: every
// write it was told of is read back, none fails.
func TestServeUpgradeTLS(t *testing.T) {
	d := makeTLSDirs(t)
	dir := t.TempDir()
	bin := filepath.Join(dir, "keel")
	installBinary(t, keeltest.MustBinary(t), bin)
	pidFile, img, listen := filepath.Join(dir, "serve.pid"), filepath.Join(dir, "disk.img"), keeltest.MustFreeAddr(t)
	logPath := filepath.Join(dir, "serve.log")
	first := startUpgradable(t, "serve", bin, logPath, "serve", "--file", img, "--size", "16M", "--listen", listen,
		"--pid-file", pidFile, "--tls-certificates", d.node)
	keeltest.MustPoll(t, 30*time.Second, "keel serve writes its pid file", func() (bool, string) {
		pid, err := upgrade.ReadPID(pidFile)
		return err == nil && pid == first.Pid(), fmt.Sprint(err)
	})
	p := &upgradeProxy{bin: bin, pidFile: pidFile, listen: listen, log: logPath, first: first}
	t.Cleanup(func() {
		if pid, err := upgrade.ReadPID(pidFile); err == nil && pid != first.Pid() {
			_ = syscall.Kill(pid, syscall.SIGTERM)
		}
		if t.Failed() {
			t.Logf("keel serve log (every generation):\n%s", p.output())
		}
	})

	host, port, _ := strings.Cut(listen, ":")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	q := &qemuSession{t: t}
	q.cmd = exec.CommandContext(ctx, tool(t, "qemu-io"),
		"--object", "tls-creds-x509,id=tls0,dir="+d.node+",endpoint=client", "--image-opts",
		"driver=nbd,server.type=inet,server.host="+host+",server.port="+port+",export=keel,tls-creds=tls0,reconnect-delay=30")
	q.cmd.Stdout, q.cmd.Stderr = q, q
	var err error
	if q.stdin, err = q.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := q.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); _ = q.cmd.Wait() })
	// do is qemuSession.do, except that a reconnect is expected here.
	do := func(cmd, want string) {
		t.Helper()
		n := strings.Count(q.output(), want) + 1
		if _, err := fmt.Fprintln(q.stdin, cmd); err != nil {
			t.Fatalf("qemu-io %q: %v\n%s", cmd, err, q.output())
		}
		keeltest.MustPoll(t, 60*time.Second, "qemu-io "+cmd, func() (bool, string) {
			o := q.output()
			for _, bad := range []string{"error", "failed", "pattern verification"} {
				if strings.Contains(strings.ToLower(o), bad) {
					t.Fatalf("qemu-io %q: %s\n%s", cmd, bad, o)
				}
			}
			return strings.Count(o, want) >= n, o
		})
	}
	for i := range 3 {
		pat := fmt.Sprintf("0x%02x", 0x60+i)
		do(fmt.Sprintf("write -P %s %dk 64k", pat, 64*i), "wrote 65536/65536")
		if r := p.upgrade(t); r.err != nil {
			t.Fatalf("upgrade %d: %v\n%s", i+1, r.err, r.stderr)
		}
		do(fmt.Sprintf("read -P %s %dk 64k", pat, 64*i), "read 65536/65536")
	}
	for i := range 3 {
		do(fmt.Sprintf("read -P 0x%02x %dk 64k", 0x60+i, 64*i), "read 65536/65536")
	}
	fmt.Fprintln(q.stdin, "quit")
	q.stdin.Close()
	if err := q.cmd.Wait(); err != nil {
		t.Fatalf("qemu-io: %v\n%s", err, q.output())
	}
	out := p.output()
	if n := strings.Count(out, "TLS connection drained for the handover and closed"); n != 3 {
		t.Errorf("%d upgrades drained qemu-io's TLS connection, want 3", n)
	}
	if n := strings.Count(out, "connections quiesced for handover: count=0"); n != 3 {
		t.Errorf("%d upgrades handed over no connection, want 3 (a TLS connection is never handed over)", n)
	}
}

// TestServerUpgradeTLS upgrades each server of a cluster that requires
// TLS with verified peers on NBD once, leader first, while fio writes and
// verifies through a proxy whose reads reach the servers over TLS: the
// proxy's TLS links to an upgraded server are drained and closed (never
// handed over) and it reads elsewhere or reconnects; fio sees no error and
// every block verifies.
func TestServerUpgradeTLS(t *testing.T) {
	d := makeTLSDirs(t)
	c := newUpgradeCluster(t, keeltest.MustBinary(t), "--tls", "require", "--tls-certificates", d.node, "--tls-verify-peer")
	p := c.MustProxy(keeltest.ProxyConfig{Name: "vm1", Flags: []string{"--tls-certificates", d.node, "--tls", "off", "--cache", "0"}})
	fio := startFio(t, "server-upgrades-tls", p.URI(), "--rw=randwrite", "--bs=4k", "--size=8M", "--iodepth=8",
		"--verify=crc32c", "--verify_backlog=256", "--verify_state_save=0", "--loops=1000", "--time_based", "--runtime=20s")
	keeltest.MustPoll(t, 60*time.Second, "fio writes and reads through the proxy", func() (bool, string) {
		st, err := proxyStatusAt(t, p.HTTP)
		return err == nil && st.Counters["writes"] > 0 && st.Counters["remote_reads"] > 0, fmt.Sprint(st.Counters, err)
	})
	lead := c.MustLeader(c.Nodes()...)
	order := []*keeltest.Node{lead}
	for _, n := range c.Nodes() {
		if n != lead {
			order = append(order, n)
		}
	}
	drained := 0
	for _, n := range order {
		if r := c.upgrade(t, n, keeltest.MustBinary(t)); r.err != nil {
			t.Fatalf("%s (leader %v): %v\n%s%s", n.ID, n == lead, r.err, r.stdout, r.stderr)
		}
		c.caughtUp(t, n)
		b, _ := os.ReadFile(c.path(n, ".log"))
		drained += strings.Count(string(b), "TLS connection drained for the handover and closed")
		select {
		case <-fio.done:
			t.Fatalf("fio ended before the upgrade of %s", n.ID)
		default:
		}
	}
	if drained == 0 {
		t.Error("no server drained a TLS connection of the proxy at its upgrade; the test did not exercise it")
	}
	j := fio.wait(t)
	if j.Read.IOBytes == 0 {
		t.Error("fio verified nothing")
	}
	c.MustConverge(c.Nodes()...)
}
