package keeltls

import (
	"crypto/tls"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func mustCA(t *testing.T, name string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	if err := CreateCA(dir, CAOptions{Name: name}); err != nil {
		t.Fatal(err)
	}
	return dir
}

func mustNode(t *testing.T, ca string, opts CertOptions) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "node")
	if err := CreateCert(ca, dir, opts); err != nil {
		t.Fatal(err)
	}
	return dir
}

// handshake runs a TLS handshake over loopback TCP and returns the
// server's view of the client's name (if any), the client's error and the
// server's. The client reads one byte the server sends after a good
// handshake, so a refusal the server sends after TLS 1.3's client-side
// handshake has finished still reaches it.
func handshake(t *testing.T, srv, cli *tls.Config) (string, error, error) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	type res struct {
		name string
		err  error
	}
	done := make(chan res, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			done <- res{"", err}
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		s := tls.Server(c, srv)
		err = s.Handshake()
		st := s.ConnectionState()
		name, _ := Peer(&st)
		if err == nil {
			_, err = s.Write([]byte{1})
		}
		done <- res{name, err}
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Client(c, cli)
	cerr := tc.Handshake()
	if cerr == nil {
		_, cerr = tc.Read(make([]byte, 1))
	}
	tc.Close()
	r := <-done
	return r.name, cerr, r.err
}

func TestMutualTLS(t *testing.T) {
	ca := mustCA(t, "ca")
	n1 := mustNode(t, ca, CertOptions{Name: "n1", Hosts: []string{"127.0.0.1", "n1.example"}})
	n2 := mustNode(t, ca, CertOptions{Name: "n2", Hosts: []string{"127.0.0.1"}})
	b1, err := Load(n1)
	if err != nil {
		t.Fatal(err)
	}
	b2, err := Load(n2)
	if err != nil {
		t.Fatal(err)
	}
	if !b1.HasServer() || !b1.HasClient() {
		t.Fatalf("neither kind asked: want both, got server %v client %v", b1.HasServer(), b1.HasClient())
	}
	srv, err := b1.ServerConfig(tls.RequireAndVerifyClientCert)
	if err != nil {
		t.Fatal(err)
	}
	cli, _ := b2.ClientConfig("n1.example")
	name, cerr, serr := handshake(t, srv, cli)
	if cerr != nil || serr != nil {
		t.Fatalf("handshake: client %v, server %v", cerr, serr)
	}
	if name != "n2" {
		t.Fatalf("server sees client %q, want n2", name)
	}

	// A client of another CA is refused by the server, and a client that
	// trusts another CA refuses the server.
	other := mustNode(t, mustCA(t, "other"), CertOptions{Name: "intruder", Hosts: []string{"127.0.0.1"}})
	bo, err := Load(other)
	if err != nil {
		t.Fatal(err)
	}
	ocli, _ := bo.ClientConfig("n1.example")
	if _, _, serr := handshake(t, srv, ocli); serr == nil {
		t.Fatal("server accepted a client whose certificate another CA signed")
	}
	// No client certificate at all.
	bare, _ := b2.ClientConfig("n1.example")
	bare.Certificates = nil
	if _, _, serr := handshake(t, srv, bare); serr == nil {
		t.Fatal("server that requires a client certificate accepted none")
	}
	// Optional client certificates: none is fine, a bad one is not.
	opt, _ := b1.ServerConfig(tls.VerifyClientCertIfGiven)
	if name, cerr, serr := handshake(t, opt, bare); cerr != nil || serr != nil || name != "" {
		t.Fatalf("optional client cert, none given: name %q client %v server %v", name, cerr, serr)
	}
	// The wrong host name.
	wrong, _ := b2.ClientConfig("n2.example")
	if _, cerr, _ := handshake(t, srv, wrong); cerr == nil {
		t.Fatal("client accepted a server certificate for another name")
	}
}

func TestCreateRefusesToOverwrite(t *testing.T) {
	ca := mustCA(t, "ca")
	if err := CreateCA(ca, CAOptions{}); !errors.Is(err, ErrExists) {
		t.Fatalf("second CreateCA: %v, want ErrExists", err)
	}
	out := mustNode(t, ca, CertOptions{Name: "n1", Hosts: []string{"localhost"}, Server: true})
	if err := CreateCert(ca, out, CertOptions{Name: "n1", Hosts: []string{"localhost"}, Server: true}); !errors.Is(err, ErrExists) {
		t.Fatalf("second CreateCert: %v, want ErrExists", err)
	}
	// Adding the client pair to a server-only directory is fine.
	if err := CreateCert(ca, out, CertOptions{Name: "n1", Client: true}); err != nil {
		t.Fatal(err)
	}
	// But not with another CA.
	if err := CreateCert(mustCA(t, "other"), filepath.Join(out), CertOptions{Name: "x", Client: true}); !errors.Is(err, ErrExists) {
		t.Fatalf("other CA into the same dir: %v, want ErrExists", err)
	}
	if st, err := os.Stat(filepath.Join(ca, CAKey)); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("CA key mode: %v %v", st.Mode(), err)
	}
}

