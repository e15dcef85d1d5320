package replica

import (
	"errors"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// TransportLogger is the logger to give raft's TCP transport: l, except
// that a connection ended by the transport's own shutdown ("failed to
// decode incoming command" with raft.ErrTransportShutdown, logged at ERROR
// by raft on every stop and every upgrade's handover) is logged at DEBUG.
// Every other line is l's.
func TransportLogger(l hclog.Logger) hclog.Logger { return transportLog{l} }

type transportLog struct{ hclog.Logger }

func (t transportLog) Error(msg string, args ...any) {
	if msg == "failed to decode incoming command" && argIs(args, raft.ErrTransportShutdown) {
		t.Logger.Debug(msg, args...)
		return
	}
	t.Logger.Error(msg, args...)
}

// argIs reports whether a value among hclog's key/value args is target.
func argIs(args []any, target error) bool {
	for i := 1; i < len(args); i += 2 {
		if err, ok := args[i].(error); ok && errors.Is(err, target) {
			return true
		}
	}
	return false
}
