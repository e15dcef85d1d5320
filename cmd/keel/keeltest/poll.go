package keeltest

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// ErrNotYet: a condition did not hold within its time.
var ErrNotYet = errors.New("keeltest: condition not met in time")

// Poll calls cond every every until it reports done, returns an error,
// ctx ends or timeout passes; the error names what and the last state
// cond described.
func Poll(ctx context.Context, timeout, every time.Duration, what string, cond func() (done bool, state string, err error)) error {
	deadline := time.Now().Add(timeout)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		done, state, err := cond()
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if done {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: %w (%v); last: %s", what, ErrNotYet, timeout, state)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w; last: %s", what, context.Cause(ctx), state)
		case <-t.C:
		}
	}
}
