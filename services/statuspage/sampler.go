package statuspage

import (
	"context"
	"time"
)

// SampleEvery is how often Sampler observes by default.
const SampleEvery = time.Second

// Sampler is the supervised service that feeds History: at each tick it
// observes Read's totals at Now. It starts no goroutine; Serve returns when
// its context ends.
type Sampler struct {
	// History receives the observations. Required.
	History *History
	// Read returns the totals to observe. Required.
	Read func() Totals
	// Every is the interval of the ticker Serve starts when Tick is nil.
	// Default SampleEvery.
	Every time.Duration
	// Tick, when set, replaces the ticker (tests): each receive is one
	// observation.
	Tick <-chan time.Time
	// Now is the clock of the observations. Default time.Now.
	Now func() time.Time
	// Name is the service's name in the supervisor's events. Default
	// "status history".
	Name string
}

func (s *Sampler) String() string {
	if s.Name == "" {
		return "status history"
	}
	return s.Name
}

// Interval is the interval the samples are taken at.
func (s *Sampler) Interval() time.Duration {
	if s.Every <= 0 {
		return SampleEvery
	}
	return s.Every
}

// Serve observes once at the start (the baseline) and at every tick.
func (s *Sampler) Serve(ctx context.Context) error {
	now := s.Now
	if now == nil {
		now = time.Now
	}
	tick := s.Tick
	if tick == nil {
		t := time.NewTicker(s.Interval())
		defer t.Stop()
		tick = t.C
	}
	s.History.Observe(now(), s.Read())
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick:
			s.History.Observe(now(), s.Read())
		}
	}
}
