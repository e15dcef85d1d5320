package control

import (
	"context"
	"testing"
	"time"

	"github.com/keelstore/keel/chaos/netfault"
)

func TestControlNet(t *testing.T) {
	dir := t.TempDir()
	tab := netfault.NewTable(1)
	s := &Server{Path: SocketPath(dir, "n1"), Net: tab}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	l, err := Listen(s.Path)
	if err != nil {
		t.Fatal(err)
	}
	go func() { done <- s.ServeListener(ctx, l) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	c := NewClient(s.Path)
	defer c.Close()
	want := netfault.Rules{Drop: []string{"127.0.0.1:1"}, Delay: 5 * time.Millisecond}
	if err := c.SetNet(ctx, want); err != nil {
		t.Fatal(err)
	}
	if got := tab.Rules(); got.Delay != want.Delay || len(got.Drop) != 1 {
		t.Fatalf("table holds %+v, want %+v", got, want)
	}
	got, err := c.Net(ctx)
	if err != nil || got.Delay != want.Delay {
		t.Fatalf("Net: %+v, %v", got, err)
	}
	if err := c.SetNet(ctx, netfault.Rules{FailPercent: 200}); err == nil {
		t.Fatal("bad rules accepted")
	}
}
