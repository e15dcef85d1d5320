package main

// Every process the driver starts, every port it picks and every wait for a
// child to accept is in this file, behind the Procs interface, so that it
// can be replaced by calls into cmd/keel/keeltest in one place. Children
// run in their own process group (a Ctrl-C at the terminal reaches only the
// driver, which then stops them in order) and are killed by the kernel if
// the driver dies first (Pdeathsig).

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/keelstore/keel/services/wire"
)

// ErrExited is returned when a child exits while it is waited on.
var ErrExited = errors.New("keelbench: process exited")

// Proc is one running child process.
type Proc interface {
	Name() string
	PID() int
	// Stop sends SIGTERM, waits up to 30 s, then SIGKILL; it returns the
	// exit status if that was not a clean one. Stopping twice is harmless.
	Stop() error
}

// Procs starts and stops the driver's children.
type Procs interface {
	// Start starts argv in the background, its output appended to log.
	Start(name string, argv []string, log string) (Proc, error)
	// Run runs argv to its end, its output appended to log; cancelling ctx
	// stops it (SIGTERM, then SIGKILL).
	Run(ctx context.Context, argv []string, log string) error
	// Output runs argv to its end and returns its stdout and stderr (tool
	// versions).
	Output(ctx context.Context, argv []string) (string, error)
	// WaitNBD waits until uri answers an NBD handshake (nbdinfo --size),
	// failing early if p exits.
	WaitNBD(ctx context.Context, p Proc, uri string) error
	// StartCluster starts three `keel server`s (n1 bootstraps, n2 and n3
	// join) and returns once all three are voters and one leads. On an
	// error the cluster returned holds the nodes started so far.
	StartCluster(ctx context.Context, spec ClusterSpec) (*Cluster, error)
	// StartProxy starts `keel proxy` in front of c and returns once it
	// serves and holds the volume.
	StartProxy(ctx context.Context, c *Cluster, spec ProxySpec) (*ProxyProc, error)
	// StopAll stops every child still running (in reverse start order).
	StopAll()
}

// ClusterSpec describes the cluster StartCluster makes.
type ClusterSpec struct {
	Keel     string // the keel binary
	Dir      string // node n is in Dir/nN; its NBD socket Dir/nN.sock
	Size     int64  // volume size in bytes
	LogLevel string // the servers' --log-level
	LogDir   string // node n logs to LogDir/nN.log
}

// Node is one server of a Cluster.
type Node struct {
	ID   string
	HTTP string // 127.0.0.1:PORT
	Sock string // NBD unix socket path
	Proc Proc
}

// Cluster is a running three-node cluster.
type Cluster struct {
	Nodes  []Node
	Leader string // the leader's id when the cluster came up
}

// Node returns the node of id.
func (c *Cluster) Node(id string) (Node, bool) {
	for _, n := range c.Nodes {
		if n.ID == id {
			return n, true
		}
	}
	return Node{}, false
}

// Follower is a node other than the leader.
func (c *Cluster) Follower() Node {
	for _, n := range c.Nodes {
		if n.ID != c.Leader {
			return n
		}
	}
	return Node{}
}

// HTTPs are the nodes' HTTP addresses.
func (c *Cluster) HTTPs() []string {
	var a []string
	for _, n := range c.Nodes {
		a = append(a, n.HTTP)
	}
	return a
}

// ProxySpec describes the proxy StartProxy starts.
type ProxySpec struct {
	Keel       string
	Sock       string // NBD unix socket
	Cache      int64  // --cache in bytes
	Writer     string // --writer
	CPUProfile string // keel --cpu-profile file; empty: none
	LogLevel   string
	Log        string
	// HTTP is the proxy's --http; empty: a free port is picked.
	HTTP string
}

// ProxyProc is a running proxy.
type ProxyProc struct {
	Proc
	HTTP string
	Sock string
}

// osProcs runs real processes.
type osProcs struct {
	http *wire.Client
	mu   sync.Mutex // guards the following
	all  []*osProc
}

