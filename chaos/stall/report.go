package main

// The results: per trial, over the run, and the printed summary. Durations
// in the JSON are milliseconds.

import (
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

type result struct {
	Config         map[string]any `json:"config"`
	Trials         []trialResult  `json:"trials"`
	Summary        map[string]pct `json:"summary"` // election, recovery, max_write, max_gap, max_read, rejoin
	SteadyWrite    pct            `json:"steady_write"`
	LoadSeconds    float64        `json:"load_seconds"`
	Writes         uint64         `json:"writes"`
	Reads          uint64         `json:"reads"`
	WriteErrors    uint64         `json:"write_errors"`
	ReadErrors     uint64         `json:"read_errors"`
	ReadMismatches uint64         `json:"read_mismatches"`
	TornReads      uint64         `json:"torn_reads"` // raced a write to the block: pages of both (allowed)
	Problems       []string       `json:"problems,omitempty"`
	IdleBefore     *idleResult    `json:"idle_before,omitempty"`
	IdleAfter      *idleResult    `json:"idle_after,omitempty"`
	Spurious       int            `json:"spurious_elections"` // term changes while idle or under steady load
	ExtraRounds    int            `json:"extra_rounds"`       // terms beyond one per kill
	RejoinMoves    int            `json:"rejoin_term_moves"`  // term changes while a killed node rejoined
	Verify         []verifyResult `json:"verify,omitempty"`
	Logs           []logCounts    `json:"logs,omitempty"`
	OK             bool           `json:"ok"`
}

type trialResult struct {
	N                 int           `json:"n"`
	Killed            string        `json:"killed"`
	NewLeader         string        `json:"new_leader"`
	TermBefore        uint64        `json:"term_before"`
	TermElected       uint64        `json:"term_elected"`
	TermAfter         uint64        `json:"term_after"`
	SpuriousUnderLoad int           `json:"spurious_under_load"`
	Elected           time.Duration `json:"-"`
	Recovered         time.Duration `json:"-"`
	MaxWrite          time.Duration `json:"-"`
	MaxGap            time.Duration `json:"-"`
	MaxRead           time.Duration `json:"-"`
	Rejoin            time.Duration `json:"-"`
	WindowWrites      int           `json:"window_writes"`
	Complete          bool          `json:"complete"`
}

// MarshalJSON adds the durations in milliseconds.
func (t trialResult) MarshalJSON() ([]byte, error) {
	type plain trialResult
	return json.Marshal(struct {
		plain
		ElectedMS   float64 `json:"election_ms"`
		RecoveredMS float64 `json:"recovery_ms"`
		MaxWriteMS  float64 `json:"max_write_ms"`
		MaxGapMS    float64 `json:"max_gap_ms"`
		MaxReadMS   float64 `json:"max_read_ms"`
		RejoinMS    float64 `json:"rejoin_ms"`
	}{plain(t), msf(t.Elected), msf(t.Recovered), msf(t.MaxWrite), msf(t.MaxGap), msf(t.MaxRead), msf(t.Rejoin)})
}

type idleResult struct {
	Seconds       float64 `json:"seconds"`
	TermBefore    uint64  `json:"term_before"`
	TermAfter     uint64  `json:"term_after"`
	LeaderChanges int     `json:"leader_changes"`
	Leader        string  `json:"leader"`
}

type verifyResult struct {
	Via      string   `json:"via"`
	Blocks   uint64   `json:"blocks"`
	Bad      uint64   `json:"bad"`
	Examples []string `json:"examples,omitempty"`
	Error    string   `json:"error,omitempty"`
}

type logCounts struct {
	Node     string `json:"node"`
	Timeouts int    `json:"heartbeat_timeouts"` // "heartbeat timeout reached, starting election"
	Won      int    `json:"elections_won"`
	Errors   int    `json:"errors"`
	Warnings int    `json:"warnings,omitempty"`
}

// pct is a distribution in milliseconds (nearest-rank percentiles).
type pct struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50_ms"`
	P99 float64 `json:"p99_ms"`
	Max float64 `json:"max_ms"`
}

