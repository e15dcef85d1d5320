package nbdserve

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"syscall"
	"time"
)

// Listen opens a listener on addr, which is HOST:PORT or unix:PATH, and
// returns it with the NBD URI a client would use for it. A unix socket file
// left behind by a process that died is removed; one that still answers is
// an error.
func Listen(addr string) (net.Listener, string, error) {
	return ListenWith(addr, nil)
}

// Listeners opens listeners that a process's successor inherits
// (*upgrade.Upgrader is one).
type Listeners interface {
	// Inherited is the listener the parent passed for network and addr, or nil.
	Inherited(network, addr string) (net.Listener, error)
	// Listen returns the inherited listener or a new one.
	Listen(network, addr string) (net.Listener, error)
}

// ListenWith is Listen through ls (nil: plain net.Listen): a listener the
// parent passed is taken as it is.
func ListenWith(addr string, ls Listeners) (net.Listener, string, error) {
	listen := net.Listen
	if ls != nil {
		listen = ls.Listen
	}
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		if path == "" {
			return nil, "", fmt.Errorf("listen address %q: unix socket path is empty", addr)
		}
		var l net.Listener
		if ls != nil {
			var err error
			if l, err = ls.Inherited("unix", path); err != nil {
				return nil, "", fmt.Errorf("listening on %s: %w", addr, err)
			}
		}
		var err error
		if l == nil {
			if err = removeStaleSocket(path); err != nil {
				return nil, "", err
			}
			l, err = listen("unix", path)
		}
		if err != nil {
			return nil, "", fmt.Errorf("listening on %s: %w", addr, err)
		}
		return l, "nbd+unix:///?socket=" + socketQuery(path), nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, "", fmt.Errorf("listen address %q: want HOST:PORT or unix:PATH: %w", addr, err)
	}
	if _, err := net.LookupPort("tcp", port); err != nil {
		return nil, "", fmt.Errorf("listen address %q: bad port: %w", addr, err)
	}
	l, err := listen("tcp", net.JoinHostPort(host, port))
	if err != nil {
		return nil, "", fmt.Errorf("listening on %s: %w", addr, err)
	}
	return l, "nbd://" + l.Addr().String() + "/", nil
}

func removeStaleSocket(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("checking %s: %w", path, err)
	}
	if st.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket; refusing to replace it", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("%s: another process is already listening there", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("checking %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("removing stale socket %s: %w", path, err)
	}
	return nil
}

// socketQuery escapes a socket path for an NBD URI's query. Clients decode
// percent-escapes only (a '+' stays a '+'), so spaces become %20; slashes
// stay readable.
func socketQuery(path string) string {
	return strings.NewReplacer("+", "%20", "%2F", "/").Replace(url.QueryEscape(path))
}

// TLSURI is uri, as Listen returns it, for a client that must use TLS
// (a server with nbd.TLSRequire): nbds:// or nbds+unix://, as libnbd
// spells it.
func TLSURI(uri string) string {
	if rest, ok := strings.CutPrefix(uri, "nbd+unix://"); ok {
		return "nbds+unix://" + rest
	}
	if rest, ok := strings.CutPrefix(uri, "nbd://"); ok {
		return "nbds://" + rest
	}
	return uri
}
