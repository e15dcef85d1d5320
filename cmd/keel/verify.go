package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/wire"
)

// errDiffer makes keel verify exit 1; other failures exit 2.
var errDiffer = errors.New("images differ")

func newVerifyCmd() *cobra.Command {
	var addr string
	var timeout, every time.Duration
	cmd := &cobra.Command{
		Use:   "verify --http ADDR",
		Short: "Check that every voter's image is byte-identical at a common applied index",
		Long: `Ask every voter for a digest of its image taken while nothing is applied,
at the same applied index. Prints one line per voter. Exits 0 when every
digest matches, 1 when they differ, 2 when the check could not be made (a
voter unreachable, or the cluster too busy to reach a common index within
--timeout: verify a quiet cluster).

While the voters fingerprint their images (a big volume takes minutes),
progress goes to stderr: one line kept up to date on a terminal, else a
line every --progress-every.`,
		Example: `  keel verify --http 127.0.0.1:7201
  keel verify --http 10.0.0.1:7201 --timeout 30m --progress-every 1m`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(c.Context(), timeout)
			defer cancel()
			pr := &verifyProgress{w: os.Stderr, tty: isTerminal(os.Stderr), every: every}
			err := verify(ctx, wire.NewClient(timeout), addr, pr)
			if errors.Is(err, errDiffer) {
				fmt.Fprintln(os.Stderr, "keel verify: FAILED:", err)
				os.Exit(1)
			}
			if err != nil {
				fmt.Fprintln(os.Stderr, "keel verify:", explain(httpErr(addr, err)))
				os.Exit(2)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&addr, "http", "127.0.0.1:7201", "HTTP address of any member")
	cmd.Flags().DurationVar(&timeout, "timeout", 2*time.Minute, "give up after this long")
	cmd.Flags().DurationVar(&every, "progress-every", 10*time.Second, "when stderr is not a terminal, print the digests' progress this often (0: never)")
	return cmd
}

// verify runs keel verify against the member at addr; pr, when not nil,
// shows the digests' progress.
func verify(ctx context.Context, c *wire.Client, addr string, pr *verifyProgress) error {
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
		digested := make(chan struct{})
		go func() { wg.Wait(); close(digested) }()
		if pr != nil {
			pr.watch(ctx, digested, func(ctx context.Context) (done, total uint64) { return digestProgress(ctx, c, voters) })
		}
		<-digested
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

// digestProgress sums the digest progress the voters report: bytes
// fingerprinted and bytes in all. A voter that does not answer, or whose
// digest is not running (not begun, or done), counts as nothing done of
// nothing.
func digestProgress(ctx context.Context, c *wire.Client, voters []wire.Member) (done, total uint64) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, m := range voters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			var p wire.DigestProgress
			if err := c.Do(sctx, "GET", m.HTTP, "/v1/verify/progress", nil, &p); err != nil || !p.Running {
				return
			}
			mu.Lock()
			done += p.BytesDone
			total += p.BytesTotal
			mu.Unlock()
		}()
	}
	wg.Wait()
	return done, total
}

// verifyProgress shows how far keel verify's digests are: on a terminal
// one line, rewritten every second; elsewhere a line every every (none
// when every is 0).
type verifyProgress struct {
	w     io.Writer
	tty   bool
	every time.Duration
}

// watch shows progress, as poll reports it, until digested is closed (or
// ctx ends), then returns.
func (p *verifyProgress) watch(ctx context.Context, digested <-chan struct{}, poll func(context.Context) (done, total uint64)) {
	interval := p.every
	if p.tty {
		interval = time.Second
	}
	if interval <= 0 {
		return
	}
	start := time.Now()
	t := time.NewTicker(interval)
	defer t.Stop()
	shown := false
	for {
		select {
		case <-digested:
			if shown && p.tty {
				fmt.Fprintln(p.w)
			}
			return
		case <-ctx.Done():
			return
		case <-t.C:
		}
		done, total := poll(ctx)
		if total == 0 {
			continue // not begun yet (or already done)
		}
		line := progressLine(done, total, time.Since(start))
		if p.tty {
			fmt.Fprintf(p.w, "\r\x1b[K%s", line)
		} else {
			fmt.Fprintln(p.w, line)
		}
		shown = true
	}
}

// progressLine is one progress report of the voters' digests.
func progressLine(done, total uint64, elapsed time.Duration) string {
	return fmt.Sprintf("verifying: %s  %s of %s fingerprinted, %s", progressBar(done, total, 30), human(done), human(total), elapsed.Round(time.Second))
}

// isTerminal reports whether f is a terminal.
func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
