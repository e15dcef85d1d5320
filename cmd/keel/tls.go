package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/spf13/cobra"

	"github.com/keelstore/keel/services/keeltls"
	"github.com/keelstore/keel/services/wire"
)

// clusterTLSEnv, when set, is the default of every --cluster-tls flag.
const clusterTLSEnv = "KEEL_CLUSTER_TLS"

const clusterTLSHelp = "directory with the cluster's certificates (keel tls cert create): ca-cert.pem, server-cert.pem/key, client-cert.pem/key; " +
	"every link between Keel processes (Raft, HTTP API, image sync) is then mutual TLS (default $" + clusterTLSEnv + ")"

const clusterTLSClientHelp = "directory with a client certificate of the cluster (keel tls cert create --client): ca-cert.pem, client-cert.pem/key; " +
	"needed when the servers run with --cluster-tls (default $" + clusterTLSEnv + ")"

func newTLSCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "tls",
		Short: "Create the cluster's CA and its nodes' and clients' certificates",
		Long: `Create the certificates for --cluster-tls (mutual TLS between Keel's own
processes: Raft, the HTTP API, image sync) and for --tls-certificates (NBD
over TLS, for qemu and nbdkit; the same directories work for both).

One CA per cluster: every certificate it signed is trusted for everything,
so keep DIR/ca-key.pem off the nodes. Each node, proxy and operator gets one
directory in qemu's and nbdkit's layout: ca-cert.pem, server-cert.pem and
server-key.pem, client-cert.pem and client-key.pem.`,
		Example: `  keel tls ca create --dir /etc/keel/ca
  keel tls cert create --ca /etc/keel/ca --dir /etc/keel/n1 --name n1 --host 10.0.0.1 --host n1.example.com
  keel tls cert create --ca /etc/keel/ca --dir ~/.keel/admin --name admin --client`,
	}
	ca := &cobra.Command{Use: "ca", Short: "Create a cluster CA", Example: "  keel tls ca create --dir /etc/keel/ca"}
	ca.AddCommand(newTLSCACreateCmd())
	cert := &cobra.Command{Use: "cert", Short: "Create a node's or a client's certificates, signed by the CA",
		Example: "  keel tls cert create --ca /etc/keel/ca --dir /etc/keel/n1 --name n1 --host 10.0.0.1"}
	cert.AddCommand(newTLSCertCreateCmd())
	cmd.AddCommand(ca, cert)
	return cmd
}

func newTLSCACreateCmd() *cobra.Command {
	var dir, name string
	var days int
	cmd := &cobra.Command{
		Use:   "create --dir DIR [--name NAME] [--days N]",
		Short: "Create a CA: DIR/ca-cert.pem and DIR/ca-key.pem (ECDSA P-256)",
		Long: `Create a new CA in DIR (made if missing): ca-cert.pem, which every node and
client trusts, and ca-key.pem (mode 0600), which signs certificates (keel tls
cert create) and should stay off the nodes. Existing files are never
overwritten.`,
		Example: `  keel tls ca create --dir /etc/keel/ca --name "Keel CA vm1" --days 1825`,
		Args:    cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			v, err := validity(days)
			if err != nil {
				return err
			}
			if err := keeltls.CreateCA(dir, keeltls.CAOptions{Name: name, Validity: v}); err != nil {
				return err
			}
			fmt.Fprintf(c.OutOrStdout(), "created CA %s (%s) and its key %s\n",
				filepath.Join(dir, keeltls.CACert), caName(name), filepath.Join(dir, keeltls.CAKey))
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory for ca-cert.pem and ca-key.pem (required)")
	cmd.Flags().StringVar(&name, "name", "", `the CA's common name (default "Keel CA")`)
	cmd.Flags().IntVar(&days, "days", 5*365, "how many days the CA is valid")
	_ = cmd.MarkFlagRequired("dir")
	return cmd
}

func caName(n string) string {
	if n == "" {
		return "Keel CA"
	}
	return n
}

func newTLSCertCreateCmd() *cobra.Command {
	var ca, dir, name string
	var hosts []string
	var server, client bool
	var days int
	cmd := &cobra.Command{
		Use:   "create --ca DIR --dir OUT --name NAME --host H [--host H ...] [--server] [--client] [--days N]",
		Short: "Create a node's or a client's certificates in OUT, signed by the CA in DIR",
		Long: `Write OUT (made if missing) in qemu's and nbdkit's layout: ca-cert.pem, and
server-cert.pem + server-key.pem (--server), client-cert.pem + client-key.pem
(--client); both kinds when neither is given. A server certificate is valid
for every --host (an IP address or a DNS name, as its peers and clients dial
it). keel server and keel proxy need both kinds; the CLI (keel cluster, keel
verify) needs a client certificate. Existing files are never overwritten.`,
		Example: `  keel tls cert create --ca /etc/keel/ca --dir /etc/keel/n1 --name n1 --host 10.0.0.1 --host n1.example.com
  keel tls cert create --ca /etc/keel/ca --dir /etc/keel/proxy --name proxy-host1 --host 127.0.0.1
  keel tls cert create --ca /etc/keel/ca --dir ~/.keel/admin --name admin --client`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			v, err := validity(days)
			if err != nil {
				return err
			}
			if _, err := os.Stat(filepath.Join(ca, keeltls.CAKey)); err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return fmt.Errorf("--ca %s: no CA there (no %s); create one with keel tls ca create --dir %s", ca, keeltls.CAKey, ca)
				}
				return fmt.Errorf("--ca %s: %w", ca, err)
			}
			opts := keeltls.CertOptions{Name: name, Hosts: hosts, Server: server, Client: client, Validity: v}
			if err := keeltls.CreateCert(ca, dir, opts); err != nil {
				return err
			}
			kinds := "server and client certificates"
			switch {
			case server && !client:
				kinds = "a server certificate"
			case client && !server:
				kinds = "a client certificate"
			}
			fmt.Fprintf(c.OutOrStdout(), "created %s for %s in %s\n", kinds, name, dir)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&ca, "ca", "", "the CA's directory (keel tls ca create --dir) (required)")
	fl.StringVar(&dir, "dir", "", "directory to write the certificates to (required)")
	fl.StringVar(&name, "name", "", "the certificate's common name: a node id, a proxy's or an operator's name (required)")
	fl.StringSliceVar(&hosts, "host", nil, "an IP address or DNS name the server certificate is valid for; repeat for more (required for a server certificate)")
	fl.BoolVar(&server, "server", false, "write a server certificate (server-cert.pem, server-key.pem)")
	fl.BoolVar(&client, "client", false, "write a client certificate (client-cert.pem, client-key.pem)")
	fl.IntVar(&days, "days", 365, "how many days the certificates are valid (at most the CA's remaining validity)")
	for _, f := range []string{"ca", "dir", "name"} {
		_ = cmd.MarkFlagRequired(f)
	}
	return cmd
}

