package keeltls

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// Bundle is a loaded, checked certificate directory.
type Bundle struct {
	// Dir is the directory it was loaded from.
	Dir    string
	ca     *x509.Certificate
	pool   *x509.CertPool
	server *tls.Certificate
	client *tls.Certificate
}

// Load reads and checks the certificate directory dir. Only ca-cert.pem is
// required; a pair (server or client) is loaded when either of its files
// exists. Each of these is one error naming the file: a missing
// ca-cert.pem, a certificate without its key or a key without its
// certificate, a file that is not PEM, a key that does not match its
// certificate, a certificate the CA did not sign, one that has expired or
// is not valid yet.
func Load(dir string) (*Bundle, error) { return LoadAt(dir, time.Now()) }

// LoadAt is Load with the time certificates are checked at.
func LoadAt(dir string, at time.Time) (*Bundle, error) {
	st, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("keeltls: certificate directory: %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("%w: %s is not a directory", ErrInvalid, dir)
	}
	caPath := filepath.Join(dir, CACert)
	caPEM, err := os.ReadFile(caPath)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: %s has no %s (make one with keel tls ca create and keel tls cert create)", ErrInvalid, dir, CACert)
		}
		return nil, fmt.Errorf("keeltls: %w", err)
	}
	ca, err := parseCert(caPath, caPEM)
	if err != nil {
		return nil, err
	}
	if !ca.IsCA {
		return nil, fmt.Errorf("%w: %s is not a CA certificate", ErrInvalid, caPath)
	}
	if err := checkTime(caPath, ca, at); err != nil {
		return nil, err
	}
	b := &Bundle{Dir: dir, ca: ca, pool: x509.NewCertPool()}
	b.pool.AddCert(ca)
	if b.server, err = b.loadPair(ServerCert, ServerKey, x509.ExtKeyUsageServerAuth, at); err != nil {
		return nil, err
	}
	if b.client, err = b.loadPair(ClientCert, ClientKey, x509.ExtKeyUsageClientAuth, at); err != nil {
		return nil, err
	}
	return b, nil
}

// loadPair loads certName and keyName when either exists (nil, nil when
// neither does) and checks them against the CA.
func (b *Bundle) loadPair(certName, keyName string, usage x509.ExtKeyUsage, at time.Time) (*tls.Certificate, error) {
	certPath, keyPath := filepath.Join(b.Dir, certName), filepath.Join(b.Dir, keyName)
	certPEM, cerr := os.ReadFile(certPath)
	keyPEM, kerr := os.ReadFile(keyPath)
	switch {
	case errors.Is(cerr, fs.ErrNotExist) && errors.Is(kerr, fs.ErrNotExist):
		return nil, nil
	case errors.Is(cerr, fs.ErrNotExist):
		return nil, fmt.Errorf("%w: %s has no certificate to go with it (%s is missing)", ErrInvalid, keyPath, certName)
	case errors.Is(kerr, fs.ErrNotExist):
		return nil, fmt.Errorf("%w: %s has no key to go with it (%s is missing)", ErrInvalid, certPath, keyName)
	case cerr != nil:
		return nil, fmt.Errorf("keeltls: %w", cerr)
	case kerr != nil:
		return nil, fmt.Errorf("keeltls: %w", kerr)
	}
	leaf, err := parseCert(certPath, certPEM)
	if err != nil {
		return nil, err
	}
	key, err := parseKey(keyPath, keyPEM)
	if err != nil {
		return nil, err
	}
	if !samePublicKey(leaf.PublicKey, key.Public()) {
		return nil, fmt.Errorf("%w: %s does not match %s (the key belongs to another certificate)", ErrInvalid, keyPath, certPath)
	}
	if err := checkTime(certPath, leaf, at); err != nil {
		return nil, err
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: b.pool, CurrentTime: at, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return nil, fmt.Errorf("%w: %s is not signed by the CA in %s for this use: %v", ErrInvalid, certPath, CACert, err)
	}
	return &tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf}, nil
}

func checkTime(path string, c *x509.Certificate, at time.Time) error {
	if at.After(c.NotAfter) {
		return fmt.Errorf("%w: %s expired on %s", ErrInvalid, path, c.NotAfter.UTC().Format(time.DateOnly))
	}
	if at.Before(c.NotBefore) {
		return fmt.Errorf("%w: %s is not valid before %s (is the clock right?)", ErrInvalid, path, c.NotBefore.UTC().Format(time.RFC3339))
	}
	return nil
}

// HasServer says whether the directory holds a server pair.
func (b *Bundle) HasServer() bool { return b.server != nil }

// HasClient says whether the directory holds a client pair.
func (b *Bundle) HasClient() bool { return b.client != nil }

// CAPool is a pool holding the directory's CA.
func (b *Bundle) CAPool() *x509.CertPool { return b.pool }

// ServerConfig is the tls.Config of a server presenting the directory's
// server certificate. clientAuth says what it asks of clients: with
// tls.VerifyClientCertIfGiven or tls.RequireAndVerifyClientCert client
// certificates are checked against the directory's CA.
func (b *Bundle) ServerConfig(clientAuth tls.ClientAuthType) (*tls.Config, error) {
	if b.server == nil {
		return nil, fmt.Errorf("%w: %s has no %s and %s", ErrInvalid, b.Dir, ServerCert, ServerKey)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{*b.server},
		ClientAuth:   clientAuth,
		ClientCAs:    b.pool,
	}, nil
}

// ClientConfig is the tls.Config of a client that trusts only the
// directory's CA and presents the directory's client certificate when it
// has one. serverName, when set, is the name the server's certificate must
// hold; "" leaves it to the dialer (crypto/tls takes the host dialled).
func (b *Bundle) ClientConfig(serverName string) (*tls.Config, error) {
	c := &tls.Config{
		MinVersion: tls.VersionTLS12,
		RootCAs:    b.pool,
		ServerName: serverName,
	}
	if b.client != nil {
		c.Certificates = []tls.Certificate{*b.client}
	}
	return c, nil
}

// Peer is the common name of the verified client certificate of a TLS
// connection's state, and false when the client presented none.
func Peer(st *tls.ConnectionState) (string, bool) {
	if st == nil || len(st.VerifiedChains) == 0 || len(st.VerifiedChains[0]) == 0 {
		return "", false
	}
	return st.VerifiedChains[0][0].Subject.CommonName, true
}
