package replica_test

import (
	"bytes"
	"errors"
	"strings"
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
