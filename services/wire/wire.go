// Package wire holds what the servers, the proxy and the CLI say to one
// another over HTTP: the routes, the status, cluster and apply types, the
// Client that calls them, and Refusal, the one numeric code for a command
// the state machine refused with its one mapping to replica's sentinels
// and to NBD errnos.
//
// It imports nbd and replica only; never services/server or
// services/proxy (both speak it).
package wire

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	stdlog "log"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/keelstore/keel/replica"
)

// The HTTP API of a keel server (--http). JSON unless noted.
//
//	GET  /v1/status                       NodeStatus of this node
//	GET  /v1/cluster                      ClusterStatus: every member and its status
//	POST /v1/cluster/join                 JoinRequest -> JoinResponse (any member; forwarded to the leader)
//	POST /v1/cluster/remove               {"id": ...}
//	POST /v1/cluster/transfer-leadership  {"id": ...} (empty id: any voter)
//	POST /v1/apply                        internal: an encoded command -> ApplyResponse (leader only; headers Keel-Timeout-Ms, Keel-Level)
//	POST /v1/apply/stream                 internal: upgrade to the apply stream (stream.go), the proxy's writes as frames
//	POST /v1/verify/digest?min_index=N    replica.Digest at a stable applied index
//	GET  /v1/sync/hashes, /v1/sync/range  image sync source (replica/imagesync)
//	GET  /metrics                         Prometheus metrics

// Versions on the wire. Every JSON message below carries the sender's
// feature level (replica.Level) in "level"; an absent one (zero) is a
// build from before levels, level 1 (Level.Or). Every request the Client
// sends says its level in LevelHeader. The command in an apply request is
// in the form every build reads (replica.Command.EncodeCompat).

// LevelHeader, on every request, is the sender's feature level.
const LevelHeader = "Keel-Level"

// Level is the feature level this build speaks on the wire.
const Level = replica.CurrentLevel

// NodeStatus is one node's view of itself.
type NodeStatus struct {
	// Version is the node's build version (keel version); Level the
	// feature level it speaks.
	Version      string           `json:"version,omitempty"`
	Level        replica.Level    `json:"level,omitempty"`
	Self         replica.NodeInfo `json:"self"`
	State        string           `json:"state"` // Leader, Follower, Candidate, Shutdown, Starting
	Leader       string           `json:"leader,omitempty"`
	Term         uint64           `json:"term"`
	LastLogIndex uint64           `json:"last_log_index"`
	CommitIndex  uint64           `json:"commit_index"`
	// ReadIndex, on a leader: every write acknowledged before the status
	// was asked for is at or below it, and every replica's AppliedIndex
	// reaches it (it counts commands only; LastLogIndex also counts
	// raft's own no-op, barrier and configuration entries, which no
	// AppliedIndex ever reaches). 0 when unknown (a follower, a leader
	// that cannot commit a barrier now, or a server from before it).
	ReadIndex    uint64      `json:"read_index,omitempty"`
	AppliedIndex uint64      `json:"applied_index"`
	Writer       string      `json:"writer,omitempty"`
	Epoch        uint64      `json:"epoch"`
	ImagePath    string      `json:"image_path"`
	ImageSize    uint64      `json:"image_size"`
	Sync         *SyncStatus `json:"sync,omitempty"`
}

// DigestProgress is how far a node's image digest (keel verify) is: GET
// /v1/verify/progress, which answers while the digest holds the state
// machine (and /v1/status waits).
type DigestProgress struct {
	Running    bool   `json:"running"`
	BytesDone  uint64 `json:"bytes_done"`
	BytesTotal uint64 `json:"bytes_total"`
}

// SyncStatus is the progress of an image resync on this node.
type SyncStatus struct {
	Active          bool      `json:"active"`
	Index           uint64    `json:"index"` // the snapshot index being synced to
	BytesTotal      uint64    `json:"bytes_total"`
	BytesCompared   uint64    `json:"bytes_compared"`
	BytesMoved      uint64    `json:"bytes_moved"`
	BytesZeroed     uint64    `json:"bytes_zeroed"`
	RateBytesPerSec float64   `json:"rate_bytes_per_sec"`
	Peers           int       `json:"peers"`
	Started         time.Time `json:"started"`
	Finished        time.Time `json:"finished,omitempty"`
	Error           string    `json:"error,omitempty"`
}

// Member is one server of the Raft configuration.
type Member struct {
	replica.NodeInfo
	Suffrage string      `json:"suffrage"` // Voter, Nonvoter
	Status   *NodeStatus `json:"status,omitempty"`
	Error    string      `json:"error,omitempty"` // why Status is missing
}

