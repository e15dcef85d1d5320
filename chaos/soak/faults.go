package soak

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"

	"github.com/keelstore/keel/chaos/control"
	"github.com/keelstore/keel/chaos/diskfault"
	"github.com/keelstore/keel/chaos/imagefault"
	"github.com/keelstore/keel/chaos/netfault"
	"github.com/keelstore/keel/cmd/keel/keeltest"
	"github.com/keelstore/keel/services/wire"
	"github.com/keelstore/keel/supervise"
	"github.com/keelstore/keel/upgrade"
)

// A fault kind, as named in the report and in Config.Faults.
const (
	FaultKill         = "kill"          // kill -9 one server, start it again
	FaultPause        = "pause"         // SIGSTOP one server, then SIGCONT
	FaultRestart      = "restart"       // SIGTERM one server, start it again
	FaultProxyKill    = "proxy-kill"    // kill -9 the proxy, start it again
	FaultProxyStop    = "proxy-stop"    // SIGTERM the proxy, start it again
	FaultQuorumLoss   = "quorum-loss"   // kill -9 two of three servers, start them again
	FaultQuorumPause  = "quorum-pause"  // SIGSTOP two of three servers, then SIGCONT
	FaultKillCatchUp  = "kill-catchup"  // kill -9 a follower, start it, kill it again while it catches up (from the log, or by an image resync), start it
	FaultMembership   = "membership"    // remove a follower from the cluster, wipe it, join it again; mid-change kill -9 the joining node or the leader
	FaultUpgrade      = "upgrade"       // keel upgrade of one server (the leader half the time): a new process of the same binary takes over its listeners and connections
	FaultProxyUpgrade = "proxy-upgrade" // keel upgrade of the proxy
)

// Network fault kinds, through the chaos build's netfault layer under each
// server's Raft transport.
const (
	FaultPartition       = "partition"        // one server cut off from the other two, both ways
	FaultPartitionLeader = "partition-leader" // the leader alone
	FaultPartitionOneWay = "partition-oneway" // one server cannot send to the others; it still hears them
	FaultPartitionAll    = "partition-all"    // nobody hears anybody: no quorum
	FaultNetDelay        = "net-delay"        // every RPC delayed 10ms plus up to 40ms of jitter
	FaultNetFlaky        = "net-flaky"        // a fifth of all RPCs fail: dropped and reset connections
)

// Network fault kinds under the proxy's links to the servers: their HTTP
// APIs and NBD exports (netfault.Dialer in the proxy).
const (
	FaultProxyCutLeader = "proxy-cut-leader" // the proxy cannot reach the leader; followers forward
	FaultProxyMinority  = "proxy-minority"   // the proxy reaches one server only, and that one is cut from the others: no quorum on its side
	FaultProxyFlaky     = "proxy-net-flaky"  // a fifth of the proxy's requests to servers are reset
	FaultProxyDelay     = "proxy-net-delay"  // the proxy's requests delayed 10ms plus up to 40ms
)

// NetworkFaults lists the network fault kinds.
var NetworkFaults = []string{FaultPartition, FaultPartitionLeader, FaultPartitionOneWay, FaultPartitionAll, FaultNetDelay, FaultNetFlaky,
	FaultProxyCutLeader, FaultProxyMinority, FaultProxyFlaky, FaultProxyDelay}

// Code fault kinds: supervise's named points armed to panic (package
// faultpoint) through the chaos build's control sockets.
const (
	FaultPanicRaft       = "panic-raft"       // one server's Raft service panics: its node is closed and opened again
	FaultPanicMembership = "panic-membership" // every server's membership loop panics once
	FaultPanicAccept     = "panic-accept"     // the proxy's NBD accept loop panics
	FaultPanicStorm      = "panic-storm"      // one server's membership loop keeps panicking: its supervisor backs off and says so
)

// CodeFaults lists the code fault kinds.
var CodeFaults = []string{FaultPanicRaft, FaultPanicMembership, FaultPanicAccept, FaultPanicStorm}

