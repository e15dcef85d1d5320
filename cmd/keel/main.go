// Command keel is Keel's one binary: a replicated network block device.
//
//	keel serve   one raw image over NBD, standalone
//
// Run `keel help` or `keel CMD --help` for the flags of each.
package main

import (
	"fmt"
	"os"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"
)

func main() {
	if err := newRoot().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "keel:", err)
		os.Exit(1)
	}
}

type globalFlags struct {
	logLevel string
	logJSON  bool
}

func newRoot() *cobra.Command {
	g := &globalFlags{}
	root := &cobra.Command{
		Use:           "keel",
		Short:         "Keel: a replicated network block device",
		Long:          "Keel serves disks over NBD. Every disk is a plain raw image file that qemu can boot directly.",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&g.logLevel, "log-level", "info", "log level: trace, debug, info, warn or error")
	root.PersistentFlags().BoolVar(&g.logJSON, "log-json", false, "log JSON lines instead of text")
	root.AddCommand(newServeCmd(g))
	return root
}

func (g *globalFlags) logger(name string) (hclog.Logger, error) {
	level := hclog.LevelFromString(g.logLevel)
	if level == hclog.NoLevel {
		return nil, fmt.Errorf("--log-level %q: want trace, debug, info, warn or error", g.logLevel)
	}
	return hclog.New(&hclog.LoggerOptions{
		Name:       name,
		Level:      level,
		Output:     os.Stderr,
		JSONFormat: g.logJSON,
	}), nil
}