// NewProcs returns the Procs that run real children.
func NewProcs() Procs { return &osProcs{http: wire.NewClient(3 * time.Second)} }

type osProc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed once it has exited
	err  error         // its exit status; set before done is closed
	once sync.Once
	serr error
}

func (p *osProc) Name() string { return p.name }
func (p *osProc) PID() int     { return p.cmd.Process.Pid }

func (p *osProc) Stop() error {
	p.once.Do(func() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		t := time.NewTimer(30 * time.Second)
		defer t.Stop()
		select {
		case <-p.done:
		case <-t.C:
			_ = p.cmd.Process.Kill()
			<-p.done
			p.serr = fmt.Errorf("keelbench: %s (pid %d) still running 30s after SIGTERM; killed", p.name, p.PID())
			return
		}
		var ee *exec.ExitError
		if errors.As(p.err, &ee) {
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGTERM {
				return // nbdkit and qemu-nbd die of SIGTERM
			}
		}
		if p.err != nil {
			p.serr = fmt.Errorf("keelbench: %s exited after SIGTERM: %w", p.name, p.err)
		}
	})
	return p.serr
}

func openLog(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("keelbench: log: %w", err)
	}
	return f, nil
}

func (ps *osProcs) Start(name string, argv []string, log string) (Proc, error) {
	f, err := openLog(log)
	if err != nil {
		return nil, err
	}
	defer f.Close() // the child holds its own descriptor
	fmt.Fprintf(f, "---- keelbench: starting %s at %s: %q ----\n", name, time.Now().Format(time.RFC3339Nano), argv)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("keelbench: starting %s: %w", name, err)
	}
	p := &osProc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() { // owned by p: ends when the child does
		p.err = cmd.Wait()
		close(p.done)
	}()
	ps.mu.Lock()
	ps.all = append(ps.all, p)
	ps.mu.Unlock()
	return p, nil
}

func (ps *osProcs) Run(ctx context.Context, argv []string, log string) error {
	f, err := openLog(log)
	if err != nil {
		return err
	}
	defer f.Close()
	fmt.Fprintf(f, "---- keelbench: running %q ----\n", argv)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("keelbench: %s: %w (see %s)", filepath.Base(argv[0]), err, log)
	}
	return nil
}

func (ps *osProcs) Output(ctx context.Context, argv []string) (string, error) {
	out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("keelbench: %s: %w", argv[0], err)
	}
	return string(out), nil
}

func (ps *osProcs) StopAll() {
	ps.mu.Lock()
	all := ps.all
	ps.all = nil
	ps.mu.Unlock()
	for i := len(all) - 1; i >= 0; i-- {
		_ = all[i].Stop()
	}
}

// poll calls try every 100 ms until it succeeds, p exits, ctx ends or
// timeout passes; it returns the last error of try on timeout.
func poll(ctx context.Context, p Proc, timeout time.Duration, try func() error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var done <-chan struct{}
	if op, ok := p.(*osProc); ok {
		done = op.done
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		err := try()
		if err == nil {
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("%w: %s: %w", ErrExited, p.Name(), p.(*osProc).err)
		case <-ctx.Done():
			return fmt.Errorf("keelbench: waiting for %s: %w (last: %w)", p.Name(), ctx.Err(), err)
		case <-tick.C:
		}
	}
}

func (ps *osProcs) WaitNBD(ctx context.Context, p Proc, uri string) error {
	return poll(ctx, p, 30*time.Second, func() error {
		return exec.CommandContext(ctx, "nbdinfo", "--size", uri).Run()
	})
}