// Disk fault kinds, through the chaos build's diskfault layer under one
// server's Raft log (raft-wal's segment files) and its imagefault layer
// under the image.
const (
	FaultPowerLoss  = "power-loss"    // log writes stay in memory until fsync, image changes are remembered until fdatasync; then a crash loses (or tears) the log's and loses a random set of the image's, and the server restarts
	FaultDiskEIO    = "disk-eio"      // log writes fail with EIO
	FaultDiskENOSPC = "disk-enospc"   // log writes fail with ENOSPC
	FaultSyncEIO    = "disk-sync-eio" // log fsyncs fail with EIO
	FaultReadEIO    = "disk-read-eio" // log reads fail with EIO
	FaultDiskSlow   = "disk-slow"     // every log write and fsync takes 20ms more

	FaultImageEIO     = "image-eio"      // image writes, trims and zeroes fail with EIO: the server stops (exit 70) and is restarted once healed
	FaultImageENOSPC  = "image-enospc"   // the same with ENOSPC
	FaultImageReadEIO = "image-read-eio" // image reads fail with EIO: the proxy reads from the other replicas
	FaultImageSyncEIO = "image-sync-eio" // image fdatasyncs fail with EIO (snapshots, FUA writes, flushes)
)

// DiskFaults lists the disk fault kinds.
var DiskFaults = []string{FaultPowerLoss, FaultDiskEIO, FaultDiskENOSPC, FaultSyncEIO, FaultReadEIO, FaultDiskSlow,
	FaultImageEIO, FaultImageENOSPC, FaultImageReadEIO, FaultImageSyncEIO}

// ProcessFaults lists the process fault kinds.
var ProcessFaults = []string{FaultKill, FaultPause, FaultRestart, FaultProxyKill, FaultProxyStop, FaultQuorumLoss, FaultQuorumPause, FaultKillCatchUp, FaultMembership, FaultUpgrade, FaultProxyUpgrade}

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
	again   time.Duration // kill-catchup: from the restart to the second kill
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
	pl.again = time.Duration(p.rng.IntN(1500)) * time.Millisecond
	return pl
}

