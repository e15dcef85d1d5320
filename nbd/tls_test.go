package nbd_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/nbd/nbdtest"
)

// testCA is a certificate authority made for one test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

var serial int64

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial++
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

// issue makes a certificate for "localhost" signed by the CA, for a server
// or a client.
func (ca *testCA) issue(t *testing.T, server bool) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial++
	usage := x509.ExtKeyUsageClientAuth
	if server {
		usage = x509.ExtKeyUsageServerAuth
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// tlsServer starts a server in mode with a certificate from ca; verify
// makes it require client certificates signed by ca.
func tlsServer(t *testing.T, ca *testCA, mode nbd.TLSMode, verify bool, mutate ...func(*nbd.ServerConfig)) *testServer {
	cfg := &tls.Config{Certificates: []tls.Certificate{ca.issue(t, true)}, MinVersion: tls.VersionTLS12}
	if verify {
		cfg.ClientAuth, cfg.ClientCAs = tls.RequireAndVerifyClientCert, ca.pool
	}
	return startServer(t, func(c *nbd.ServerConfig) {
		c.TLS, c.TLSConfig = mode, cfg
		for _, m := range mutate {
			m(c)
		}
	})
}

// logWatch passes log lines on to w and closes each channel of seen at
// the first line that contains its key.
type logWatch struct {
	w    io.Writer
	mu   sync.Mutex // guards seen
	seen map[string]chan struct{}
}

func (l *logWatch) Write(p []byte) (int, error) {
	l.mu.Lock()
	for want, ch := range l.seen {
		if bytes.Contains(p, []byte(want)) {
			close(ch)
			delete(l.seen, want)
		}
	}
	l.mu.Unlock()
	return l.w.Write(p)
}

func clientTLS(ca *testCA, certs ...tls.Certificate) *tls.Config {
	return &tls.Config{RootCAs: ca.pool, ServerName: "localhost", Certificates: certs, MinVersion: tls.VersionTLS12}
}

func TestParseTLSMode(t *testing.T) {
	for s, want := range map[string]nbd.TLSMode{"off": nbd.TLSOff, "on": nbd.TLSOn, "require": nbd.TLSRequire, "REQUIRE": nbd.TLSRequire} {
		if got, err := nbd.ParseTLSMode(s); err != nil || got != want {
			t.Errorf("ParseTLSMode(%q) = %v, %v; want %v", s, got, err, want)
		}
		if want.String() != strings.ToLower(s) {
			t.Errorf("%v.String() = %q", want, want.String())
		}
	}
	if _, err := nbd.ParseTLSMode("yes"); err == nil || !strings.Contains(err.Error(), "off, on or require") {
		t.Errorf("ParseTLSMode(yes): %v", err)
	}
}

func TestTLSConfigValidate(t *testing.T) {
	exp := []nbd.Export{{Name: "disk", Backend: nbdtest.NewMem(1 << 20)}}
	for _, tc := range []struct {
		cfg  nbd.ServerConfig
		want string
	}{
		{nbd.ServerConfig{Exports: exp, TLS: nbd.TLSRequire}, "TLSConfig: required when TLS is require"},
		{nbd.ServerConfig{Exports: exp, TLS: nbd.TLSOn, TLSConfig: &tls.Config{}}, "no server certificate"},
		{nbd.ServerConfig{Exports: exp, TLS: nbd.TLSMode(7)}, "ServerConfig.TLS TLSMode(7)"},
	} {
		if err := tc.cfg.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Validate(TLS %v) = %v, want %q", tc.cfg.TLS, err, tc.want)
		}
	}
	if err := (nbd.ServerConfig{Exports: exp, TLS: nbd.TLSOff}).Validate(); err != nil {
		t.Errorf("TLS off without a config: %v", err)
	}
}

