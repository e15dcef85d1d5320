// Package control is how a soak tells a running keel process which fault
// to switch on. A keel binary built with -tags chaos (cmd/keel/chaos.go)
// starts a Server in every server and proxy process when $KEEL_CHAOS_DIR
// is set: an HTTP server on the unix socket $KEEL_CHAOS_DIR/NAME.sock
// (NAME: the server's --id, or "proxy-" and the proxy's --writer), which
// only the owner of that directory can reach. The soak (chaos/soak) talks
// to it with Client.
//
//	GET  /v1/net   the network rules in force (netfault.Rules, JSON)
//	PUT  /v1/net   replace them
//	PUT  /v1/point {"point": NAME, "count": N}: the next N passes through
//	               supervise's point NAME panic (package faultpoint)
//	PUT  /v1/disk  replace the disk rules (diskfault.Rules)
//	PUT  /v1/image replace the image rules (imagefault.Rules)
//	POST /v1/crash simulate power loss: what was not fsynced is lost (of
//	               the log, a random prefix of it torn in; of the image,
//	               a random set of blocks kept), then the process kills
//	               itself with SIGKILL; the request gets no answer
//
// Without the chaos tag, nothing of chaos/ is linked into keel and no
// socket exists. Production code never imports this package.
package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/keelstore/keel/chaos/diskfault"
	"github.com/keelstore/keel/chaos/faultpoint"
	"github.com/keelstore/keel/chaos/imagefault"
	"github.com/keelstore/keel/chaos/netfault"
)

// EnvDir names the directory of the control sockets.
const EnvDir = "KEEL_CHAOS_DIR"

// SocketPath is the control socket of process name under dir.
func SocketPath(dir, name string) string { return filepath.Join(dir, name+".sock") }

// Server serves the control API for one process.
type Server struct {
	// Path is the unix socket; required.
	Path string
	// Net is the network layer's table; nil: no network faults here.
	Net *netfault.Table
	// Dialer, if set, is the layer under the process's outgoing
	// connections; PUT /v1/net goes through it (so that a partition resets
	// the connections open), and it must use Net.
	Dialer *netfault.Dialer
	// Points arms the named panic points.
	Points *faultpoint.Table
	// Disk is the disk layer under the log; nil: no disk faults here.
	Disk *diskfault.FS
	// Image is the layer under the image; nil: no image faults here.
	Image *imagefault.Layer
	// Crash simulates power loss and kills the process; nil: refused.
	Crash func()
}

// Arm is the body of PUT /v1/point.
type Arm struct {
	Point string `json:"point"`
	Count int    `json:"count"`
}

// Listen binds the socket at path, replacing one a killed run left.
//
// A process that takes over from another (keel upgrade) binds the same
// path while its parent still serves it: the path is replaced, and the
// parent, when it stops, leaves the path alone (see ServeListener).
func Listen(path string) (net.Listener, error) {
	_ = os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control: %w", err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false) // ServeListener decides
	return l, nil
}

// removeIfOurs removes path if it is still the socket l bound (not a
// successor's).
func removeIfOurs(path string, bound os.FileInfo) {
	if now, err := os.Stat(path); err == nil && bound != nil && os.SameFile(now, bound) {
		_ = os.Remove(path)
	}
}

// Serve listens on Path until ctx ends, then closes and removes it.
func (s *Server) Serve(ctx context.Context) error {
	l, err := Listen(s.Path)
	if err != nil {
		return err
	}
	return s.ServeListener(ctx, l)
}

