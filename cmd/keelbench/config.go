package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// ErrConfig is returned for settings out of range.
var ErrConfig = errors.New("keelbench: bad setting")

// Config is one run's settings (the command line's flags).
type Config struct {
	// Size is the volume and image size in bytes, a whole number of MiB;
	// 0 takes each suite's default (nbd and cluster 1 GiB, proxy 384 MiB).
	Size int64
	// Runtime is how long each time-based fio job runs (1s to 1h).
	Runtime time.Duration
	// Ramp is each job's warm-up before Runtime starts (0 to 1m).
	Ramp time.Duration
	// Rounds is how often every job runs per target, the targets taking
	// turns within a round (1 to 100); the tables show the median.
	Rounds int
	// Out is the output directory: results.json, results.md, the charts,
	// fio's JSON (fio/) and every log (logs/). New or empty.
	Out string
	// DataDir is where images and sockets go (one filesystem for all;
	// choose a tmpfs to take the disk out); empty: a new directory under
	// $TMPDIR. What the driver makes there is removed at the end.
	DataDir string
	// Keel is the keel binary; empty: go build ./cmd/keel into DataDir.
	Keel string
	// LogLevel is the keel children's --log-level.
	LogLevel string
	// NBDServers are the nbd suite's targets: keel, nbdkit, qemu-nbd.
	NBDServers []string
	// Cache is the proxy's --cache in bytes (proxy suite).
	Cache int64
	// WSet is the proxy suite's warm rand-read working set in bytes: less
	// than Cache and at most the proxy suite's size.
	WSet int64
	// Places are where the goals suite's passes keep their data, in
	// order (a tmpfs, then a disk).
	Places []Place
	// Profile reruns the proxy's rand-read under keel --cpu-profile and
	// lists the hottest functions (proxy suite).
	Profile bool
	// Verify runs keel verify on the cluster after the cluster suite.
	Verify bool
	// Disk runs the plain-file fdatasync jobs for context (cluster suite).
	Disk bool
}

// KnownNBDServers are the nbd suite's possible targets.
var KnownNBDServers = []string{"keel", "nbdkit", "qemu-nbd"}

// Suite default sizes.
const (
	defaultSize      = 1 << 30
	defaultProxySize = 384 << 20
)

// SizeFor is the size the suite runs with.
func (c Config) SizeFor(suite string) int64 {
	switch {
	case c.Size != 0:
		return c.Size
	case suite == "proxy":
		return defaultProxySize
	default:
		return defaultSize
	}
}

// Validate checks every field; its errors name the flag and its range.
func (c Config) Validate(suites []string) error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrConfig}, a...)...)
	}
	switch {
	case c.Size < 0 || c.Size%(1<<20) != 0:
		return bad("--size %d: want a whole number of MiB", c.Size)
	case c.Runtime < time.Second || c.Runtime > time.Hour:
		return bad("--runtime %v: want 1s to 1h", c.Runtime)
	case c.Ramp < 0 || c.Ramp > time.Minute:
		return bad("--ramp %v: want 0 to 1m", c.Ramp)
	case c.Rounds < 1 || c.Rounds > 100:
		return bad("--rounds %d: want 1 to 100", c.Rounds)
	case c.Out == "":
		return bad("--out: required")
	case c.LogLevel == "":
		return bad("--log-level: required")
	}
	for _, s := range c.NBDServers {
		if !contains(KnownNBDServers, s) {
			return bad("--nbd-servers: unknown %q (want some of %s)", s, strings.Join(KnownNBDServers, ","))
		}
	}
	if contains(suites, "nbd") && len(c.NBDServers) == 0 {
		return bad("--nbd-servers: none")
	}
	if contains(suites, "goals") {
		if len(c.Places) == 0 {
			return bad("goals: no place for the data")
		}
		for _, p := range c.Places {
			if st, err := os.Stat(p.Dir); err != nil || !st.IsDir() {
				return bad("--%s-dir %s: not a directory", p.Name, p.Dir)
			}
		}
	}
	if contains(suites, "proxy") || contains(suites, "goals") {
		size := c.SizeFor("proxy")
		if c.Cache <= 0 || c.WSet <= 0 || c.WSet >= c.Cache || c.WSet > size {
			return bad("--wset %d must be above 0, below --cache %d and at most the size %d", c.WSet, c.Cache, size)
		}
	}
	return nil
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

// ParseSize reads 512, 4k, 256M, 1G, 1GiB (powers of 1024).
func ParseSize(s string) (int64, error) {
	t := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSpace(s), "iB"), "B")
	mult := int64(1)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'k', 'K':
			mult = 1 << 10
		case 'm', 'M':
			mult = 1 << 20
		case 'g', 'G':
			mult = 1 << 30
		case 't', 'T':
			mult = 1 << 40
		}
		if mult != 1 {
			t = t[:n-1]
		}
	}
	v, err := strconv.ParseInt(t, 10, 64)
	if err != nil || v < 0 || v > (1<<62)/mult {
		return 0, fmt.Errorf("%w: size %q: want a number with an optional k, M, G or T", ErrConfig, s)
	}
	return v * mult, nil
}

// FormatSize prints n in the largest unit that divides it.
func FormatSize(n int64) string {
	for _, u := range []struct {
		s string
		v int64
	}{{"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"k", 1 << 10}} {
		if n >= u.v && n%u.v == 0 {
			return strconv.FormatInt(n/u.v, 10) + u.s
		}
	}
	return strconv.FormatInt(n, 10)
}

// Visit is one fio run in a schedule.
type Visit struct {
	Round  int
	Target string
	Job    Job
}

// Schedule is the order of a suite's runs: round by round; within a round
// the targets take turns, each running its jobs in order. jobs gives each
// target's jobs.
func Schedule(rounds int, targets []string, jobs func(target string) []Job) []Visit {
	var vs []Visit
	for r := range rounds {
		for _, t := range targets {
			for _, j := range jobs(t) {
				vs = append(vs, Visit{r, t, j})
			}
		}
	}
	return vs
}

// rounds is "1 round", "3 rounds".
func rounds(n int) string {
	if n == 1 {
		return "1 round"
	}
	return strconv.Itoa(n) + " rounds"
}
