// Package servertest runs a real keel server in-process for tests: the
// whole supervision tree of services/server over loopback TCP, with its
// logs routed to the test. It imports only what a server is made of.
package servertest

import (
	"bytes"
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/server"
	"github.com/keelstore/keel/services/wire"
)

// Node is a running single-node server.
type Node struct {
	HTTP, NBD, Raft string // addresses
	Server          *server.Server
}

// Holder hands out the node's running replica.Node.
func (n *Node) Holder() *server.NodeHolder { return n.Server.Holder() }

// Logger returns a logger that writes to t.Log.
func Logger(t testing.TB, name string) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Output: tWriter{t}, Level: hclog.Info, Name: name})
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// FreeAddr returns a loopback TCP address that was free a moment ago.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// StartOne bootstraps a one-node cluster of size bytes (16 MiB when 0),
// waits until it leads and has registered itself, and stops it (within
// 30s) when the test ends.
func StartOne(t testing.TB, size uint64) *Node {
	t.Helper()
	return Start(t, Options{Size: size})
}

// Options configure Start.
type Options struct {
	// Size is the volume's size in bytes; 0 means 16 MiB.
	Size uint64
	// ClusterTLS, when set, is the server's cluster TLS (Raft and the
	// HTTP API over mutual TLS; server.Config.ClusterTLS).
	ClusterTLS *wire.ClusterTLS
	// Log is the server's logger; nil: Logger(t, "n1").
	Log hclog.Logger
}

// Start is StartOne with options.
func Start(t testing.TB, o Options) *Node {
	t.Helper()
	size := o.Size
	if size == 0 {
		size = 16 << 20
	}
	log := o.Log
	if log == nil {
		log = Logger(t, "n1")
	}
	httpL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	nbdL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &Node{HTTP: httpL.Addr().String(), NBD: nbdL.Addr().String(), Raft: FreeAddr(t)}
	srv, err := server.New(server.Config{
		Node: replica.NodeConfig{
			ID: "n1", Dir: filepath.Join(t.TempDir(), "n1"), RaftAddr: n.Raft, Bootstrap: true, Size: size,
			Self: replica.NodeInfo{ID: "n1", Raft: n.Raft, HTTP: n.HTTP, NBD: n.NBD},
		},
		HTTP: httpL, NBD: nbdL, VolumeSize: size,
		WriteTimeout: 5 * time.Second, DrainTimeout: 10 * time.Second, MembershipEvery: 50 * time.Millisecond,
		ClusterTLS: o.ClusterTLS, Log: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	n.Server = srv
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("server did not stop within 30s")
		}
	})
	// Ready: leader, and registered (so followers could forward to it).
	deadline := time.Now().Add(15 * time.Second)
	for {
		rn := n.Holder().Peek()
		if rn != nil && rn.IsLeader() {
			if _, ok := rn.FSM().State().Nodes["n1"]; ok {
				return n
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("single node did not become a registered leader within 15s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
