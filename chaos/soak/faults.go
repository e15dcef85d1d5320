package soak

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
)

// A fault kind, as named in the report and in Config.Faults.
const (
	FaultKill        = "kill"         // kill -9 one server, start it again
	FaultPause       = "pause"        // SIGSTOP one server, then SIGCONT
	FaultRestart     = "restart"      // SIGTERM one server, start it again
	FaultProxyKill   = "proxy-kill"   // kill -9 the proxy, start it again
	FaultProxyStop   = "proxy-stop"   // SIGTERM the proxy, start it again
	FaultQuorumLoss  = "quorum-loss"  // kill -9 two of three servers, start them again
	FaultQuorumPause = "quorum-pause" // SIGSTOP two of three servers, then SIGCONT
)

// ProcessFaults lists the process fault kinds.
var ProcessFaults = []string{FaultKill, FaultPause, FaultRestart, FaultProxyKill, FaultProxyStop, FaultQuorumLoss, FaultQuorumPause}

// Fault is one fault injected: what, on whom, and when (times since the
// history began).
type Fault struct {
	Kind   string
	Target string
	// Start is when it was injected, Healed when the harness undid it.
	Start, Healed time.Duration
	// Unavailable: while it lasts the volume cannot serve (no quorum, or
	// no proxy), so client-visible errors are allowed from Start until the
	// first write acknowledged after Healed.
	Unavailable bool
	// Err is why injecting or healing failed, if it did.
	Err string
}

// plan is one fault decided from the seed before it is injected: its
// kind, whom (indices into the servers, or the leader), and for how long.
type plan struct {
	kind    string
	leader  bool          // target the leader
	victims []int         // server indices when not the leader (and the second one for quorum faults)
	hold    time.Duration // how long the fault lasts
	gap     time.Duration // quiet time before it
}

// planner turns the seed into a sequence of plans; it decides everything
// random about the faults, so a seed replays the same sequence.
type planner struct {
	rng   *rand.Rand
	kinds []string
	n     int      // servers
	deck  []string // the kinds still to come in this round
}

func newPlanner(seed uint64, kinds []string, n int) *planner {
	return &planner{rng: rand.New(rand.NewPCG(seed, 0x6661756c74)), kinds: kinds, n: n}
}

func (p *planner) next() plan {
	// Rounds of every kind in a shuffled order: a run of len(kinds)
	// faults covers each kind once.
	if len(p.deck) == 0 {
		p.deck = append([]string(nil), p.kinds...)
		p.rng.Shuffle(len(p.deck), func(i, j int) { p.deck[i], p.deck[j] = p.deck[j], p.deck[i] })
	}
	kind := p.deck[0]
	p.deck = p.deck[1:]
	pl := plan{
		kind: kind,
		hold: time.Duration(200+p.rng.IntN(3800)) * time.Millisecond,
		gap:  time.Duration(500+p.rng.IntN(2500)) * time.Millisecond,
	}
	pl.leader = p.rng.IntN(2) == 0
	perm := p.rng.Perm(p.n)
	pl.victims = perm[:2]
	return pl
}

// injector applies plans to a cluster of keeltest processes.
type injector struct {
	c     *keeltest.Cluster
	proxy *keeltest.Proxy
	hist  *History
	logf  func(string, ...any)
}

// victims resolves a plan's targets: the leader (if asked and known)
// first, then others from the plan, count of them.
func (in *injector) victims(ctx context.Context, pl plan, count int) []*keeltest.Node {
	nodes := in.c.Nodes()
	var out []*keeltest.Node
	if pl.leader {
		lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if lead, err := in.c.Leader(lctx); err == nil {
			out = append(out, lead)
		}
		cancel()
	}
	for _, i := range pl.victims {
		if len(out) < count && !slices.Contains(out, nodes[i]) {
			out = append(out, nodes[i])
		}
	}
	return out
}

func ids(ns []*keeltest.Node) string {
	var s []string
	for _, n := range ns {
		s = append(s, n.ID)
	}
	return fmt.Sprint(s)
}

// run injects pl, holds it, heals it, and waits until the cluster has
// recovered (every server up and caught up, the proxy serving).
func (in *injector) run(ctx context.Context, pl plan) Fault {
	f := Fault{Kind: pl.kind}
	hold := func() {
		t := time.NewTimer(pl.hold)
		defer t.Stop()
		select {
		case <-ctx.Done():
		case <-t.C:
		}
	}
	var err error
	var restart []*keeltest.Node
	switch pl.kind {
	case FaultKill, FaultRestart, FaultQuorumLoss:
		count := 1
		if pl.kind == FaultQuorumLoss {
			count, f.Unavailable = 2, true
		}
		vs := in.victims(ctx, pl, count)
		f.Target, f.Start = ids(vs), in.hist.Now()
		for _, n := range vs {
			if pl.kind == FaultRestart {
				err = n.Stop()
			} else {
				err = n.Kill()
			}
			if err != nil {
				break
			}
		}
		hold()
		restart = vs
		f.Healed = in.hist.Now()
		for _, n := range vs {
			if err2 := n.Restart(ctx); err2 != nil && err == nil {
				err = err2
			}
		}
	case FaultPause, FaultQuorumPause:
		count := 1
		if pl.kind == FaultQuorumPause {
			count, f.Unavailable = 2, true
		}
		vs := in.victims(ctx, pl, count)
		f.Target, f.Start = ids(vs), in.hist.Now()
		for _, n := range vs {
			if err = n.Proc().Pause(); err != nil {
				break
			}
		}
		hold()
		f.Healed = in.hist.Now()
		for _, n := range vs {
			if err2 := n.Proc().Resume(); err2 != nil && err == nil {
				err = err2
			}
		}
		restart = vs
	case FaultProxyKill, FaultProxyStop:
		f.Target, f.Start, f.Unavailable = "proxy", in.hist.Now(), true
		if pl.kind == FaultProxyKill {
			err = in.proxy.Kill()
		} else {
			err = in.proxy.Stop()
		}
		hold()
		f.Healed = in.hist.Now()
		if err2 := in.proxy.Restart(ctx); err2 != nil && err == nil {
			err = err2
		}
	default:
		err = fmt.Errorf("unknown fault kind %q", pl.kind)
	}
	for _, n := range restart {
		if err != nil {
			break
		}
		wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		err = in.c.WaitCaughtUp(wctx, n)
		cancel()
	}
	if err != nil {
		f.Err = err.Error()
	}
	in.logf("fault %-12s %-10s at %6.1fs held %v%s", f.Kind, f.Target, f.Start.Seconds(), pl.hold.Round(time.Millisecond), errSuffix(f.Err))
	return f
}

func errSuffix(s string) string {
	if s == "" {
		return ""
	}
	return ": ERROR " + s
}
