package wire

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"

	"github.com/hashicorp/go-hclog"
)

// Cluster TLS (docs: README "Cluster TLS"). With --cluster-tls, every
// link between Keel processes (Raft, the HTTP API, image sync; from
// servers, proxies and the CLI) is mutual TLS with certificates from one
// cluster CA. The HTTP API's listener asks for a client certificate but
// lets a client without one finish the handshake (a browser on the status
// page, a Prometheus scraper); a certificate from another CA fails the
// handshake. Then RequireClientCert answers 403 to every request that
// needs one (NeedsClientCert): any that changes something or reads the
// volume's data. The Raft listener requires a certificate from the CA in
// the handshake itself.

// ClusterTLS is the mutual TLS of Keel's own links. Nil (in a Config):
// cluster traffic is plain TCP, unauthenticated.
type ClusterTLS struct {
	// Server is the listeners' side: this process's certificate (for
	// server authentication) and the cluster CA in ClientCAs. Its
	// ClientAuth is ignored: each listener sets its own (ServerConfig).
	Server *tls.Config
	// Client is the dialers' side: this process's client certificate and
	// the cluster CA in RootCAs. A ServerName left empty is the host
	// dialed.
	Client *tls.Config
}

// Validate checks that both sides are there and carry a certificate and
// the CA.
func (t *ClusterTLS) Validate() error {
	switch {
	case t.Server == nil || t.Client == nil:
		return errors.New("wire: ClusterTLS needs both Server and Client configurations")
	case len(t.Server.Certificates) == 0 && t.Server.GetCertificate == nil:
		return errors.New("wire: ClusterTLS.Server has no certificate (a server certificate from the cluster CA)")
	case t.Server.ClientCAs == nil:
		return errors.New("wire: ClusterTLS.Server has no ClientCAs (the cluster CA)")
	case len(t.Client.Certificates) == 0 && t.Client.GetClientCertificate == nil:
		return errors.New("wire: ClusterTLS.Client has no certificate (a client certificate from the cluster CA)")
	case t.Client.RootCAs == nil:
		return errors.New("wire: ClusterTLS.Client has no RootCAs (the cluster CA)")
	}
	return nil
}

// ServerConfig is Server with auth as its client authentication.
func (t *ClusterTLS) ServerConfig(auth tls.ClientAuthType) *tls.Config {
	c := t.Server.Clone()
	c.ClientAuth = auth
	if c.MinVersion == 0 {
		c.MinVersion = tls.VersionTLS12
	}
	return c
}

// ClientFor is Client with ServerName set to the host of addr (HOST:PORT)
// when Client names none.
func (t *ClusterTLS) ClientFor(addr string) *tls.Config {
	c := t.Client.Clone()
	if c.ServerName == "" {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			host = addr
		}
		c.ServerName = host
	}
	return c
}

// HTTPListener wraps l (the API's listener) in TLS that asks for a client
// certificate and verifies one if given; nil t: l itself.
func (t *ClusterTLS) HTTPListener(l net.Listener) net.Listener {
	if t == nil {
		return l
	}
	return tls.NewListener(l, t.ServerConfig(tls.VerifyClientCertIfGiven))
}

// ErrNoClientCert is the 403 of a request that needs a client
// certificate from the cluster CA and came without one.
var ErrNoClientCert = errors.New("keel: this call needs a client certificate from the cluster CA (--cluster-tls DIR)")

// NeedsClientCert says whether r needs a verified client certificate when
// the API is served over TLS: every request but a GET or HEAD, and the
// GETs that read the volume's data (the image sync source, /v1/sync/).
// Status, cluster status, metrics and the status page stay readable
// without one. A route added to an API follows this rule; one that
// reveals data must be under /v1/sync/ or be a POST.
func NeedsClientCert(r *http.Request) bool {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return true
	}
	return r.URL.Path == "/v1/sync" || strings.HasPrefix(r.URL.Path, "/v1/sync/")
}

// RequireClientCert answers 403 (ErrorBody with ErrNoClientCert) to a
// request over TLS that NeedsClientCert and has no verified client
// certificate; requests over plain HTTP (no cluster TLS) pass.
func RequireClientCert(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS != nil && len(r.TLS.VerifiedChains) == 0 && NeedsClientCert(r) {
			WriteJSON(w, http.StatusForbidden, ErrorBody{Error: ErrNoClientCert.Error()})
			return
		}
		h.ServeHTTP(w, r)
	})
}

