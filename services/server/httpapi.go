package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/replica/imagesync"
	"github.com/keelstore/keel/services/statuspage"
	"github.com/keelstore/keel/services/wire"
)

// API serves a keel server's HTTP API (see api.go for the routes) and is a
// supervised service listening on Listener.
type API struct {
	Listener net.Listener
	// TLS, when set, serves the API over TLS (wire.ClusterTLS.HTTPListener):
	// a request that changes anything or reads the volume needs a client
	// certificate from the cluster CA (wire.NeedsClientCert).
	TLS     *wire.ClusterTLS
	Holder  *NodeHolder
	Client  *wire.Client
	Resync  *Resyncer
	Metrics *prometheus.Registry
	// Version is the build version reported in the status; Level the
	// feature level reported while the node is starting (after that, the
	// node's own).
	Version string
	Level   replica.Level
	Log     hclog.Logger
	// Page, when set, is the status page (GET /) with its history.
	Page *statuspage.Service
}

func (a *API) String() string { return "http " + a.Listener.Addr().String() }

func (a *API) Serve(ctx context.Context) error {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", a.handleStatus)
	mux.HandleFunc("GET /v1/cluster", a.handleCluster)
	mux.HandleFunc("POST /v1/cluster/join", a.leaderOnly(a.handleJoin))
	mux.HandleFunc("POST /v1/cluster/remove", a.leaderOnly(a.handleRemove))
	mux.HandleFunc("POST /v1/cluster/transfer-leadership", a.leaderOnly(a.handleTransfer))
	if a.Page != nil {
		mux.Handle("POST /v1/apply", a.Page.Meter().WriteHandler(http.HandlerFunc(a.handleApply)))
	} else {
		mux.HandleFunc("POST /v1/apply", a.handleApply)
	}
	streams, stopStreams := a.streamServer(ctx) // POST /v1/apply/stream (applystream.go)
	defer stopStreams()
	mux.Handle("POST "+wire.StreamPath, streams)
	mux.HandleFunc("POST /v1/verify/digest", a.handleDigest)
	mux.HandleFunc("GET /v1/verify/progress", a.handleDigestProgress)
	mux.Handle("/v1/sync/", http.StripPrefix("/v1/sync", a.syncHandler()))
	if a.Page != nil {
		a.Page.Register(mux)
	}
	if a.Metrics != nil {
		mux.Handle("GET /metrics", promhttp.HandlerFor(a.Metrics, promhttp.HandlerOpts{}))
	}
	return wire.ServeHTTP(ctx, a.TLS.HTTPListener(a.Listener), mux, a.Log)
}

// syncHandler serves the image to syncing peers, once the node runs.
func (a *API) syncHandler() http.Handler {
	var once sync.Once
	var h http.Handler
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := a.Holder.Peek()
		if n == nil {
			writeErr(w, http.StatusServiceUnavailable, errors.New("node not running"))
			return
		}
		once.Do(func() { h = imagesync.Handler(n.Image(), a.Log.Named("sync-source")) })
		h.ServeHTTP(w, r)
	})
}

func writeErr(w http.ResponseWriter, code int, err error) {
	wire.WriteJSON(w, code, wire.ErrorBody{Error: err.Error()})
}

func (a *API) node(w http.ResponseWriter, r *http.Request) *replica.Node {
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	n, err := a.Holder.Get(ctx)
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, err)
		return nil
	}
	return n
}

// leaderOnly runs h on the leader, and forwards the call to the leader
// from any other member.
func (a *API) leaderOnly(h func(http.ResponseWriter, *http.Request, *replica.Node)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		n := a.node(w, r)
		if n == nil {
			return
		}
		if n.IsLeader() {
			h(w, r, n)
			return
		}
		l, ok := n.Leader()
		if !ok || l.HTTP == "" || r.Header.Get("X-Keel-Forwarded") != "" {
			wire.WriteJSON(w, http.StatusServiceUnavailable, wire.ErrorBody{Error: "no leader to forward to", NotLeader: true, Leader: l.HTTP})
			return
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err != nil {
			writeErr(w, http.StatusBadRequest, err)
			return
		}
		req, err := http.NewRequestWithContext(r.Context(), r.Method, a.Client.BaseURL(l.HTTP)+r.URL.RequestURI(), bytesReader(body))
		if err != nil {
			writeErr(w, http.StatusInternalServerError, err)
			return
		}
		req.Header.Set("Content-Type", r.Header.Get("Content-Type"))
		req.Header.Set("X-Keel-Forwarded", n.ID())
		resp, err := a.Client.HTTP.Do(req)
		if err != nil {
			writeErr(w, http.StatusBadGateway, fmt.Errorf("forwarding to leader %s: %w", l.ID, err))
			return
		}
		defer resp.Body.Close()
		w.Header().Set("Content-Type", resp.Header.Get("Content-Type"))
		w.WriteHeader(resp.StatusCode)
		_, _ = io.Copy(w, resp.Body)
	}
}

