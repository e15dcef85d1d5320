package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keelstore/keel/services/keeltls"
)

// keel runs the command line in-process and returns its output and error.
func keel(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRoot()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

// keel tls makes a CA and certificates a server, a proxy and the CLI
// load; each mistake is one clear error and nothing is overwritten.
func TestTLSCommands(t *testing.T) {
	dir := t.TempDir()
	ca, n1, cli := filepath.Join(dir, "ca"), filepath.Join(dir, "n1"), filepath.Join(dir, "cli")
	if _, err := keel(t, "tls", "ca", "create", "--dir", ca, "--name", "test CA", "--days", "30"); err != nil {
		t.Fatal(err)
	}
	if _, err := keel(t, "tls", "cert", "create", "--ca", ca, "--dir", n1, "--name", "n1", "--host", "127.0.0.1", "--host", "n1.example.com"); err != nil {
		t.Fatal(err)
	}
	if _, err := keel(t, "tls", "cert", "create", "--ca", ca, "--dir", cli, "--name", "admin", "--client"); err != nil {
		t.Fatal(err)
	}
	ct, err := loadClusterTLS(n1)
	if err != nil || ct.Validate() != nil {
		t.Fatalf("a node's directory does not load for a server: %v", err)
	}
	// The server certificate must name the hosts peers dial.
	for addr, ok := range map[string]bool{"127.0.0.1:7001": true, "n1.example.com:7001": true, ":7001": true, "0.0.0.0:7001": true,
		"10.9.9.9:7001": false, "n2.example.com:7001": false} {
		err := checkCertHosts(ct, n1, map[string]string{"--raft": addr})
		if ok && err != nil || !ok && (err == nil || !strings.Contains(err.Error(), "--host "+strings.Split(addr, ":")[0])) {
			t.Errorf("--raft %s with a certificate for 127.0.0.1, n1.example.com: %v", addr, err)
		}
	}
	if _, err := loadClusterTLS(cli); err == nil || !strings.Contains(err.Error(), keeltls.ServerCert) {
		t.Errorf("a client-only directory for a server: %v, want an error naming %s", err, keeltls.ServerCert)
	}
	if tc, err := loadClientTLS(cli); err != nil || len(tc.Certificates) != 1 {
		t.Errorf("the client directory does not load for the CLI: %v", err)
	}
	if _, err := loadClientTLS(ca); err == nil || !strings.Contains(err.Error(), keeltls.ClientCert) {
		t.Errorf("a directory without a client certificate for the CLI: %v, want an error naming %s", err, keeltls.ClientCert)
	}
	caCert, err := os.ReadFile(filepath.Join(ca, keeltls.CACert))
	if err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"the CA again", []string{"tls", "ca", "create", "--dir", ca}, "already exists"},
		{"a node's certificates again", []string{"tls", "cert", "create", "--ca", ca, "--dir", n1, "--name", "n1", "--host", "127.0.0.1"}, "already exists"},
		{"no CA in --ca", []string{"tls", "cert", "create", "--ca", filepath.Join(dir, "none"), "--dir", filepath.Join(dir, "x"), "--name", "x", "--host", "127.0.0.1"}, "no CA there"},
		{"a host that is neither", []string{"tls", "cert", "create", "--ca", ca, "--dir", filepath.Join(dir, "y"), "--name", "y", "--host", "not a host!"}, "neither an IP address nor a DNS name"},
		{"a server certificate without a host", []string{"tls", "cert", "create", "--ca", ca, "--dir", filepath.Join(dir, "z"), "--name", "z", "--server"}, "needs at least one host"},
		{"no days", []string{"tls", "ca", "create", "--dir", filepath.Join(dir, "ca2"), "--days", "0"}, "--days 0"},
		{"a missing --dir", []string{"tls", "ca", "create"}, `"dir" not set`},
	} {
		_, err := keel(t, c.args...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error with %q", c.name, err, c.want)
		}
	}
	if now, err := os.ReadFile(filepath.Join(ca, keeltls.CACert)); err != nil || !bytes.Equal(now, caCert) {
		t.Errorf("the CA's certificate changed after a refused create (%v)", err)
	}
	for _, d := range []string{"x", "y", "z", "ca2"} {
		if _, err := os.Stat(filepath.Join(dir, d)); err == nil {
			if ents, _ := os.ReadDir(filepath.Join(dir, d)); len(ents) > 0 {
				t.Errorf("a refused create left files in %s", d)
			}
		}
	}
}

// keel dev makes its CA and certificates once and reuses them: a second
// run on the same directory changes nothing, and every child's directory
// loads (servers and proxy with both kinds, the CLI's with a client
// certificate).
func TestDevCertsMadeOnce(t *testing.T) {
	dir := t.TempDir()
	first, err := makeDevCerts(dir)
	if err != nil {
		t.Fatal(err)
	}
	read := func() map[string]string {
		files := map[string]string{}
		_ = filepath.WalkDir(filepath.Join(dir, "tls"), func(p string, d os.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				b, _ := os.ReadFile(p)
				files[p] = string(b)
			}
			return nil
		})
		return files
	}
	before := read()
	if len(before) == 0 {
		t.Fatal("keel dev made no certificates")
	}
	second, err := makeDevCerts(dir)
	if err != nil {
		t.Fatalf("a second run on the same directory: %v", err)
	}
	after := read()
	if len(after) != len(before) || second.cli != first.cli {
		t.Errorf("a second run changed the certificates: %d files, then %d", len(before), len(after))
	}
	for p, b := range before {
		if after[p] != b {
			t.Errorf("a second run rewrote %s", p)
		}
	}
	for _, name := range []string{"n1", "n2", "n3", "proxy"} {
		if _, err := loadClusterTLS(second.dir(name)); err != nil {
			t.Errorf("keel dev's %s: %v", name, err)
		}
	}
	if _, err := loadClientTLS(second.cli); err != nil {
		t.Errorf("keel dev's CLI certificate: %v", err)
	}
	var insecure *devCerts
	if insecure.dir("n1") != "" || !strings.Contains(insecure.howTo(), "NOT") {
		t.Error("--insecure: want no --cluster-tls and a warning in the instructions")
	}
}