// TestTLSRequire: before STARTTLS every option but STARTTLS and ABORT is
// refused with ERR_TLS_REQD and the connection stays usable; after it the
// haggling goes on over TLS, a second STARTTLS is refused, and GO leads to
// a working transmission phase.
func TestTLSRequire(t *testing.T) {
	ca := newTestCA(t, "nbd test CA")
	ts := tlsServer(t, ca, nbd.TLSRequire, false)
	c := ts.dial()
	if _, err := c.Greet(nbd.ClientFixedNewstyle | nbd.ClientNoZeroes); err != nil {
		t.Fatal(err)
	}
	opt := func(o uint32, data []byte) uint32 {
		t.Helper()
		rs, err := c.Option(o, data)
		if err != nil {
			t.Fatalf("option %d: %v", o, err)
		}
		return lastType(rs)
	}
	goReq := nbd.AppendExportRequest(nil, nbd.ExportRequest{Name: "disk"})
	for _, o := range []struct {
		opt  uint32
		data []byte
	}{
		{nbd.OptInfo, goReq}, {nbd.OptGo, goReq}, {nbd.OptList, nil}, {nbd.OptStructuredReply, nil},
		{nbd.OptExtendedHeaders, nil}, {42, []byte("x")}, {nbd.OptInfo, make([]byte, nbd.MaxOptionLength+1)},
	} {
		if got := opt(o.opt, o.data); got != nbd.RepErrTLSReqd {
			t.Errorf("option %d before TLS: reply %#x, want ERR_TLS_REQD", o.opt, got)
		}
	}
	if got := opt(nbd.OptStartTLS, []byte{1}); got != nbd.RepErrInvalid {
		t.Errorf("STARTTLS with data: %#x, want ERR_INVALID", got)
	}
	if err := c.StartTLS(clientTLS(ca)); err != nil {
		t.Fatal(err)
	}
	if got := opt(nbd.OptStartTLS, nil); got != nbd.RepErrInvalid {
		t.Errorf("second STARTTLS: %#x, want ERR_INVALID", got)
	}
	rs, err := c.Option(nbd.OptList, nil)
	if err != nil || len(rs) != 3 || lastType(rs) != nbd.RepAck {
		t.Fatalf("LIST over TLS: %+v, %v", rs, err)
	}
	if got := opt(nbd.OptStructuredReply, nil); got != nbd.RepAck {
		t.Fatalf("STRUCTURED_REPLY over TLS: %#x", got)
	}
	c.Structured = true
	if got := opt(nbd.OptGo, goReq); got != nbd.RepAck {
		t.Fatalf("GO over TLS: %#x", got)
	}
	data := bytes.Repeat([]byte{0x5a}, 64<<10)
	if r, err := c.Do(nbd.Request{Type: nbd.CmdWrite, Cookie: 1, Offset: 4096, Length: uint64(len(data))}, data); err != nil || r.Err != 0 {
		t.Fatalf("write over TLS: %v %v", err, r)
	}
	r, err := c.Do(nbd.Request{Type: nbd.CmdRead, Cookie: 2, Offset: 4096, Length: uint64(len(data))}, nil)
	if err != nil || r.Err != 0 || !bytes.Equal(r.Data, data) {
		t.Fatalf("read over TLS: %v %v", err, r)
	}
	if !bytes.Equal(ts.mem.Bytes()[4096:4096+len(data)], data) {
		t.Error("the write over TLS did not reach the backend")
	}
}

// TestTLSRequireExportName: EXPORT_NAME before TLS cannot be refused, so
// the server hangs up, and serves the next client.
func TestTLSRequireExportName(t *testing.T) {
	ca := newTestCA(t, "nbd test CA")
	ts := tlsServer(t, ca, nbd.TLSRequire, false)
	c := ts.dial()
	if _, err := c.Greet(nbd.ClientFixedNewstyle | nbd.ClientNoZeroes); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Conn.Write(nbd.AppendOption(nil, nbd.OptExportName, []byte("disk"))); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Conn.Read(make([]byte, 64)); err != io.EOF {
		t.Fatalf("after EXPORT_NAME before TLS: read %d bytes, %v; want EOF", n, err)
	}
	ts.connect(nbdtest.Handshake{Export: "disk", TLS: clientTLS(ca)})
}

