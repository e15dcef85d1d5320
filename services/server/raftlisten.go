package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/wire"
)

// RaftListener shares one Raft TCP listener, which outlives any one
// replica.Node (a process inherits it from its parent and passes it on),
// between the Raft transports this process opens one after another: a node
// stopped for an upgrade and opened again when the upgrade fails, or
// restarted by its supervisor. Each transport gets a lease (Transport);
// while none is held, nothing accepts, so peers' connections wait in the
// kernel's backlog for the next holder, in this process or the child that
// inherited the listener.
//
// Only the lease's Accept calls the listener's Accept; closing the lease
// unblocks it with a deadline instead of closing the listener.
//
// With cluster TLS, every connection is mutual TLS over the shared TCP
// listener (the listener itself stays plain TCP, so an upgrade passes it
// on as before): an accepted one must show a client certificate from the
// cluster CA, a dialed one shows this node's and checks the peer's server
// certificate. The handshake of an accepted connection runs in raft's
// goroutine for that connection (its first Read), never in Accept, so a
// peer that stalls or fails it holds up nobody; a refused peer is logged
// once (PeerLog) and its connection closed, as if it had hung up.
type RaftListener struct {
	l     *net.TCPListener
	log   hclog.Logger
	tls   *wire.ClusterTLS // nil: plain TCP
	peers *wire.PeerLog

	mu  sync.Mutex // guards the following
	cur *raftLease // the lease held now, if any
}

// NewRaftListener shares l, which must be a TCP listener; ct, when set,
// is the cluster TLS every Raft connection runs over.
func NewRaftListener(l net.Listener, ct *wire.ClusterTLS, log hclog.Logger) (*RaftListener, error) {
	tl, ok := l.(*net.TCPListener)
	if !ok {
		return nil, fmt.Errorf("server: the Raft listener is a %T, want a TCP listener", l)
	}
	if log == nil {
		log = hclog.NewNullLogger()
	}
	if ct != nil {
		if err := ct.Validate(); err != nil {
			return nil, err
		}
	}
	return &RaftListener{l: tl, log: log, tls: ct, peers: &wire.PeerLog{Log: log}}, nil
}

// Addr is the listener's address.
func (r *RaftListener) Addr() net.Addr { return r.l.Addr() }

// Close closes the listener itself (this process's descriptor).
func (r *RaftListener) Close() error { return r.l.Close() }

// ErrLeaseHeld: a transport still holds the Raft listener.
var ErrLeaseHeld = errors.New("server: the Raft listener is leased to a transport that is still open")

// Transport returns a new Raft transport that accepts on the listener
// until it is closed and advertises advertise (HOST:PORT) to peers; log
// nil: the listener's.
func (r *RaftListener) Transport(advertise string, log hclog.Logger) (*raft.NetworkTransport, error) {
	if log == nil {
		log = r.log
	}
	addr, err := net.ResolveTCPAddr("tcp", advertise)
	if err != nil {
		return nil, fmt.Errorf("server: Raft address %q: %w", advertise, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cur != nil {
		return nil, ErrLeaseHeld
	}
	_ = r.l.SetDeadline(time.Time{}) // the last lease's Close set one
	lease := &raftLease{r: r, adv: addr, closed: make(chan struct{})}
	r.cur = lease
	return raft.NewNetworkTransportWithLogger(lease, 4, 10*time.Second, replica.TransportLogger(log)), nil
}

// raftLease is one transport's raft.StreamLayer over the shared listener.
type raftLease struct {
	r      *RaftListener
	adv    net.Addr
	once   sync.Once
	closed chan struct{}
	accept sync.Mutex // held while Accept waits on the listener
}

func (l *raftLease) Accept() (net.Conn, error) {
	l.accept.Lock()
	defer l.accept.Unlock()
	select {
	case <-l.closed:
		return nil, net.ErrClosed
	default:
	}
	// Close sets a past deadline to unblock this call; the next lease
	// clears it only once this one is closed and its Accept returned.
	c, err := l.r.l.Accept()
	select {
	case <-l.closed:
		if c != nil {
			c.Close() // accepted just as the lease ended: the peer redials
		}
		return nil, net.ErrClosed
	default:
	}
	if err != nil || l.r.tls == nil {
		return c, err
	}
	return &handshakeConn{Conn: tls.Server(c, l.r.tls.ServerConfig(tls.RequireAndVerifyClientCert)), peers: l.r.peers}, nil
}

// Close ends the lease: its Accept returns, the listener stays open.
func (l *raftLease) Close() error {
	l.once.Do(func() {
		close(l.closed)
		_ = l.r.l.SetDeadline(time.Unix(1, 0))
		l.accept.Lock() // wait for a running Accept to return
		l.accept.Unlock()
		l.r.mu.Lock()
		if l.r.cur == l {
			l.r.cur = nil
		}
		l.r.mu.Unlock()
	})
	return nil
}

func (l *raftLease) Addr() net.Addr { return l.adv }

func (l *raftLease) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := net.Dialer{Timeout: timeout}
	c, err := d.Dial("tcp", string(address))
	if err != nil || l.r.tls == nil {
		return c, err
	}
	tc := tls.Client(c, l.r.tls.ClientFor(string(address)))
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("%w: %s: %w", ErrRaftHandshake, address, err)
	}
	return tc, nil
}

// ErrRaftHandshake: a Raft connection's TLS handshake failed.
var ErrRaftHandshake = errors.New("server: Raft TLS handshake failed")

// handshakeTimeout bounds an accepted Raft connection's TLS handshake.
const handshakeTimeout = 10 * time.Second

// handshakeConn is an accepted Raft connection over TLS: its first Read
// or Write runs the handshake; one that fails is logged once per peer and
// reads as the peer hanging up (io.EOF, which raft does not log).
type handshakeConn struct {
	*tls.Conn
	peers *wire.PeerLog
	once  sync.Once
	err   error
}

func (c *handshakeConn) handshake() error {
	c.once.Do(func() {
		_ = c.Conn.SetDeadline(time.Now().Add(handshakeTimeout))
		err := c.Conn.Handshake()
		_ = c.Conn.SetDeadline(time.Time{})
		if err == nil {
			return
		}
		c.err = fmt.Errorf("%w: %w", ErrRaftHandshake, err)
		if wire.Probe(err) {
			return
		}
		c.peers.Refused(c.RemoteAddr().String(), "refused a Raft connection: TLS handshake failed (a peer without a certificate from the cluster CA?)", "error", err)
	})
	return c.err
}

func (c *handshakeConn) Read(p []byte) (int, error) {
	if c.handshake() != nil {
		return 0, io.EOF
	}
	return c.Conn.Read(p)
}

func (c *handshakeConn) Write(p []byte) (int, error) {
	if err := c.handshake(); err != nil {
		return 0, err
	}
	return c.Conn.Write(p)
}
