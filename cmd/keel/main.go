// Command keel is Keel's one binary: a replicated network block device.
//
//	keel dev       a three-node cluster on loopback, for a first look
//	keel server    one replica of a volume (Raft over a raw image)
//	keel cluster   status, add, remove, transfer-leadership
//	keel verify    check every voter's image is byte-identical
//	keel serve     one raw image over NBD, standalone (no replication)
//	keel version   the build version and the feature level it speaks
//	keel upgrade   replace a running proxy by a fresh start of its binary
//	keel tls       create the cluster CA and node and client certificates
//
// Run `keel help` or `keel CMD --help` for the flags of each.
package main

import (
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"strings"

	gsyslog "github.com/hashicorp/go-syslog"
	"github.com/spf13/cobra"

	"github.com/keelstore/keel/replica"
)

// version is the build version, set at link time:
//
//	go build -ldflags "-X main.version=1.2.3" ./cmd/keel
//
// Servers report it in their status and keel cluster status shows it.
var version = "dev"

func main() {
	if err := newRoot().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "keel:", explain(err))
		os.Exit(1)
	}
}

type globalFlags struct {
	logLevel       string
	logJSON        bool
	syslog         bool
	syslogFacility string
	syslogAddr     string
	cpuProfile     string
	memProfile     string
	profFile       *os.File
	sys            gsyslog.Syslogger // opened by the first logger with --syslog
}

func (g *globalFlags) startProfile() error {
	if g.memProfile != "" {
		// Fail now rather than after hours of serving.
		f, err := os.Create(g.memProfile)
		if err != nil {
			return fmt.Errorf("--mem-profile: %w", err)
		}
		f.Close()
	}
	if g.cpuProfile == "" {
		return nil
	}
	f, err := os.Create(g.cpuProfile)
	if err != nil {
		return fmt.Errorf("--cpu-profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return fmt.Errorf("--cpu-profile: %w", err)
	}
	g.profFile = f
	return nil
}

func (g *globalFlags) stopProfile() {
	if g.profFile != nil {
		pprof.StopCPUProfile()
		g.profFile.Close()
	}
	if g.memProfile != "" {
		if err := writeAllocProfile(g.memProfile); err != nil {
			fmt.Fprintln(os.Stderr, "keel: --mem-profile:", err)
		}
	}
}

// writeAllocProfile writes the "allocs" profile: every sampled allocation
// since the start (go tool pprof -sample_index=alloc_space) and what is
// still live after a collection (-sample_index=inuse_space).
func writeAllocProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	runtime.GC()
	if err := pprof.Lookup("allocs").WriteTo(f, 0); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func newRoot() *cobra.Command {
	g := &globalFlags{}
	root := &cobra.Command{
		Use:   "keel",
		Short: "Keel: a replicated network block device",
		Long:  "Keel serves disks over NBD. Every disk is a plain raw image file that qemu can boot directly.",
		Example: `  keel dev                                    # a three-node cluster and a proxy on loopback
  keel cluster status --http 127.0.0.1:11009   # what that cluster is doing
  keel server --help                           # the flags of one command
  keel --log-json --syslog server ...          # logs as JSON lines on stderr and to syslog`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&g.logLevel, "log-level", "info", "log level: trace, debug, info, warn or error")
	root.PersistentFlags().BoolVar(&g.logJSON, "log-json", false, "log JSON lines instead of text")
	root.PersistentFlags().BoolVar(&g.syslog, "syslog", false, "send every log line to syslog as well (the local daemon, or --syslog-addr), at the line's level")
	root.PersistentFlags().StringVar(&g.syslogFacility, "syslog-facility", "LOCAL0", "syslog facility with --syslog: "+strings.Join(syslogFacilities, ", "))
	root.PersistentFlags().StringVar(&g.syslogAddr, "syslog-addr", "", "with --syslog: a remote syslog, udp:HOST:PORT, tcp:HOST:PORT or unix:PATH, instead of the local daemon")
	root.PersistentFlags().StringVar(&g.cpuProfile, "cpu-profile", "", "write a Go CPU profile to this file until the command ends")
	root.PersistentFlags().StringVar(&g.memProfile, "mem-profile", "", "when the command ends, write a Go allocation profile (all allocations since the start, and what is still live) to this file")
	root.SetFlagErrorFunc(flagError)
	root.PersistentPreRunE = func(*cobra.Command, []string) error { return g.startProfile() }
	root.PersistentPostRun = func(*cobra.Command, []string) { g.stopProfile(); g.closeSyslog() }
	root.AddCommand(newServeCmd(g), newServerCmd(g), newClusterCmd(), newVerifyCmd(), newDevCmd(g), newProxyCmd(g), newVersionCmd(), newUpgradeCmd(), newTLSCmd())
	return root
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "version",
		Short:   "Print the build version and the feature level it speaks",
		Example: `  keel version`,
		Args:    cobra.NoArgs,
		Run: func(c *cobra.Command, _ []string) {
			fmt.Fprintf(c.OutOrStdout(), "keel %s (feature level %d)\n", version, replica.CurrentLevel)
		},
	}
}
