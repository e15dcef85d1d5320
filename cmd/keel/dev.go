package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/thejerf/suture/v4"

	"github.com/keelstore/keel/services/keeltls"
	"github.com/keelstore/keel/services/wire"
	"github.com/keelstore/keel/supervise"
)

// devNode is one server of keel dev.
type devNode struct {
	id                   string
	raft, http, nbd, dir string
	child                *devChild
}

// devChild runs one child process of keel dev as a supervised service:
// Serve starts it and waits; when it exits on its own (a crash, a kill -9
// by someone watching failover) Serve returns an error and the supervisor
// starts it again (backing off if it keeps failing). When Serve's context
// ends it stops the process with SIGTERM (SIGKILL after stopWait).
type devChild struct {
	name     string
	bin      string
	args     func() []string // the arguments of the next start
	stopWait time.Duration

	mu      sync.Mutex // guards the following
	pid     int
	starts  int
	upOnce  bool       // the child came up once: later exits are restarted
	startup chan error // receives the first exit while not yet up
}

func newDevChild(name, bin string, stopWait time.Duration, args func() []string) *devChild {
	return &devChild{name: name, bin: bin, args: args, stopWait: stopWait, startup: make(chan error, 1)}
}

func (c *devChild) String() string { return c.name }

// up marks the child as having come up: from now on an exit is a failure
// to restart, not a failure to start.
func (c *devChild) up() {
	c.mu.Lock()
	c.upOnce = true
	c.mu.Unlock()
}

func (c *devChild) Serve(ctx context.Context) error {
	cmd := exec.Command(c.bin, c.args()...)
	cmd.Stdout = os.Stdout
	// Its own process group: a Ctrl-C in the terminal reaches keel dev
	// alone, which stops its children in order (they would otherwise all
	// stop at once, and be restarted as if they had died). Pdeathsig: if
	// keel dev itself dies (kill -9, a crash), the kernel sends the child
	// SIGTERM, so no server or proxy outlives it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	pr, pw := io.Pipe()
	cmd.Stderr = pw
	printed := make(chan struct{})
	go func() { defer close(printed); prefixLines(pr, c.name) }()
	defer func() { pw.Close(); <-printed }()
	if err := cmd.Start(); err != nil {
		return c.failed(fmt.Errorf("starting %s: %w", c.name, err))
	}
	c.mu.Lock()
	c.pid, c.starts = cmd.Process.Pid, c.starts+1
	starts := c.starts
	c.mu.Unlock()
	if starts > 1 {
		fmt.Fprintf(os.Stderr, "keel dev: %s restarted (pid %d)\n", c.name, cmd.Process.Pid)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case err := <-exited:
		return c.failed(fmt.Errorf("%s exited: %v", c.name, err))
	case <-ctx.Done():
		_ = cmd.Process.Signal(syscall.SIGTERM)
		t := time.NewTimer(c.stopWait)
		defer t.Stop()
		select {
		case <-exited:
		case <-t.C:
			fmt.Fprintf(os.Stderr, "keel dev: %s did not stop within %v; killing it\n", c.name, c.stopWait)
			_ = cmd.Process.Kill()
			<-exited
		}
		return nil
	}
}

// failed reports an exit: while the child never came up it goes to
// startup (keel dev gives up); afterwards it is logged and returned, so the
// supervisor restarts the child after a short pause.
func (c *devChild) failed(err error) error {
	c.mu.Lock()
	up := c.upOnce
	c.mu.Unlock()
	if !up {
		select {
		case c.startup <- err:
		default:
		}
		return suture.ErrDoNotRestart
	}
	fmt.Fprintf(os.Stderr, "keel dev: %v; restarting it\n", err)
	time.Sleep(500 * time.Millisecond) // a child that dies at once is not restarted hot
	return err
}

// Pid is the child's current process id.
func (c *devChild) Pid() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pid
}