func validity(days int) (time.Duration, error) {
	if days < 1 || days > 100*365 {
		return 0, fmt.Errorf("--days %d: must be from 1 to %d", days, 100*365)
	}
	return time.Duration(days) * 24 * time.Hour, nil
}

// loadClusterTLS reads --cluster-tls DIR for a server or a proxy, which
// need a server and a client certificate; "" is nil (cluster TLS off).
func loadClusterTLS(dir string) (*wire.ClusterTLS, error) {
	if dir == "" {
		return nil, nil
	}
	b, err := keeltls.Load(dir)
	if err != nil {
		return nil, fmt.Errorf("--cluster-tls %s: %w", dir, err)
	}
	if !b.HasServer() || !b.HasClient() {
		return nil, fmt.Errorf("--cluster-tls %s: a server or proxy needs both %s and %s (keel tls cert create without --server or --client writes both)",
			dir, keeltls.ServerCert, keeltls.ClientCert)
	}
	srv, err := b.ServerConfig(tls.RequireAndVerifyClientCert)
	if err != nil {
		return nil, fmt.Errorf("--cluster-tls %s: %w", dir, err)
	}
	cli, err := b.ClientConfig("")
	if err != nil {
		return nil, fmt.Errorf("--cluster-tls %s: %w", dir, err)
	}
	return &wire.ClusterTLS{Server: srv, Client: cli}, nil
}

// loadClientTLS reads --cluster-tls DIR for the CLI, which needs a client
// certificate; "" is nil (plain HTTP).
func loadClientTLS(dir string) (*tls.Config, error) {
	if dir == "" {
		return nil, nil
	}
	b, err := keeltls.Load(dir)
	if err != nil {
		return nil, fmt.Errorf("--cluster-tls %s: %w", dir, err)
	}
	if !b.HasClient() {
		return nil, fmt.Errorf("--cluster-tls %s: no %s and %s (keel tls cert create --client)", dir, keeltls.ClientCert, keeltls.ClientKey)
	}
	return b.ClientConfig("")
}

// clientTLSFlag adds --cluster-tls to a CLI command, its default from
// $KEEL_CLUSTER_TLS.
func clientTLSFlag(c *cobra.Command, dir *string, persistent bool) {
	fl := c.Flags()
	if persistent {
		fl = c.PersistentFlags()
	}
	fl.StringVar(dir, "cluster-tls", os.Getenv(clusterTLSEnv), clusterTLSClientHelp)
}

// checkCertHosts says, in one sentence, when the server certificate of
// --cluster-tls dir is not valid for the host of an address a flag gives
// (peers dialing it would refuse the handshake); unspecified hosts
// (":7001", "0.0.0.0:7001") and unix sockets are not checked.
func checkCertHosts(ct *wire.ClusterTLS, dir string, flags map[string]string) error {
	if ct == nil || len(ct.Server.Certificates) == 0 {
		return nil
	}
	c := ct.Server.Certificates[0]
	leaf := c.Leaf
	if leaf == nil {
		var err error
		if leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
			return fmt.Errorf("--cluster-tls %s: %s: %w", dir, keeltls.ServerCert, err)
		}
	}
	names := slices.Sorted(maps.Keys(flags))
	for _, flag := range names {
		host, _, err := net.SplitHostPort(flags[flag])
		if err != nil || host == "" {
			continue
		}
		if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
			continue
		}
		if err := leaf.VerifyHostname(host); err != nil {
			hosts := append(slices.Clone(leaf.DNSNames), ipStrings(leaf.IPAddresses)...)
			return fmt.Errorf("--cluster-tls %s: %s is for %v, not for %s (%s %s): peers would refuse it; make one with keel tls cert create --host %s",
				dir, keeltls.ServerCert, hosts, host, flag, flags[flag], host)
		}
	}
	return nil
}

func ipStrings(ips []net.IP) []string {
	var s []string
	for _, ip := range ips {
		s = append(s, ip.String())
	}
	return s
}