// TestTLSRestartsNegotiation: under TLSOn a plain client is served, and
// what a client negotiated before STARTTLS is forgotten after it.
func TestTLSRestartsNegotiation(t *testing.T) {
	ca := newTestCA(t, "nbd test CA")
	ts := tlsServer(t, ca, nbd.TLSOn, false)
	plain := ts.connect(nbdtest.Handshake{Export: "disk", Structured: true})
	if r, err := plain.Do(nbd.Request{Type: nbd.CmdRead, Cookie: 1, Length: 512}, nil); err != nil || r.Err != 0 {
		t.Fatalf("plain read under TLSOn: %v %v", err, r)
	}

	c := ts.dial()
	if _, err := c.Greet(nbd.ClientFixedNewstyle | nbd.ClientNoZeroes); err != nil {
		t.Fatal(err)
	}
	if rs, err := c.Option(nbd.OptStructuredReply, nil); err != nil || lastType(rs) != nbd.RepAck {
		t.Fatalf("plain STRUCTURED_REPLY: %+v %v", rs, err)
	}
	if err := c.StartTLS(clientTLS(ca)); err != nil {
		t.Fatal(err)
	}
	q := nbd.AppendMetaContextRequest(nil, nbd.MetaContextRequest{Export: "disk", Queries: []string{"base:"}})
	if rs, err := c.Option(nbd.OptListMetaContext, q); err != nil || lastType(rs) != nbd.RepErrInvalid {
		t.Errorf("LIST_META_CONTEXT after STARTTLS with structured replies negotiated only before it: %+v %v, want ERR_INVALID", rs, err)
	}
}

// TestTLSClient: nbd.Client with TLS against servers that require TLS,
// verify client certificates, or have no TLS at all.
func TestTLSClient(t *testing.T) {
	ca, other := newTestCA(t, "nbd test CA"), newTestCA(t, "another CA")
	unknownCA, plainLeft := make(chan struct{}), make(chan struct{})
	ts := tlsServer(t, ca, nbd.TLSRequire, true, func(c *nbd.ServerConfig) {
		c.Logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Debug, Output: &logWatch{w: tWriter{t}, seen: map[string]chan struct{}{
			"certificate signed by unknown authority": unknownCA,
			"plain-text client refused":               plainLeft,
		}}})
	})
	dial := func(cfg *tls.Config) (*nbd.Client, error) {
		return nbd.Dial(opCtx(t), "unix", ts.path, nbd.ClientConfig{Export: "disk", TLS: cfg, Logger: clientLogger(t)})
	}

	c, err := dial(clientTLS(ca, ca.issue(t, false)))
	if err != nil {
		t.Fatal(err)
	}
	if !c.TLS() {
		t.Error("Client.TLS() is false on a TLS connection")
	}
	buf := bytes.Repeat([]byte{7}, 8192)
	if err := c.WriteAt(opCtx(t), buf, 0, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(buf))
	if err := c.ReadAt(opCtx(t), got, 0); err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("read back over TLS: %v", err)
	}

	// Refused: a certificate from another CA, no certificate, no TLS, a
	// server certificate the client's CA did not sign.
	// (A Go client sends no certificate the server's CA list does not
	// name; make it send the foreign one anyway.)
	foreign := other.issue(t, false)
	cfg := clientTLS(ca)
	cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &foreign, nil }
	if _, err := dial(cfg); err == nil {
		t.Error("a client certificate from another CA was accepted")
	}
	waitFor(t, unknownCA, "the server's log line refusing the foreign client certificate")
	if _, err := dial(clientTLS(ca)); err == nil {
		t.Error("a client without a certificate was accepted by a server that verifies peers")
	}
	if _, err := dial(nil); err == nil || !strings.Contains(err.Error(), "requires TLS") {
		t.Errorf("plain client against TLSRequire: %v", err)
	}
	waitFor(t, plainLeft, "the server's log line about the plain-text client")
	if _, err := dial(clientTLS(other, other.issue(t, false))); err == nil || !strings.Contains(err.Error(), "TLS handshake") {
		t.Errorf("server certificate from an unknown CA: %v", err)
	}
	// The good connection lived through all that.
	if err := c.ReadAt(opCtx(t), got, 0); err != nil {
		t.Errorf("first connection after the refusals: %v", err)
	}
	c.Close()

	plain := startServer(t, nil)
	_, err = nbd.Dial(opCtx(t), "unix", plain.path, nbd.ClientConfig{Export: "disk", TLS: clientTLS(ca), Logger: clientLogger(t)})
	var oe *nbd.OptionError
	if !errors.As(err, &oe) || oe.Type != nbd.RepErrUnsup || !strings.Contains(err.Error(), "refused TLS") {
		t.Errorf("TLS client against a server without TLS: %v", err)
	}
}

