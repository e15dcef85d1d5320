package server_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/server/servertest"
	"github.com/keelstore/keel/services/wire"
)

// TestApplyStream: a server takes the apply stream on its API listener and
// commits what it carries as POST /v1/apply does (refusals as numbers);
// a connection that sends garbage is answered why and closed while
// another stream goes on; the server's stop closes the stream.
func TestApplyStream(t *testing.T) {
	var s *wire.Stream
	t.Cleanup(func() { // runs after the server's own cleanup has stopped it
		if s == nil {
			return
		}
		select {
		case <-s.Done():
		case <-time.After(10 * time.Second):
			t.Error("the server stopped and its apply stream is still open")
		}
		if !errors.Is(s.Err(), wire.ErrStreamClosed) {
			t.Errorf("the stream ended with %v, want ErrStreamClosed", s.Err())
		}
	})
	o := servertest.StartOne(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var err error
	if s, err = wire.NewClient(0, nil).DialStream(ctx, o.HTTP); err != nil {
		t.Fatal(err)
	}
	if s.Level() != wire.Level {
		t.Errorf("the server says level %d, want %d", s.Level(), wire.Level)
	}
	claim := replica.Command{Kind: replica.KindClaim, Writer: "w"}
	r, err := s.Apply(ctx, claim.EncodeCompat(nil))
	if err != nil || r.Refused != wire.NotRefused || r.Epoch == 0 {
		t.Fatalf("claim over the stream: %+v, %v", r, err)
	}
	epoch := r.Epoch
	w := replica.Command{Kind: replica.KindWrite, Epoch: epoch, ReqID: 1, AckedBelow: 1, Offset: 4096, Data: bytes.Repeat([]byte{7}, 4096)}
	if r, err = s.Apply(ctx, w.EncodeCompat(nil)); err != nil || r.Refused != wire.NotRefused || r.Duplicate {
		t.Fatalf("write: %+v, %v", r, err)
	}
	if r, err = s.Apply(ctx, w.EncodeCompat(nil)); err != nil || !r.Duplicate {
		t.Fatalf("the same request id again: %+v, %v; want a duplicate", r, err)
	}
	stale := w
	stale.Epoch, stale.ReqID = epoch-1, 2
	if r, err = s.Apply(ctx, stale.EncodeCompat(nil)); err != nil || r.Refused != wire.RefusedStaleEpoch {
		t.Fatalf("a stale epoch: %+v, %v; want RefusedStaleEpoch", r, err)
	}
	if r, err = s.Apply(ctx, []byte{0x63, 1, 2}); err != nil || r.Refused != wire.RefusedBadCommand {
		t.Fatalf("a malformed command: %+v, %v; want RefusedBadCommand", r, err)
	}
	nc, err := nbd.Dial(ctx, "tcp", o.NBD, nbd.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	got := make([]byte, 4096)
	if err := nc.ReadAt(ctx, got, 4096); err != nil || !bytes.Equal(got, w.Data) {
		t.Fatalf("the image holds %#x (%v)", got[0], err)
	}

	// Garbage on a second stream: answered, closed; the first goes on.
	c, err := net.Dial("tcp", o.HTTP)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = io.WriteString(c, "POST "+wire.StreamPath+" HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: "+wire.StreamProtocol+"\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v, %v", resp, err)
	}
	_, _ = c.Write(append(wire.AppendFrameHeader(nil, wire.FrameHeader{Kind: wire.FrameRequest, Tag: 1, Length: 64 << 20}), "junk"...))
	rest, _ := io.ReadAll(br) // the answer, then the end of the connection
	if len(rest) < wire.FrameHeaderSize || !strings.Contains(string(rest), "request of 67108864 bytes") {
		t.Fatalf("garbage answered %q, want a tag-0 answer naming the bad length", rest)
	}
	w.ReqID, w.Offset = 2, 8192
	if r, err = s.Apply(ctx, w.EncodeCompat(nil)); err != nil || r.Refused != wire.NotRefused {
		t.Fatalf("the first stream after another's garbage: %+v, %v", r, err)
	}
	if _, err := wire.NewClient(2*time.Second, nil).Status(ctx, o.HTTP); err != nil {
		t.Fatalf("the API after the garbage: %v", err)
	}
}
