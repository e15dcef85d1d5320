package server_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/keeltls"
	"github.com/keelstore/keel/services/server"
	"github.com/keelstore/keel/services/server/servertest"
	"github.com/keelstore/keel/services/wire"
)

// certs is a cluster CA with a node's directory, and a stranger's
// directory signed by another CA.
type certs struct {
	node, stranger *keeltls.Bundle
}

func makeCerts(t *testing.T) certs {
	t.Helper()
	dir := t.TempDir()
	mk := func(ca, out, name string) *keeltls.Bundle {
		if err := keeltls.CreateCert(filepath.Join(dir, ca), filepath.Join(dir, out), keeltls.CertOptions{Name: name, Hosts: []string{"127.0.0.1"}}); err != nil {
			t.Fatal(err)
		}
		b, err := keeltls.Load(filepath.Join(dir, out))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, ca := range []string{"ca", "other-ca"} {
		if err := keeltls.CreateCA(filepath.Join(dir, ca), keeltls.CAOptions{Name: ca}); err != nil {
			t.Fatal(err)
		}
	}
	return certs{node: mk("ca", "n1", "n1"), stranger: mk("other-ca", "stranger", "stranger")}
}

func clusterTLS(t *testing.T, b *keeltls.Bundle) *wire.ClusterTLS {
	t.Helper()
	srv, err := b.ServerConfig(tls.RequireAndVerifyClientCert)
	if err != nil {
		t.Fatal(err)
	}
	cli, err := b.ClientConfig("")
	if err != nil {
		t.Fatal(err)
	}
	return &wire.ClusterTLS{Server: srv, Client: cli}
}

// lines is a logger that keeps every line (and passes it to t.Log).
type lines struct {
	t  *testing.T
	mu sync.Mutex
	b  strings.Builder
}

func (l *lines) Write(p []byte) (int, error) {
	l.t.Log(string(bytes.TrimRight(p, "\n")))
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lines) count(sub string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.b.String(), sub)
}

// state is what a refused stranger must not change.
type state struct {
	Term, LastIndex, Applied uint64
	Leader                   bool
	Servers                  string
	Registered               int
}

func stateOf(t *testing.T, n *replica.Node) state {
	t.Helper()
	cf := n.Raft().GetConfiguration()
	if err := cf.Error(); err != nil {
		t.Fatal(err)
	}
	return state{Term: n.Raft().CurrentTerm(), LastIndex: n.Raft().LastIndex(), Applied: n.FSM().AppliedIndex(),
		Leader: n.IsLeader(), Servers: fmt.Sprint(cf.Configuration().Servers), Registered: len(n.FSM().State().Nodes)}
}

// forceCert is cfg presenting its certificate whatever CAs the server
// asks for (crypto/tls's client sends none that the server's CA list does
// not name).
func forceCert(cfg *tls.Config) *tls.Config {
	c := cfg.Clone()
	cert := c.Certificates[0]
	c.Certificates = nil
	c.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	return c
}

// closeTransport closes tr and its pooled connections (Close alone keeps
// them, and the node's side of each would outlive the test).
func closeTransport(tr *raft.NetworkTransport) {
	tr.CloseStreams()
	tr.Close()
}

// dialer is a raft.StreamLayer that only dials, with dial.
type dialer struct {
	dial   func(addr string) (net.Conn, error)
	closed chan struct{}
	once   sync.Once
}

func (d *dialer) Accept() (net.Conn, error) { <-d.closed; return nil, net.ErrClosed }
func (d *dialer) Close() error              { d.once.Do(func() { close(d.closed) }); return nil }
func (d *dialer) Addr() net.Addr            { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1} }
func (d *dialer) Dial(a raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	return d.dial(string(a))
}

