// Package supervise builds Keel's suture supervision trees: supervisors named
// for what they own, restart policy in one place, and every supervisor event
// sent to an hclog logger. It imports no other Keel package.
package supervise

import (
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
}

// New returns a supervisor named name whose events go to log.
func New(name string, log hclog.Logger, p Policy) *suture.Supervisor {
	return suture.New(name, suture.Spec{
		EventHook:        EventHook(log),
		FailureThreshold: p.FailureThreshold,
		FailureDecay:     p.FailureDecay,
		FailureBackoff:   p.FailureBackoff,
		Timeout:          p.StopTimeout,
	})
}

// EventHook logs suture's events: panics with their stack, failures,
// back-offs and services that would not stop.
func EventHook(log hclog.Logger) suture.EventHook {
	return func(ev suture.Event) {
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
