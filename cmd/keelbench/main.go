// Command keelbench benchmarks Keel against its peers on this machine:
// fio jobs (ioengine=nbd, one connection each) against `keel serve`,
// `nbdkit file` and `qemu-nbd` (suite nbd), against a three-node `keel
// server` cluster's leader and follower, keel serve and nbdkit (suite
// cluster), and through `keel proxy` in front of a cluster (suite proxy).
// The targets take turns within each round; the tables show each target's
// median and keel's ratio to each peer, then each round. It writes
// results.json, results.md and one SVG bar chart per table into --out.
//
// A developer tool, never part of the keel binary. Every child process
// is started in procs.go; everything else is pure and tested without
// processes.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/keelstore/keel/services/wire"
	"github.com/spf13/cobra"
)

// Suites are the suites in the order "all" runs them.
var Suites = []string{"nbd", "cluster", "proxy"}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// After the first Ctrl-C the children are stopped in order; a second
	// one kills the driver at once (and the kernel its children: Pdeathsig).
	go func() {
		<-ctx.Done()
		stop()
	}()
	err := newRoot().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

type flags struct {
	size, cache, wset string
	servers           string
	cfg               Config
}

func newRoot() *cobra.Command {
	f := &flags{}
	root := &cobra.Command{
		Use:   "keelbench",
		Short: "Benchmark keel serve, a keel cluster and keel proxy against nbdkit and qemu-nbd",
		Long: `keelbench runs the same fio jobs (ioengine=nbd, one connection each)

  seq-write   rw=write      bs=1M  iodepth=8   reported in MB/s
  seq-read    rw=read       bs=1M  iodepth=8   reported in MB/s
  rand-read   rw=randread   bs=4k  iodepth=32  reported in IOPS
  rand-write  rw=randwrite  bs=4k  iodepth=32  reported in IOPS

against Keel and its peers on this machine, --rounds rounds in which the
targets take turns, and prints each table of medians with keel's ratio to
each peer (>1: keel is faster), then each round. It writes results.json,
results.md and one SVG bar chart per table into --out, fio's JSON into
--out/fio and every child's output into --out/logs.

The machines are shared and noisy: compare ratios from one run, never
absolute figures. Every child is stopped when keelbench ends, Ctrl-C too.
Needs fio, nbdinfo, nbdkit and qemu-nbd (scripts/test installs them).`,
		SilenceUsage:  true,
		SilenceErrors: true, // main prints it

	}
	fl := root.PersistentFlags()
	fl.StringVar(&f.size, "size", "", "volume and image size, a whole number of MiB (default 1G; 384M for the proxy suite)")
	fl.DurationVar(&f.cfg.Runtime, "runtime", 10*time.Second, "how long each time-based fio job runs")
	fl.DurationVar(&f.cfg.Ramp, "ramp", 2*time.Second, "warm-up of each job before --runtime starts")
	fl.IntVar(&f.cfg.Rounds, "rounds", 2, "rounds of the jobs, the targets taking turns in each; the tables show the median")
	fl.StringVar(&f.cfg.Out, "out", "", "output directory, new or empty (default keelbench-SUITE-TIME in the current directory)")
	fl.StringVar(&f.cfg.DataDir, "data-dir", "", "where images and sockets go, one filesystem for all (choose a tmpfs to take the disk out); default $TMPDIR")
	fl.StringVar(&f.cfg.Keel, "keel", "", "the keel binary (default: go build ./cmd/keel)")
	fl.StringVar(&f.cfg.LogLevel, "log-level", "info", "the keel children's --log-level")
	fl.StringVar(&f.servers, "nbd-servers", strings.Join(KnownNBDServers, ","), "nbd suite: the targets, some of "+strings.Join(KnownNBDServers, ","))
	fl.StringVar(&f.cache, "cache", "256M", "proxy suite: the proxy's --cache")
	fl.StringVar(&f.wset, "wset", "192M", "proxy suite: the warm rand-read working set, below --cache")
	fl.BoolVar(&f.cfg.Profile, "profile", false, "proxy suite: rerun rand-read under keel --cpu-profile and list the hottest functions")
	fl.BoolVar(&f.cfg.Verify, "verify", true, "cluster suite: run keel verify after the jobs (every voter byte-identical?)")
	fl.BoolVar(&f.cfg.Disk, "disk", true, "cluster suite: also run fio on a plain file with fdatasync, for context")
	for _, s := range append(Suites, "all") {
		suites := []string{s}
		short := map[string]string{
			"nbd":     "keel serve against nbdkit file and qemu-nbd, each on a copy of one random image",
			"cluster": "a three-node keel server cluster's leader (and a follower) against keel serve and nbdkit",
			"proxy":   "keel proxy --cache in front of a cluster against its leader, nbdkit and keel serve (warm-cache reads)",
			"all":     "the nbd, cluster and proxy suites, one after the other, into one report",
		}[s]
		if s == "all" {
			suites = Suites
		}
		root.AddCommand(&cobra.Command{
			Use:   s,
			Short: short,
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				cfg, err := f.config(s)
				if err != nil {
					return err
				}
				return run(cmd.Context(), cfg, s, suites)
			},
		})
	}
	var places = []Place{{Name: "tmpfs", Dir: "/dev/shm"}, {Name: "disk", Dir: os.TempDir()}}
	goals := &cobra.Command{
		Use:   "goals",
		Short: "issue 9's goals: the proxy suite with the data on a tmpfs and on a disk, one table of every goal",
		Long: `goals runs the proxy suite twice, first with every image and log on a
tmpfs (--tmpfs-dir), then on a disk (--disk-dir), adding rand-write at
queue depth 1, a warm seq-read, the write jobs against keel serve (the
CPU baseline) and, on the disk, the disk's own durable write bandwidth.
It ends with one table: each goal, the figure reached in each place (from
the medians) and MET or MISSED; CPU-seconds per GiB per process, p50/p99
latency and peak RSS are in the report beside it.`,
		Example: `  go run ./cmd/keelbench goals --rounds 3 --out /tmp/goals
  go run ./cmd/keelbench goals --tmpfs-dir /dev/shm --disk-dir /var/tmp --runtime 5s --rounds 1`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := f.config("goals")
			if err != nil {
				return err
			}
			cfg.Places = places
			return run(cmd.Context(), cfg, "goals", []string{"goals"})
		},
	}
	goals.Flags().StringVar(&places[0].Dir, "tmpfs-dir", places[0].Dir, "where the tmpfs pass keeps its data (a tmpfs)")
	goals.Flags().StringVar(&places[1].Dir, "disk-dir", places[1].Dir, "where the disk pass keeps its data (on the disk to measure)")
	root.AddCommand(goals)
	return root
}