func newDevCmd(g *globalFlags) *cobra.Command {
	var dir, size string
	var base int
	var insecure bool
	cmd := &cobra.Command{
		Use:   "dev [--dir DIR] [--size SIZE]",
		Short: "Run a three-node cluster and a proxy on loopback for a first look",
		Long: `Start three keel servers on 127.0.0.1 (n1 bootstraps, n2 and n3 join) and
a keel proxy in front of them, print the proxy's NBD address to give qemu,
nbdinfo or fio, and stop everything on Ctrl-C. Each node keeps its image at
DIR/nN/disk.img; run keel dev again on the same DIR and the volume is as you
left it. Kill a server (even the leader) while a client writes through the
proxy: the client sees a stall, not an error, and keel dev starts the server
again (each child runs under a supervisor; one that keeps failing is
restarted with a back-off). A child that fails before it first came up
stops keel dev with its error.

Ports, from --base-port P: proxy NBD P; servers' NBD P+1..P+3, Raft
P+100.., HTTP P+200..; the proxy's HTTP (status, metrics) P+300.

Cluster traffic (Raft, the HTTP API, image sync) is mutual TLS: the first
run makes a CA and certificates under DIR/tls (ca, n1..n3, proxy, and cli for
you: keel cluster status --cluster-tls DIR/tls/cli), later runs reuse them.
--insecure runs it all over plain TCP instead.`,
		Example: `  keel dev
  keel dev --dir /tmp/keel-dev --size 10G --base-port 20809
  keel dev --insecure                   # no cluster TLS
  qemu-img info nbd://127.0.0.1:10809   # in another terminal, once it runs`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error { return runDev(c.Context(), g, dir, size, base, insecure) },
	}
	cmd.Flags().StringVar(&dir, "dir", "keel-dev", "directory for the three nodes")
	cmd.Flags().StringVar(&size, "size", "1G", "volume size for a new cluster")
	cmd.Flags().IntVar(&base, "base-port", 10809, "the proxy's NBD port; the servers' ports follow it")
	cmd.Flags().BoolVar(&insecure, "insecure", false, "run the cluster without TLS: Raft and the HTTP API over plain TCP, unauthenticated")
	return cmd
}

