package supervise

import "sync/atomic"

// Named fault points. A supervised service calls Point with its point's
// name where a failure would hurt most (each turn of its loop); in a
// production build nothing is installed and Point only loads one pointer.
// The chaos tests' build installs a hook (SetPointHook) that panics at an
// armed point, to prove that the service's supervisor restarts it and the
// client sees no error. Names are "process.service".
const (
	PointRaft       = "server.raft"       // RaftService's watch loop: the Raft node is closed and opened again
	PointMembership = "server.membership" // the membership loop
	PointAccept     = "nbd.accept"        // the NBD accept loop (servers and proxy), before each accept
)

// Points lists every named point.
var Points = []string{PointRaft, PointMembership, PointAccept}

var pointHook atomic.Pointer[func(name string)]

// Point runs the installed hook, if any, for the named point.
func Point(name string) {
	if h := pointHook.Load(); h != nil {
		(*h)(name)
	}
}

// SetPointHook installs f as the hook of every point (nil removes it).
func SetPointHook(f func(name string)) {
	if f == nil {
		pointHook.Store(nil)
		return
	}
	pointHook.Store(&f)
}
