package netfault

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
)

func TestDialer(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); c.Close() }()
		}
	}()
	addr := l.Addr().String()
	d := NewDialer(NewTable(1))
	ctx := context.Background()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echo := func(c net.Conn) error {
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		b := make([]byte, 4)
		_, err := io.ReadFull(c, b)
		return err
	}
	if err := echo(c); err != nil {
		t.Fatalf("no rules: %v", err)
	}
	if err := d.SetRules(Rules{Drop: []string{addr}}); err != nil {
		t.Fatal(err)
	}
	// The open connection was reset; a new one is refused.
	if err := echo(c); err == nil {
		t.Fatal("the open connection survived the partition")
	}
	if _, err := d.DialContext(ctx, "tcp", addr); !errors.Is(err, ErrInjected) {
		t.Fatalf("dial across the partition: %v", err)
	}
	if err := d.SetRules(Rules{}); err != nil {
		t.Fatal(err)
	}
	c2, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if err := echo(c2); err != nil {
		t.Fatalf("healed: %v", err)
	}
	if err := d.SetRules(Rules{FailPercent: 100}); err != nil {
		t.Fatal(err)
	}
	if err := echo(c2); !errors.Is(err, ErrInjected) {
		t.Fatalf("100%% resets: %v", err)
	}
}
