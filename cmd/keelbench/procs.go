package main

// Every process the driver starts, every port it picks and every wait for a
// child to accept is in this file, behind the Procs interface (the tests
// put fakes behind it), and done by cmd/keel/keeltest, the harness of the
// end-to-end tests. Children run in their own process group (a Ctrl-C at
// the terminal reaches only the driver, which then stops them in order)
// and are killed by the kernel if the driver dies first (Pdeathsig).

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
)

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
	// failing early (keeltest.ErrExited) if p exits.
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

	kt *keeltest.Cluster // nil in tests' fakes
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

// ProxySpec describes the proxy StartProxy starts; it runs the cluster's
// keel binary at the cluster's --log-level.
type ProxySpec struct {
	Sock       string // NBD unix socket
	Cache      int64  // --cache in bytes
	Writer     string // --writer
	CPUProfile string // keel --cpu-profile file; empty: none
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

// stopTimeout bounds SIGTERM to exit; SIGKILL follows.
const stopTimeout = 30 * time.Second

// osProcs runs real processes through keeltest.
type osProcs struct {
	group keeltest.Group // the children Start starts

	mu       sync.Mutex // guards clusters
	clusters []*keeltest.Cluster
}

// NewProcs returns the Procs that run real children.
func NewProcs() Procs { return &osProcs{} }

// osProc is a keeltest process under the driver's name for it.
type osProc struct {
	name string
	p    *keeltest.Proc
	once sync.Once
	err  error // what the first Stop said
}

func (p *osProc) Name() string { return p.name }
func (p *osProc) PID() int     { return p.p.Pid() }

func (p *osProc) Stop() error {
	p.once.Do(func() { p.err = stopErr(p.name, p.p, p.p.Stop(stopTimeout)) })
	return p.err
}

// stopErr judges what keeltest's Stop returned: dying of SIGTERM (nbdkit
// and qemu-nbd do) is a clean stop, and so is an exit with status 0, before
// the signal or after it.
func stopErr(name string, p *keeltest.Proc, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, keeltest.ErrTimeout):
		return fmt.Errorf("keelbench: %s (pid %d) still running %v after SIGTERM; killed: %w", name, p.Pid(), stopTimeout, err)
	}
	if sig, ok := p.ExitSignal(); ok && sig == syscall.SIGTERM {
		return nil
	}
	if p.Err() == nil {
		return nil
	}
	return fmt.Errorf("keelbench: %s exited after SIGTERM: %w", name, p.Err())
}

func (ps *osProcs) Start(name string, argv []string, log string) (Proc, error) {
	p, err := ps.group.Start(keeltest.ProcConfig{Bin: argv[0], Name: name, Args: argv[1:], LogPath: log})
	if err != nil {
		return nil, fmt.Errorf("keelbench: starting %s: %w", name, err)
	}
	return &osProc{name: name, p: p}, nil
}

func (ps *osProcs) Run(ctx context.Context, argv []string, log string) error {
	err := keeltest.Run(ctx, keeltest.ProcConfig{Bin: argv[0], Name: filepath.Base(argv[0]), Args: argv[1:], LogPath: log}, 10*time.Second)
	if err != nil {
		return fmt.Errorf("keelbench: %w (see %s)", err, log)
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

// StopAll stops the children Start started, the newest first, then each
// cluster (its proxies, then its servers), the newest first.
func (ps *osProcs) StopAll() {
	running := ps.group.Running()
	slices.Reverse(running)
	_ = ps.group.StopAll(stopTimeout, running...)
	ps.mu.Lock()
	clusters := ps.clusters
	ps.clusters = nil
	ps.mu.Unlock()
	for i := len(clusters) - 1; i >= 0; i-- {
		_ = clusters[i].StopAll()
		clusters[i].Close()
	}
}

// waitFor calls try every 100 ms until it succeeds, p exits
// (keeltest.ErrExited), ctx ends or timeout passes.
func waitFor(ctx context.Context, p *keeltest.Proc, timeout time.Duration, what string, try func() error) error {
	return keeltest.Poll(ctx, timeout, 100*time.Millisecond, "waiting for "+what, func() (bool, string, error) {
		err := try()
		if err == nil {
			return true, "", nil
		}
		if p.Exited() {
			return false, "", fmt.Errorf("%w: %s: %v", keeltest.ErrExited, p.Name(), p.Err())
		}
		return false, err.Error(), nil
	})
}

func (ps *osProcs) WaitNBD(ctx context.Context, p Proc, uri string) error {
	return waitNBD(ctx, p.(*osProc).p, uri)
}

func waitNBD(ctx context.Context, p *keeltest.Proc, uri string) error {
	return waitFor(ctx, p, 30*time.Second, p.Name()+" to answer on "+uri, func() error {
		return exec.CommandContext(ctx, "nbdinfo", "--size", uri).Run()
	})
}

func (ps *osProcs) StartCluster(ctx context.Context, spec ClusterSpec) (*Cluster, error) {
	kc, err := keeltest.NewCluster(keeltest.ClusterConfig{Bin: spec.Keel, Dir: spec.Dir, LogDir: spec.LogDir, NBDSocketDir: spec.Dir,
		N: 3, Size: strconv.FormatInt(spec.Size, 10), GlobalFlags: []string{"--log-level", spec.LogLevel}, HTTPTimeout: 3 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("keelbench: %w", err)
	}
	ps.mu.Lock()
	ps.clusters = append(ps.clusters, kc)
	ps.mu.Unlock()
	err = kc.Start(ctx)
	c := &Cluster{kt: kc}
	for _, n := range kc.Nodes() {
		if p := n.Proc(); p != nil {
			c.Nodes = append(c.Nodes, Node{ID: n.ID, HTTP: n.HTTP, Sock: n.NBDSocket(), Proc: &osProc{name: n.ID, p: p}})
		}
	}
	if err != nil {
		return c, fmt.Errorf("keelbench: %w", err)
	}
	lead, err := kc.Leader(ctx)
	if err != nil {
		return c, fmt.Errorf("keelbench: %w", err)
	}
	c.Leader = lead.ID
	return c, nil
}

func (ps *osProcs) StartProxy(ctx context.Context, c *Cluster, spec ProxySpec) (*ProxyProc, error) {
	var global []string
	if spec.CPUProfile != "" {
		global = []string{"--cpu-profile", spec.CPUProfile}
	}
	kp, err := c.kt.StartProxy(ctx, keeltest.ProxyConfig{Name: spec.Writer, Listen: "unix:" + spec.Sock, HTTP: spec.HTTP,
		LogPath: spec.Log, GlobalFlags: global, Flags: []string{"--cache", strconv.FormatInt(spec.Cache, 10)}})
	if err == nil {
		// Serving, then holding the volume (writes before the claim would
		// wait for it anyway).
		err = waitFor(ctx, kp.Proc(), time.Minute, "the proxy to hold the volume", func() error {
			st, err := kp.Status(ctx)
			if err == nil && !st.Holding {
				err = errors.New("not holding the volume yet")
			}
			return err
		})
	}
	if err == nil {
		err = waitNBD(ctx, kp.Proc(), NBDURI(spec.Sock))
	}
	if err != nil {
		if kp != nil && kp.Running() {
			_ = kp.Stop()
		}
		return nil, fmt.Errorf("keelbench: %w", err)
	}
	return &ProxyProc{Proc: &osProc{name: "proxy", p: kp.Proc()}, HTTP: kp.HTTP, Sock: spec.Sock}, nil
}