func runDev(ctx context.Context, g *globalFlags, dir, size string, base int, insecure bool) error {
	if err := checkDir("--dir", dir); err != nil {
		return err
	}
	if _, err := parseVolumeSize(size); err != nil {
		return err
	}
	if base < 1024 || base > 65535-300 {
		return fmt.Errorf("--base-port %d: must be from 1024 to %d", base, 65535-300)
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var certs *devCerts
	var cliTLS *tls.Config
	if !insecure {
		if certs, err = makeDevCerts(dir); err != nil {
			return err
		}
		if cliTLS, err = loadClientTLS(certs.cli); err != nil {
			return err
		}
	}
	var nodes []*devNode
	for i := 0; i < 3; i++ {
		id := fmt.Sprintf("n%d", i+1)
		nodes = append(nodes, &devNode{
			id:   id,
			nbd:  fmt.Sprintf("127.0.0.1:%d", base+1+i),
			raft: fmt.Sprintf("127.0.0.1:%d", base+100+i),
			http: fmt.Sprintf("127.0.0.1:%d", base+200+i),
			dir:  filepath.Join(dir, id),
		})
	}
	// The tree: servers under one supervisor, the proxy under the root.
	// Stopping removes the proxy first (it drains its clients while the
	// servers can still commit what it read), then the servers.
	log, err := g.logger("keel-dev")
	if err != nil {
		return err
	}
	root := supervise.New("keel-dev", log, supervise.Policy{StopTimeout: 80 * time.Second})
	servers := supervise.New("servers", log, supervise.Policy{StopTimeout: 80 * time.Second})
	root.Add(servers)
	treeCtx, stopTree := context.WithCancel(context.WithoutCancel(ctx))
	defer stopTree()
	treeDone := root.ServeBackground(treeCtx)
	var proxyTok *suture.ServiceToken
	defer func() {
		if proxyTok != nil {
			_ = root.RemoveAndWait(*proxyTok, 80*time.Second)
		}
		stopTree()
		<-treeDone
		fmt.Fprintln(os.Stderr, "keel dev: all nodes stopped; the volume is in", dir)
	}()
	// startOrExit waits until addr accepts connections, or the child
	// exits before it came up.
	startOrExit := func(c *devChild, addr string) error {
		upc := make(chan error, 1)
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		go func() { upc <- waitHTTP(wctx, addr) }()
		select {
		case err := <-upc:
			if err != nil {
				return fmt.Errorf("%s did not come up: %w", c.name, err)
			}
			c.up()
			return nil
		case err := <-c.startup:
			return err
		}
	}
	client := wire.NewClient(2*time.Second, cliTLS)
	for i, n := range nodes {
		if err := os.MkdirAll(n.dir, 0o755); err != nil {
			return err
		}
		n.child = newDevChild(n.id, self, 70*time.Second, func() []string {
			args := append(g.childLogArgs(), "server", "--dir", n.dir, "--id", n.id,
				"--raft", n.raft, "--http", n.http, "--nbd", n.nbd, "--cluster-tls", certs.dir(n.id))
			if !hasRaftState(n.dir) { // a restarted node needs neither
				if i == 0 {
					args = append(args, "--bootstrap", "--size", size)
				} else {
					args = append(args, "--join", nodes[0].http)
				}
			}
			return args
		})
		servers.Add(n.child)
		if err := startOrExit(n.child, n.http); err != nil {
			return err
		}
	}
	if err := waitVoters(ctx, client, nodes[0].http, 3); err != nil {
		return err
	}
	proxyAddr := fmt.Sprintf("127.0.0.1:%d", base)
	proxy := newDevChild("proxy", self, 70*time.Second, func() []string {
		return append(g.childLogArgs(), "proxy", "--listen", proxyAddr,
			"--servers", nodes[0].http+","+nodes[1].http+","+nodes[2].http, "--writer", "keel-dev",
			"--http", fmt.Sprintf("127.0.0.1:%d", base+300), "--cluster-tls", certs.dir("proxy"))
	})
	tok := root.Add(proxy)
	proxyTok = &tok
	if err := startOrExit(proxy, proxyAddr); err != nil {
		return fmt.Errorf("the proxy did not come up: %w", err)
	}
	fmt.Printf(`
keel dev: a three-node cluster is running, with a proxy in front.
  NBD for your client (the proxy; survives any one server going away):
    nbd://%s
  each server's own NBD: n1 nbd://%s  n2 nbd://%s  n3 nbd://%s
  try:
    nbdinfo nbd://%s
    qemu-img info nbd://%s
    fio --ioengine=nbd --uri=nbd://%s --rw=randrw --bs=4k --size=64M --name=try
%s    keel cluster status --http %s
    keel verify --http %s
    curl %s://127.0.0.1:%d/v1/status     (the proxy: leader, epoch, cache)
  Kill a server (kill -9 PID, pids: n1 %d  n2 %d  n3 %d): the proxy's clients
  see a stall, and keel dev starts it again. Ctrl-C stops everything.
`, proxyAddr, nodes[0].nbd, nodes[1].nbd, nodes[2].nbd, proxyAddr, proxyAddr, proxyAddr, certs.howTo(), nodes[0].http, nodes[0].http, certs.curl(), base+300,
		nodes[0].child.Pid(), nodes[1].child.Pid(), nodes[2].child.Pid())
	<-ctx.Done()
	return nil
}

// devCerts are keel dev's cluster certificates, under DIR/tls: the CA,
// one directory per server and the proxy, and cli (a client certificate)
// for the operator's keel cluster and keel verify. Nil: --insecure.
type devCerts struct {
	root, cli string
}

// makeDevCerts makes DIR/tls's CA and certificates, each once: a later
// run reuses what is there.
func makeDevCerts(dir string) (*devCerts, error) {
	root, err := filepath.Abs(filepath.Join(dir, "tls"))
	if err != nil {
		return nil, err
	}
	ca := filepath.Join(root, "ca")
	if !exists(filepath.Join(ca, keeltls.CACert)) {
		if err := keeltls.CreateCA(ca, keeltls.CAOptions{Name: "Keel dev CA"}); err != nil {
			return nil, fmt.Errorf("keel dev: making its CA: %w", err)
		}
	}
	for _, name := range []string{"n1", "n2", "n3", "proxy", "cli"} {
		out := filepath.Join(root, name)
		if exists(filepath.Join(out, keeltls.CACert)) {
			continue
		}
		opts := keeltls.CertOptions{Name: name, Hosts: []string{"127.0.0.1", "localhost"}}
		if name == "cli" {
			opts = keeltls.CertOptions{Name: "keel-dev-operator", Client: true}
		}
		if err := keeltls.CreateCert(ca, out, opts); err != nil {
			return nil, fmt.Errorf("keel dev: making %s's certificates: %w", name, err)
		}
	}
	return &devCerts{root: root, cli: filepath.Join(root, "cli")}, nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// dir is the --cluster-tls directory of a child; "" with --insecure.
func (d *devCerts) dir(name string) string {
	if d == nil {
		return ""
	}
	return filepath.Join(d.root, name)
}

// howTo tells the operator how to point the CLI at the certificates.
func (d *devCerts) howTo() string {
	if d == nil {
		return "  cluster traffic is NOT encrypted or authenticated (--insecure)\n"
	}
	return fmt.Sprintf("  cluster traffic is mutual TLS; point the CLI at its certificates first:\n    export %s=%s\n", clusterTLSEnv, d.cli)
}

// curl is the scheme of the proxy's status page, with curl's option to
// trust the dev CA.
func (d *devCerts) curl() string {
	if d == nil {
		return "http"
	}
	return "--cacert " + filepath.Join(d.cli, keeltls.CACert) + " https"
}

func prefixLines(r io.Reader, id string) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fmt.Fprintf(os.Stderr, "%s | %s\n", id, sc.Text())
	}
}

func waitHTTP(ctx context.Context, addr string) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitVoters waits until the cluster has n voters, printing resync progress.
func waitVoters(ctx context.Context, c *wire.Client, addr string, n int) error {
	deadline := time.Now().Add(5 * time.Minute)
	last := ""
	for {
		cs, err := c.Cluster(ctx, addr)
		if err == nil {
			voters := 0
			for _, m := range cs.Members {
				if m.Suffrage == "Voter" {
					voters++
				} else if m.Status != nil && m.Status.Sync != nil && m.Status.Sync.Active {
					if t := m.ID + ": " + syncText(m.Status.Sync); t != last {
						fmt.Fprintln(os.Stderr, "keel dev:", t)
						last = t
					}
				}
			}
			if voters >= n {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cluster did not reach %d voters within 5 minutes (last error: %v)", n, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}
