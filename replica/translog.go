package replica

import (
	"errors"
	"io"
	"net"
	"strings"
	"syscall"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// TransportLogger is the logger to give raft's TCP transport: l, except
// that a connection ended by the transport's own shutdown ("failed to
// decode incoming command" with raft.ErrTransportShutdown, logged at ERROR
// by raft on every stop and every upgrade's handover) is logged at DEBUG.
// Every other line is l's.
func TransportLogger(l hclog.Logger) hclog.Logger { return demoting{l, transportDemote} }

func transportDemote(msg string, args []any) hclog.Level {
	if msg == "failed to decode incoming command" && argIs(args, raft.ErrTransportShutdown) {
		return hclog.Debug
	}
	return hclog.Error
}

// RaftLogger is the logger to give raft itself (raft.Config.Logger): l,
// except that a leader's failure to reach a peer over the network (the
// peer is starting, joining, restarting or stopping: "failed to
// appendEntries to", "failed to heartbeat to", "failed to pipeline
// appendEntries", "failed to start pipeline replication to", "failed to
// send snapshot to", "failed to install snapshot", and a candidate's
// "failed to make requestVote RPC"), logged by raft at ERROR, is logged at
// WARN when its error is a connection that was refused, reset, closed or
// timed out. A peer that stays away keeps logging at WARN (raft backs off
// between attempts), and keel_raft_state, the peers' lag and raft's own
// replication metrics show it; any other error stays an ERROR.
func RaftLogger(l hclog.Logger) hclog.Logger { return demoting{l, raftDemote} }

// peerErrors are raft's ERROR messages about reaching one peer.
var peerErrors = map[string]bool{
	"failed to appendEntries to":              true,
	"failed to heartbeat to":                  true,
	"failed to pipeline appendEntries":        true,
	"failed to start pipeline replication to": true,
	"failed to send snapshot to":              true,
	"failed to install snapshot":              true,
	"failed to make requestVote RPC":          true,
}

func raftDemote(msg string, args []any) hclog.Level {
	if peerErrors[msg] && argMatches(args, isConnectionError) {
		return hclog.Warn
	}
	return hclog.Error
}

// isConnectionError reports whether err is a network connection that
// failed as connections do when the other end is not (yet, or no longer)
// there: refused, reset, a broken pipe, EOF, a time-out, or a closed
// transport. raft's msgpack codec wraps its read errors with %v, so the
// texts of those causes are matched too.
func isConnectionError(err error) bool {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed),
		errors.Is(err, raft.ErrTransportShutdown), errors.Is(err, raft.ErrPipelineShutdown):
		return true
	case errors.As(err, &ne) && ne.Timeout():
		return true
	}
	s := err.Error()
	for _, t := range []string{"connection refused", "connection reset by peer", "broken pipe", "i/o timeout", "use of closed network connection", ": EOF", "unexpected EOF"} {
		if strings.Contains(s, t) {
			return true
		}
	}
	return false
}

// demoting is a logger whose ERROR lines are logged at the level level
// decides; every logger derived from it (Named, With, ...) demotes alike.
type demoting struct {
	hclog.Logger
	level func(msg string, args []any) hclog.Level
}

func (d demoting) Error(msg string, args ...any) {
	d.Logger.Log(d.level(msg, args), msg, args...)
}

func (d demoting) Log(level hclog.Level, msg string, args ...any) {
	if level == hclog.Error {
		level = d.level(msg, args)
	}
	d.Logger.Log(level, msg, args...)
}

func (d demoting) With(args ...any) hclog.Logger { return demoting{d.Logger.With(args...), d.level} }
func (d demoting) Named(name string) hclog.Logger {
	return demoting{d.Logger.Named(name), d.level}
}
func (d demoting) ResetNamed(name string) hclog.Logger {
	return demoting{d.Logger.ResetNamed(name), d.level}
}

// argIs reports whether a value among hclog's key/value args is target.
func argIs(args []any, target error) bool {
	return argMatches(args, func(err error) bool { return errors.Is(err, target) })
}

// argMatches reports whether an error among hclog's key/value args
// satisfies f.
func argMatches(args []any, f func(error) bool) bool {
	for i := 1; i < len(args); i += 2 {
		if err, ok := args[i].(error); ok && f(err) {
			return true
		}
	}
	return false
}