// ClusterStatus is a node's view of the whole cluster.
type ClusterStatus struct {
	Level   replica.Level `json:"level,omitempty"` // the answering node's
	Leader  string        `json:"leader,omitempty"`
	Members []Member      `json:"members"`
}

// JoinRequest asks the cluster to add a node as a non-voter.
type JoinRequest struct {
	Node replica.NodeInfo `json:"node"`
	// Level and Version are the joining node's: the leader counts the
	// level into the cluster's before it adds the node.
	Level   replica.Level `json:"level,omitempty"`
	Version string        `json:"version,omitempty"`
}

// JoinResponse tells a joining node what it needs to start.
type JoinResponse struct {
	Level  replica.Level `json:"level,omitempty"` // the leader's
	Size   uint64        `json:"size"`
	Leader string        `json:"leader"`
}

// IDRequest names a member for remove and transfer-leadership.
type IDRequest struct {
	ID string `json:"id"`
}

// TimeoutHeader, on POST /v1/apply, says how many milliseconds the caller
// waits for the answer; the leader applies the command within that time.
// Client.Apply sets it from its context's deadline.
const TimeoutHeader = "Keel-Timeout-Ms"

// RelayHeader, set to "1" on POST /v1/apply, asks a follower to forward
// the command to the leader and answer once it has applied it itself,
// instead of answering "not the leader": a proxy that cannot reach the
// leader writes through a follower that can. A server of a build without
// it answers "not the leader", which the proxy retries like any refusal.
const RelayHeader = "Keel-Relay"

// ApplyResponse is the result of a forwarded command.
type ApplyResponse struct {
	Level     replica.Level `json:"level,omitempty"` // the answering leader's
	Index     uint64        `json:"index"`
	Epoch     uint64        `json:"epoch"`
	Duplicate bool          `json:"duplicate,omitempty"`
	// Refused: the FSM refused the command, or the leader did before
	// proposing it (RefusedFeatureLevel, RefusedUnknownCommand): a Refusal
	// code; Error says why.
	Refused Refusal `json:"refused,omitempty"`
	Error   string  `json:"error,omitempty"`
	// Holder names the writer that holds the volume when a claim is
	// refused (RefusedWriterHeld).
	Holder string `json:"holder,omitempty"`
}

// ErrorBody is the body of every non-2xx answer.
type ErrorBody struct {
	Error string `json:"error"`
	// NotLeader is set when the call needs the leader; Leader is its HTTP
	// address when known.
	NotLeader bool   `json:"not_leader,omitempty"`
	Leader    string `json:"leader,omitempty"`
}

// Client calls a keel server's HTTP API.
type Client struct {
	HTTP *http.Client
	// TLS, when set, is the cluster's client side (ClusterTLS.Client):
	// calls go over https with this process's client certificate.
	TLS *tls.Config
}

// NewClient returns a client with the given per-request timeout, over
// https with tlsConfig (the cluster client certificate, ClusterTLS.Client)
// when it is not nil. It keeps enough idle connections per peer for a
// follower forwarding many writes at once (net/http's default keeps 2).
func NewClient(timeout time.Duration, tlsConfig *tls.Config) *Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConnsPerHost = 128
	if tlsConfig != nil {
		t.TLSClientConfig = tlsConfig.Clone()
	}
	return &Client{HTTP: &http.Client{Timeout: timeout, Transport: t}, TLS: tlsConfig}
}

// ErrRemoteNotLeader is returned when the called node is not the leader.
var ErrRemoteNotLeader = errors.New("keel: the node called is not the leader")

// BaseURL turns a HOST:PORT (or a URL, kept as it is) into the API's base
// URL: https when the client has TLS, else http.
func (c *Client) BaseURL(addr string) string {
	if strings.HasPrefix(addr, "http://") || strings.HasPrefix(addr, "https://") {
		return strings.TrimSuffix(addr, "/")
	}
	if c.TLS != nil {
		return "https://" + addr
	}
	return "http://" + addr
}

// Do sends a request and decodes a JSON answer into out (when not nil).
func (c *Client) Do(ctx context.Context, method, addr, path string, in, out any) error {
	return c.do(ctx, method, addr, path, nil, in, out)
}

