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
		Example: `  keel cluster status --http 10.0.0.1:7002
  keel cluster add --id n4 --raft 10.0.0.4:7001 --node-http 10.0.0.4:7002 --nbd 10.0.0.4:10809 --http 10.0.0.1:7002
  keel cluster remove n3 --http 10.0.0.1:7002
  keel cluster transfer-leadership n2 --http 10.0.0.1:7002`,
	}
	cmd.PersistentFlags().StringVar(&addr, "http", "127.0.0.1:7201", "HTTP address of any member")
	cmd.PersistentFlags().DurationVar(&timeout, "timeout", 30*time.Second, "how long to wait for the answer")
	client := func() *wire.Client { return wire.NewClient(timeout) }
	ctx := func(c *cobra.Command) (context.Context, context.CancelFunc) {
		return context.WithTimeout(c.Context(), timeout)
	}

	var asJSON bool
	status := &cobra.Command{
		Use:   "status",
		Short: "Show the leader, term, writer and every member: role, lag, version, health, resync progress",
		Long: `Ask any member for the cluster's state and print it for a person: the
leader with its term and commit index, the writer holding the volume and
its epoch, then one row per member (suffrage, role, applied index,
version/feature level, lag in entries behind the leader, healthy or not,
addresses), why each unhealthy member is, and a progress bar for each
image resync that runs. --json prints the same answer as JSON for scripts
(the shape of GET /v1/cluster, which stays stable).`,
		Example: `  keel cluster status --http 10.0.0.1:7002
  keel cluster status --http 10.0.0.1:7002 --json | jq '.members[] | {id, state: .status.state}'`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			cx, cancel := ctx(c)
			defer cancel()
			cs, err := client().Cluster(cx, addr)
			if err != nil {
				return httpErr(addr, err)
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
		Use:     "add --id ID --raft HOST:PORT --node-http HOST:PORT [--nbd ADDR]",
		Short:   "Add a node as a non-voter (it is promoted once caught up); the node itself can do this with keel server --join",
		Example: `  keel cluster add --id n4 --raft 10.0.0.4:7001 --node-http 10.0.0.4:7002 --nbd 10.0.0.4:10809 --http 10.0.0.1:7002`,
		Args:    cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			cx, cancel := ctx(c)
			defer cancel()
			var resp wire.JoinResponse
			if err := client().Do(cx, "POST", addr, "/v1/cluster/join", wire.JoinRequest{Node: add}, &resp); err != nil {
				return httpErr(addr, err)
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
		Use:     "remove ID",
		Short:   "Remove a member from the cluster (stop its process afterwards)",
		Example: `  keel cluster remove n3 --http 10.0.0.1:7002`,
		Args:    cobra.ExactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			cx, cancel := ctx(c)
			defer cancel()
			// Removing the leader hands leadership over first; the call
			// then needs to go to the new leader.
			for {
				err := client().Do(cx, "POST", addr, "/v1/cluster/remove", wire.IDRequest{ID: args[0]}, nil)
				if err == nil {
					fmt.Printf("removed %s\n", args[0])
					return nil
				}
				if !errors.Is(err, wire.ErrRemoteNotLeader) || cx.Err() != nil {
					return httpErr(addr, err)
				}
				select {
				case <-time.After(300 * time.Millisecond):
				case <-cx.Done():
					return httpErr(addr, err)
				}
			}
		},
	}

	transfer := &cobra.Command{
		Use:   "transfer-leadership [ID]",
		Short: "Hand leadership to ID, or to any up-to-date voter",
		Example: `  keel cluster transfer-leadership --http 10.0.0.1:7002      # to any up-to-date voter
  keel cluster transfer-leadership n2 --http 10.0.0.1:7002   # to n2`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			cx, cancel := ctx(c)
			defer cancel()
			req := wire.IDRequest{}
			if len(args) == 1 {
				req.ID = args[0]
			}
			var out map[string]string
			if err := client().Do(cx, "POST", addr, "/v1/cluster/transfer-leadership", req, &out); err != nil {
				return httpErr(addr, err)
			}
			fmt.Printf("leader is now %s\n", out["leader"])
			return nil
		},
	}
	cmd.AddCommand(status, addCmd, remove, transfer)
	return cmd
}

// healthyLag is how many entries a member may trail the leader's
// applied index and still count as healthy in keel cluster status (the
// promotion bound of a non-voter).
const healthyLag = 64

