// Command keel-chaos runs a soak: three `keel server`s and a `keel proxy`
// on loopback (started with the process harness cmd/keel/keeltest), a
// workload of several NBD clients through the proxy whose every operation
// is recorded, and a seeded chaos monkey that injects faults for
// --duration. At the end every changed block is read back, `keel verify`
// compares the replicas, and the history is checked per block for
// linearizability (see package chaos/soak). It prints progress as it goes
// and a summary at the end, with the seed to replay it.
//
//	go run ./chaos/cmd/keel-chaos --duration 10m --seed 7
//
// With --check FILE it only checks a saved history again.
//
// Exit status: 0 pass, 1 the soak found a problem, 2 it could not run.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/keelstore/keel/chaos/soak"
)

func main() {
	duration := flag.Duration("duration", time.Minute, "how long the workload runs under faults")
	seed := flag.Uint64("seed", uint64(time.Now().UnixNano()%1_000_000), "seed of the faults and the workload (default: from the clock)")
	faults := flag.String("faults", strings.Join(soak.AllFaults(), ","), "fault kinds to inject, comma-separated; \"none\" for none")
	dir := flag.String("dir", "", "working directory (default: a new temporary one, removed on a pass)")
	bin := flag.String("keel", "", "keel binary built with -tags chaos (default: built from this module)")
	keep := flag.Bool("keep", false, "keep the working directory on a pass")
	snapOften := flag.Bool("snapshot-often", false, "servers snapshot every 1000 entries and keep 100 behind: faults land mid-snapshot and mid-resync")
	dev := flag.Int("dev", 0, "instead of starting a cluster, soak a running `keel dev` with this --base-port (it writes the volume; process faults only: "+strings.Join(soak.DevFaults, ",")+"; its cluster certificate from $KEEL_CLUSTER_TLS, as keel dev prints)")
	check := flag.String("check", "", "only check a saved history (history.json of a failed soak) and print the verdict")
	flag.Parse()
	if *check != "" {
		os.Exit(checkFile(*check))
	}
	if *dev != 0 && !flagSet("faults") {
		*faults = strings.Join(soak.DevFaults, ",")
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	code, err := run(ctx, *duration, *seed, *faults, *dir, *bin, *keep, *dev, *snapOften)
	if err != nil {
		fmt.Fprintln(os.Stderr, "keel-chaos:", err)
	}
	os.Exit(code)
}

// checkFile checks a saved history again, e.g. after the checker changed.
func checkFile(path string) int {
	ops, err := soak.LoadJSON(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "keel-chaos:", err)
		return 2
	}
	start := time.Now()
	r := soak.Check(ops, time.Minute)
	fmt.Printf("%d operations checked in %v: %v\n", len(ops), time.Since(start).Round(time.Millisecond), r)
	if !r.OK() {
		return 1
	}
	return 0
}

func flagSet(name string) bool {
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

func run(ctx context.Context, duration time.Duration, seed uint64, faults, dir, bin string, keep bool, dev int, snapOften bool) (int, error) {
	if bin == "" {
		bdir, err := os.MkdirTemp("", "keel-chaos-bin-")
		if err != nil {
			return 2, err
		}
		defer os.RemoveAll(bdir)
		bin = filepath.Join(bdir, "keel")
		fmt.Println("keel-chaos: building keel with -tags chaos")
		if err := soak.BuildChaos(ctx, bin, false); err != nil {
			return 2, err
		}
	}
	made := false
	if dir == "" {
		d, err := os.MkdirTemp("", "keel-chaos-")
		if err != nil {
			return 2, err
		}
		dir, made = d, true
	}
	cfg := soak.Config{Bin: bin, Dir: dir, Duration: duration, Seed: seed,
		SnapshotOften: snapOften,
		Logf:          func(f string, a ...any) { fmt.Printf(time.Now().Format("15:04:05 ")+f+"\n", a...) }}
	if faults == "none" {
		cfg.NoFaults = true
	} else {
		cfg.Faults = strings.Split(faults, ",")
	}
	fmt.Printf("keel-chaos: seed %d, duration %v, faults %s, dir %s\n", seed, duration, faults, dir)
	var res soak.Result
	var err error
	if dev != 0 {
		res, err = soak.RunDev(ctx, soak.DevConfig{BasePort: dev, Bin: bin, Dir: dir, Duration: duration, Seed: seed,
			Faults: cfg.Faults, Logf: cfg.Logf, ClusterTLS: os.Getenv("KEEL_CLUSTER_TLS")})
	} else {
		res, err = soak.Run(ctx, cfg)
	}
	if err != nil {
		return 2, fmt.Errorf("%w (logs in %s)", err, dir)
	}
	fmt.Print(res.Summary())
	if !res.OK() {
		fmt.Printf("logs in %s\n", dir)
		return 1, nil
	}
	if made && !keep {
		os.RemoveAll(dir)
	}
	return 0, nil
}
