// Package netfault is the network fault layer of the chaos tests: a
// raft.Transport that wraps the real one and, by the rules it is given at
// run time, fails the RPCs this node sends to some peers (a partition;
// one-way when only one side is told), fails a share of them at random
// (dropped and reset connections), and delays them with jitter.
//
// Faults act on the sending side only. A symmetric partition of A and B
// tells A to drop B and B to drop A; a one-way partition tells one of
// them. The replies of an RPC travel on its own connection, so a node that
// may not send still answers what it receives.
//
// Production code never imports this package: cmd/keel's chaos.go (built
// only with -tags chaos) installs it through replica.NodeConfig's
// WrapTransport hook. See package chaos/control for how a soak sets the
// rules of a running process.
package netfault

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"
)

// ErrInjected is wrapped by every error this layer makes up.
var ErrInjected = errors.New("netfault: injected network fault")

// Rules are the faults in force on one node's outbound RPCs.
type Rules struct {
	// Drop lists the peers (Raft addresses, HOST:PORT) every RPC to which
	// fails at once: a partition.
	Drop []string `json:"drop,omitempty"`
	// FailPercent fails that share (0..100) of the other RPCs at random,
	// as a dropped or reset connection would.
	FailPercent int `json:"fail_percent,omitempty"`
	// Delay and Jitter delay every RPC by Delay plus a uniform random
	// part of up to Jitter.
	Delay  time.Duration `json:"delay,omitempty"`
	Jitter time.Duration `json:"jitter,omitempty"`
}

// Validate names the first bad field.
func (r Rules) Validate() error {
	switch {
	case r.FailPercent < 0 || r.FailPercent > 100:
		return fmt.Errorf("netfault: Rules.FailPercent %d: must be from 0 to 100", r.FailPercent)
	case r.Delay < 0 || r.Delay > time.Minute:
		return fmt.Errorf("netfault: Rules.Delay %v: must be from 0 to 1m", r.Delay)
	case r.Jitter < 0 || r.Jitter > time.Minute:
		return fmt.Errorf("netfault: Rules.Jitter %v: must be from 0 to 1m", r.Jitter)
	}
	return nil
}

// Empty reports whether the rules inject nothing.
func (r Rules) Empty() bool {
	return len(r.Drop) == 0 && r.FailPercent == 0 && r.Delay == 0 && r.Jitter == 0
}

// Table holds the rules in force; safe for any goroutine. The zero value
// injects nothing.
type Table struct {
	mu    sync.Mutex // guards the following
	rules Rules
	rng   *rand.Rand
}

// NewTable returns an empty table whose random choices come from seed.
func NewTable(seed uint64) *Table {
	return &Table{rng: rand.New(rand.NewPCG(seed, 0x6e6574))}
}

// Set replaces the rules.
func (t *Table) Set(r Rules) error {
	if err := r.Validate(); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.rules = r
	return nil
}

// Rules returns the rules in force.
func (t *Table) Rules() Rules {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.rules
}

// decide says what happens to one RPC to target: wait this long, then
// fail with err (nil: send it).
func (t *Table) decide(target string) (wait time.Duration, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	r := t.rules
	if r.Empty() {
		return 0, nil
	}
	if t.rng == nil {
		t.rng = rand.New(rand.NewPCG(1, 0x6e6574))
	}
	if slices.Contains(r.Drop, target) {
		return 0, fmt.Errorf("%w: partitioned from %s", ErrInjected, target)
	}
	wait = r.Delay
	if r.Jitter > 0 {
		wait += time.Duration(t.rng.Int64N(int64(r.Jitter)))
	}
	if r.FailPercent > 0 && t.rng.IntN(100) < r.FailPercent {
		return wait, fmt.Errorf("%w: connection to %s reset", ErrInjected, target)
	}
	return wait, nil
}