// config turns the flags into a Config.
func (f *flags) config(suite string) (Config, error) {
	c := f.cfg
	var err error
	if f.size != "" {
		if c.Size, err = ParseSize(f.size); err != nil {
			return c, fmt.Errorf("--size: %w", err)
		}
	}
	if c.Cache, err = ParseSize(f.cache); err != nil {
		return c, fmt.Errorf("--cache: %w", err)
	}
	if c.WSet, err = ParseSize(f.wset); err != nil {
		return c, fmt.Errorf("--wset: %w", err)
	}
	c.NBDServers = nil
	for _, s := range strings.Split(f.servers, ",") {
		if s = strings.TrimSpace(s); s != "" {
			c.NBDServers = append(c.NBDServers, s)
		}
	}
	if c.Out == "" {
		c.Out = "keelbench-" + suite + "-" + time.Now().Format("20060102-150405")
	}
	return c, nil
}

// run runs the suites and writes the report, a partial one after Ctrl-C
// or a failed suite.
func run(ctx context.Context, cfg Config, name string, suites []string) error {
	if err := cfg.Validate(suites); err != nil {
		return err
	}
	out, err := prepareOut(cfg.Out)
	if err != nil {
		return err
	}
	cfg.Out = out
	base := cfg.DataDir
	if base == "" {
		base = os.TempDir()
	}
	work, err := os.MkdirTemp(base, "keelbench-")
	if err != nil {
		return fmt.Errorf("keelbench: --data-dir: %w", err)
	}
	defer os.RemoveAll(work)
	if len(work) > 70 {
		return fmt.Errorf("%w: --data-dir %s is too long for unix socket paths", ErrConfig, work)
	}
	b := &bench{cfg: cfg, procs: NewProcs(), http: wire.NewClient(3*time.Second, nil), out: os.Stdout,
		rep: &Report{Suite: name}, work: work, fioDir: filepath.Join(out, "fio"), logDir: filepath.Join(out, "logs")}
	defer b.procs.StopAll()
	if b.keel, err = b.keelBinary(ctx); err != nil {
		return err
	}
	b.rep.Header = b.header(ctx, suites)
	for _, h := range b.rep.Header {
		b.say("%s", h)
	}
	started := time.Now()
	for _, s := range suites {
		if ctx.Err() != nil {
			break
		}
		var err error
		switch s {
		case "nbd":
			err = b.runNBD(ctx)
		case "cluster":
			err = b.runCluster(ctx)
		case "proxy":
			err = b.runProxy(ctx)
		case "goals":
			err = b.runGoals(ctx, cfg.Places)
		}
		if err != nil {
			b.odd("suite %s stopped early: %v; its results are partial", s, err)
		}
		b.say("load average after %s: %s", s, loadavg())
	}
	b.procs.StopAll()
	fmt.Printf("\nkeelbench: results (%.0f s)\n\n%s", time.Since(started).Seconds(), b.rep.Text())
	if err := b.rep.WriteDir(out); err != nil {
		return err
	}
	b.say("wrote %s", filepath.Join(out, "results.md"))
	if ctx.Err() != nil {
		return fmt.Errorf("keelbench: interrupted: %w", ctx.Err())
	}
	return nil
}

