package netfault

import (
	"context"
	"net"
	"sync"
	"time"
)

// Dialer is the fault layer under a process's outgoing TCP connections
// (the proxy's links to the servers' HTTP APIs). A rule names the target
// by the address dialed. Every write on a connection passes the table's
// rules (delay, random reset); a partition refuses new connections to the
// target and resets the ones open, as SetRules does at once.
type Dialer struct {
	t    *Table
	dial func(ctx context.Context, network, addr string) (net.Conn, error)

	mu    sync.Mutex // guards conns
	conns map[*conn]struct{}
}

// NewDialer returns a dialer under the rules of t.
func NewDialer(t *Table) *Dialer {
	var d net.Dialer
	return &Dialer{t: t, dial: d.DialContext, conns: map[*conn]struct{}{}}
}

// SetRules replaces the rules and resets every open connection to a peer
// they drop.
func (d *Dialer) SetRules(r Rules) error {
	if err := d.t.Set(r); err != nil {
		return err
	}
	d.mu.Lock()
	var doomed []*conn
	for c := range d.conns {
		for _, a := range r.Drop {
			if c.target == a {
				doomed = append(doomed, c)
			}
		}
	}
	d.mu.Unlock()
	for _, c := range doomed {
		c.Close()
	}
	return nil
}

// DialContext opens a connection under the rules.
func (d *Dialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	if wait, err := d.t.decide(addr); err != nil {
		return nil, err
	} else if wait > 0 {
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
	nc, err := d.dial(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	c := &conn{Conn: nc, d: d, target: addr}
	d.mu.Lock()
	d.conns[c] = struct{}{}
	d.mu.Unlock()
	return c, nil
}

type conn struct {
	net.Conn
	d      *Dialer
	target string
	once   sync.Once
}

func (c *conn) Write(b []byte) (int, error) {
	wait, err := c.d.t.decide(c.target)
	if wait > 0 {
		time.Sleep(wait) // the network's delay
	}
	if err != nil {
		c.Close()
		return 0, err
	}
	return c.Conn.Write(b)
}

func (c *conn) Close() error {
	c.once.Do(func() {
		c.d.mu.Lock()
		delete(c.d.conns, c)
		c.d.mu.Unlock()
	})
	return c.Conn.Close()
}
