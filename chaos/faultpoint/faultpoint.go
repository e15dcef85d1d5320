// Package faultpoint arms supervise's named points to panic: the code
// fault of the chaos tests. A Table's Hit is installed as the point hook
// (supervise.SetPointHook) by keel's chaos build; Arm says how many of the
// next passes through a point panic.
//
// Production code never imports this package.
package faultpoint

import (
	"fmt"
	"sync"
)

// Table holds the armed points; safe for any goroutine.
type Table struct {
	mu    sync.Mutex     // guards the following
	armed map[string]int // point -> panics still to come
	hits  map[string]int // point -> panics made
}

// NewTable returns a table with nothing armed.
func NewTable() *Table { return &Table{armed: map[string]int{}, hits: map[string]int{}} }

// Arm makes the next count passes through point panic (0 disarms it).
func (t *Table) Arm(point string, count int) error {
	if count < 0 || count > 1000 {
		return fmt.Errorf("faultpoint: count %d: must be from 0 to 1000", count)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.armed[point] = count
	return nil
}

// Hits is how many panics point has made.
func (t *Table) Hits(point string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.hits[point]
}

// Panic is the value an armed point panics with.
type Panic struct{ Point string }

func (p Panic) String() string { return "faultpoint: injected panic at " + p.Point }

// Hit panics if point is armed.
func (t *Table) Hit(point string) {
	t.mu.Lock()
	n := t.armed[point]
	if n > 0 {
		t.armed[point] = n - 1
		t.hits[point]++
	}
	t.mu.Unlock()
	if n > 0 {
		panic(Panic{Point: point})
	}
}
