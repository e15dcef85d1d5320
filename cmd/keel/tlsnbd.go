package main

import (
	"crypto/tls"
	"errors"
	"fmt"

	"github.com/spf13/pflag"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/services/keeltls"
)

// NBD over TLS, the flags of keel serve, keel server and keel proxy, as
// nbdkit names them:
//
//	--tls off|on|require    the listener's mode (nbd.TLSMode). Default:
//	                        require when --tls-certificates is given and
//	                        holds a server certificate, else off. "on"
//	                        must be asked for: it also serves plain-text
//	                        clients, which a man in the middle can fake.
//	--tls-certificates DIR  ca-cert.pem, server-cert.pem, server-key.pem
//	                        (qemu's and nbdkit's layout; client-cert.pem
//	                        and client-key.pem too for a proxy's links)
//	--tls-verify-peer       clients must show a certificate signed by
//	                        DIR/ca-cert.pem
//	--upstream-tls          keel proxy only: its NBD links to the servers
//	                        run over TLS, checked against DIR/ca-cert.pem,
//	                        showing DIR/client-cert.pem when present.
//	                        Default: on when --tls-certificates is given.

// nbdTLSFlags are the NBD TLS flags of one command.
type nbdTLSFlags struct {
	mode       string
	dir        string
	verifyPeer bool
	upstream   bool
	// hasUpstream: --upstream-tls is one of the command's flags.
	hasUpstream bool
	fs          *pflag.FlagSet // to tell a flag given from its default
}

// register adds the flags to fl; upstream adds --upstream-tls (keel proxy).
func (f *nbdTLSFlags) register(fl *pflag.FlagSet, upstream bool) {
	f.fs = fl
	fl.StringVar(&f.mode, "tls", "", "NBD over TLS (STARTTLS): off, on (TLS offered, plain clients served too) or require; default require with --tls-certificates, else off")
	fl.StringVar(&f.dir, "tls-certificates", "", "directory with the NBD TLS certificates in qemu's and nbdkit's layout: ca-cert.pem, server-cert.pem, server-key.pem (keel tls cert create)")
	fl.BoolVar(&f.verifyPeer, "tls-verify-peer", false, "with TLS, accept only NBD clients that show a certificate signed by the directory's ca-cert.pem")
	f.hasUpstream = upstream
	if upstream {
		fl.BoolVar(&f.upstream, "upstream-tls", false, "the proxy's NBD links to the servers use TLS, checked against the directory's ca-cert.pem and showing its client-cert.pem if present (default true with --tls-certificates)")
	}
}

// nbdTLS is what the flags resolve to.
type nbdTLS struct {
	Mode     nbd.TLSMode
	Server   *tls.Config // the listener's; nil when Mode is off
	Upstream *tls.Config // the proxy's links to the servers; nil: plain
	Dir      string
}

// String describes the listener's TLS for the start-up log line.
func (t nbdTLS) String() string {
	if t.Mode == nbd.TLSOff {
		return "off"
	}
	s := t.Mode.String() + " (" + t.Dir
	if t.Server != nil && t.Server.ClientAuth == tls.RequireAndVerifyClientCert {
		s += ", peers verified"
	}
	return s + ")"
}

func (f *nbdTLSFlags) changed(name string) bool {
	return f.fs != nil && f.fs.Changed(name)
}

// load checks the flags and loads the certificate directory. Every error
// is one sentence naming the flag or the file.
func (f *nbdTLSFlags) load() (nbdTLS, error) {
	out := nbdTLS{Dir: f.dir}
	explicit := f.mode != ""
	if explicit {
		m, err := nbd.ParseTLSMode(f.mode)
		if err != nil {
			return out, fmt.Errorf("--tls %q: must be off, on or require", f.mode)
		}
		out.Mode = m
	}
	if f.dir == "" {
		switch {
		case out.Mode != nbd.TLSOff:
			return out, fmt.Errorf("--tls %v needs --tls-certificates DIR (with ca-cert.pem, server-cert.pem and server-key.pem; keel tls cert create makes them)", out.Mode)
		case f.verifyPeer:
			return out, errors.New("--tls-verify-peer needs --tls-certificates DIR (its ca-cert.pem checks the clients)")
		case f.upstream:
			return out, errors.New("--upstream-tls needs --tls-certificates DIR (its ca-cert.pem checks the servers)")
		}
		return out, nil
	}
	b, err := keeltls.Load(f.dir)
	if err != nil {
		return out, fmt.Errorf("--tls-certificates: %w", err)
	}
	// A proxy's links use TLS when it has a directory, unless told not to.
	upstream := f.hasUpstream && (f.upstream || !f.changed("upstream-tls"))
	if !explicit {
		out.Mode = nbd.TLSRequire
		if !b.HasServer() && upstream {
			// A proxy's client-only directory: TLS on its links only.
			out.Mode = nbd.TLSOff
		}
	}
	if out.Mode != nbd.TLSOff {
		if !b.HasServer() {
			return out, fmt.Errorf("--tls %v: %s has no server-cert.pem and server-key.pem", out.Mode, f.dir)
		}
		auth := tls.NoClientCert
		if f.verifyPeer {
			auth = tls.RequireAndVerifyClientCert
		}
		if out.Server, err = b.ServerConfig(auth); err != nil {
			return out, fmt.Errorf("--tls-certificates: %w", err)
		}
	} else if f.verifyPeer {
		return out, errors.New("--tls-verify-peer with --tls off: no client is asked for a certificate")
	}
	if upstream {
		if out.Upstream, err = b.ClientConfig(""); err != nil {
			return out, fmt.Errorf("--tls-certificates: %w", err)
		}
	}
	return out, nil
}