func percentiles(ds []time.Duration) pct {
	if len(ds) == 0 {
		return pct{}
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	rank := func(p float64) float64 {
		i := int(math.Ceil(p*float64(len(s)))) - 1
		return msf(s[max(0, min(i, len(s)-1))])
	}
	return pct{N: len(s), P50: rank(0.50), P99: rank(0.99), Max: msf(s[len(s)-1])}
}

func msf(d time.Duration) float64 { return math.Round(d.Seconds()*1e4) / 10 }

func resultConfig(cfg *config) map[string]any {
	return map[string]any{
		"trials": cfg.trials, "size": cfg.sizeText, "bs": cfg.bs, "writers": cfg.writers, "readers": cfg.readers,
		"heartbeat_timeout": cfg.heartbeat.String(), "election_timeout": cfg.election.String(),
		"leader_lease_timeout": cfg.lease.String(), "proxy_poll_interval": cfg.proxyPoll.String(),
		"proxy_cache": cfg.proxyCache, "settle": cfg.settle.String(),
	}
}

// report fills the summary, prints it, and says whether the run passed.
func (r *runner) report() bool {
	res, cfg := r.res, r.cfg
	var el, rec, mw, mg, mr, rj []time.Duration
	complete := 0
	for _, t := range res.Trials {
		if !t.Complete {
			continue
		}
		complete++
		el, rec, mw, mg = append(el, t.Elected), append(rec, t.Recovered), append(mw, t.MaxWrite), append(mg, t.MaxGap)
		if cfg.readers > 0 {
			mr = append(mr, t.MaxRead)
		}
		rj = append(rj, t.Rejoin)
		res.Spurious += t.SpuriousUnderLoad
		if t.TermElected > t.TermBefore+1 {
			res.ExtraRounds += int(t.TermElected - t.TermBefore - 1)
		}
		if t.TermAfter > t.TermElected {
			res.RejoinMoves += int(t.TermAfter - t.TermElected)
		}
	}
	for _, i := range []*idleResult{res.IdleBefore, res.IdleAfter} {
		if i != nil && i.TermAfter > i.TermBefore {
			res.Spurious += int(i.TermAfter - i.TermBefore)
		}
	}
	res.Summary = map[string]pct{
		"election": percentiles(el), "recovery": percentiles(rec), "max_write": percentiles(mw),
		"max_gap": percentiles(mg), "max_read": percentiles(mr), "rejoin": percentiles(rj),
	}
	verified := !cfg.verify || len(res.Verify) == 4
	for _, v := range res.Verify {
		verified = verified && v.Bad == 0 && v.Error == ""
	}
	res.OK = complete == cfg.trials && res.WriteErrors == 0 && res.ReadErrors == 0 && res.ReadMismatches == 0 && verified

	fmt.Println()
	fmt.Printf("stall: results: %d of %d trials complete; raft --heartbeat-timeout %v --election-timeout %v --leader-lease-timeout %v; proxy --poll-interval %v\n",
		complete, cfg.trials, cfg.heartbeat, cfg.election, cfg.lease, cfg.proxyPoll)
	row := func(name, what string, p pct) {
		if p.N == 0 {
			fmt.Printf("  %-10s %8s %8s %8s  %s\n", name, "-", "-", "-", what)
			return
		}
		fmt.Printf("  %-10s %8.0f %8.0f %8.0f  %s\n", name, p.P50, p.P99, p.Max, what)
	}
	fmt.Printf("  %-10s %8s %8s %8s\n", "ms", "p50", "p99", "max")
	row("election", "kill -> a survivor reports Leader", res.Summary["election"])
	row("recovery", "kill -> first write sent after the kill acknowledged", res.Summary["recovery"])
	row("max write", "longest single write, kill -> trial end", res.Summary["max_write"])
	row("max gap", "longest time without a write completing", res.Summary["max_gap"])
	row("max read", "longest single read, kill -> trial end", res.Summary["max_read"])
	row("rejoin", "restart of the killed node -> caught up", res.Summary["rejoin"])
	s := res.SteadyWrite
	fmt.Printf("  steady write latency outside the trials: p50 %.1f ms, p99 %.1f ms, max %.0f ms (%d samples)\n", s.P50, s.P99, s.Max, s.N)
	fmt.Printf("  load: %d writes (%d errors), %d reads (%d errors, %d wrong content; %d torn by a racing write, which is allowed) in %.0f s\n",
		res.Writes, res.WriteErrors, res.Reads, res.ReadErrors, res.ReadMismatches, res.TornReads, res.LoadSeconds)
	idle := func(i *idleResult) string {
		if i == nil {
			return "not watched"
		}
		return fmt.Sprintf("term %d -> %d in %.0f s", i.TermBefore, i.TermAfter, i.Seconds)
	}
	fmt.Printf("  elections: spurious %d (idle before the load: %s; after: %s; under steady load: %d); extra rounds after kills %d; term moves while the killed node rejoined %d\n",
		res.Spurious, idle(res.IdleBefore), idle(res.IdleAfter), res.Spurious-idleMoves(res.IdleBefore)-idleMoves(res.IdleAfter), res.ExtraRounds, res.RejoinMoves)
	var ls []string
	for _, l := range res.Logs {
		if l.Node == "proxy" {
			ls = append(ls, fmt.Sprintf("proxy %d ERROR %d WARN", l.Errors, l.Warnings))
		} else {
			ls = append(ls, fmt.Sprintf("%s %d heartbeat timeouts %d won %d ERROR", l.Node, l.Timeouts, l.Won, l.Errors))
		}
	}
	if len(ls) > 0 {
		fmt.Printf("  logs: %s\n", strings.Join(ls, "; "))
	}
	for _, v := range res.Verify {
		fmt.Printf("  verify via %-5s %d blocks, %d wrong%s\n", v.Via+":", v.Blocks, v.Bad, map[bool]string{true: "", false: "; error: " + v.Error}[v.Error == ""])
		for _, e := range v.Examples {
			fmt.Printf("    %s\n", e)
		}
	}
	if !cfg.verify {
		fmt.Println("  verify: skipped (--verify=false)")
	}
	for _, p := range res.Problems {
		fmt.Printf("  problem: %s\n", p)
	}
	if res.OK {
		fmt.Println("stall: PASS: every trial completed, no client error, every block holds its last acknowledged write")
	} else {
		var why []string
		if complete != cfg.trials {
			why = append(why, fmt.Sprintf("%d of %d trials complete", complete, cfg.trials))
		}
		if n := res.WriteErrors + res.ReadErrors; n > 0 {
			why = append(why, fmt.Sprintf("%d client errors", n))
		}
		if res.ReadMismatches > 0 {
			why = append(why, fmt.Sprintf("%d reads with wrong content", res.ReadMismatches))
		}
		if !verified {
			why = append(why, "verify failed or did not run to the end")
		}
		fmt.Printf("stall: FAIL: %s\n", strings.Join(why, "; "))
	}
	return res.OK
}

func idleMoves(i *idleResult) int {
	if i == nil || i.TermAfter <= i.TermBefore {
		return 0
	}
	return int(i.TermAfter - i.TermBefore)
}