// injector applies plans to a cluster of keeltest processes.
type injector struct {
	c     *keeltest.Cluster
	ctl   map[string]*control.Client  // per server id, nil without the chaos build
	pctl  *control.Client             // the proxy's
	dial  func(context.Context) error // opens and closes one NBD connection to the proxy
	proxy *keeltest.Proxy
	hist  *History
	logf  func(string, ...any)
	bin   string // the keel binary, for keel upgrade
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
	case FaultKillCatchUp:
		pl.leader = false
		n := in.victims(ctx, pl, 1)[0]
		f.Target, f.Start = "["+n.ID+"]", in.hist.Now()
		err = n.Kill()
		hold()
		if err == nil {
			err = n.Restart(ctx)
		}
		if err == nil {
			t := time.NewTimer(pl.again)
			select {
			case <-ctx.Done():
			case <-t.C:
			}
			t.Stop()
			in.logf("%s: killed again %v after it came back (syncing: %v)", n.ID, pl.again, in.syncing(ctx, n))
			err = n.Kill()
		}
		f.Healed = in.hist.Now()
		if err == nil {
			err = n.Restart(ctx)
		}
		restart = []*keeltest.Node{n}
	case FaultUpgrade:
		n := in.victims(ctx, pl, 1)[0]
		f.Target, f.Start = "["+n.ID+"]", in.hist.Now()
		var pid int
		if pid, err = in.upgrade(ctx, n.ID, n.PidFile()); err == nil {
			err = n.Adopt(pid)
		}
		f.Healed = in.hist.Now()
		restart = []*keeltest.Node{n}
	case FaultProxyUpgrade:
		f.Target, f.Start = "proxy", in.hist.Now()
		var pid int
		if pid, err = in.upgrade(ctx, "proxy", in.proxy.PidFile()); err == nil {
			err = in.proxy.Adopt(pid)
		}
		f.Healed = in.hist.Now()
	case FaultMembership:
		var vs []*keeltest.Node
		vs, err = in.membership(ctx, pl, &f)
		restart = vs
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
	case FaultPartition, FaultPartitionLeader, FaultPartitionOneWay, FaultPartitionAll, FaultNetDelay, FaultNetFlaky:
		rules, target := in.netRules(ctx, pl)
		f.Target, f.Start, f.Unavailable = target, in.hist.Now(), pl.kind == FaultPartitionAll
		err = in.setNet(ctx, rules)
		hold()
		f.Healed = in.hist.Now()
		if err2 := in.setNet(ctx, nil); err2 != nil && err == nil {
			err = err2
		}
		restart = in.c.Nodes()
	case FaultProxyCutLeader, FaultProxyMinority, FaultProxyFlaky, FaultProxyDelay:
		if in.pctl == nil {
			err = errNoChaosBuild
			break
		}
		var prules netfault.Rules
		var srules map[string]netfault.Rules
		switch pl.kind {
		case FaultProxyFlaky:
			prules, f.Target = netfault.Rules{FailPercent: 20}, "proxy"
		case FaultProxyDelay:
			prules, f.Target = netfault.Rules{Delay: 10 * time.Millisecond, Jitter: 40 * time.Millisecond}, "proxy"
		case FaultProxyCutLeader:
			pl.leader = true
			v := in.victims(ctx, pl, 1)[0]
			prules, f.Target = netfault.Rules{Drop: []string{v.HTTP, v.NBD}}, "proxy/"+v.ID
		case FaultProxyMinority:
			// The proxy keeps one server (not the leader if it can help
			// it) and loses the others; that server is cut off from them.
			pl.leader = false
			keep := in.victims(ctx, pl, 1)[0]
			pl.kind = FaultPartition
			srules, _ = in.netRulesFor(keep, in.c.Nodes(), false)
			for _, o := range in.c.Nodes() {
				if o != keep {
					prules.Drop = append(prules.Drop, o.HTTP, o.NBD)
				}
			}
			f.Target, f.Unavailable = "proxy+"+keep.ID, true
		}
		f.Start = in.hist.Now()
		err = in.pctl.SetNet(ctx, prules)
		if err == nil && srules != nil {
			err = in.setNet(ctx, srules)
		}
		hold()
		f.Healed = in.hist.Now()
		if err2 := in.pctl.SetNet(ctx, netfault.Rules{}); err2 != nil && err == nil {
			err = err2
		}
		if srules != nil {
			if err2 := in.setNet(ctx, nil); err2 != nil && err == nil {
				err = err2
			}
		}
		restart = in.c.Nodes()
	case FaultPowerLoss, FaultDiskEIO, FaultDiskENOSPC, FaultSyncEIO, FaultReadEIO, FaultDiskSlow,
		FaultImageEIO, FaultImageENOSPC, FaultImageReadEIO, FaultImageSyncEIO:
		if in.ctl == nil {
			err = errNoChaosBuild
			break
		}
		n := in.victims(ctx, pl, 1)[0]
		rules := map[string]diskfault.Rules{
			FaultPowerLoss: {Lazy: true, CrashAtSync: true}, FaultDiskEIO: {FailWrite: "EIO"}, FaultDiskENOSPC: {FailWrite: "ENOSPC"},
			FaultSyncEIO: {FailSync: "EIO"}, FaultReadEIO: {FailRead: "EIO"}, FaultDiskSlow: {Slow: 20 * time.Millisecond},
		}[pl.kind]
		image := map[string]imagefault.Rules{
			FaultPowerLoss: {Lazy: true}, FaultImageEIO: {FailChange: "EIO"}, FaultImageENOSPC: {FailChange: "ENOSPC"},
			FaultImageReadEIO: {FailRead: "EIO"}, FaultImageSyncEIO: {FailSync: "EIO"},
		}[pl.kind]
		f.Target, f.Start = "["+n.ID+"]", in.hist.Now()
		proc := n.Proc()
		if image != (imagefault.Rules{}) {
			// The image's first: a power loss then remembers every image
			// change until the crash the log's rules bring.
			err = in.ctl[n.ID].SetImage(ctx, image)
			if err != nil && (pl.kind == FaultImageEIO || pl.kind == FaultImageENOSPC) {
				// The server stops (exit 70) at its next apply, which may
				// come before the control socket's answer is sent.
				select {
				case <-proc.Done():
					err = nil
				case <-time.After(10 * time.Second):
				}
			}
		}
		if pl.kind == FaultPowerLoss && err == nil {
			// Let image changes pile up unsynced for half the hold; the
			// log's rules crash the server at its next fsync after that.
			sleepCtx(ctx, pl.hold/2)
		}
		if rules != (diskfault.Rules{}) && err == nil {
			err = in.ctl[n.ID].SetDisk(ctx, rules)
		}
		if err != nil && pl.kind == FaultPowerLoss {
			// The crash may come at an fsync before the answer is sent.
			select {
			case <-proc.Done():
				err = nil
			case <-time.After(10 * time.Second):
			}
		}
		hold()
		if pl.kind == FaultPowerLoss && err == nil {
			// The crash comes at the log's next fsync, with that append's
			// writes lost or torn; if none came during the hold, now.
			if !proc.Exited() {
				in.ctl[n.ID].Crash(ctx)
			}
			select {
			case <-proc.Done():
			case <-time.After(30 * time.Second):
				err = fmt.Errorf("%s did not die at the simulated crash", n.ID)
			}
		} else if n.Running() {
			if err2 := in.ctl[n.ID].SetDisk(ctx, diskfault.Rules{}); err2 != nil && err == nil {
				err = err2
			}
			if err2 := in.ctl[n.ID].SetImage(ctx, imagefault.Rules{}); err2 != nil && err == nil {
				err = err2
			}
		}
		f.Healed = in.hist.Now()
		if !n.Running() {
			// The server stopped at the disk error (or crashed): start it
			// again, as an operator would once the disk is fixed.
			if pl.kind != FaultPowerLoss {
				in.logf("%s exited at the disk fault (%v); restarting it", n.ID, n.Proc().Err())
			}
			if err2 := n.Restart(ctx); err2 != nil && err == nil {
				err = err2
			}
		}
		restart = []*keeltest.Node{n}
	case FaultPanicRaft, FaultPanicMembership, FaultPanicStorm:
		if in.ctl == nil {
			err = errNoChaosBuild
			break
		}
		point, count, want := supervise.PointRaft, 1, "injected panic at "+supervise.PointRaft
		vs := in.victims(ctx, pl, 1)
		switch pl.kind {
		case FaultPanicMembership:
			point, want, vs = supervise.PointMembership, "injected panic at "+supervise.PointMembership, in.c.Nodes()
		case FaultPanicStorm:
			point, count, want = supervise.PointMembership, 50, "too many failures; backing off"
		}
		f.Target, f.Start = ids(vs), in.hist.Now()
		for _, n := range vs {
			before := strings.Count(n.RunOutput(), want)
			if err = in.ctl[n.ID].ArmPoint(ctx, point, count); err != nil {
				break
			}
			if err = waitLog(ctx, n.RunOutput, want, before); err != nil {
				err = fmt.Errorf("%s: %w", n.ID, err)
				break
			}
		}
		if pl.kind == FaultPanicStorm {
			for _, n := range vs {
				if err2 := in.ctl[n.ID].ArmPoint(ctx, point, 0); err2 != nil && err == nil {
					err = err2
				}
			}
		}
		hold()
		f.Healed = in.hist.Now()
		restart = vs
	case FaultPanicAccept:
		if in.pctl == nil {
			err = errNoChaosBuild
			break
		}
		f.Target, f.Start = "proxy", in.hist.Now()
		want := "injected panic at " + supervise.PointAccept
		before := strings.Count(in.proxy.RunOutput(), want)
		if err = in.pctl.ArmPoint(ctx, supervise.PointAccept, 1); err == nil {
			// The accept loop passes the point once per connection.
			if err = in.dial(ctx); err == nil {
				err = waitLog(ctx, in.proxy.RunOutput, want, before)
			}
		}
		hold()
		f.Healed = in.hist.Now()
		if err == nil {
			// The restarted accept loop takes connections again.
			err = in.dial(ctx)
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
	if err2 := in.healAll(ctx); err2 != nil && err == nil {
		err = err2
	}
	if err != nil {
		f.Err = err.Error()
	}
	in.logf("fault %-12s %-10s at %6.1fs held %v%s", f.Kind, f.Target, f.Start.Seconds(), pl.hold.Round(time.Millisecond), errSuffix(f.Err))
	return f
}

// netRules are the rules per server id that make pl's network fault,
// and whom it targets.
func (in *injector) netRules(ctx context.Context, pl plan) (map[string]netfault.Rules, string) {
	nodes := in.c.Nodes()
	out := map[string]netfault.Rules{}
	switch pl.kind {
	case FaultNetDelay, FaultNetFlaky:
		r := netfault.Rules{Delay: 10 * time.Millisecond, Jitter: 40 * time.Millisecond}
		if pl.kind == FaultNetFlaky {
			r = netfault.Rules{FailPercent: 20}
		}
		for _, n := range nodes {
			out[n.ID] = r
		}
		return out, "all"
	case FaultPartitionAll:
		for _, n := range nodes {
			var r netfault.Rules
			for _, o := range nodes {
				if o != n {
					r.Drop = append(r.Drop, o.Raft)
				}
			}
			out[n.ID] = r
		}
		return out, "all"
	}
	if pl.kind == FaultPartitionLeader {
		pl.leader = true
	}
	return in.netRulesFor(in.victims(ctx, pl, 1)[0], nodes, pl.kind == FaultPartitionOneWay)
}

// netRulesFor cuts v off from the other nodes: both ways, or only what v
// sends.
func (in *injector) netRulesFor(v *keeltest.Node, nodes []*keeltest.Node, oneWay bool) (map[string]netfault.Rules, string) {
	out := map[string]netfault.Rules{}
	var cut netfault.Rules
	for _, o := range nodes {
		if o != v {
			cut.Drop = append(cut.Drop, o.Raft)
			if !oneWay {
				out[o.ID] = netfault.Rules{Drop: []string{v.Raft}}
			}
		}
	}
	out[v.ID] = cut
	return out, "[" + v.ID + "]"
}

// setNet gives every server its rules (none when absent from rules).
func (in *injector) setNet(ctx context.Context, rules map[string]netfault.Rules) error {
	if in.ctl == nil {
		return errNoChaosBuild
	}
	var errs []error
	for _, n := range in.c.Nodes() {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if err := in.ctl[n.ID].SetNet(cctx, rules[n.ID]); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", n.ID, err))
		}
		cancel()
	}
	return errors.Join(errs...)
}