// TestTLSGarbageAfterStartTLS: a client that goes on in plain text after
// STARTTLS was acknowledged gets its connection closed, and the server
// keeps serving others.
func TestTLSGarbageAfterStartTLS(t *testing.T) {
	ca := newTestCA(t, "nbd test CA")
	ts := tlsServer(t, ca, nbd.TLSRequire, false)
	for _, garbage := range [][]byte{
		nbd.AppendOption(nil, nbd.OptGo, nbd.AppendExportRequest(nil, nbd.ExportRequest{Name: "disk"})),
		bytes.Repeat([]byte{0x16, 0x03, 0x01, 0xff, 0xff}, 100), // a TLS record header with a length too long
		{0x16, 0x03},
	} {
		c := ts.dial()
		if _, err := c.Greet(nbd.ClientFixedNewstyle | nbd.ClientNoZeroes); err != nil {
			t.Fatal(err)
		}
		if rs, err := c.Option(nbd.OptStartTLS, nil); err != nil || lastType(rs) != nbd.RepAck {
			t.Fatalf("STARTTLS: %+v %v", rs, err)
		}
		if _, err := c.Conn.Write(garbage); err != nil {
			t.Fatal(err)
		}
		if len(garbage) == 2 {
			// A record cut short: the server waits for the rest until
			// the client gives up.
			c.Conn.(*net.UnixConn).CloseWrite()
		}
		if _, err := io.ReadAll(c.Conn); err != nil && !errors.Is(err, net.ErrClosed) && !strings.Contains(err.Error(), "reset") {
			t.Fatalf("after garbage: %v", err)
		}
	}
	ts.connect(nbdtest.Handshake{Export: "disk", TLS: clientTLS(ca)})
}

// TestTLSHandoffDrains: a TLS connection asked to hand itself over cannot
// be (its keys stay in this process): it answers every request it read,
// then is closed, and ServeConnHandoff returns no Detached and no error.
// Every write answered is in the backend; the client resends the rest.
func TestTLSHandoffDrains(t *testing.T) {
	ca := newTestCA(t, "nbd test CA")
	mem := nbdtest.NewMem(1 << 20)
	handoff := nbd.NewHandoff()
	srv, err := nbd.NewServer(nbd.ServerConfig{
		Exports:   []nbd.Export{{Name: "disk", Backend: mem}},
		TLS:       nbd.TLSRequire,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{ca.issue(t, true)}},
		Hooks:     nbd.Hooks{HeaderRead: func(nbd.Request) { handoff.Request() }},
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	type result struct {
		d   *nbd.Detached
		err error
	}
	served := make(chan result, 1)
	go func() {
		nc, err := l.Accept()
		if err != nil {
			served <- result{nil, err}
			return
		}
		d, err := srv.ServeConnHandoff(ctx, nc, handoff)
		served <- result{d, err}
	}()
	nc, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(20 * time.Second))
	c := nbdtest.NewClient(nc)
	if err := c.Connect(nbdtest.Handshake{Export: "disk", Structured: true, TLS: clientTLS(ca)}); err != nil {
		t.Fatal(err)
	}
	var out []byte
	for i := range 3 {
		r := nbd.Request{Type: nbd.CmdWrite, Cookie: uint64(i + 1), Offset: uint64(i) * 4096, Length: 4096}
		out = append(nbd.AppendRequest(out, r, false), bytes.Repeat([]byte{byte(0xa0 + i)}, 4096)...)
	}
	if _, err := c.Conn.Write(out); err != nil {
		t.Fatal(err)
	}
	answered := 0
	for {
		r, err := c.Recv()
		if err != nil {
			break // closed after the drain
		}
		if r.Err != 0 {
			t.Errorf("write %d answered with %v: a handoff must not fail requests", r.Cookie, r.Err)
			continue
		}
		answered++
		i := int(r.Cookie - 1)
		if !bytes.Equal(mem.Bytes()[i*4096:(i+1)*4096], bytes.Repeat([]byte{byte(0xa0 + i)}, 4096)) {
			t.Errorf("write %d acknowledged but not in the backend", r.Cookie)
		}
	}
	if answered == 0 {
		t.Error("no write was answered before the connection closed")
	}
	res := <-served
	if res.d != nil || res.err != nil {
		t.Errorf("ServeConnHandoff of a TLS connection = %+v, %v; want no Detached and no error", res.d, res.err)
	}
}
