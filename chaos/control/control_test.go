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
	go func() { done <- s.Serve(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	c := NewClient(s.Path)
	defer c.Close()
	want := netfault.Rules{Drop: []string{"127.0.0.1:1"}, Delay: 5 * time.Millisecond}
	// The server may not listen yet: retry the first call until it does.
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := c.SetNet(ctx, want)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
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
