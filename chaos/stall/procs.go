package main

// The processes under test: three `keel server`s and a `keel proxy` on
// 127.0.0.1, each in its own process group (so a Ctrl-C at the terminal
// reaches only this tool, which then stops them in order) and killed by the
// kernel if this tool dies first (Pdeathsig).

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// proc is one running keel process.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed once it has exited
	err  error         // its exit status; set before done is closed
}

// procs keeps every process started, so that cleanup stops them all.
type procs struct {
	mu  sync.Mutex // guards the following
	all []*proc
}

// start runs bin with args, appending its output to logPath after a marker
// line.
func (ps *procs) start(name, bin string, args []string, logPath string) (*proc, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer f.Close() // the child holds its own descriptor
	fmt.Fprintf(f, "---- stall: starting %s at %s: %s %q ----\n", name, time.Now().Format(time.RFC3339Nano), bin, args)
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	ps.mu.Lock()
	ps.all = append(ps.all, p)
	ps.mu.Unlock()
	return p, nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill sends SIGKILL and waits for the exit.
func (p *proc) kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// stop sends SIGTERM, and SIGKILL after grace.
func (p *proc) stop(grace time.Duration) {
	if p.exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
	case <-t.C:
		fmt.Fprintf(os.Stderr, "stall: %s still running %v after SIGTERM; killed\n", p.name, grace)
		p.kill()
	}
}

// stopAll stops every process still running, the given ones first (the
// proxy before the servers, so that it releases the volume).
func (ps *procs) stopAll(grace time.Duration, first ...*proc) {
	for _, p := range first {
		if p != nil {
			p.stop(grace)
		}
	}
	ps.mu.Lock()
	all := append([]*proc(nil), ps.all...)
	ps.mu.Unlock()
	var wg sync.WaitGroup
	for _, p := range all {
		wg.Add(1)
		go func() { defer wg.Done(); p.stop(grace) }()
	}
	wg.Wait()
}

// freePorts returns n distinct TCP ports free on 127.0.0.1 right now.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// ---- servers ----

// node is one `keel server`. Its flags never change: a restart reuses
// them (the server ignores --bootstrap and --join on a directory that
// already holds a node).
type node struct {
	id                   string
	raft, http, nbd, dir string
	log                  string
	args                 []string
	p                    *proc
}

// status is the part of GET /v1/status this tool reads.
type status struct {
	Self struct {
		ID   string `json:"id"`
		HTTP string `json:"http"`
		NBD  string `json:"nbd"`
	} `json:"self"`
	State        string `json:"state"`
	Leader       string `json:"leader"`
	Term         uint64 `json:"term"`
	CommitIndex  uint64 `json:"commit_index"`
	AppliedIndex uint64 `json:"applied_index"`
}

type clusterStatus struct {
	Leader  string `json:"leader"`
	Members []struct {
		ID       string `json:"id"`
		Suffrage string `json:"suffrage"`
	} `json:"members"`
}

var httpc = &http.Client{Timeout: time.Second}

func getJSON(ctx context.Context, addr, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+addr+path, nil)
	if err != nil {
		return err
	}
	resp, err := httpc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s%s: %s", addr, path, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

func (n *node) status(ctx context.Context) (status, error) {
	var s status
	err := getJSON(ctx, n.http, "/v1/status", &s)
	return s, err
}

// cluster is the three servers and the proxy.
type cluster struct {
	cfg   *config
	ps    procs
	nodes []*node
	proxy *proc
	// proxyAddr is where the proxy serves NBD (127.0.0.1:PORT).
	proxyAddr string
	proxyLog  string
}

func newCluster(cfg *config) (*cluster, error) {
	ports, err := freePorts(10)
	if err != nil {
		return nil, fmt.Errorf("finding free ports: %w", err)
	}
	c := &cluster{cfg: cfg}
	for i := range 3 {
		id := fmt.Sprintf("n%d", i+1)
		n := &node{
			id:   id,
			raft: fmt.Sprintf("127.0.0.1:%d", ports[3*i]),
			http: fmt.Sprintf("127.0.0.1:%d", ports[3*i+1]),
			nbd:  fmt.Sprintf("127.0.0.1:%d", ports[3*i+2]),
			dir:  filepath.Join(cfg.dir, id),
			log:  filepath.Join(cfg.dir, id+".log"),
		}
		n.args = []string{"--log-level", cfg.logLevel, "server", "--dir", n.dir, "--id", id,
			"--raft", n.raft, "--http", n.http, "--nbd", n.nbd,
			"--heartbeat-timeout", cfg.heartbeat.String(),
			"--election-timeout", cfg.election.String(),
			"--leader-lease-timeout", cfg.lease.String()}
		if i == 0 {
			n.args = append(n.args, "--bootstrap", "--size", fmt.Sprint(cfg.size))
		} else {
			n.args = append(n.args, "--join", c.nodesHTTP0(n))
		}
		c.nodes = append(c.nodes, n)
	}
	c.proxyAddr = fmt.Sprintf("127.0.0.1:%d", ports[9])
	c.proxyLog = filepath.Join(cfg.dir, "proxy.log")
	return c, nil
}

