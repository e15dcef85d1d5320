package soak

import (
	"fmt"
	"sort"
	"strings"
	"time"
)

// Summary is the soak's end-of-run report, for a terminal.
func (r Result) Summary() string {
	var b strings.Builder
	verdict := "PASS"
	if !r.OK() {
		verdict = "FAIL"
	}
	fmt.Fprintf(&b, "soak %s: seed %d, %v\n", verdict, r.Seed, r.Duration.Round(time.Second))
	byKind := map[string]int{}
	for _, f := range r.Faults {
		byKind[f.Kind]++
	}
	fmt.Fprintf(&b, "faults injected: %d %s\n", len(r.Faults), counts(byKind))
	fmt.Fprintf(&b, "operations: %s\n", counts(r.Report.Ops))
	fmt.Fprintf(&b, "acknowledged changes: %d over %d blocks\n", r.Report.Acked, r.Report.Blocks)
	fmt.Fprintf(&b, "lost writes: %d\n", len(r.Report.Lost))
	fmt.Fprintf(&b, "linearizability violations: %d (blocks %v), undecided %d, corrupt reads %d, unread blocks %d\n",
		len(r.Report.Violations), r.Report.Violations, len(r.Report.Undecided), len(r.Report.Corrupt), len(r.Report.Unread))
	allowed := 0
	for _, e := range r.Errors {
		if e.Allowed {
			allowed++
		}
	}
	fmt.Fprintf(&b, "client-visible errors: %d while unavailable (allowed), %d otherwise (read-back failures %d)\n",
		allowed, r.Unexpected, r.ReadBackFailures)
	// The unexpected ones first, then the allowed, ten of each at most.
	for _, allowed := range []bool{false, true} {
		shown := 0
		for _, e := range r.Errors {
			if e.Allowed == allowed && shown < 10 {
				tag := "NOT ALLOWED"
				if allowed {
					tag = "allowed"
				}
				fmt.Fprintf(&b, "  at %7.2fs %-11s %s: %s\n", e.At.Seconds(), tag, e.Kind, e.Err)
				shown++
			}
		}
	}
	var recs []string
	for i, f := range r.Faults {
		rec := "never"
		if r.Recovery[i] >= 0 {
			rec = r.Recovery[i].Round(time.Millisecond).String()
		}
		line := fmt.Sprintf("  %7.1fs %-12s %-10s held %-8v first write after %s", f.Start.Seconds(), f.Kind, f.Target, (f.Healed - f.Start).Round(time.Millisecond), rec)
		if f.Err != "" {
			line += "  ERROR " + f.Err
		}
		recs = append(recs, line)
	}
	if len(recs) > 0 {
		fmt.Fprintf(&b, "faults (time to the first acknowledged write after each):\n%s\n", strings.Join(recs, "\n"))
		fmt.Fprintf(&b, "recovery by kind: %s\n", recoveryByKind(r))
	}
	for _, l := range r.Report.Lost {
		fmt.Fprintf(&b, "lost: %s\n", l)
	}
	for _, c := range r.Report.Corrupt {
		fmt.Fprintf(&b, "corrupt: %s\n", c)
	}
	if r.Verify != "" {
		fmt.Fprintf(&b, "keel verify: %s\n", r.Verify)
	} else {
		b.WriteString("keel verify: replicas identical\n")
	}
	if r.Stuck != "" {
		fmt.Fprintf(&b, "stuck: %s\n", r.Stuck)
	}
	if r.Crashes != "" {
		fmt.Fprintf(&b, "crashes: %s\n", r.Crashes)
	}
	if r.FailureDir != "" {
		fmt.Fprintf(&b, "history and visualisation saved in %s\n", r.FailureDir)
	}
	fmt.Fprintf(&b, "replay: go run ./chaos/cmd/keel-chaos --seed %d --duration %v\n", r.Seed, r.Duration.Round(time.Second))
	return b.String()
}

func counts(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s=%d", k, m[k]))
	}
	return strings.Join(parts, " ")
}

func recoveryByKind(r Result) string {
	worst := map[string]time.Duration{}
	for i, f := range r.Faults {
		if d := r.Recovery[i]; d > worst[f.Kind] {
			worst[f.Kind] = d
		}
	}
	keys := make([]string, 0, len(worst))
	for k := range worst {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s max %v", k, worst[k].Round(time.Millisecond)))
	}
	return strings.Join(parts, ", ")
}