func (a *API) status(ctx context.Context, n *replica.Node) wire.NodeStatus {
	st := n.FSM().State()
	s := wire.NodeStatus{
		Version:      a.Version,
		Level:        n.Level(),
		Self:         n.Self(),
		State:        n.Raft().State().String(),
		Term:         parseUint(n.Raft().Stats()["term"]),
		LastLogIndex: n.Raft().LastIndex(),
		CommitIndex:  n.Raft().CommitIndex(),
		AppliedIndex: n.FSM().AppliedIndex(),
		Writer:       st.Writer,
		Epoch:        st.Epoch,
		ImagePath:    n.Image().Path(),
		ImageSize:    n.Image().Size(),
	}
	if l, ok := n.Leader(); ok {
		s.Leader = l.ID
	}
	if n.IsLeader() {
		// Once per term this commits a barrier; without a quorum it gives
		// up quickly and the field stays unknown.
		ctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		if n.ReadBarrier(ctx) == nil && n.IsLeader() {
			s.ReadIndex = n.FSM().AppliedIndex()
		}
		cancel()
	}
	if a.Resync != nil {
		s.Sync = a.Resync.Status()
	}
	return s
}

func parseUint(s string) uint64 {
	v, _ := strconv.ParseUint(s, 10, 64)
	return v
}

func (a *API) handleStatus(w http.ResponseWriter, r *http.Request) {
	n := a.Holder.Peek()
	if n == nil {
		wire.WriteJSON(w, http.StatusOK, wire.NodeStatus{Version: a.Version, Level: a.Level, State: "Starting", Sync: a.Resync.Status()})
		return
	}
	wire.WriteJSON(w, http.StatusOK, a.status(r.Context(), n))
}

func (a *API) handleCluster(w http.ResponseWriter, r *http.Request) {
	n := a.node(w, r)
	if n == nil {
		return
	}
	cf := n.Raft().GetConfiguration()
	if err := cf.Error(); err != nil {
		writeErr(w, http.StatusServiceUnavailable, err)
		return
	}
	reg := n.FSM().State().Nodes
	cs := wire.ClusterStatus{Level: n.Level()}
	if l, ok := n.Leader(); ok {
		cs.Leader = l.ID
	}
	servers := cf.Configuration().Servers
	cs.Members = make([]wire.Member, len(servers))
	var wg sync.WaitGroup
	for i, srv := range servers {
		info, ok := reg[string(srv.ID)]
		if !ok {
			info = replica.NodeInfo{ID: string(srv.ID), Raft: string(srv.Address)}
		}
		m := &cs.Members[i]
		m.NodeInfo, m.Suffrage = info, srv.Suffrage.String()
		if info.ID == n.ID() {
			s := a.status(r.Context(), n)
			m.Status = &s
			continue
		}
		if info.HTTP == "" {
			m.Error = "not registered yet"
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
			defer cancel()
			s, err := a.Client.Status(ctx, info.HTTP)
			if err != nil {
				m.Error = err.Error()
				return
			}
			m.Status = &s
		}()
	}
	wg.Wait()
	wire.WriteJSON(w, http.StatusOK, cs)
}