func (c *Client) do(ctx context.Context, method, addr, path string, hdr http.Header, in, out any) error {
	var body io.Reader
	ctype := "application/json"
	switch v := in.(type) {
	case nil:
	case []byte:
		body, ctype = bytes.NewReader(v), "application/octet-stream"
	default:
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.BaseURL(addr)+path, body)
	if err != nil {
		return err
	}
	req.Header.Set(LevelHeader, strconv.Itoa(int(Level)))
	for k, vs := range hdr {
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
	if body != nil {
		req.Header.Set("Content-Type", ctype)
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return tlsHint(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("%s %s: reading answer: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		var ae ErrorBody
		if json.Unmarshal(data, &ae) == nil && ae.Error != "" {
			if ae.NotLeader {
				return fmt.Errorf("%w (leader: %q): %s", ErrRemoteNotLeader, ae.Leader, ae.Error)
			}
			return fmt.Errorf("%s %s: %s", method, addr+path, ae.Error)
		}
		if resp.StatusCode == http.StatusBadRequest && c.TLS == nil && bytes.Contains(data, []byte("HTTP request to an HTTPS server")) {
			return fmt.Errorf("%s %s: %w", method, addr+path, ErrServerWantsTLS)
		}
		return fmt.Errorf("%s %s: %s: %s", method, addr+path, resp.Status, strings.TrimSpace(string(data)))
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("%s %s: decoding answer: %w", method, path, err)
		}
	}
	return nil
}

// Status fetches a node's status.
func (c *Client) Status(ctx context.Context, addr string) (NodeStatus, error) {
	var s NodeStatus
	err := c.Do(ctx, http.MethodGet, addr, "/v1/status", nil, &s)
	return s, err
}

// Cluster fetches a node's view of the cluster.
func (c *Client) Cluster(ctx context.Context, addr string) (ClusterStatus, error) {
	var s ClusterStatus
	err := c.Do(ctx, http.MethodGet, addr, "/v1/cluster", nil, &s)
	return s, err
}

// Apply forwards an encoded command to the leader at addr, telling it
// ctx's deadline (TimeoutHeader).
func (c *Client) Apply(ctx context.Context, addr string, cmd []byte) (ApplyResponse, error) {
	return c.apply(ctx, addr, cmd, false)
}

// Relay sends an encoded command to the follower at addr, which forwards
// it to the leader (RelayHeader) and answers once it has applied it.
func (c *Client) Relay(ctx context.Context, addr string, cmd []byte) (ApplyResponse, error) {
	return c.apply(ctx, addr, cmd, true)
}

func (c *Client) apply(ctx context.Context, addr string, cmd []byte, relay bool) (ApplyResponse, error) {
	var r ApplyResponse
	hdr := http.Header{}
	if d, ok := ctx.Deadline(); ok {
		ms := time.Until(d).Milliseconds()
		if ms <= 0 {
			return r, fmt.Errorf("POST %s/v1/apply: %w", addr, context.DeadlineExceeded)
		}
		hdr.Set(TimeoutHeader, strconv.FormatInt(ms, 10))
	}
	if relay {
		hdr.Set(RelayHeader, "1")
	}
	err := c.do(ctx, http.MethodPost, addr, "/v1/apply", hdr, cmd, &r)
	return r, err
}

// ServeHTTP serves h on l until ctx ends, then shuts the server down
// (giving requests in flight 5s). A connection that has still not sent
// its first request 100ms into the shutdown is closed: net/http would wait
// 5s for it (a client's spare dial, kept idle on its side), and that held
// a server handing over to its successor (docs/upgrade.md) for 5s.
//
// Over a TLS listener (ClusterTLS.HTTPListener), h is behind
// RequireClientCert, and a failed handshake is logged once per peer.
func ServeHTTP(ctx context.Context, l net.Listener, h http.Handler, log hclog.Logger) error {
	h = RequireClientCert(h)
	var mu sync.Mutex // guards fresh
	fresh := map[net.Conn]struct{}{}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ErrorLog: stdlog.New(newHTTPErrorLog(log), "", 0),
		ConnState: func(c net.Conn, st http.ConnState) {
			mu.Lock()
			defer mu.Unlock()
			if st == http.StateNew {
				fresh[c] = struct{}{}
			} else {
				delete(fresh, c)
			}
		}}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case err := <-errc:
		return fmt.Errorf("http server: %w", err)
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		stop, stopped := make(chan struct{}), make(chan struct{})
		go func() { // ends with the shutdown (stop)
			defer close(stopped)
			select {
			case <-time.After(100 * time.Millisecond):
			case <-stop:
				return
			}
			mu.Lock()
			defer mu.Unlock()
			for c := range fresh {
				c.Close()
			}
		}()
		_ = srv.Shutdown(sctx)
		close(stop)
		<-stopped
		<-errc
		return nil
	}
}

// WriteJSON answers v as JSON with the status code.
func WriteJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