// ServeListener serves on l (from Listen) until ctx ends, then closes it
// and removes Path.
func (s *Server) ServeListener(ctx context.Context, l net.Listener) error {
	bound, _ := os.Stat(s.Path)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/net", func(w http.ResponseWriter, r *http.Request) {
		if s.Net == nil {
			http.Error(w, "no network layer in this process", http.StatusNotFound)
			return
		}
		_ = json.NewEncoder(w).Encode(s.Net.Rules())
	})
	mux.HandleFunc("PUT /v1/net", func(w http.ResponseWriter, r *http.Request) {
		if s.Net == nil {
			http.Error(w, "no network layer in this process", http.StatusNotFound)
			return
		}
		var rules netfault.Rules
		if err := json.NewDecoder(r.Body).Decode(&rules); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		set := s.Net.Set
		if s.Dialer != nil {
			set = s.Dialer.SetRules
		}
		if err := set(rules); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("PUT /v1/point", func(w http.ResponseWriter, r *http.Request) {
		var a Arm
		if err := json.NewDecoder(r.Body).Decode(&a); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if s.Points == nil {
			http.Error(w, "no panic points in this process", http.StatusNotFound)
			return
		}
		if err := s.Points.Arm(a.Point, a.Count); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("PUT /v1/disk", func(w http.ResponseWriter, r *http.Request) {
		if s.Disk == nil {
			http.Error(w, "no disk layer in this process", http.StatusNotFound)
			return
		}
		var rules diskfault.Rules
		if err := json.NewDecoder(r.Body).Decode(&rules); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if err := s.Disk.Set(rules); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("PUT /v1/image", func(w http.ResponseWriter, r *http.Request) {
		if s.Image == nil {
			http.Error(w, "no image layer in this process", http.StatusNotFound)
			return
		}
		var rules imagefault.Rules
		if err := json.NewDecoder(r.Body).Decode(&rules); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if err := s.Image.Set(rules); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /v1/crash", func(w http.ResponseWriter, r *http.Request) {
		if s.Crash == nil {
			http.Error(w, "this process cannot crash on request", http.StatusNotFound)
			return
		}
		s.Crash() // does not return
	})
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(l) }()
	select {
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = hs.Shutdown(sctx)
		<-errc
		removeIfOurs(s.Path, bound)
		return nil
	case err := <-errc:
		return fmt.Errorf("control: %w", err)
	}
}

// Client talks to one process's control socket.
type Client struct {
	path string
	hc   *http.Client
}

// NewClient returns a client of the socket at path.
func NewClient(path string) *Client {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}
	return &Client{path: path, hc: &http.Client{Transport: tr, Timeout: 5 * time.Second}}
}

// ErrRefused: the process answered with an error.
var ErrRefused = errors.New("control: refused")

// SetNet replaces the process's network rules.
func (c *Client) SetNet(ctx context.Context, r netfault.Rules) error { return c.put(ctx, "/v1/net", r) }

// SetDisk replaces the process's disk rules.
func (c *Client) SetDisk(ctx context.Context, r diskfault.Rules) error {
	return c.put(ctx, "/v1/disk", r)
}

// SetImage replaces the process's image rules.
func (c *Client) SetImage(ctx context.Context, r imagefault.Rules) error {
	return c.put(ctx, "/v1/image", r)
}

// Crash asks the process to lose what it has not fsynced and die; the
// error (the connection breaks) says nothing, so it is not returned: wait
// for the process to exit.
func (c *Client) Crash(ctx context.Context) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://chaos/v1/crash", nil)
	if err != nil {
		return
	}
	if resp, err := c.hc.Do(req); err == nil {
		resp.Body.Close()
	}
}

// ArmPoint makes the next count passes through point panic.
func (c *Client) ArmPoint(ctx context.Context, point string, count int) error {
	return c.put(ctx, "/v1/point", Arm{Point: point, Count: count})
}

func (c *Client) put(ctx context.Context, path string, body any) error {
	b, err := json.Marshal(body)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, "http://chaos"+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("control %s: %w", c.path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		msg := make([]byte, 512)
		n, _ := resp.Body.Read(msg)
		return fmt.Errorf("%w: %s: %s", ErrRefused, resp.Status, msg[:n])
	}
	return nil
}

// Net returns the process's network rules.
func (c *Client) Net(ctx context.Context) (netfault.Rules, error) {
	var r netfault.Rules
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://chaos/v1/net", nil)
	if err != nil {
		return r, err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return r, fmt.Errorf("control %s: %w", c.path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return r, fmt.Errorf("%w: %s", ErrRefused, resp.Status)
	}
	return r, json.NewDecoder(resp.Body).Decode(&r)
}

// Close releases the client's idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }
