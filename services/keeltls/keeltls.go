// Package keeltls makes and loads the X.509 certificates Keel's TLS uses.
//
// A certificate directory has the layout qemu's tls-creds-x509 object and
// nbdkit's --tls-certificates read, so one directory serves qemu, nbdkit,
// libnbd and Keel alike:
//
//	ca-cert.pem                      the CA that signed everything below
//	server-cert.pem, server-key.pem  this node's server certificate and key
//	client-cert.pem, client-key.pem  this node's client certificate and key
//
// A CA directory (CreateCA) holds ca-cert.pem and ca-key.pem; the key never
// leaves it. CreateCert signs a node's certificates with it and writes the
// node directory. Load reads a node directory and checks it (every
// certificate signed by the CA, each key matching its certificate, none
// expired), and Bundle builds the tls.Config of a server or a client.
//
// keeltls owns files and crypto/x509 only: it imports nothing of Keel's.
package keeltls

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// File names, in qemu's and nbdkit's layout.
const (
	CACert     = "ca-cert.pem"
	CAKey      = "ca-key.pem"
	ServerCert = "server-cert.pem"
	ServerKey  = "server-key.pem"
	ClientCert = "client-cert.pem"
	ClientKey  = "client-key.pem"
)

// Errors a caller may test for.
var (
	// ErrExists: CreateCA or CreateCert would overwrite a file.
	ErrExists = errors.New("keeltls: file already exists")
	// ErrInvalid: a certificate directory is incomplete or inconsistent.
	ErrInvalid = errors.New("keeltls: invalid certificate directory")
)

// CAOptions configure CreateCA.
type CAOptions struct {
	// Name is the CA's common name; "" means "Keel CA".
	Name string
	// Validity is how long the CA is valid from now; 0 means 5 years.
	Validity time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// CertOptions configure CreateCert.
type CertOptions struct {
	// Name is the certificate's common name (a node id, "proxy", an
	// operator's name). Required.
	Name string
	// Hosts are the IP addresses and DNS names the server certificate is
	// valid for. Required when Server is set.
	Hosts []string
	// Server and Client choose which certificates to write; neither means
	// both.
	Server, Client bool
	// Validity is how long the certificates are valid from now; 0 means
	// one year. It is capped at the CA's own expiry.
	Validity time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Validate checks the options.
func (o CertOptions) Validate() error {
	if strings.TrimSpace(o.Name) == "" {
		return errors.New("keeltls: a certificate needs a name")
	}
	for _, h := range o.Hosts {
		if _, err := parseHost(h); err != nil {
			return err
		}
	}
	if o.wantServer() && len(o.Hosts) == 0 {
		return errors.New("keeltls: a server certificate needs at least one host (an IP address or a DNS name its clients dial)")
	}
	if o.Validity < 0 {
		return fmt.Errorf("keeltls: validity %v is negative", o.Validity)
	}
	return nil
}

func (o CertOptions) wantServer() bool { return o.Server || !o.Client }
func (o CertOptions) wantClient() bool { return o.Client || !o.Server }

// host is a parsed CertOptions.Hosts entry: an IP or a DNS name.
type host struct {
	ip  net.IP
	dns string
}

func parseHost(h string) (host, error) {
	if ip := net.ParseIP(h); ip != nil {
		return host{ip: ip}, nil
	}
	if validDNSName(h) {
		return host{dns: strings.ToLower(h)}, nil
	}
	return host{}, fmt.Errorf("keeltls: host %q is neither an IP address nor a DNS name", h)
}

// validDNSName: labels of letters, digits and hyphens, not starting or
// ending with a hyphen, at most 63 bytes each and 253 in all; a leading
// "*." is allowed for a wildcard.
func validDNSName(s string) bool {
	s = strings.TrimPrefix(s, "*.")
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

func now(f func() time.Time) time.Time {
	if f == nil {
		return time.Now()
	}
	return f()
}

// CreateCA makes a new CA in dir (created if missing): ca-cert.pem and
// ca-key.pem (mode 0600). It refuses to overwrite either.
func CreateCA(dir string, opts CAOptions) error {
	if opts.Name == "" {
		opts.Name = "Keel CA"
	}
	if opts.Validity == 0 {
		opts.Validity = 5 * 365 * 24 * time.Hour
	}
	if opts.Validity < 0 {
		return fmt.Errorf("keeltls: validity %v is negative", opts.Validity)
	}
	if err := refuseExisting(dir, CACert, CAKey); err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("keeltls: generating the CA key: %w", err)
	}
	t := now(opts.Now)
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: opts.Name, Organization: []string{"Keel"}},
		NotBefore:             t.Add(-time.Minute),
		NotAfter:              t.Add(opts.Validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("keeltls: signing the CA certificate: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("keeltls: %w", err)
	}
	if err := writeKey(filepath.Join(dir, CAKey), key); err != nil {
		return err
	}
	return writePEM(filepath.Join(dir, CACert), "CERTIFICATE", der, 0o644)
}

// CreateCert signs certificates for one node with the CA in caDir and
// writes outDir (created if missing) in the layout Load reads: ca-cert.pem
// and the server and/or client pair. It refuses to overwrite a
// certificate or key; an existing ca-cert.pem is accepted when it is the
// same CA.
func CreateCert(caDir, outDir string, opts CertOptions) error {
	if err := opts.Validate(); err != nil {
		return err
	}
	ca, caKey, caPEM, err := loadCA(caDir)
	if err != nil {
		return err
	}
	var names []string
	if opts.wantServer() {
		names = append(names, ServerCert, ServerKey)
	}
	if opts.wantClient() {
		names = append(names, ClientCert, ClientKey)
	}
	if err := refuseExisting(outDir, names...); err != nil {
		return err
	}
	if old, err := os.ReadFile(filepath.Join(outDir, CACert)); err == nil && !bytes.Equal(old, caPEM) {
		return fmt.Errorf("%w: %s holds a different CA than %s", ErrExists, filepath.Join(outDir, CACert), filepath.Join(caDir, CACert))
	}
	if opts.Validity == 0 {
		opts.Validity = 365 * 24 * time.Hour
	}
	t := now(opts.Now)
	notAfter := t.Add(opts.Validity)
	if notAfter.After(ca.NotAfter) {
		notAfter = ca.NotAfter
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return fmt.Errorf("keeltls: %w", err)
	}
	if err := os.WriteFile(filepath.Join(outDir, CACert), caPEM, 0o644); err != nil {
		return fmt.Errorf("keeltls: %w", err)
	}
	sign := func(certName, keyName string, usage x509.ExtKeyUsage) error {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return fmt.Errorf("keeltls: generating a key: %w", err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: serial(),
			Subject:      pkix.Name{CommonName: opts.Name, Organization: []string{"Keel"}},
			NotBefore:    t.Add(-time.Minute),
			NotAfter:     notAfter,
			KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		}
		if usage == x509.ExtKeyUsageServerAuth {
			for _, h := range opts.Hosts {
				p, _ := parseHost(h) // validated above
				if p.ip != nil {
					tmpl.IPAddresses = append(tmpl.IPAddresses, p.ip)
				} else {
					tmpl.DNSNames = append(tmpl.DNSNames, p.dns)
				}
			}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return fmt.Errorf("keeltls: signing %s: %w", certName, err)
		}
		if err := writeKey(filepath.Join(outDir, keyName), key); err != nil {
			return err
		}
		return writePEM(filepath.Join(outDir, certName), "CERTIFICATE", der, 0o644)
	}
	if opts.wantServer() {
		if err := sign(ServerCert, ServerKey, x509.ExtKeyUsageServerAuth); err != nil {
			return err
		}
	}
	if opts.wantClient() {
		if err := sign(ClientCert, ClientKey, x509.ExtKeyUsageClientAuth); err != nil {
			return err
		}
	}
	return nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(fmt.Sprintf("keeltls: crypto/rand failed: %v", err))
	}
	return n
}

func refuseExisting(dir string, names ...string) error {
	for _, n := range names {
		p := filepath.Join(dir, n)
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("%w: %s (remove it first to make a new one)", ErrExists, p)
		}
	}
	return nil
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("keeltls: %w", err)
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("%w: %s", ErrExists, path)
		}
		return fmt.Errorf("keeltls: %w", err)
	}
	if err := pem.Encode(f, &pem.Block{Type: typ, Bytes: der}); err != nil {
		f.Close()
		return fmt.Errorf("keeltls: writing %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("keeltls: writing %s: %w", path, err)
	}
	return f.Close()
}

func loadCA(dir string) (*x509.Certificate, crypto.Signer, []byte, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CACert))
	if err != nil {
		return nil, nil, nil, fmt.Errorf("keeltls: reading the CA: %w (make one with keel tls ca create)", err)
	}
	ca, err := parseCert(filepath.Join(dir, CACert), certPEM)
	if err != nil {
		return nil, nil, nil, err
	}
	if !ca.IsCA {
		return nil, nil, nil, fmt.Errorf("%w: %s is not a CA certificate", ErrInvalid, filepath.Join(dir, CACert))
	}
	keyPath := filepath.Join(dir, CAKey)
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("keeltls: reading the CA key: %w", err)
	}
	key, err := parseKey(keyPath, keyPEM)
	if err != nil {
		return nil, nil, nil, err
	}
	if !samePublicKey(ca.PublicKey, key.Public()) {
		return nil, nil, nil, fmt.Errorf("%w: %s does not match %s", ErrInvalid, keyPath, filepath.Join(dir, CACert))
	}
	return ca, key, certPEM, nil
}

func parseCert(path string, data []byte) (*x509.Certificate, error) {
	b, _ := pem.Decode(data)
	if b == nil || b.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%w: %s holds no PEM certificate", ErrInvalid, path)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrInvalid, path, err)
	}
	return c, nil
}

func parseKey(path string, data []byte) (crypto.Signer, error) {
	b, _ := pem.Decode(data)
	if b == nil || !strings.HasSuffix(b.Type, "PRIVATE KEY") {
		return nil, fmt.Errorf("%w: %s holds no PEM private key", ErrInvalid, path)
	}
	var k any
	var err error
	switch b.Type {
	case "EC PRIVATE KEY":
		k, err = x509.ParseECPrivateKey(b.Bytes)
	case "RSA PRIVATE KEY":
		k, err = x509.ParsePKCS1PrivateKey(b.Bytes)
	default:
		k, err = x509.ParsePKCS8PrivateKey(b.Bytes)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrInvalid, path, err)
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("%w: %s: a %T key cannot sign", ErrInvalid, path, k)
	}
	return s, nil
}

func samePublicKey(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	e, ok := a.(equaler)
	return ok && e.Equal(b)
}
