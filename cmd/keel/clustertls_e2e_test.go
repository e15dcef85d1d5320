package main

// Cluster TLS end to end: a cluster of the built binary with --cluster-tls
// on every server and the proxy (keeltest's ClusterConfig.TLS), its
// certificates from keel's own `keel tls` where a test makes its own.
// services/server's TestRaftRefusesStrangers and TestAPIRefusesStrangers
// try every refusal in-process; these show the processes wired the same
// way.

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
	"github.com/keelstore/keel/services/keeltls"
	"github.com/keelstore/keel/services/wire"
)

// TestClusterTLS runs three servers and a proxy over mutual TLS: fio
// writes and verifies through the proxy; a node with a certificate from
// another CA (made with keel tls), or without cluster TLS, cannot join; the CLI without the
// cluster's certificate and a client without a certificate cannot remove a
// member, hand leadership over, write or read the image, and the
// membership is unchanged; a node with the cluster's certificate joins
// (its image pulled over TLS), and keel verify with the cluster's
// certificate finds four identical voters.
func TestClusterTLS(t *testing.T) {
	bin := keeltest.MustBinary(t)
	c := keeltest.MustCluster(t, keeltest.ClusterConfig{
		N: 3, Size: "64M", TLS: true, Flags: []string{"--write-timeout", "60s"},
		UpTimeout: nodeUpTimeout, Timeout: clusterTimeout, StopTimeout: nodeStopTimeout, PollEvery: pollEvery,
	})
	for _, n := range c.Nodes() {
		if out := n.Output(); !strings.Contains(out, "cluster traffic over mutual TLS") || strings.Contains(out, wire.UnsecuredWarning) {
			t.Errorf("%s does not say its cluster traffic is mutual TLS", n.ID)
		}
	}
	lead := c.MustLeader()
	p := c.MustProxy(keeltest.ProxyConfig{Name: "tls"})
	p.MustWaitLog("holding the volume") // the claim goes through Raft after the proxy serves
	if st := p.MustStatus(); !st.Holding || st.Leader == "" {
		t.Errorf("proxy status over TLS: %+v, want holding, with a leader", st)
	}
	f := startFio(t, "proxy-randwrite", p.URI(), "--rw=randwrite", "--bs=4k", "--iodepth=16", "--offset=0", "--size=16M",
		"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0")
	if j := f.wait(t); j.Write.IOBytes != 16*mib || j.Read.IOBytes != 16*mib {
		t.Errorf("fio through the proxy wrote %d and verified %d bytes, want %d each", j.Write.IOBytes, j.Read.IOBytes, 16*mib)
	}

	// A stranger's CA and certificates, made with keel tls.
	tlsDir := t.TempDir()
	otherCA, stranger := filepath.Join(tlsDir, "other-ca"), filepath.Join(tlsDir, "stranger")
	mustRun(t, toolTimeout, bin, "tls", "ca", "create", "--dir", otherCA)
	mustRun(t, toolTimeout, bin, "tls", "cert", "create", "--ca", otherCA, "--dir", stranger, "--name", "n4", "--host", "127.0.0.1")

	members := func() string {
		cs, err := c.Client().Cluster(t.Context(), lead.HTTP)
		if err != nil {
			t.Fatalf("cluster status: %v", err)
		}
		var ids []string
		for _, m := range cs.Members {
			ids = append(ids, m.ID+"/"+m.Suffrage)
		}
		return fmt.Sprint(ids, " leader ", cs.Leader)
	}
	before := members()

	// A node with another CA's certificate, and one without cluster TLS,
	// ask to join and keep being refused.
	for _, s := range []struct{ id, certs, what, says string }{
		{"n4", stranger, "another CA's certificate", "certificate"},
		{"n6", "", "no cluster TLS", "--cluster-tls"},
	} {
		n, err := c.Add(s.id)
		if err != nil {
			t.Fatal(err)
		}
		n.CertDir = s.certs
		if err := n.Start("--join", lead.HTTP); err != nil {
			t.Fatal(err)
		}
		keeltest.MustPoll(t, clusterTimeout, s.id+" ("+s.what+") refused at join", func() (bool, string) {
			return strings.Count(n.Output(), "join failed; retrying") >= 2, lastLine(n.Output())
		})
		if !strings.Contains(n.Output(), s.says) {
			t.Errorf("%s's join failures do not say %q:\n%s", s.id, s.says, n.Output())
		}
		c.MustKill(n)
	}

	// The CLI without the cluster's certificate (plain HTTP to a TLS
	// API), and with the stranger's (it does not trust the cluster).
	for _, args := range [][]string{
		{"cluster", "remove", "n3", "--http", lead.HTTP},
		{"cluster", "transfer-leadership", "--http", lead.HTTP},
		{"cluster", "remove", "n3", "--http", lead.HTTP, "--cluster-tls", stranger},
		{"verify", "--http", lead.HTTP, "--timeout", "5s", "--cluster-tls", stranger},
	} {
		r := run(t, 30*time.Second, bin, args...)
		if r.err == nil {
			t.Errorf("keel %s succeeded without the cluster's certificate:\n%s", strings.Join(args, " "), r.stdout)
		}
		t.Logf("keel %s: %v: %s", strings.Join(args, " "), r.err, strings.TrimSpace(r.stderr))
	}
	// A client that trusts the cluster but has no certificate.
	noCert := wire.NewClient(5*time.Second, keeltestCA(t, c))
	defer noCert.HTTP.CloseIdleConnections()
	write := []byte{1} // never decoded: refused before
	for _, call := range []struct{ method, path string }{
		{"POST", "/v1/cluster/remove"}, {"POST", "/v1/cluster/transfer-leadership"}, {"POST", "/v1/cluster/join"},
		{"POST", "/v1/apply"}, {"GET", "/v1/sync/range?offset=0&length=4096"},
	} {
		req, err := http.NewRequestWithContext(t.Context(), call.method, noCert.BaseURL(lead.HTTP)+call.path, bytes.NewReader(write))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := noCert.HTTP.Do(req)
		if err != nil {
			t.Errorf("%s %s without a client certificate: %v, want 403", call.method, call.path, err)
			continue
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("%s %s without a client certificate: %s, want 403", call.method, call.path, resp.Status)
		}
	}
	if after := members(); after != before {
		t.Errorf("refused calls changed the cluster: before %s, after %s", before, after)
	}

	// A node with the cluster's certificate joins and syncs over TLS.
	c.MustJoin("n5", lead)
	c.MustVoters(lead, []string{"n1", "n2", "n3", "n5"}, nil)
	op, err := c.CertDir("operator")
	if err != nil {
		t.Fatal(err)
	}
	out := mustRun(t, 90*time.Second, bin, "verify", "--http", lead.HTTP, "--timeout", "60s", "--cluster-tls", op)
	if !strings.Contains(out, "OK: 4 voters byte-identical") {
		t.Errorf("keel verify over TLS:\n%s\nwant OK for 4 voters", out)
	}
	status := mustRun(t, 30*time.Second, bin, "cluster", "status", "--http", lead.HTTP, "--cluster-tls", op)
	if strings.Count(status, "Voter") < 4 {
		t.Errorf("keel cluster status over TLS lists fewer than 4 voters:\n%s", status)
	}
}

// keeltestCA is a client TLS configuration that trusts c's CA and has no
// certificate.
func keeltestCA(t *testing.T, c *keeltest.TCluster) *tls.Config {
	t.Helper()
	b, err := keeltls.Load(c.CADir())
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := b.ClientConfig("")
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Certificates) != 0 {
		t.Fatal("the CA's directory holds a client certificate")
	}
	return cfg
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	return s[strings.LastIndex(s, "\n")+1:]
}