func TestCertOptionsRefused(t *testing.T) {
	ca := mustCA(t, "ca")
	for _, tc := range []struct {
		opts CertOptions
		want string
	}{
		{CertOptions{Hosts: []string{"127.0.0.1"}}, "needs a name"},
		{CertOptions{Name: "n1"}, "needs at least one host"},
		{CertOptions{Name: "n1", Hosts: []string{"bad host!"}}, "neither an IP address nor a DNS name"},
		{CertOptions{Name: "n1", Hosts: []string{"-x.example"}}, "neither an IP address nor a DNS name"},
		{CertOptions{Name: "n1", Hosts: []string{"::1"}, Validity: -time.Hour}, "negative"},
	} {
		err := CreateCert(ca, filepath.Join(t.TempDir(), "out"), tc.opts)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.opts, err, tc.want)
		}
	}
	if err := CreateCert(filepath.Join(t.TempDir(), "none"), t.TempDir(), CertOptions{Name: "n1", Client: true}); err == nil || !strings.Contains(err.Error(), "keel tls ca create") {
		t.Errorf("missing CA: %v", err)
	}
}

func TestLoadRefusesBrokenDirectories(t *testing.T) {
	ca := mustCA(t, "ca")
	other := mustCA(t, "other")
	good := mustNode(t, ca, CertOptions{Name: "n1", Hosts: []string{"127.0.0.1"}})
	foreign := mustNode(t, other, CertOptions{Name: "n9", Hosts: []string{"127.0.0.1"}})

	copyDir := func(t *testing.T, src string) string {
		dst := t.TempDir()
		for _, n := range []string{CACert, ServerCert, ServerKey, ClientCert, ClientKey} {
			b, err := os.ReadFile(filepath.Join(src, n))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dst, n), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		return dst
	}
	cp := func(t *testing.T, from, name, to string) {
		b, err := os.ReadFile(filepath.Join(from, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name    string
		breakIt func(t *testing.T, dir string)
		want    string
	}{
		{"no CA", func(t *testing.T, d string) { os.Remove(filepath.Join(d, CACert)) }, "has no ca-cert.pem"},
		{"key without cert", func(t *testing.T, d string) { os.Remove(filepath.Join(d, ServerCert)) }, "server-key.pem has no certificate"},
		{"cert without key", func(t *testing.T, d string) { os.Remove(filepath.Join(d, ClientKey)) }, "client-cert.pem has no key"},
		{"not PEM", func(t *testing.T, d string) { os.WriteFile(filepath.Join(d, ServerCert), []byte("hello"), 0o600) }, "holds no PEM certificate"},
		{"key not PEM", func(t *testing.T, d string) { os.WriteFile(filepath.Join(d, ServerKey), []byte("hello"), 0o600) }, "holds no PEM private key"},
		{"mismatched key", func(t *testing.T, d string) { cp(t, foreign, ServerKey, d) }, "server-key.pem does not match"},
		{"other CA's pair", func(t *testing.T, d string) { cp(t, foreign, ServerKey, d); cp(t, foreign, ServerCert, d) }, "is not signed by the CA"},
		{"leaf as CA", func(t *testing.T, d string) {
			cp(t, good, ServerCert, d)
			os.Rename(filepath.Join(d, ServerCert), filepath.Join(d, CACert))
		}, "not a CA certificate"},
		{"client cert as server cert", func(t *testing.T, d string) {
			os.Rename(filepath.Join(d, ClientCert), filepath.Join(d, ServerCert))
			os.Rename(filepath.Join(d, ClientKey), filepath.Join(d, ServerKey))
		}, "for this use"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := copyDir(t, good)
			tc.breakIt(t, d)
			_, err := Load(d)
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Load: %v, want ErrInvalid with %q", err, tc.want)
			}
		})
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("Load of a missing directory succeeded")
	}
}

func TestLoadChecksValidity(t *testing.T) {
	ca := mustCA(t, "ca")
	dir := mustNode(t, ca, CertOptions{Name: "n1", Hosts: []string{"127.0.0.1"}, Validity: 24 * time.Hour})
	if _, err := LoadAt(dir, time.Now().Add(48*time.Hour)); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("two days on: %v, want expired", err)
	}
	if _, err := LoadAt(dir, time.Now().Add(-time.Hour)); err == nil || !strings.Contains(err.Error(), "not valid before") {
		t.Fatalf("an hour ago: %v, want not valid before", err)
	}
	// A certificate never outlives its CA.
	short := filepath.Join(t.TempDir(), "short")
	if err := CreateCA(short, CAOptions{Validity: time.Hour}); err != nil {
		t.Fatal(err)
	}
	n := mustNode(t, short, CertOptions{Name: "n1", Client: true, Validity: 24 * time.Hour})
	b, err := Load(n)
	if err != nil {
		t.Fatal(err)
	}
	if b.client.Leaf.NotAfter.After(b.ca.NotAfter) {
		t.Fatalf("certificate valid until %v, after its CA's %v", b.client.Leaf.NotAfter, b.ca.NotAfter)
	}
}
