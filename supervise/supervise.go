// Package supervise builds Keel's suture supervision trees: supervisors named
// for what they own, restart policy in one place, and every supervisor event
// sent to an hclog logger. It imports no other Keel package.
package supervise

import (
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/thejerf/suture/v4"
)

// Policy is the restart policy of one supervisor. Zero fields take defaults.
type Policy struct {
	// FailureThreshold is how many failures (decaying over FailureDecay)
	// the supervisor tolerates before it backs off. Default 5.
	FailureThreshold float64
	// FailureDecay is the half-life, in seconds, of the failure count.
	// Default 30.
	FailureDecay float64
	// FailureBackoff is how long the supervisor waits before restarting
	// anything once the threshold is crossed. Default 15s.
	FailureBackoff time.Duration
	// StopTimeout is how long the supervisor waits for each service to
	// return when it is stopped. Default 10s.
	StopTimeout time.Duration
	// Restarts, when set, counts every restart of a service under this
	// supervisor (and under the supervisors added to it, which share its
	// event hook). Nil: restarts are only logged.
	Restarts *Restarts
}

// Restarts counts service restarts by supervisor and service name: a
// service that failed or panicked and is started again. A service that
// ends for good is not a restart. The zero value is ready to use; it is
// safe for concurrent use.
type Restarts struct {
	mu sync.Mutex            // guards the following
	n  map[RestartKey]uint64 // restarts so far
}

// RestartKey names one supervised service.
type RestartKey struct{ Supervisor, Service string }

// RestartCount is one service's restarts so far.
type RestartCount struct {
	RestartKey
	N uint64
}

func (r *Restarts) add(supervisor, service string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.n == nil {
		r.n = map[RestartKey]uint64{}
	}
	r.n[RestartKey{supervisor, service}]++
}

// Counts returns every service restarted so far, sorted by supervisor and
// service.
func (r *Restarts) Counts() []RestartCount {
	r.mu.Lock()
	out := make([]RestartCount, 0, len(r.n))
	for k, n := range r.n {
		out = append(out, RestartCount{k, n})
	}
	r.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].Supervisor != out[j].Supervisor {
			return out[i].Supervisor < out[j].Supervisor
		}
		return out[i].Service < out[j].Service
	})
	return out
}

// New returns a supervisor named name whose events go to log.
func New(name string, log hclog.Logger, p Policy) *suture.Supervisor {
	return suture.New(name, suture.Spec{
		EventHook:        CountingHook(log, p.Restarts),
		FailureThreshold: p.FailureThreshold,
		FailureDecay:     p.FailureDecay,
		FailureBackoff:   p.FailureBackoff,
		Timeout:          p.StopTimeout,
	})
}

// EventHook logs suture's events: panics with their stack, failures,
// back-offs and services that would not stop.
func EventHook(log hclog.Logger) suture.EventHook { return CountingHook(log, nil) }

// CountingHook is EventHook that also counts each restart in r (when r is
// not nil).
func CountingHook(log hclog.Logger, r *Restarts) suture.EventHook {
	return func(ev suture.Event) {
		if r != nil {
			switch e := ev.(type) {
			case suture.EventServicePanic:
				if e.Restarting {
					r.add(e.SupervisorName, e.ServiceName)
				}
			case suture.EventServiceTerminate:
				if e.Restarting {
					r.add(e.SupervisorName, e.ServiceName)
				}
			}
		}
		switch e := ev.(type) {
		case suture.EventServicePanic:
			log.Error("service panicked", "supervisor", e.SupervisorName, "service", e.ServiceName,
				"panic", e.PanicMsg, "stack", e.Stacktrace, "restarting", e.Restarting)
		case suture.EventServiceTerminate:
			log.Warn("service failed", "supervisor", e.SupervisorName, "service", e.ServiceName,
				"error", e.Err, "restarting", e.Restarting)
		case suture.EventBackoff:
			log.Warn("too many failures; backing off before restarting", "supervisor", e.SupervisorName)
		case suture.EventResume:
			log.Info("resuming restarts", "supervisor", e.SupervisorName)
		case suture.EventStopTimeout:
			log.Error("service did not stop in time", "supervisor", e.SupervisorName, "service", e.ServiceName)
		default:
			log.Debug("supervisor event", "event", ev.String())
		}
	}
}
