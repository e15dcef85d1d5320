package main

import (
	"bufio"
	"context"
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

	"github.com/keelstore/keel/services/wire"
)

// devNode is one server of keel dev.
type devNode struct {
	id                   string
	raft, http, nbd, dir string
	cmd                  *exec.Cmd
}

func newDevCmd(g *globalFlags) *cobra.Command {
	var dir, size string
	var base int
	cmd := &cobra.Command{
		Use:   "dev [--dir DIR] [--size SIZE]",
		Short: "Run a three-node cluster and a proxy on loopback for a first look",
		Long: `Start three keel servers on 127.0.0.1 (n1 bootstraps, n2 and n3 join) and
a keel proxy in front of them, print the proxy's NBD address to give qemu,
nbdinfo or fio, and stop everything on Ctrl-C. Each node keeps its image at
DIR/nN/disk.img; run keel dev again on the same DIR and the volume is as you
left it. Kill a server (even the leader) while a client writes through the
proxy: the client sees a stall, not an error.

Ports, from --base-port P: proxy NBD P; servers' NBD P+1..P+3, Raft
P+100.., HTTP P+200..; the proxy's HTTP (status, metrics) P+300.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error { return runDev(c.Context(), g, dir, size, base) },
	}
	cmd.Flags().StringVar(&dir, "dir", "keel-dev", "directory for the three nodes")
	cmd.Flags().StringVar(&size, "size", "1G", "volume size for a new cluster")
	cmd.Flags().IntVar(&base, "base-port", 10809, "the proxy's NBD port; the servers' ports follow it")
	return cmd
}

func runDev(ctx context.Context, g *globalFlags, dir, size string, base int) error {
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
	var wg sync.WaitGroup
	defer func() {
		for _, n := range nodes {
			if n.cmd != nil && n.cmd.Process != nil {
				_ = n.cmd.Process.Signal(syscall.SIGTERM)
			}
		}
		wg.Wait()
		fmt.Fprintln(os.Stderr, "keel dev: all nodes stopped; the volume is in", dir)
	}()
	client := wire.NewClient(2 * time.Second)
	for i, n := range nodes {
		args := []string{"--log-level", g.logLevel, "server", "--dir", n.dir, "--id", n.id,
			"--raft", n.raft, "--http", n.http, "--nbd", n.nbd}
		if !hasRaftState(n.dir) {
			if i == 0 {
				args = append(args, "--bootstrap", "--size", size)
			} else {
				args = append(args, "--join", nodes[0].http)
			}
		}
		if err := os.MkdirAll(n.dir, 0o755); err != nil {
			return err
		}
		n.cmd = exec.Command(self, args...)
		n.cmd.Stdout = os.Stdout
		pr, pw := io.Pipe()
		n.cmd.Stderr = pw
		go prefixLines(pr, n.id)
		if err := n.cmd.Start(); err != nil {
			return fmt.Errorf("starting %s: %w", n.id, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := n.cmd.Wait()
			pw.Close()
			if ctx.Err() == nil {
				fmt.Fprintf(os.Stderr, "keel dev: %s exited: %v; stopping the others\n", n.id, err)
				stop()
			}
		}()
		if err := waitHTTP(ctx, client, n.http); err != nil {
			return fmt.Errorf("%s did not come up: %w", n.id, err)
		}
	}
	if err := waitVoters(ctx, client, nodes[0].http, 3); err != nil {
		return err
	}
	proxyAddr := fmt.Sprintf("127.0.0.1:%d", base)
	proxy := exec.Command(self, "--log-level", g.logLevel, "proxy", "--listen", proxyAddr,
		"--servers", nodes[0].http+","+nodes[1].http+","+nodes[2].http, "--writer", "keel-dev",
		"--http", fmt.Sprintf("127.0.0.1:%d", base+300))
	proxy.Stdout = os.Stdout
	pr, pw := io.Pipe()
	proxy.Stderr = pw
	go prefixLines(pr, "proxy")
	if err := proxy.Start(); err != nil {
		return fmt.Errorf("starting the proxy: %w", err)
	}
	proxyDone := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		err := proxy.Wait()
		close(proxyDone)
		pw.Close()
		if ctx.Err() == nil {
			fmt.Fprintf(os.Stderr, "keel dev: the proxy exited: %v; stopping the servers\n", err)
			stop()
		}
	}()
	// Stop the proxy first, so that it drains its clients while the
	// servers can still commit what it read.
	defer func() {
		_ = proxy.Process.Signal(syscall.SIGTERM)
		select {
		case <-proxyDone:
		case <-time.After(70 * time.Second):
			_ = proxy.Process.Kill()
		}
	}()
	if err := waitHTTP(ctx, client, proxyAddr); err != nil {
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
    keel cluster status --http %s
    keel verify --http %s
    curl http://127.0.0.1:%d/v1/status     (the proxy: leader, epoch, cache)
  Ctrl-C stops everything.
`, proxyAddr, nodes[0].nbd, nodes[1].nbd, nodes[2].nbd, proxyAddr, proxyAddr, proxyAddr, nodes[0].http, nodes[0].http, base+300)
	<-ctx.Done()
	return nil
}

func prefixLines(r io.Reader, id string) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fmt.Fprintf(os.Stderr, "%s | %s\n", id, sc.Text())
	}
}

func waitHTTP(ctx context.Context, c *wire.Client, addr string) error {
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
