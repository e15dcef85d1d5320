package main

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
	"github.com/keelstore/keel/services/keeltls"
)

// Each way a person can start keel wrongly gets one line on stderr, "keel:
// " and one sentence naming what is wrong, and a non-zero exit, before
// anything is started. The cases run the real binary.
func TestStartErrorsAreOneSentence(t *testing.T) {
	tmp := t.TempDir()
	file := filepath.Join(tmp, "a-file")
	if err := os.WriteFile(file, []byte("not a directory"), 0o644); err != nil {
		t.Fatal(err)
	}
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	taken := busy.Addr().String()
	// server is a keel server command line with free ports, then extra
	// (a repeated flag's last value wins).
	server := func(dir string, extra ...string) []string {
		return append([]string{"server", "--dir", dir, "--id", "n1", "--bootstrap", "--size", "64M",
			"--raft", keeltest.MustFreeAddr(t), "--http", keeltest.MustFreeAddr(t), "--nbd", keeltest.MustFreeAddr(t)}, extra...)
	}
	dir := func(name string) string { return filepath.Join(tmp, name) }
	nobody := keeltest.MustFreeAddr(t) // nothing listens there
	// A certificate directory whose server key belongs to another node's
	// certificate.
	ca, mixed, other := dir("ca"), dir("tls-mixed"), dir("tls-other")
	if err := keeltls.CreateCA(ca, keeltls.CAOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{mixed, other} {
		if err := keeltls.CreateCert(ca, d, keeltls.CertOptions{Name: filepath.Base(d), Hosts: []string{"127.0.0.1"}}); err != nil {
			t.Fatal(err)
		}
	}
	key, err := os.ReadFile(filepath.Join(other, keeltls.ServerKey))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mixed, keeltls.ServerKey), key, 0o600); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct {
		name string
		args []string
		want string // in the one line
	}{
		{"unknown flag", []string{"server", "--bogus"}, "unknown flag: --bogus (see 'keel server --help')"},
		{"unknown flag of a subcommand", []string{"cluster", "status", "--jsn"}, "unknown flag: --jsn (see 'keel cluster status --help')"},
		{"flag without its value", []string{"verify", "--timeout"}, "flag needs an argument: --timeout (see 'keel verify --help')"},
		{"missing required flags", []string{"server", "--dir", dir("r")}, `required flag(s) "http", "id", "nbd", "raft" not set`},
		{"--dir that cannot be created", server(filepath.Join(file, "node")), "--dir " + filepath.Join(file, "node") + ": cannot create the directory: not a directory"},
		{"--dir that cannot be written", server("/sys"), "--dir /sys: cannot write in the directory: permission denied"},
		{"keel dev --dir that cannot be created", []string{"dev", "--dir", filepath.Join(file, "dev")}, "--dir " + filepath.Join(file, "dev") + ": cannot create the directory: not a directory"},
		{"--http in use", server(dir("h"), "--http", taken), "--http " + taken + ": the address is already in use by another process; stop it or choose another port"},
		{"--raft in use", server(dir("r"), "--raft", taken), "--raft " + taken + ": the address is already in use"},
		{"--nbd in use", server(dir("n"), "--nbd", taken), "--nbd " + taken + ": the address is already in use"},
		{"keel serve --listen in use", []string{"serve", "--file", dir("s.img"), "--size", "1M", "--listen", taken}, "--listen " + taken + ": the address is already in use"},
		{"server size that does not parse", server(dir("z"), "--size", "10Q"), `--size: size "10Q": want a number of bytes, optionally with a suffix K, M, G, T, P or E`},
		{"serve size that does not parse", []string{"serve", "--file", dir("q.img"), "--size", "12zz"}, `--size: size "12zz": want a number of bytes`},
		{"nothing at cluster status --http", []string{"cluster", "status", "--http", nobody}, "--http " + nobody + ": nothing answers there (connection refused)"},
		{"certificate that does not match its key", []string{"serve", "--file", dir("t.img"), "--size", "1M", "--listen", keeltest.MustFreeAddr(t), "--tls-certificates", mixed},
			filepath.Join(mixed, keeltls.ServerKey) + " does not match " + filepath.Join(mixed, keeltls.ServerCert)},
		{"log level", []string{"--log-level", "loud", "serve", "--file", dir("l.img"), "--size", "1M"}, `--log-level "loud": want trace, debug, info, warn or error`},
		{"syslog facility", []string{"--syslog", "--syslog-facility", "LOCAL9", "serve", "--file", dir("f.img"), "--size", "1M"}, `--syslog-facility "LOCAL9": want one of KERN,`},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := keeltest.MustStart(t, keeltest.ProcConfig{Name: "keel " + c.args[0], Args: c.args})
			select {
			case <-p.Done():
			case <-time.After(30 * time.Second):
				t.Fatalf("keel %s still runs after 30s; want it to refuse at once", strings.Join(c.args, " "))
			}
			out := strings.TrimRight(p.Output(), "\n")
			if code := p.ExitCode(); code == 0 || code == -1 {
				t.Errorf("exit status %d, want non-zero", code)
			}
			if strings.Contains(out, "\n") || !strings.HasPrefix(out, "keel: ") {
				t.Errorf("output is not one line starting \"keel: \":\n%s", out)
			}
			if !strings.Contains(out, c.want) {
				t.Errorf("output %q\nwant it to say %q", out, c.want)
			}
			if strings.Contains(out, "upgrade:") || strings.Contains(out, "can't create new listener") {
				t.Errorf("output %q carries the listener's internals", out)
			}
		})
	}
}