// healAll starts every server and the proxy that is not running (after a
// fault that went wrong), so that one failed fault does not fail the
// rest of the run.
func (in *injector) healAll(ctx context.Context) error {
	var errs []error
	for _, n := range in.c.Nodes() {
		if !n.Running() {
			in.logf("%s is not running after the fault; starting it", n.ID)
			if err := n.Restart(ctx); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if !in.proxy.Running() {
		in.logf("the proxy is not running after the fault; starting it")
		errs = append(errs, in.proxy.Restart(ctx))
	}
	return errors.Join(errs...)
}

// syncing reports whether n says an image resync is running.
func (in *injector) syncing(ctx context.Context, n *keeltest.Node) bool {
	st, err := n.Status(ctx)
	return err == nil && st.Sync != nil && st.Sync.Active
}

var errNoChaosBuild = errors.New("this fault needs keel built with -tags chaos (soak.BuildChaos)")

// waitLog waits up to 30s until out() holds want more than before times.
func waitLog(ctx context.Context, out func() string, want string, before int) error {
	return keeltest.Poll(ctx, 30*time.Second, 50*time.Millisecond, fmt.Sprintf("the log shows %q", want), func() (bool, string, error) {
		return strings.Count(out(), want) > before, "", nil
	})
}

func errSuffix(s string) string {
	if s == "" {
		return ""
	}
	return ": ERROR " + s
}

// membership removes a follower, wipes its directory and joins it again
// under the same id, so it comes back as a non-voter that must resync the
// whole image before it is promoted; pl.again into that catch-up it kills
// the joining node or (pl.leader) the leader, and starts it again. With
// the follower out, the two voters left are the quorum: killing the
// leader then makes the volume unavailable until it is back.
func (in *injector) membership(ctx context.Context, pl plan, f *Fault) ([]*keeltest.Node, error) {
	pl.leader = false
	lead, err := in.c.Leader(ctx)
	if err != nil {
		return nil, err
	}
	var v *keeltest.Node
	for _, n := range in.victims(ctx, pl, 2) {
		if n != lead {
			v = n
			break
		}
	}
	if v == nil {
		return nil, fmt.Errorf("membership: no follower to remove")
	}
	f.Target, f.Start = "["+v.ID+"]", in.hist.Now()
	cl := in.c.Client()
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	err = cl.Do(rctx, "POST", lead.HTTP, "/v1/cluster/remove", wire.IDRequest{ID: v.ID}, nil)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("membership: removing %s: %w", v.ID, err)
	}
	if err := v.Stop(); err != nil && !errors.Is(err, keeltest.ErrExited) {
		in.logf("%s: stopping it after its removal: %v", v.ID, err)
	}
	if err := os.RemoveAll(v.Dir); err != nil {
		return nil, err
	}
	var via *keeltest.Node
	for _, n := range in.c.Running() {
		if n != v {
			via = n
			break
		}
	}
	if via == nil {
		return nil, fmt.Errorf("membership: nobody to join %s through", v.ID)
	}
	if err := v.StartFresh(ctx, "--join", via.HTTP); err != nil {
		return nil, fmt.Errorf("membership: joining %s again: %w", v.ID, err)
	}
	sleepCtx(ctx, pl.again)
	victim := v
	if pl.hold > 2*time.Second { // about half the plans: the leader instead
		if l, err := in.c.Leader(ctx); err == nil && l != v {
			victim, f.Unavailable = l, true
		}
	}
	in.logf("%s: killed %v into %s's rejoin (syncing: %v)", victim.ID, pl.again, v.ID, in.syncing(ctx, v))
	if err := victim.Kill(); err != nil {
		return nil, err
	}
	f.Healed = in.hist.Now()
	if err := victim.Restart(ctx); err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	var ids []string
	for _, n := range in.c.Nodes() {
		ids = append(ids, n.ID)
	}
	l, err := in.c.Leader(wctx)
	if err != nil {
		return nil, err
	}
	if _, err := in.c.WaitVoters(wctx, l, ids, nil); err != nil {
		return nil, fmt.Errorf("membership: %s not a voter again: %w", v.ID, err)
	}
	return []*keeltest.Node{v, victim}, nil
}

// upgrade runs keel upgrade on the process whose pid file is pidFile (the
// same binary: a new process takes over all the same) and returns the
// successor's pid once the old process is gone.
func (in *injector) upgrade(ctx context.Context, who, pidFile string) (int, error) {
	before, err := upgrade.ReadPID(pidFile)
	if err != nil {
		return 0, fmt.Errorf("upgrade %s: %w", who, err)
	}
	uctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(uctx, in.bin, "upgrade", "--pid-file", pidFile, "--timeout", "90s").CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("upgrade %s: %w: %s", who, err, strings.TrimSpace(string(out)))
	}
	after, err := upgrade.ReadPID(pidFile)
	if err != nil {
		return 0, fmt.Errorf("upgrade %s: %w", who, err)
	}
	if after == before || !upgrade.Alive(after) {
		return 0, fmt.Errorf("upgrade %s: the pid file names %d (was %d) after %s", who, after, before, strings.TrimSpace(string(out)))
	}
	in.logf("%s upgraded: pid %d -> %d", who, before, after)
	return after, nil
}