// A Raft peer without a certificate from the cluster CA (plain TCP, TLS
// without a client certificate, one from another CA) sends a real
// RequestVote and AppendEntries of a higher term through
// raft.NetworkTransport: each is refused, the node's term, log and
// configuration do not change, and the refusal is logged once for the
// peer, not once per attempt. A peer with a certificate from the CA is
// answered (the control: the same RPCs reach raft).
func TestRaftRefusesStrangers(t *testing.T) {
	c := makeCerts(t)
	logs := &lines{t: t}
	o := servertest.Start(t, servertest.Options{ClusterTLS: clusterTLS(t, c.node),
		Log: hclog.New(&hclog.LoggerOptions{Name: "n1", Output: logs, Level: hclog.Debug})})
	n := o.Holder().Peek()
	before := stateOf(t, n)

	tlsDial := func(cfg *tls.Config) func(string) (net.Conn, error) {
		return func(addr string) (net.Conn, error) {
			c, err := net.DialTimeout("tcp", addr, 2*time.Second)
			if err != nil {
				return nil, err
			}
			return tls.Client(c, cfg), nil
		}
	}
	noCert, err := c.node.ClientConfig("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	noCert.Certificates = nil
	foreign, err := c.stranger.ClientConfig("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	foreign.RootCAs = c.node.CAPool() // it trusts the node; the node must not trust it
	forced := forceCert(foreign)
	good, err := c.node.ClientConfig("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	peers := []struct {
		name string
		dial func(string) (net.Conn, error)
	}{
		{"plain TCP", func(a string) (net.Conn, error) { return net.DialTimeout("tcp", a, 2*time.Second) }},
		{"TLS without a client certificate", tlsDial(noCert)},
		{"a certificate from another CA", tlsDial(foreign)},
		{"a certificate from another CA, sent anyway", tlsDial(forced)},
	}
	hdr := raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte("stranger"), Addr: []byte("127.0.0.1:1")}
	vote := &raft.RequestVoteRequest{RPCHeader: hdr, Term: before.Term + 10, LastLogIndex: before.LastIndex + 100, LastLogTerm: before.Term + 10}
	appendReq := &raft.AppendEntriesRequest{RPCHeader: hdr, Term: before.Term + 10, PrevLogEntry: before.LastIndex, PrevLogTerm: before.Term,
		Entries:           []*raft.Log{{Index: before.LastIndex + 1, Term: before.Term + 10, Type: raft.LogCommand, Data: (&replica.Command{Kind: replica.KindWrite, Data: []byte("stranger")}).Encode(nil)}},
		LeaderCommitIndex: before.LastIndex + 1}
	send := func(dial func(string) (net.Conn, error)) (voteErr, appendErr error) {
		d := &dialer{dial: dial, closed: make(chan struct{})}
		tr := raft.NewNetworkTransportWithLogger(d, 1, 3*time.Second, hclog.NewNullLogger())
		defer closeTransport(tr)
		var vr raft.RequestVoteResponse
		voteErr = tr.RequestVote("n1", raft.ServerAddress(o.Raft), vote, &vr)
		var ar raft.AppendEntriesResponse
		appendErr = tr.AppendEntries("n1", raft.ServerAddress(o.Raft), appendReq, &ar)
		return voteErr, appendErr
	}
	for _, p := range peers {
		for attempt := 1; attempt <= 2; attempt++ {
			ve, ae := send(p.dial)
			if ve == nil || ae == nil {
				t.Errorf("%s, attempt %d: RequestVote %v, AppendEntries %v: want both refused", p.name, attempt, ve, ae)
			}
		}
	}
	if after := stateOf(t, n); after != before {
		t.Errorf("strangers' Raft RPCs changed the node:\nbefore %+v\nafter  %+v", before, after)
	}
	// Eight connections or more from one peer host, of four kinds: one
	// WARN line.
	if got := logs.count("refused a Raft connection"); got < 8 {
		t.Errorf("%d refusals logged in all, want one per connection (8 or more; WARN once, DEBUG after)", got)
	}
	if got := logs.count("[WARN]  n1.raft-listener: refused a Raft connection"); got != 1 {
		t.Errorf("%d WARN lines for one refused peer, want 1", got)
	}

	// A peer that connects and never says anything holds up nobody: the
	// control below is answered while it hangs in its handshake.
	silent, err := net.Dial("tcp", o.Raft)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()

	// The control: a peer with the cluster's certificate reaches raft,
	// which answers (a vote of the current term is not granted: the node
	// leads) and changes nothing.
	ctrl := *vote
	ctrl.Term, ctrl.LastLogIndex, ctrl.LastLogTerm = before.Term, 0, 0
	d := &dialer{dial: tlsDial(good), closed: make(chan struct{})}
	tr := raft.NewNetworkTransportWithLogger(d, 1, 3*time.Second, hclog.NewNullLogger())
	defer closeTransport(tr)
	var vr raft.RequestVoteResponse
	if err := tr.RequestVote("n1", raft.ServerAddress(o.Raft), &ctrl, &vr); err != nil {
		t.Fatalf("a peer with the cluster's certificate was not answered: %v", err)
	}
	if vr.Granted || vr.Term != before.Term {
		t.Errorf("control vote: %+v, want refused at term %d", vr, before.Term)
	}
	if after := stateOf(t, n); after != before {
		t.Errorf("the control vote changed the node:\nbefore %+v\nafter  %+v", before, after)
	}
}

// Every call to the API that changes anything or reads the volume is
// refused to a client without a certificate from the cluster CA (403),
// one with another CA's (the handshake fails) and one speaking plain HTTP
// (400); status stays readable without a certificate; a node with another
// CA's certificate cannot join; and nothing changed.
func TestAPIRefusesStrangers(t *testing.T) {
	c := makeCerts(t)
	ct := clusterTLS(t, c.node)
	o := servertest.Start(t, servertest.Options{ClusterTLS: ct})
	n := o.Holder().Peek()
	good := wire.NewClient(5*time.Second, ct.Client)
	defer good.HTTP.CloseIdleConnections()
	// The leader's first status of a term commits a read barrier.
	if _, err := good.Status(context.Background(), o.HTTP); err != nil {
		t.Fatalf("status with the cluster's certificate: %v", err)
	}
	before := stateOf(t, n)

	client := func(cfg *tls.Config) *http.Client {
		tr := &http.Transport{TLSClientConfig: cfg}
		t.Cleanup(tr.CloseIdleConnections)
		return &http.Client{Transport: tr, Timeout: 5 * time.Second}
	}
	noCert, err := c.node.ClientConfig("")
	if err != nil {
		t.Fatal(err)
	}
	noCert.Certificates = nil
	foreign, err := c.stranger.ClientConfig("")
	if err != nil {
		t.Fatal(err)
	}
	foreign.RootCAs = c.node.CAPool()
	write := (&replica.Command{Kind: replica.KindWrite, Data: []byte("stranger")}).EncodeCompat(nil)
	calls := []struct {
		method, path string
		body         []byte
	}{
		{"POST", "/v1/cluster/remove", []byte(`{"id":"n1"}`)},
		{"POST", "/v1/cluster/transfer-leadership", []byte(`{}`)},
		{"POST", "/v1/cluster/join", []byte(`{"node":{"id":"n9","raft":"127.0.0.1:1","http":"127.0.0.1:2"}}`)},
		{"POST", "/v1/apply", write},
		{"POST", "/v1/verify/digest", nil},
		{"GET", "/v1/sync/hashes?offset=0&length=4096&chunk=4096", nil},
		{"GET", "/v1/sync/range?offset=0&length=4096", nil},
	}
	do := func(hc *http.Client, scheme, method, path string, body []byte) (int, string, error) {
		req, err := http.NewRequest(method, scheme+"://"+o.HTTP+path, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := hc.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), nil
	}
	nc, fc, ffc, pc := client(noCert), client(foreign), client(forceCert(foreign)), client(nil)
	for _, call := range calls {
		code, body, err := do(nc, "https", call.method, call.path, call.body)
		if err != nil || code != http.StatusForbidden || !strings.Contains(body, "client certificate") {
			t.Errorf("%s %s without a client certificate: %d %q %v, want 403 naming the certificate", call.method, call.path, code, body, err)
		}
		// crypto/tls sends no certificate the server's CA list does not
		// name: 403; one sent anyway fails the handshake.
		if code, body, err := do(fc, "https", call.method, call.path, call.body); err != nil || code != http.StatusForbidden {
			t.Errorf("%s %s with another CA's certificate: %d %q %v, want 403", call.method, call.path, code, body, err)
		}
		if code, body, err := do(ffc, "https", call.method, call.path, call.body); err == nil || !strings.Contains(err.Error(), "certificate") {
			t.Errorf("%s %s with another CA's certificate sent anyway: %d %q %v, want the handshake refused", call.method, call.path, code, body, err)
		}
		if code, body, err := do(pc, "http", call.method, call.path, call.body); err != nil || code != http.StatusBadRequest {
			t.Errorf("%s %s over plain HTTP: %d %q %v, want 400", call.method, call.path, code, body, err)
		}
	}
	// Read-only status needs no certificate (a browser, a scraper).
	for _, path := range []string{"/v1/status", "/v1/cluster", "/metrics"} {
		if code, body, err := do(nc, "https", "GET", path, nil); err != nil || code != http.StatusOK {
			t.Errorf("GET %s without a client certificate: %d %q %v, want 200", path, code, body, err)
		}
	}
	// A node with another CA's certificate asks to join (keel server
	// --join): refused until it gives up.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	sct := clusterTLS(t, c.stranger)
	sct.Client.RootCAs = c.node.CAPool() // it trusts the cluster; the cluster must not trust it
	sc := wire.NewClient(time.Second, sct.Client)
	defer sc.HTTP.CloseIdleConnections()
	self := replica.NodeInfo{ID: "n9", Raft: "127.0.0.1:1", HTTP: "127.0.0.1:2"}
	if _, err := server.Join(ctx, sc, o.HTTP, self, replica.CurrentLevel, "test", hclog.NewNullLogger()); err == nil {
		t.Error("a node with another CA's certificate joined")
	}
	if err := sc.Do(context.Background(), "POST", o.HTTP, "/v1/cluster/join", wire.JoinRequest{Node: self}, nil); err == nil || !strings.Contains(err.Error(), "client certificate") {
		t.Errorf("join with another CA's certificate: %v, want a refusal naming the certificate", err)
	}
	if after := stateOf(t, n); after != before {
		t.Errorf("refused calls changed the node:\nbefore %+v\nafter  %+v", before, after)
	}

	// The control: the cluster's client certificate is let through.
	var d replica.Digest
	if err := good.Do(context.Background(), "POST", o.HTTP, "/v1/verify/digest", nil, &d); err != nil || d.ID != "n1" {
		t.Errorf("digest with the cluster's certificate: %+v %v", d, err)
	}
}
