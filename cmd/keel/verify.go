package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/wire"
)

// errDiffer makes keel verify exit 1; other failures exit 2.
var errDiffer = errors.New("images differ")

func newVerifyCmd() *cobra.Command {
	var addr string
	var timeout time.Duration
	var tlsDir string
	cmd := &cobra.Command{
		Use:   "verify --http ADDR [--cluster-tls DIR]",
		Short: "Check that every voter's image is byte-identical at a common applied index",
		Long: `Ask every voter for a digest of its image taken while nothing is applied,
at the same applied index. Prints one line per voter. Exits 0 when every
digest matches, 1 when they differ, 2 when the check could not be made (a
voter unreachable, or the cluster too busy to reach a common index within
--timeout: verify a quiet cluster).`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(c.Context(), timeout)
			defer cancel()
			tc, err := loadClientTLS(tlsDir)
			if err != nil {
				return err
			}
			err = verify(ctx, wire.NewClient(timeout, tc), addr)
			if errors.Is(err, errDiffer) {
				fmt.Fprintln(os.Stderr, "keel verify: FAILED:", err)
				os.Exit(1)
			}
			if err != nil {
				fmt.Fprintln(os.Stderr, "keel verify:", err)
				os.Exit(2)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&addr, "http", "127.0.0.1:7201", "HTTP address of any member")
	cmd.Flags().DurationVar(&timeout, "timeout", 2*time.Minute, "give up after this long")
	clientTLSFlag(cmd, &tlsDir, false)
	return cmd
}

func verify(ctx context.Context, c *wire.Client, addr string) error {
	for attempt := 1; ; attempt++ {
		cs, err := c.Cluster(ctx, addr)
		if err != nil {
			return err
		}
		var voters []wire.Member
		var target uint64
		for _, m := range cs.Members {
			if m.Suffrage == "Voter" {
				voters = append(voters, m)
			}
			if m.ID == cs.Leader && m.Status != nil {
				// The leader's applied index, not its commit index: raft's
				// own entries (a new leader's no-op, configuration
				// changes) are committed but never reach the image.
				target = m.Status.AppliedIndex
			}
		}
		if cs.Leader == "" {
			return errors.New("no leader: cannot pick an index every voter must reach")
		}
		digests := make([]replica.Digest, len(voters))
		errs := make([]error, len(voters))
		var wg sync.WaitGroup
		for i, m := range voters {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = c.Do(ctx, "POST", m.HTTP, fmt.Sprintf("/v1/verify/digest?min_index=%d", target), nil, &digests[i])
			}()
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			return err
		}
		same := true
		for _, d := range digests {
			same = same && d.AppliedIndex == digests[0].AppliedIndex
		}
		if !same {
			// Writes landed between the digests: try again.
			select {
			case <-time.After(200 * time.Millisecond):
				continue
			case <-ctx.Done():
				return fmt.Errorf("voters did not reach a common applied index (is the cluster busy?): %w", ctx.Err())
			}
		}
		sort.Slice(digests, func(i, j int) bool { return digests[i].ID < digests[j].ID })
		tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "VOTER\tAPPLIED\tSIZE\tDIGEST")
		differ := false
		for _, d := range digests {
			fmt.Fprintf(tw, "%s\t%d\t%d\t%s\n", d.ID, d.AppliedIndex, d.Size, d.Digest)
			differ = differ || d.Digest != digests[0].Digest || d.Size != digests[0].Size
		}
		tw.Flush()
		if differ {
			return fmt.Errorf("%w at applied index %d", errDiffer, digests[0].AppliedIndex)
		}
		fmt.Printf("OK: %d voters byte-identical at applied index %d\n", len(digests), digests[0].AppliedIndex)
		return nil
	}
}
