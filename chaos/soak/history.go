package soak

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"sync"
	"time"
)

// Kind is what an operation does.
type Kind uint8

// The operations of the workload.
const (
	Read Kind = iota + 1
	Write
	Trim // Keel applies a trim as zeroes (replica/decide.go), so it is modelled as one
	ZeroOp
	Flush
)

func (k Kind) String() string {
	switch k {
	case Read:
		return "read"
	case Write:
		return "write"
	case Trim:
		return "trim"
	case ZeroOp:
		return "zero"
	case Flush:
		return "flush"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// MarshalText and UnmarshalText spell kinds by name in a saved history.
func (k Kind) MarshalText() ([]byte, error) { return []byte(k.String()), nil }
func (k *Kind) UnmarshalText(b []byte) error {
	for c := Read; c <= Flush; c++ {
		if c.String() == string(b) {
			*k = c
			return nil
		}
	}
	return fmt.Errorf("soak: unknown kind %q", b)
}

// Outcome is how an operation ended as the client saw it.
type Outcome uint8

const (
	// OK: acknowledged.
	OK Outcome = iota + 1
	// Unknown: an error or a time-out. A read or flush that failed says
	// nothing and is left out of the model; a write, trim or zero that
	// failed may or may not have taken effect, then or at any later time,
	// so it stays open to the end of the history.
	Unknown
)

func (o Outcome) String() string {
	switch o {
	case OK:
		return "ok"
	case Unknown:
		return "unknown"
	}
	return fmt.Sprintf("outcome(%d)", uint8(o))
}

func (o Outcome) MarshalText() ([]byte, error) { return []byte(o.String()), nil }
func (o *Outcome) UnmarshalText(b []byte) error {
	switch string(b) {
	case "ok":
		*o = OK
	case "unknown":
		*o = Unknown
	default:
		return fmt.Errorf("soak: unknown outcome %q", b)
	}
	return nil
}

// Op is one operation of the history: its call and return times (since
// the history began), what it did and what the client saw.
type Op struct {
	Client int           `json:"client"`
	Kind   Kind          `json:"kind"`
	Block  uint64        `json:"block"`  // first block (unused for Flush)
	Blocks int           `json:"blocks"` // how many blocks from Block
	Value  Value         `json:"value"`  // Write: the value written to every block
	Got    []Value       `json:"got"`    // Read, OK: per block, the value read
	Call   time.Duration `json:"call"`
	Return time.Duration `json:"return"`
	Out    Outcome       `json:"outcome"`
	Err    string        `json:"err,omitempty"`
	// Final marks the read-back after the run.
	Final bool `json:"final,omitempty"`
}

// Mutates reports whether the op changes blocks (write, trim, zero).
func (o Op) Mutates() bool { return o.Kind == Write || o.Kind == Trim || o.Kind == ZeroOp }

// History records operations from any goroutine.
type History struct {
	start time.Time

	mu  sync.Mutex // guards ops
	ops []Op
}

// NewHistory starts an empty history; its clock starts now.
func NewHistory() *History { return &History{start: time.Now()} }

// Now is the time since the history began.
func (h *History) Now() time.Duration { return time.Since(h.start) }

// Start is the wall time the history began.
func (h *History) Start() time.Time { return h.start }

// Add records a finished operation.
func (h *History) Add(op Op) {
	h.mu.Lock()
	h.ops = append(h.ops, op)
	h.mu.Unlock()
}

// Ops is a copy of the history, sorted by call time.
func (h *History) Ops() []Op {
	h.mu.Lock()
	ops := append([]Op(nil), h.ops...)
	h.mu.Unlock()
	sort.SliceStable(ops, func(i, j int) bool { return ops[i].Call < ops[j].Call })
	return ops
}

// SaveJSON writes ops to path, one JSON array.
func SaveJSON(path string, ops []Op) error {
	b, err := json.MarshalIndent(ops, "", " ")
	if err != nil {
		return fmt.Errorf("soak: history: %w", err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return fmt.Errorf("soak: history: %w", err)
	}
	return nil
}

// LoadJSON reads a history SaveJSON wrote.
func LoadJSON(path string) ([]Op, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("soak: history: %w", err)
	}
	var ops []Op
	if err := json.Unmarshal(b, &ops); err != nil {
		return nil, fmt.Errorf("soak: history %s: %w", path, err)
	}
	return ops, nil
}