// printCluster writes cs for a person: the leader, its term and the
// writer, a table of members, then each member's problem and each resync
// in progress, with a bar.
func printCluster(w io.Writer, cs wire.ClusterStatus) {
	sort.Slice(cs.Members, func(i, j int) bool { return cs.Members[i].ID < cs.Members[j].ID })
	var lead *wire.NodeStatus
	for _, m := range cs.Members {
		if m.ID == cs.Leader && m.Status != nil {
			lead = m.Status
		}
	}
	switch {
	case cs.Leader == "":
		fmt.Fprintln(w, "Leader:  none (an election is running, or there is no quorum)")
	case lead == nil:
		fmt.Fprintf(w, "Leader:  %s (not answering)\n", cs.Leader)
	default:
		fmt.Fprintf(w, "Leader:  %s, term %d, commit index %d\n", cs.Leader, lead.Term, lead.CommitIndex)
		if lead.Writer != "" {
			fmt.Fprintf(w, "Writer:  %s, epoch %d\n", lead.Writer, lead.Epoch)
		} else {
			fmt.Fprintf(w, "Writer:  none (epoch %d); any NBD client may write\n", lead.Epoch)
		}
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSUFFRAGE\tROLE\tAPPLIED\tVERSION\tLAG\tHEALTHY\tNBD\tRAFT\tHTTP")
	var notes []string
	for _, m := range cs.Members {
		role, applied, ver, lag := "?", "-", "-", "-"
		if m.Status != nil {
			role = strings.ToLower(m.Status.State)
			applied = fmt.Sprint(m.Status.AppliedIndex)
			ver = versionText(*m.Status)
			if lead != nil {
				lag = fmt.Sprint(lagOf(lead.AppliedIndex, m.Status.AppliedIndex))
			}
		} else if m.Error != "" {
			role = "unreachable"
		}
		healthy, why := memberHealth(m, lead)
		h := "yes"
		if !healthy {
			h = "no"
			notes = append(notes, fmt.Sprintf("%s: %s", m.ID, why))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.ID, m.Suffrage, role, applied, ver, lag, h, orDash(m.NBD), orDash(m.Raft), orDash(m.HTTP))
	}
	tw.Flush()
	if len(notes) > 0 {
		fmt.Fprintln(w)
		for _, n := range notes {
			fmt.Fprintln(w, n)
		}
	}
	for _, m := range cs.Members {
		if m.Status != nil && m.Status.Sync != nil && m.Status.Sync.Active {
			fmt.Fprintf(w, "\nResync on %s: %s\n", m.ID, syncText(m.Status.Sync))
		}
	}
}

// lagOf is how many entries applied trails the leader's (0 if ahead).
func lagOf(leader, applied uint64) uint64 {
	if applied >= leader {
		return 0
	}
	return leader - applied
}

// memberHealth says whether a member is healthy, and if not why: it
// answers, is a leader or follower, runs no resync and trails the
// leader by at most healthyLag entries.
func memberHealth(m wire.Member, lead *wire.NodeStatus) (bool, string) {
	switch {
	case m.Status == nil && m.Error != "":
		return false, "not answering: " + m.Error
	case m.Status == nil:
		return false, "no status"
	case m.Status.Sync != nil && m.Status.Sync.Active:
		return false, "resyncing its image from peers"
	case m.Status.State != "Leader" && m.Status.State != "Follower":
		return false, "raft is " + strings.ToLower(m.Status.State)
	case lead != nil && lagOf(lead.AppliedIndex, m.Status.AppliedIndex) > healthyLag:
		return false, fmt.Sprintf("%d entries behind the leader", lagOf(lead.AppliedIndex, m.Status.AppliedIndex))
	}
	return true, ""
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// progressBar draws done of total as a bar of width cells and a percentage:
// "[##########----------]  50%".
func progressBar(done, total uint64, width int) string {
	frac := 0.0
	if total > 0 {
		frac = float64(done) / float64(total)
	}
	frac = min(max(frac, 0), 1)
	n := int(frac * float64(width))
	return fmt.Sprintf("[%s%s] %3.0f%%", strings.Repeat("#", n), strings.Repeat("-", width-n), 100*frac)
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
	var b strings.Builder
	if s.Active {
		fmt.Fprintf(&b, "%s  %s of %s compared, %s moved, %s/s from %d peers",
			progressBar(s.BytesCompared, s.BytesTotal, 30), human(s.BytesCompared), human(s.BytesTotal), human(s.BytesMoved), human(uint64(s.RateBytesPerSec)), s.Peers)
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
