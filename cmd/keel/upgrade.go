package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/keelstore/keel/upgrade"
)

func newUpgradeCmd() *cobra.Command {
	var pidFile string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "upgrade --pid-file PATH [--timeout D]",
		Short: "Replace a running keel process by a fresh start of its binary, keeping its connections",
		Long: `Ask the keel process named by --pid-file to upgrade (SIGHUP) and wait.

The process starts its binary afresh (install the new one at the same path
first); the new process inherits the listeners, gets ready, takes over every
connection and rewrites the PID file, and the old one exits. If the new
process fails to start, crashes or misses its deadline, the old one keeps
serving and this command reports why, and exits 1. See docs/upgrade.md.`,
		Example: `  keel upgrade --pid-file /run/keel/proxy-vm1.pid`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			st, err := upgrade.Trigger(ctx, pidFile, 50*time.Millisecond)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "upgraded: pid %d -> %d (version %s)\n", st.Pid, st.NewPid, st.NewVersion)
			return nil
		},
	}
	cmd.Flags().StringVar(&pidFile, "pid-file", "", "the PID file of the process to upgrade (required)")
	cmd.Flags().DurationVar(&timeout, "timeout", 90*time.Second, "how long to wait for the outcome")
	_ = cmd.MarkFlagRequired("pid-file")
	return cmd
}

// relaySIGHUP delivers each SIGHUP (an upgrade request) on the returned
// channel, coalescing those that arrive while one is pending; stop ends
// the relay and waits for its goroutine.
func relaySIGHUP() (<-chan struct{}, func()) {
	hup := make(chan struct{}, 1)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGHUP)
	done := make(chan struct{})
	quit := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-sig:
				select {
				case hup <- struct{}{}:
				default:
				}
			case <-quit:
				return
			}
		}
	}()
	return hup, func() { signal.Stop(sig); close(quit); <-done }
}