// ErrServerWantsTLS: a client without cluster TLS called an API served
// over TLS.
var ErrServerWantsTLS = errors.New("keel: the server's API is served over TLS (cluster TLS is on): give --cluster-tls DIR with a client certificate from the cluster CA")

// tlsHint adds what to do to a client's certificate errors.
func tlsHint(err error) error {
	var ua x509.UnknownAuthorityError
	var ch x509.HostnameError
	switch {
	case errors.As(err, &ua):
		return fmt.Errorf("%w (the server's certificate is not from the CA in --cluster-tls: is it this cluster's?)", err)
	case errors.As(err, &ch):
		return fmt.Errorf("%w (the server's certificate is not for the address dialed: give keel tls cert create a --host for it)", err)
	case strings.Contains(err.Error(), "remote error: tls:"):
		return fmt.Errorf("%w (the server refused this client's certificate: is --cluster-tls from this cluster's CA?)", err)
	}
	return err
}

// PeerLog logs refused connections once per peer host at WARN (the
// peer's later refusals at DEBUG): a peer without a certificate from the
// cluster CA retries forever, and one line says what is wrong.
type PeerLog struct {
	Log hclog.Logger

	mu   sync.Mutex // guards seen
	seen map[string]struct{}
}

// maxPeers bounds the hosts PeerLog remembers; past it, it forgets all.
const maxPeers = 4096

// Refused logs that a connection from remote (HOST:PORT) was refused.
func (p *PeerLog) Refused(remote, msg string, args ...any) {
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		host = remote
	}
	p.mu.Lock()
	if p.seen == nil || len(p.seen) >= maxPeers {
		p.seen = map[string]struct{}{}
	}
	_, again := p.seen[host]
	p.seen[host] = struct{}{}
	p.mu.Unlock()
	args = append([]any{"peer", remote}, args...)
	if again {
		p.Log.Debug(msg, args...)
		return
	}
	p.Log.Warn(msg+" (further refusals of this peer are logged at debug)", args...)
}

// Probe says whether a failed handshake's err is a peer that closed the
// connection before sending anything (a port probe, a health check):
// not a refusal worth a line.
func Probe(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || strings.HasSuffix(err.Error(), "EOF") ||
		strings.Contains(err.Error(), "connection reset by peer")
}

// httpErrorLog is net/http's ErrorLog: its TLS handshake errors go to
// peers (once per peer; probes at DEBUG), the rest to log.
type httpErrorLog struct {
	log   hclog.Logger
	std   io.Writer
	peers *PeerLog
}

const handshakeErr = "http: TLS handshake error from "

func (w *httpErrorLog) Write(p []byte) (int, error) {
	line := strings.TrimSpace(string(p))
	rest, ok := strings.CutPrefix(line, handshakeErr)
	if !ok {
		return w.std.Write(p)
	}
	remote, cause, _ := strings.Cut(rest, ": ")
	if Probe(errors.New(cause)) {
		w.log.Debug("HTTPS connection closed before its handshake", "peer", remote, "error", cause)
		return len(p), nil
	}
	w.peers.Refused(remote, "refused an HTTPS connection: TLS handshake failed (a client without a certificate from the cluster CA, or plain HTTP?)", "error", cause)
	return len(p), nil
}

func newHTTPErrorLog(log hclog.Logger) *httpErrorLog {
	return &httpErrorLog{log: log, std: log.StandardWriter(&hclog.StandardLoggerOptions{InferLevels: true}), peers: &PeerLog{Log: log}}
}

// UnsecuredWarning is the one line a server or proxy started without
// cluster TLS logs at WARN.
const UnsecuredWarning = "CLUSTER TRAFFIC IS UNAUTHENTICATED AND UNENCRYPTED: anyone who can reach this process's ports can join, administer and read the volume; start it with --cluster-tls DIR (keel tls)"

// String describes t for a log line.
func (t *ClusterTLS) String() string {
	if t == nil {
		return "off"
	}
	return fmt.Sprintf("mutual TLS (%d server, %d client certificates)", len(t.Server.Certificates), len(t.Client.Certificates))
}