func (a *API) handleJoin(w http.ResponseWriter, r *http.Request, n *replica.Node) {
	var req wire.JoinRequest
	if err := decodeBody(r, &req); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	info := req.Node
	if info.ID == "" || info.Raft == "" || info.HTTP == "" {
		writeErr(w, http.StatusBadRequest, errors.New("join needs the node's id, raft and http addresses"))
		return
	}
	cf := n.Raft().GetConfiguration()
	if err := cf.Error(); err != nil {
		writeErr(w, http.StatusServiceUnavailable, err)
		return
	}
	for _, s := range cf.Configuration().Servers {
		if string(s.ID) == info.ID && string(s.Address) != info.Raft {
			writeErr(w, http.StatusConflict, fmt.Errorf("a member %q already exists at raft address %s; remove it first", info.ID, s.Address))
			return
		}
	}
	// Count the node's level in before it takes part: the leader must not
	// write entries it cannot read (a node that says none is level 1).
	n.NoteLevel(info.ID, req.Level)
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	// Register first, so the registry knows the node's addresses before it
	// takes part (a resync of the new node needs its peers' addresses,
	// and everyone needs its HTTP address to forward to it as leader).
	if res, err := n.Apply(ctx, &replica.Command{Kind: replica.KindRegister, Node: info}); err != nil || res.Err != nil {
		writeErr(w, http.StatusServiceUnavailable, fmt.Errorf("registering %s: %v", info.ID, errors.Join(err, res.Err)))
		return
	}
	isMember := false
	for _, s := range cf.Configuration().Servers {
		isMember = isMember || string(s.ID) == info.ID
	}
	if !isMember {
		if err := n.Raft().AddNonvoter(raft.ServerID(info.ID), raft.ServerAddress(info.Raft), 0, 10*time.Second).Error(); err != nil {
			writeErr(w, http.StatusServiceUnavailable, fmt.Errorf("adding %s: %w", info.ID, err))
			return
		}
		a.Log.Info("node joined as a non-voter; it becomes a voter once caught up", "id", info.ID, "raft", info.Raft, "http", info.HTTP)
	}
	wire.WriteJSON(w, http.StatusOK, wire.JoinResponse{Level: n.Level(), Size: n.Image().Size(), Leader: n.ID()})
}

