package soak

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/keelstore/keel/cmd/keel/keeltest"
)

// soakCases is the short soak of the test run (about three minutes on a
// loaded machine): fixed seeds, each over one family of fault kinds, run
// for secs and then until every kind of the family was injected once
// (Config.FullRound). A seed that ever fails stays here as a regression
// case (say which run failed and why beside it).
var soakCases = []struct {
	seed      uint64
	faults    []string
	secs      int
	snapOften bool // Config.SnapshotOften
}{
	{1, ProcessFaults, 45, true},
	{2, NetworkFaults, 45, false},
	// Seed 3 failed twice (in CI on 2026-12-01, and once before): after
	// disk-eio or disk-sync-eio on a follower it stayed at its last index
	// for good while heartbeats kept it from calling an election. Cause:
	// hashicorp/raft#612, a deadlock in raft's append pipeline after a
	// refused append; fixed by replica/pipeline.go (its test replays it).
	// It reproduced in about one run in five of this seed's disk faults
	// with a -race build; none in 26 runs after the fix.
	{3, DiskFaults, 30, false},
	{4, CodeFaults, 25, false},
}

// $KEEL_SOAK_SECONDS overrides every case's duration. $KEEL_CHAOS_BIN
// names a keel built with -tags chaos to use instead of building one.

func TestSoak(t *testing.T) {
	override := 0
	if s := os.Getenv("KEEL_SOAK_SECONDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("$KEEL_SOAK_SECONDS %q: want a positive number", s)
		}
		override = n
	}
	bin := os.Getenv("KEEL_CHAOS_BIN")
	if bin == "" {
		bin = filepath.Join(t.TempDir(), "keel")
		if err := BuildChaos(context.Background(), bin, os.Getenv(keeltest.EnvRace) == "1"); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[string]bool{}
	for _, tc := range soakCases {
		seed, secs := tc.seed, tc.secs
		if override > 0 {
			secs = override
		}
		t.Run("seed="+strconv.FormatUint(seed, 10), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs)*time.Second+6*time.Minute)
			defer cancel()
			dir := t.TempDir()
			res, err := Run(ctx, Config{Bin: bin, Dir: dir, Duration: time.Duration(secs) * time.Second, Seed: seed, Faults: tc.faults, FullRound: true, SnapshotOften: tc.snapOften, Logf: t.Logf})
			if err != nil {
				t.Fatal(err)
			}
			t.Log("\n" + res.Summary())
			for _, f := range res.Faults {
				seen[f.Kind] = true
			}
			for _, k := range tc.faults {
				if !seen[k] {
					t.Errorf("seed %d did not inject %s", seed, k)
				}
			}
			if !res.OK() {
				// Keep the logs and the history: the test's own directory
				// goes when it ends.
				keep := os.Getenv("KEEL_SOAK_KEEP")
				if keep == "" {
					keep = filepath.Join(os.TempDir(), fmt.Sprintf("keel-soak-seed%d-%s", seed, time.Now().Format("150405")))
				}
				if err := os.CopyFS(keep, os.DirFS(dir)); err != nil {
					t.Logf("keeping the logs: %v", err)
				}
				t.Fatalf("soak failed with seed %d; logs and history in %s ($KEEL_SOAK_KEEP chooses where)", seed, keep)
			}
			if res.Report.Acked == 0 {
				t.Fatal("no change was acknowledged")
			}
		})
	}
	if t.Failed() {
		return
	}
	for _, k := range AllFaults() {
		if !seen[k] {
			t.Errorf("no seed injected %s; lengthen the soak or add a seed", k)
		}
	}
	if want := AllFaults(); len(seen) < len(want) {
		t.Logf("injected %v of %v", keys(seen), want)
	}
}

func keys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