// nodesHTTP0 is the first node's HTTP address (n itself while it is
// being made).
func (c *cluster) nodesHTTP0(n *node) string {
	if len(c.nodes) == 0 {
		return n.http
	}
	return c.nodes[0].http
}

func (c *cluster) startNode(ctx context.Context, n *node) error {
	if err := os.MkdirAll(n.dir, 0o755); err != nil {
		return err
	}
	p, err := c.ps.start(n.id, c.cfg.keel, n.args, n.log)
	if err != nil {
		return err
	}
	n.p = p
	return c.waitFor(ctx, 60*time.Second, n.id+" answering GET /v1/status", func() (bool, error) {
		if p.exited() {
			return false, fmt.Errorf("%s exited: %v (see %s)", n.id, p.err, n.log)
		}
		_, err := n.status(ctx)
		return err == nil, nil
	})
}

// start brings up n1 (bootstrap), n2 and n3 (join), waits for three
// voters, then starts the proxy and waits until it serves.
func (c *cluster) start(ctx context.Context) error {
	for i, n := range c.nodes {
		if err := c.startNode(ctx, n); err != nil {
			return err
		}
		if i == 0 {
			if err := c.waitFor(ctx, 60*time.Second, "n1 to lead", func() (bool, error) {
				s, err := n.status(ctx)
				return err == nil && s.State == "Leader", nil
			}); err != nil {
				return err
			}
		}
	}
	if err := c.waitFor(ctx, 120*time.Second, "three voters", func() (bool, error) {
		var cs clusterStatus
		if err := getJSON(ctx, c.nodes[0].http, "/v1/cluster", &cs); err != nil {
			return false, nil
		}
		v := 0
		for _, m := range cs.Members {
			if m.Suffrage == "Voter" {
				v++
			}
		}
		return v == 3 && cs.Leader != "", nil
	}); err != nil {
		return err
	}
	var servers string
	for i, n := range c.nodes {
		if i > 0 {
			servers += ","
		}
		servers += n.http
	}
	args := []string{"--log-level", c.cfg.logLevel}
	if c.cfg.proxyProfile != "" {
		args = append(args, "--cpu-profile", c.cfg.proxyProfile)
	}
	args = append(args, "proxy", "--servers", servers, "--listen", c.proxyAddr,
		"--cache", c.cfg.proxyCache, "--poll-interval", c.cfg.proxyPoll.String(), "--writer", "stall")
	p, err := c.ps.start("proxy", c.cfg.keel, args, c.proxyLog)
	if err != nil {
		return err
	}
	c.proxy = p
	return c.waitFor(ctx, 60*time.Second, "the proxy to serve", func() (bool, error) {
		if p.exited() {
			return false, fmt.Errorf("the proxy exited: %v (see %s)", p.err, c.proxyLog)
		}
		b, _ := os.ReadFile(c.proxyLog)
		return containsLine(b, "proxy serving"), nil
	})
}

// waitFor polls cond every 20ms until it holds, fails, or limit passes.
func (c *cluster) waitFor(ctx context.Context, limit time.Duration, what string, cond func() (bool, error)) error {
	deadline := time.Now().Add(limit)
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("waited %v for %s", limit, what)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", what, context.Cause(ctx))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// view is every live server's status at one moment.
type view struct {
	st     map[string]status // by node id; missing: no answer
	leader *node             // the one node that says Leader, if exactly one does
	term   uint64            // highest term reported
}

func (c *cluster) view(ctx context.Context) view {
	v := view{st: map[string]status{}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, n := range c.nodes {
		if n.p == nil || n.p.exited() {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := n.status(ctx)
			if err != nil {
				return
			}
			mu.Lock()
			v.st[n.id] = s
			mu.Unlock()
		}()
	}
	wg.Wait()
	leaders := 0
	for _, n := range c.nodes {
		s, ok := v.st[n.id]
		if !ok {
			continue
		}
		v.term = max(v.term, s.Term)
		if s.State == "Leader" {
			leaders++
			v.leader = n
		}
	}
	if leaders != 1 {
		v.leader = nil
	}
	return v
}

// waitCaughtUp waits until one node leads, every node answers, and every
// node has applied at least what the leader had applied when asked (it
// keeps applying meanwhile: the load goes on).
func (c *cluster) waitCaughtUp(ctx context.Context, limit time.Duration) error {
	var want uint64
	return c.waitFor(ctx, limit, "every node to catch up with the leader", func() (bool, error) {
		for _, n := range c.nodes {
			if n.p.exited() {
				return false, fmt.Errorf("%s exited: %v (see %s)", n.id, n.p.err, n.log)
			}
		}
		v := c.view(ctx)
		if v.leader == nil || len(v.st) != len(c.nodes) {
			return false, nil
		}
		if want == 0 {
			want = max(1, v.st[v.leader.id].AppliedIndex)
		}
		for _, s := range v.st {
			if s.AppliedIndex < want {
				return false, nil
			}
		}
		return true, nil
	})
}

func containsLine(b []byte, s string) bool { return bytes.Contains(b, []byte(s)) }
