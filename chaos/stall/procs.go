package main

// The processes under test: three `keel server`s and a `keel proxy` on
// 127.0.0.1, run by keeltest (each in its own process group, so a Ctrl-C at
// the terminal reaches only this tool, which then stops them in order, and
// killed by the kernel if this tool dies first).

import (
	"context"
	"fmt"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
	"github.com/keelstore/keel/services/wire"
)

// cluster is the three servers and the proxy.
type cluster struct {
	cfg *config
	*keeltest.Cluster
	proxy *keeltest.Proxy
}

func newCluster(cfg *config) (*cluster, error) {
	kc, err := keeltest.NewCluster(keeltest.ClusterConfig{
		Bin: cfg.keel, Dir: cfg.dir, N: 3, Size: fmt.Sprint(cfg.size),
		GlobalFlags: []string{"--log-level", cfg.logLevel},
		Flags: []string{"--heartbeat-timeout", cfg.heartbeat.String(),
			"--election-timeout", cfg.election.String(),
			"--leader-lease-timeout", cfg.lease.String()},
		Logf:        func(format string, args ...any) { fmt.Printf("stall: "+format+"\n", args...) },
		StopTimeout: 15 * time.Second,
		PollEvery:   20 * time.Millisecond,
		HTTPTimeout: time.Second,
	})
	if err != nil {
		return nil, err
	}
	return &cluster{cfg: cfg, Cluster: kc}, nil
}

// start brings up n1 (bootstrap), n2 and n3 (join), waits for three
// voters, then starts the proxy and waits until it serves.
func (c *cluster) start(ctx context.Context) error {
	if err := c.Start(ctx); err != nil {
		return err
	}
	listen, err := keeltest.FreeAddr()
	if err != nil {
		return err
	}
	pc := keeltest.ProxyConfig{Name: "stall", Listen: listen,
		Flags: []string{"--cache", c.cfg.proxyCache, "--poll-interval", c.cfg.proxyPoll.String()}}
	if c.cfg.proxyProfile != "" {
		pc.GlobalFlags = []string{"--cpu-profile", c.cfg.proxyProfile}
	}
	c.proxy, err = c.StartProxy(ctx, pc)
	return err
}

// waitFor polls cond every 20ms until it holds, fails, or limit passes.
func (c *cluster) waitFor(ctx context.Context, limit time.Duration, what string, cond func() (bool, error)) error {
	return keeltest.Poll(ctx, limit, 20*time.Millisecond, what, func() (bool, string, error) {
		ok, err := cond()
		return ok, "", err
	})
}

// view is every live server's status at one moment.
type view struct {
	st     map[string]wire.NodeStatus // by node id; missing: no answer
	leader *keeltest.Node             // the one node that says Leader, if exactly one does
	term   uint64                     // highest term reported
}

func (c *cluster) view(ctx context.Context) view {
	v := view{st: c.Statuses(ctx)}
	leaders := 0
	for _, n := range c.Nodes() {
		s, ok := v.st[n.ID]
		if !ok {
			continue
		}
		v.term = max(v.term, s.Term)
		if s.State == "Leader" {
			leaders++
			v.leader = n
		}
	}
	if leaders != 1 {
		v.leader = nil
	}
	return v
}

// waitCaughtUp waits until one node leads, every node answers, and every
// node has applied at least what the leader had applied when asked (it
// keeps applying meanwhile: the load goes on).
func (c *cluster) waitCaughtUp(ctx context.Context, limit time.Duration) error {
	var want uint64
	return c.waitFor(ctx, limit, "every node to catch up with the leader", func() (bool, error) {
		for _, n := range c.Nodes() {
			if !n.Running() {
				return false, fmt.Errorf("%s exited: %v (see %s)", n.ID, n.Proc().Err(), n.LogPath)
			}
		}
		v := c.view(ctx)
		if v.leader == nil || len(v.st) != len(c.Nodes()) {
			return false, nil
		}
		if want == 0 {
			want = max(1, v.st[v.leader.ID].AppliedIndex)
		}
		for _, s := range v.st {
			if s.AppliedIndex < want {
				return false, nil
			}
		}
		return true, nil
	})
}
