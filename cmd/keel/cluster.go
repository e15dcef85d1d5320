package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/wire"
)

func newClusterCmd() *cobra.Command {
	var addr string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "Inspect and change a volume's cluster (talks to any member's --http)",
	}
	cmd.PersistentFlags().StringVar(&addr, "http", "127.0.0.1:7201", "HTTP address of any member")
	cmd.PersistentFlags().DurationVar(&timeout, "timeout", 30*time.Second, "how long to wait for the answer")
	var tlsDir string
	clientTLSFlag(cmd, &tlsDir, true)
	client := func() (*wire.Client, error) {
		tc, err := loadClientTLS(tlsDir)
		if err != nil {
			return nil, err
		}
		return wire.NewClient(timeout, tc), nil
	}
	ctx := func(c *cobra.Command) (context.Context, context.CancelFunc) {
		return context.WithTimeout(c.Context(), timeout)
	}

	var asJSON bool
	status := &cobra.Command{
		Use:   "status",
		Short: "Show every member: role, applied index, addresses, resync progress",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			cx, cancel := ctx(c)
			defer cancel()
			cl, err := client()
			if err != nil {
				return err
			}
			cs, err := cl.Cluster(cx, addr)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(cs)
			}
			printCluster(os.Stdout, cs)
			return nil
		},
	}
	status.Flags().BoolVar(&asJSON, "json", false, "print the raw JSON")

	var add replica.NodeInfo
	addCmd := &cobra.Command{
		Use:   "add --id ID --raft HOST:PORT --node-http HOST:PORT [--nbd ADDR]",
		Short: "Add a node as a non-voter (it is promoted once caught up); the node itself can do this with keel server --join",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			cx, cancel := ctx(c)
			defer cancel()
			cl, err := client()
			if err != nil {
				return err
			}
			var resp wire.JoinResponse
			if err := cl.Do(cx, "POST", addr, "/v1/cluster/join", wire.JoinRequest{Node: add}, &resp); err != nil {
				return err
			}
			fmt.Printf("added %s as a non-voter (leader %s); it becomes a voter once it has caught up\n", add.ID, resp.Leader)
			return nil
		},
	}
	addCmd.Flags().StringVar(&add.ID, "id", "", "the new node's id (required)")
	addCmd.Flags().StringVar(&add.Raft, "raft", "", "the new node's Raft address (required)")
	addCmd.Flags().StringVar(&add.HTTP, "node-http", "", "the new node's HTTP address (required)")
	addCmd.Flags().StringVar(&add.NBD, "nbd", "", "the new node's NBD address")
	for _, f := range []string{"id", "raft", "node-http"} {
		_ = addCmd.MarkFlagRequired(f)
	}

	remove := &cobra.Command{
		Use:   "remove ID",
		Short: "Remove a member from the cluster (stop its process afterwards)",
		Args:  cobra.ExactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			cx, cancel := ctx(c)
			defer cancel()
			// Removing the leader hands leadership over first; the call
			// then needs to go to the new leader.
			cl, err := client()
			if err != nil {
				return err
			}
			for {
				err := cl.Do(cx, "POST", addr, "/v1/cluster/remove", wire.IDRequest{ID: args[0]}, nil)
				if err == nil {
					fmt.Printf("removed %s\n", args[0])
					return nil
				}
				if !errors.Is(err, wire.ErrRemoteNotLeader) || cx.Err() != nil {
					return err
				}
				select {
				case <-time.After(300 * time.Millisecond):
				case <-cx.Done():
					return err
				}
			}
		},
	}

	transfer := &cobra.Command{
		Use:   "transfer-leadership [ID]",
		Short: "Hand leadership to ID, or to any up-to-date voter",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			cx, cancel := ctx(c)
			defer cancel()
			req := wire.IDRequest{}
			if len(args) == 1 {
				req.ID = args[0]
			}
			cl, err := client()
			if err != nil {
				return err
			}
			var out map[string]string
			if err := cl.Do(cx, "POST", addr, "/v1/cluster/transfer-leadership", req, &out); err != nil {
				return err
			}
			fmt.Printf("leader is now %s\n", out["leader"])
			return nil
		},
	}
	cmd.AddCommand(status, addCmd, remove, transfer)
	return cmd
}

func printCluster(w io.Writer, cs wire.ClusterStatus) {
	sort.Slice(cs.Members, func(i, j int) bool { return cs.Members[i].ID < cs.Members[j].ID })
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSUFFRAGE\tSTATE\tAPPLIED\tVERSION\tRAFT\tHTTP\tNBD\tRESYNC")
	for _, m := range cs.Members {
		state, applied, ver, sync := "?", "-", "-", "-"
		if m.Status != nil {
			state = m.Status.State
			applied = fmt.Sprint(m.Status.AppliedIndex)
			ver = versionText(*m.Status)
			sync = syncText(m.Status.Sync)
		} else if m.Error != "" {
			state = "unreachable"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.ID, m.Suffrage, state, applied, ver, m.Raft, m.HTTP, m.NBD, sync)
	}
	tw.Flush()
	for _, m := range cs.Members {
		if m.Error != "" {
			fmt.Fprintf(w, "%s: %s\n", m.ID, m.Error)
		}
	}
}

// versionText is a member's build version and feature level, "1.2.3/L2";
// a build from before versions reports neither: "?/L1".
func versionText(s wire.NodeStatus) string {
	v := s.Version
	if v == "" {
		v = "?"
	}
	return fmt.Sprintf("%s/L%d", v, s.Level.Or())
}

func syncText(s *wire.SyncStatus) string {
	if s == nil {
		return "-"
	}
	pct := 0.0
	if s.BytesTotal > 0 {
		pct = 100 * float64(s.BytesCompared) / float64(s.BytesTotal)
	}
	var b strings.Builder
	if s.Active {
		fmt.Fprintf(&b, "syncing %.0f%% (%s of %s compared, %s moved, %s/s from %d peers)",
			pct, human(s.BytesCompared), human(s.BytesTotal), human(s.BytesMoved), human(uint64(s.RateBytesPerSec)), s.Peers)
	} else if s.Error != "" {
		fmt.Fprintf(&b, "last resync failed: %s", s.Error)
	} else {
		fmt.Fprintf(&b, "last resync moved %s of %s in %s", human(s.BytesMoved), human(s.BytesTotal), s.Finished.Sub(s.Started).Round(time.Millisecond))
	}
	return b.String()
}

func human(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