func (a *API) handleRemove(w http.ResponseWriter, r *http.Request, n *replica.Node) {
	var req wire.IDRequest
	if err := decodeBody(r, &req); err != nil || req.ID == "" {
		writeErr(w, http.StatusBadRequest, errors.Join(err, errors.New("remove needs an id")))
		return
	}
	if req.ID == n.ID() {
		// The leader removing itself: hand over first, then the new
		// leader removes it.
		if err := n.Raft().LeadershipTransfer().Error(); err != nil {
			writeErr(w, http.StatusServiceUnavailable, fmt.Errorf("transferring leadership before removing the leader: %w", err))
			return
		}
		wire.WriteJSON(w, http.StatusServiceUnavailable, wire.ErrorBody{Error: "leadership transferred away from the node to remove; retry", NotLeader: true})
		return
	}
	if err := n.Raft().RemoveServer(raft.ServerID(req.ID), 0, 10*time.Second).Error(); err != nil {
		writeErr(w, http.StatusServiceUnavailable, fmt.Errorf("removing %s: %w", req.ID, err))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	_, _ = n.Apply(ctx, &replica.Command{Kind: replica.KindForget, Node: replica.NodeInfo{ID: req.ID}})
	a.Log.Info("node removed", "id", req.ID)
	wire.WriteJSON(w, http.StatusOK, map[string]string{"removed": req.ID})
}

func (a *API) handleTransfer(w http.ResponseWriter, r *http.Request, n *replica.Node) {
	var req wire.IDRequest
	if err := decodeBody(r, &req); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	var f raft.Future
	if req.ID == "" {
		f = n.Raft().LeadershipTransfer()
	} else {
		info, ok := n.FSM().State().Nodes[req.ID]
		if !ok {
			writeErr(w, http.StatusBadRequest, fmt.Errorf("no member %q", req.ID))
			return
		}
		f = n.Raft().LeadershipTransferToServer(raft.ServerID(req.ID), raft.ServerAddress(info.Raft))
	}
	if err := f.Error(); err != nil {
		writeErr(w, http.StatusServiceUnavailable, fmt.Errorf("leadership transfer: %w", err))
		return
	}
	l, _ := n.Leader()
	wire.WriteJSON(w, http.StatusOK, map[string]string{"leader": l.ID})
}

// handleApply commits a command forwarded by a follower (Forwarder) or
// sent by a proxy, within the caller's deadline (wire.TimeoutHeader; a
// caller that sends none is bounded by Raft alone: leadership lost or
// shutdown ends the wait).
func (a *API) handleApply(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	if h := r.Header.Get(wire.TimeoutHeader); h != "" {
		ms, err := strconv.ParseUint(h, 10, 32)
		if err != nil || ms == 0 {
			writeErr(w, http.StatusBadRequest, fmt.Errorf("%s %q: want a positive number of milliseconds", wire.TimeoutHeader, h))
			return
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(ms)*time.Millisecond)
		defer cancel()
	}
	n := a.node(w, r)
	if n == nil {
		return
	}
	data, err := io.ReadAll(io.LimitReader(r.Body, 64<<20))
	if err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	c, err := replica.DecodeAt(data, n.Level())
	if errors.Is(err, replica.ErrUnknownCommand) {
		// Of a level this build does not know (a newer sender): refused
		// before it is proposed, a result the sender can act on.
		wire.WriteJSON(w, http.StatusOK, wire.ApplyResponse{Level: n.Level(), Refused: wire.RefusedUnknownCommand, Error: err.Error()})
		return
	}
	if err != nil {
		wire.WriteJSON(w, http.StatusBadRequest, wire.ApplyResponse{Level: n.Level(), Refused: wire.RefusedBadCommand, Error: err.Error()})
		return
	}
	relay := r.Header.Get(wire.RelayHeader) == "1"
	if !n.IsLeader() && !relay {
		l, _ := n.Leader()
		wire.WriteJSON(w, http.StatusServiceUnavailable, wire.ErrorBody{Error: "not the leader", NotLeader: true, Leader: l.HTTP})
		return
	}
	// A relayed command goes to the leader through this node's forwarder
	// (Node.Propose), which answers once this node has applied it too.
	res, err := n.Propose(ctx, &c)
	if err != nil {
		wire.WriteJSON(w, http.StatusServiceUnavailable, wire.ErrorBody{Error: err.Error(), NotLeader: errors.Is(err, replica.ErrNotLeader)})
		return
	}
	out := wire.ApplyResponse{Level: n.Level(), Index: res.Index, Epoch: res.Epoch, Duplicate: res.Duplicate, Holder: res.Writer}
	if res.Err != nil {
		out.Refused, out.Error = wire.RefusalOf(res.Err), res.Err.Error()
	}
	wire.WriteJSON(w, http.StatusOK, out)
}

// Forwarder is replica.Forwarder over the leader's POST /v1/apply (the
// other end of handleApply). The leader's refusal crosses as a
// wire.Refusal and comes back as replica's sentinel in Result.Err.
type Forwarder struct {
	Client *wire.Client
}

var _ replica.Forwarder = (*Forwarder)(nil)

func (f *Forwarder) Forward(ctx context.Context, leader replica.NodeInfo, c *replica.Command) (replica.Result, error) {
	if leader.HTTP == "" {
		return replica.Result{}, fmt.Errorf("%w: leader %s has not registered its HTTP address", replica.ErrNoLeader, leader.ID)
	}
	r, err := f.Client.Apply(ctx, leader.HTTP, c.EncodeCompat(nil))
	if err != nil {
		return replica.Result{}, err
	}
	if r.Refused == wire.NotRefused && r.Error != "" {
		return replica.Result{}, fmt.Errorf("leader %s: %s", leader.ID, r.Error)
	}
	return replica.Result{Index: r.Index, Epoch: r.Epoch, Duplicate: r.Duplicate, Err: r.Refused.Err(r.Error)}, nil
}

func (a *API) handleDigest(w http.ResponseWriter, r *http.Request) {
	n := a.node(w, r)
	if n == nil {
		return
	}
	minIndex, err := strconv.ParseUint(r.URL.Query().Get("min_index"), 10, 64)
	if err != nil && r.URL.Query().Get("min_index") != "" {
		writeErr(w, http.StatusBadRequest, fmt.Errorf("min_index: %w", err))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	d, err := n.Digest(ctx, minIndex)
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, err)
		return
	}
	wire.WriteJSON(w, http.StatusOK, d)
}

// handleDigestProgress answers how far a running digest is (keel verify's
// progress); it touches nothing the digest holds.
func (a *API) handleDigestProgress(w http.ResponseWriter, r *http.Request) {
	n := a.node(w, r)
	if n == nil {
		return
	}
	done, total, running := n.DigestProgress()
	wire.WriteJSON(w, http.StatusOK, wire.DigestProgress{Running: running, BytesDone: done, BytesTotal: total})
}

func decodeBody(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("bad request body: %w", err)
	}
	return nil
}