// freePorts picks n ports on 127.0.0.1 that are free now (another program
// may still take one before the child listens: it then fails to start).
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			_ = l.Close()
		}
	}()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("keelbench: picking a port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func (ps *osProcs) StartCluster(ctx context.Context, spec ClusterSpec) (*Cluster, error) {
	ports, err := freePorts(6)
	if err != nil {
		return nil, err
	}
	c := &Cluster{}
	for i := range 3 {
		id := "n" + strconv.Itoa(i+1)
		n := Node{ID: id, HTTP: "127.0.0.1:" + strconv.Itoa(ports[3+i]), Sock: filepath.Join(spec.Dir, id+".sock")}
		argv := []string{spec.Keel, "--log-level", spec.LogLevel, "server", "--dir", filepath.Join(spec.Dir, id), "--id", id,
			"--raft", "127.0.0.1:" + strconv.Itoa(ports[i]), "--http", n.HTTP, "--nbd", "unix:" + n.Sock}
		if i == 0 {
			argv = append(argv, "--bootstrap", "--size", strconv.FormatInt(spec.Size, 10))
		} else {
			argv = append(argv, "--join", c.Nodes[0].HTTP)
		}
		if n.Proc, err = ps.Start(id, argv, filepath.Join(spec.LogDir, id+".log")); err != nil {
			return c, err
		}
		c.Nodes = append(c.Nodes, n)
		if err := poll(ctx, n.Proc, time.Minute, func() error {
			_, err := ps.http.Status(ctx, n.HTTP)
			return err
		}); err != nil {
			return c, err
		}
		if i == 0 { // n1 must lead before the others join it
			if _, err := ps.waitVoters(ctx, c, 1); err != nil {
				return c, err
			}
		}
	}
	if c.Leader, err = ps.waitVoters(ctx, c, 3); err != nil {
		return c, err
	}
	return c, nil
}

// waitVoters waits until n1 sees n voters and a leader; it returns the
// leader's id.
func (ps *osProcs) waitVoters(ctx context.Context, c *Cluster, n int) (string, error) {
	var leader string
	err := poll(ctx, c.Nodes[0].Proc, 2*time.Minute, func() error {
		cs, err := ps.http.Cluster(ctx, c.Nodes[0].HTTP)
		if err != nil {
			return err
		}
		voters := 0
		for _, m := range cs.Members {
			if m.Suffrage == "Voter" {
				voters++
			}
		}
		if voters < n || cs.Leader == "" {
			return fmt.Errorf("%d voters, leader %q", voters, cs.Leader)
		}
		leader = cs.Leader
		return nil
	})
	return leader, err
}

func (ps *osProcs) StartProxy(ctx context.Context, c *Cluster, spec ProxySpec) (*ProxyProc, error) {
	if spec.HTTP == "" {
		ports, err := freePorts(1)
		if err != nil {
			return nil, err
		}
		spec.HTTP = "127.0.0.1:" + strconv.Itoa(ports[0])
	}
	argv := []string{spec.Keel, "--log-level", spec.LogLevel}
	if spec.CPUProfile != "" {
		argv = append(argv, "--cpu-profile", spec.CPUProfile)
	}
	var servers string
	for i, h := range c.HTTPs() {
		if i > 0 {
			servers += ","
		}
		servers += h
	}
	argv = append(argv, "proxy", "--servers", servers, "--listen", "unix:"+spec.Sock,
		"--cache", strconv.FormatInt(spec.Cache, 10), "--writer", spec.Writer, "--http", spec.HTTP)
	p, err := ps.Start("proxy", argv, spec.Log)
	if err != nil {
		return nil, err
	}
	pp := &ProxyProc{Proc: p, HTTP: spec.HTTP, Sock: spec.Sock}
	// Serving, then holding the volume (writes before the claim would
	// wait for it anyway).
	err = poll(ctx, p, time.Minute, func() error {
		var st struct {
			Holding bool `json:"holding"`
		}
		if err := ps.http.Do(ctx, "GET", spec.HTTP, "/v1/status", nil, &st); err != nil {
			return err
		}
		if !st.Holding {
			return errors.New("not holding the volume yet")
		}
		return nil
	})
	if err != nil {
		_ = p.Stop()
		return nil, err
	}
	if err := ps.WaitNBD(ctx, p, NBDURI(spec.Sock)); err != nil {
		_ = p.Stop()
		return nil, err
	}
	return pp, nil
}