// prepareOut makes the output directory (new or empty) and its fio/ and
// logs/; it returns its absolute path.
func prepareOut(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("keelbench: --out: %w", err)
	}
	if es, err := os.ReadDir(abs); err == nil && len(es) > 0 {
		return "", fmt.Errorf("%w: --out %s is not empty", ErrConfig, abs)
	}
	for _, d := range []string{abs, filepath.Join(abs, "fio"), filepath.Join(abs, "logs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", fmt.Errorf("keelbench: --out: %w", err)
		}
	}
	return abs, nil
}

// keelBinary is --keel, or a fresh build of ./cmd/keel.
func (b *bench) keelBinary(ctx context.Context) (string, error) {
	if b.cfg.Keel != "" {
		return filepath.Abs(b.cfg.Keel)
	}
	bin := filepath.Join(b.work, "keel")
	b.say("building keel")
	if err := b.procs.Run(ctx, []string{"go", "build", "-o", bin, "github.com/keelstore/keel/cmd/keel"},
		filepath.Join(b.logDir, "keel-build.log")); err != nil {
		return "", fmt.Errorf("keel does not build (run from the repository, or give --keel): %w", err)
	}
	return bin, nil
}

// header describes the machine, the tools and the settings.
func (b *bench) header(ctx context.Context, suites []string) []string {
	first := func(argv ...string) string {
		out, err := b.procs.Output(ctx, argv)
		if err != nil {
			return argv[0] + " ?"
		}
		l, _, _ := strings.Cut(strings.TrimSpace(out), "\n")
		return l
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	rev := first("git", "rev-parse", "--short", "HEAD")
	c := b.cfg
	return []string{
		fmt.Sprintf("%d CPUs, Linux %s, data on %s (%s), load average %s", runtime.NumCPU(), strings.TrimSpace(string(kernel)),
			fsType(b.work), b.work, loadavg()),
		fmt.Sprintf("%s, %s, %s", first("fio", "--version"), first("nbdkit", "--version"), first("qemu-nbd", "--version")),
		fmt.Sprintf("keel %s (%s)", b.keel, rev),
		fmt.Sprintf("suites %s; runtime %v, ramp %v, %s; size %s (proxy %s, --cache %s, --wset %s)",
			strings.Join(suites, ", "), c.Runtime, c.Ramp, rounds(c.Rounds), FormatSize(c.SizeFor("nbd")), FormatSize(c.SizeFor("proxy")),
			FormatSize(c.Cache), FormatSize(c.WSet)),
	}
}

func loadavg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// fsType names the filesystem dir is on.
func fsType(dir string) string {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return "?"
	}
	if name, ok := map[int64]string{0x01021994: "tmpfs", 0xef53: "ext4", 0x58465342: "xfs", 0x9123683e: "btrfs",
		0x794c7630: "overlayfs", 0x2fc12fc1: "zfs"}[int64(st.Type)]; ok {
		return name
	}
	return fmt.Sprintf("fs 0x%x", st.Type)
}
