package replica_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	"github.com/keelstore/keel/replica"
)

func TestTransportLoggerQuietsOnlyItsOwnShutdown(t *testing.T) {
	var buf bytes.Buffer
	l := replica.TransportLogger(hclog.New(&hclog.LoggerOptions{Output: &buf, Level: hclog.Info}))
	l.Error("failed to decode incoming command", "error", raft.ErrTransportShutdown)
	if buf.Len() != 0 {
		t.Errorf("the transport's own shutdown was logged at ERROR: %s", buf.String())
	}
	l.Error("failed to decode incoming command", "error", errors.New("unexpected EOF"))
	l.Error("failed to accept connection", "error", raft.ErrTransportShutdown)
	if got := strings.Count(buf.String(), "[ERROR]"); got != 2 {
		t.Errorf("other errors: %d ERROR lines, want 2:\n%s", got, buf.String())
	}
}

// raft's errors about reaching a peer that is not there are warnings;
// the same messages with another cause, and other errors, stay errors;
// loggers derived from it demote alike.
func TestRaftLoggerDemotesPeerConnectionErrors(t *testing.T) {
	var buf bytes.Buffer
	l := replica.RaftLogger(hclog.New(&hclog.LoggerOptions{Output: &buf, Level: hclog.Info}))
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	l.Error("failed to appendEntries to", "peer", "n2", "error", refused)
	l.Error("failed to heartbeat to", "peer", "127.0.0.1:1", "backoff time", "10ms",
		"error", errors.New("msgpack decode error [pos 0]: read tcp 127.0.0.1:52306->127.0.0.1:23910: read: connection reset by peer"))
	l.Named("x").With("k", "v").Error("failed to make requestVote RPC", "target", "n3", "error", io.EOF)
	l.Log(hclog.Error, "failed to pipeline appendEntries", "error", raft.ErrPipelineShutdown)
	if got := strings.Count(buf.String(), "[WARN]"); got != 4 || strings.Contains(buf.String(), "[ERROR]") {
		t.Errorf("peer connection failures: %d WARN lines, want 4 and no ERROR:\n%s", got, buf.String())
	}
	buf.Reset()
	l.Error("failed to appendEntries to", "peer", "n2", "error", errors.New("disk full"))
	l.Error("failed to commit logs", "error", io.EOF)
	l.Named("x").Error("failed to heartbeat to", "error", errors.New("msgpack decode error [pos 3]: invalid"))
	if got := strings.Count(buf.String(), "[ERROR]"); got != 3 {
		t.Errorf("other errors: %d ERROR lines, want 3:\n%s", got, buf.String())
	}
}
