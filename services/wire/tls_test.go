package wire

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
)

// Which requests need a client certificate: every one that is not a GET
// or HEAD, and the GETs that read the image; status stays open.
func TestNeedsClientCert(t *testing.T) {
	for _, c := range []struct {
		method, path string
		want         bool
	}{
		{"GET", "/v1/status", false},
		{"GET", "/v1/cluster", false},
		{"GET", "/metrics", false},
		{"GET", "/", false},
		{"HEAD", "/v1/status", false},
		{"GET", "/v1/sync", true},
		{"GET", "/v1/sync/hashes", true},
		{"GET", "/v1/sync/range", true},
		{"HEAD", "/v1/sync/range", true},
		{"POST", "/v1/apply", true},
		{"POST", "/v1/cluster/join", true},
		{"POST", "/v1/cluster/remove", true},
		{"POST", "/v1/cluster/transfer-leadership", true},
		{"POST", "/v1/verify/digest", true},
		{"PUT", "/v1/status", true},
		{"DELETE", "/", true},
	} {
		r := httptest.NewRequest(c.method, c.path, nil)
		if got := NeedsClientCert(r); got != c.want {
			t.Errorf("NeedsClientCert(%s %s) = %v, want %v", c.method, c.path, got, c.want)
		}
	}
}

// Over TLS without a verified certificate: 403 where one is needed, the
// handler elsewhere; with one, or over plain HTTP, always the handler.
func TestRequireClientCert(t *testing.T) {
	h := RequireClientCert(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusTeapot) }))
	verified := &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{{}}}}
	for _, c := range []struct {
		method string
		state  *tls.ConnectionState
		want   int
	}{
		{"POST", nil, http.StatusTeapot},
		{"POST", &tls.ConnectionState{}, http.StatusForbidden},
		{"POST", verified, http.StatusTeapot},
		{"GET", &tls.ConnectionState{}, http.StatusTeapot},
	} {
		r := httptest.NewRequest(c.method, "/v1/cluster/remove", nil)
		r.TLS = c.state
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != c.want {
			t.Errorf("%s, TLS %+v: %d, want %d", c.method, c.state, w.Code, c.want)
		}
		if w.Code == http.StatusForbidden && !strings.Contains(w.Body.String(), "client certificate") {
			t.Errorf("403 body %q does not name the certificate", w.Body.String())
		}
	}
}

// One WARN per peer host, whatever its port; DEBUG after.
func TestPeerLogOncePerPeer(t *testing.T) {
	var b bytes.Buffer
	p := &PeerLog{Log: hclog.New(&hclog.LoggerOptions{Output: &b, Level: hclog.Debug})}
	for _, remote := range []string{"10.0.0.1:1000", "10.0.0.1:1001", "10.0.0.2:1000", "10.0.0.1:1002"} {
		p.Refused(remote, "refused")
	}
	out := b.String()
	if got := strings.Count(out, "[WARN]"); got != 2 {
		t.Errorf("%d WARN lines for two peers, want 2:\n%s", got, out)
	}
	if got := strings.Count(out, "[DEBUG]"); got != 2 {
		t.Errorf("%d DEBUG lines for two repeated refusals, want 2:\n%s", got, out)
	}
}

// net/http's TLS handshake errors: a refusal once per peer at WARN, a
// probe (closed before the handshake) at DEBUG, other lines as they are.
func TestHTTPErrorLog(t *testing.T) {
	var b bytes.Buffer
	w := newHTTPErrorLog(hclog.New(&hclog.LoggerOptions{Output: &b, Level: hclog.Debug}))
	for _, l := range []string{
		"http: TLS handshake error from 127.0.0.1:5000: EOF",
		"http: TLS handshake error from 127.0.0.1:5001: remote error: tls: bad certificate",
		"http: TLS handshake error from 127.0.0.1:5002: client sent an HTTP request to an HTTPS server",
		"http: something else",
	} {
		if _, err := w.Write([]byte(l + "\n")); err != nil {
			t.Fatal(err)
		}
	}
	out := b.String()
	if strings.Count(out, "[WARN]") != 1 || !strings.Contains(out, "bad certificate") {
		t.Errorf("want one WARN for the refused peer:\n%s", out)
	}
	if !strings.Contains(out, "closed before its handshake") || !strings.Contains(out, "something else") {
		t.Errorf("want the probe at DEBUG and the other line kept:\n%s", out)
	}
}

// A client without TLS calling a TLS API is told to give --cluster-tls.
func TestClientToTLSServer(t *testing.T) {
	srv := httptest.NewTLSServer(http.NotFoundHandler())
	defer srv.Close()
	c := NewClient(0, nil)
	err := c.Do(t.Context(), "GET", srv.Listener.Addr().String(), "/v1/status", nil, nil)
	if err == nil || !strings.Contains(err.Error(), "--cluster-tls") {
		t.Errorf("plain client to a TLS API: %v, want ErrServerWantsTLS", err)
	}
	// A TLS client that does not trust the server's CA says so.
	c = NewClient(0, &tls.Config{RootCAs: x509.NewCertPool()})
	defer c.HTTP.CloseIdleConnections()
	err = c.Do(t.Context(), "GET", srv.Listener.Addr().String(), "/v1/status", nil, nil)
	if err == nil || !strings.Contains(err.Error(), "not from the CA in --cluster-tls") {
		t.Errorf("TLS client with another CA: %v, want the hint", err)
	}
	if got := c.BaseURL("h:1"); got != "https://h:1" {
		t.Errorf("BaseURL with TLS = %q, want https://h:1", got)
	}
	if got := NewClient(0, nil).BaseURL("h:1"); got != "http://h:1" {
		t.Errorf("BaseURL without TLS = %q, want http://h:1", got)
	}
}
