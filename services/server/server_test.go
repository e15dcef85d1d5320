package server_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-msgpack/v2/codec"
	"github.com/hashicorp/raft"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/nbd/nbdtest"
	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/server/servertest"
	"github.com/keelstore/keel/services/wire"
)

func startOneNode(t *testing.T) *servertest.Node { return servertest.StartOne(t, 0) }

func nbdClient(t *testing.T, o *servertest.Node) *nbdtest.Client {
	t.Helper()
	c, err := net.Dial("tcp", o.NBD)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	cl := nbdtest.NewClient(c)
	if err := cl.Connect(nbdtest.Handshake{Export: "keel", Structured: true, BlockSize: true}); err != nil {
		t.Fatal(err)
	}
	return cl
}

func post(t *testing.T, url, ctype string, body []byte) (int, string) {
	t.Helper()
	resp, err := http.Post(url, ctype, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestVolumeWritesAndFencing(t *testing.T) {
	o := startOneNode(t)
	c := nbdClient(t, o)
	data := bytes.Repeat([]byte{0x5a}, 8192)
	res, err := c.Do(nbd.Request{Type: nbd.CmdWrite, Cookie: 1, Offset: 4096, Length: 8192}, data)
	if err != nil || res.Err != 0 {
		t.Fatalf("direct write with no writer holding the volume: %+v %v", res, err)
	}
	res, err = c.Do(nbd.Request{Type: nbd.CmdRead, Cookie: 2, Offset: 4096, Length: 8192}, nil)
	if err != nil || res.Err != 0 || !bytes.Equal(res.Data, data) {
		t.Fatalf("read back: %+v %v", res.Err, err)
	}
	// A write larger than one Raft entry holds is split and lands whole.
	big := make([]byte, 4<<20+4096)
	rand.Read(big)
	res, err = c.Do(nbd.Request{Type: nbd.CmdWrite, Cookie: 5, Offset: 1 << 20, Length: uint64(len(big))}, big)
	if err != nil || res.Err != 0 {
		t.Fatalf("4 MiB write: %v %v", res.Err, err)
	}
	res, err = c.Do(nbd.Request{Type: nbd.CmdRead, Cookie: 6, Offset: 1 << 20, Length: uint64(len(big))}, nil)
	if err != nil || res.Err != 0 || !bytes.Equal(res.Data, big) {
		t.Fatalf("4 MiB read back: %v %v", res.Err, err)
	}
	if got := o.Holder().Peek().FSM().Applies(); got < 6 {
		t.Errorf("the 4 MiB write took %d commands in all, want it split into 1 MiB entries", got)
	}

	// A writer claims the volume: direct writes are now refused with EPERM
	// and do not land; reads still work.
	n := o.Holder().Peek()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if r, err := n.Apply(ctx, &replica.Command{Kind: replica.KindClaim, Writer: "proxy"}); err != nil || r.Err != nil {
		t.Fatalf("claim: %+v %v", r, err)
	}
	res, err = c.Do(nbd.Request{Type: nbd.CmdWrite, Cookie: 3, Offset: 4096, Length: 4096}, make([]byte, 4096))
	if err != nil || res.Err != nbd.EPERM {
		t.Fatalf("direct write while a writer holds the volume: %v %v, want EPERM", res.Err, err)
	}
	res, err = c.Do(nbd.Request{Type: nbd.CmdRead, Cookie: 4, Offset: 4096, Length: 8192}, nil)
	if err != nil || res.Err != 0 || !bytes.Equal(res.Data, data) {
		t.Fatalf("the refused write changed the data, or reads failed: %v %v", res.Err, err)
	}
}

func TestAPIBadInput(t *testing.T) {
	o := startOneNode(t)
	base := "http://" + o.HTTP
	for _, tc := range []struct {
		name, path, ctype string
		body              []byte
		code              int
		want              string
	}{
		{"garbage command", "/v1/apply", "application/octet-stream", []byte{0xff, 1, 2}, 400, "malformed command"},
		{"empty command", "/v1/apply", "application/octet-stream", nil, 400, "malformed command"},
		{"truncated write", "/v1/apply", "application/octet-stream", []byte{1, 0, 0}, 400, "malformed command"},
		{"join with bad JSON", "/v1/cluster/join", "application/json", []byte("{not json"), 400, "bad request body"},
		{"join without addresses", "/v1/cluster/join", "application/json", []byte(`{"node":{"id":"n9"}}`), 400, "needs the node's id, raft and http"},
		{"join with unknown field", "/v1/cluster/join", "application/json", []byte(`{"nodes":1}`), 400, "unknown field"},
		{"remove without id", "/v1/cluster/remove", "application/json", []byte(`{}`), 400, "remove needs an id"},
		{"transfer to nobody", "/v1/cluster/transfer-leadership", "application/json", []byte(`{"id":"ghost"}`), 400, "no member"},
		{"digest with bad index", "/v1/verify/digest?min_index=abc", "", nil, 400, "min_index"},
	} {
		code, body := post(t, base+tc.path, tc.ctype, tc.body)
		if code != tc.code || !strings.Contains(body, tc.want) {
			t.Errorf("%s: %d %s; want %d containing %q", tc.name, code, body, tc.code, tc.want)
		}
	}
	// Still serving.
	var st wire.NodeStatus
	if err := wire.NewClient(5*time.Second, nil).Do(context.Background(), "GET", o.HTTP, "/v1/status", nil, &st); err != nil || st.State != "Leader" {
		t.Fatalf("status after bad input: %+v %v", st, err)
	}
}

// TestRaftPortGarbage: a hostile peer writing junk to the Raft port, or a
// request that claims more data than it sends, costs that connection only.
func TestRaftPortGarbage(t *testing.T) {
	o := startOneNode(t)
	for i := 0; i < 5; i++ {
		c, err := net.Dial("tcp", o.Raft)
		if err != nil {
			t.Fatal(err)
		}
		junk := make([]byte, 4096)
		rand.Read(junk)
		junk[0] = byte(i) // every RPC type byte, and then some
		c.Write(junk)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		io.Copy(io.Discard, c) // the node hangs up
		c.Close()
	}
	// A well-formed AppendEntries whose entry claims 4 GiB of data and then
	// ends: the decoder allocates a bounded buffer up front (the raft
	// patch's keelMaxInitLen), reads to the end and drops the connection.
	var msg bytes.Buffer
	marker := bytes.Repeat([]byte{0xa5}, 16)
	if err := codec.NewEncoder(&msg, &codec.MsgpackHandle{}).Encode(&raft.AppendEntriesRequest{
		Term: 1, Entries: []*raft.Log{{Index: 1, Term: 1, Type: raft.LogCommand, Data: marker}},
	}); err != nil {
		t.Fatal(err)
	}
	head := append([]byte{0xb0}, marker...) // raw (fixstr) of 16 bytes, as raft's encoder writes []byte
	i := bytes.Index(msg.Bytes(), head)
	if i < 0 {
		t.Fatalf("no marker in the encoded request % x", msg.Bytes())
	}
	lie := append([]byte{0 /* AppendEntries */}, msg.Bytes()[:i]...)
	lie = append(lie, 0xdb, 0xff, 0xff, 0xff, 0xf0) // raw32 of 4 GiB - 16
	lie = append(lie, marker...)
	for j := 0; j < 3; j++ {
		c, err := net.Dial("tcp", o.Raft)
		if err != nil {
			t.Fatal(err)
		}
		c.Write(lie)
		c.(*net.TCPConn).CloseWrite()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		io.Copy(io.Discard, c)
		c.Close()
	}
	cl := nbdClient(t, o)
	for i := uint64(0); i < 3; i++ {
		res, err := cl.Do(nbd.Request{Type: nbd.CmdWrite, Cookie: i, Offset: i * 4096, Length: 4096}, make([]byte, 4096))
		if err != nil || res.Err != 0 {
			t.Fatalf("write after raft-port garbage: %v %v", res.Err, err)
		}
	}
	if n := o.Holder().Peek(); n == nil || !n.IsLeader() {
		t.Fatal("node lost leadership after raft-port garbage")
	}
}

// POST /v1/apply applies within the caller's deadline, which wire.Client
// sends as Keel-Timeout-Ms; a malformed one is refused before anything is
// proposed.
func TestApplyCarriesDeadline(t *testing.T) {
	o := startOneNode(t)
	n := o.Holder().Peek()
	cmd := (&replica.Command{Kind: replica.KindWrite, Offset: 0, Data: []byte("deadline")}).Encode(nil)
	for _, h := range []string{"abc", "0", "-5"} {
		req, err := http.NewRequest(http.MethodPost, "http://"+o.HTTP+"/v1/apply", bytes.NewReader(cmd))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set(wire.TimeoutHeader, h)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(b), wire.TimeoutHeader) {
			t.Errorf("%s %q: %d %s, want 400 naming the header", wire.TimeoutHeader, h, resp.StatusCode, b)
		}
	}
	last := n.Raft().LastIndex()
	expired, cancelExpired := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancelExpired()
	if _, err := wire.NewClient(5*time.Second, nil).Apply(expired, o.HTTP, cmd); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("apply with an expired deadline: %v, want DeadlineExceeded", err)
	}
	if got := n.Raft().LastIndex(); got != last {
		t.Errorf("refused requests reached the log: last index %d, was %d", got, last)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := wire.NewClient(5*time.Second, nil).Apply(ctx, o.HTTP, cmd)
	if err != nil || r.Refused != wire.NotRefused || r.Index <= last {
		t.Fatalf("apply within a deadline: %+v %v", r, err)
	}
	got := make([]byte, 8)
	if err := n.Image().ReadAt(got, 0); err != nil || string(got) != "deadline" {
		t.Errorf("image holds %q (%v) after the apply", got, err)
	}
}

// The leader's status names a read index that replicas' applied indexes
// reach: raft's own entries (the term's no-op, the read barrier) count in
// last_log_index but are never applied by the state machine.
func TestStatusReadIndex(t *testing.T) {
	o := startOneNode(t)
	c := nbdClient(t, o)
	if res, err := c.Do(nbd.Request{Type: nbd.CmdWrite, Cookie: 1, Offset: 0, Length: 4096}, make([]byte, 4096)); err != nil || res.Err != 0 {
		t.Fatalf("write: %v %v", res.Err, err)
	}
	var st wire.NodeStatus
	for i := 0; i < 2; i++ { // the first commits the term's read barrier
		if err := wire.NewClient(5*time.Second, nil).Do(context.Background(), "GET", o.HTTP, "/v1/status", nil, &st); err != nil {
			t.Fatal(err)
		}
	}
	if st.ReadIndex == 0 || st.ReadIndex != st.AppliedIndex {
		t.Fatalf("status: read_index %d, applied_index %d; want the applied index of a leader after its barrier", st.ReadIndex, st.AppliedIndex)
	}
	if st.LastLogIndex <= st.ReadIndex {
		t.Errorf("last_log_index %d not above read_index %d: the barrier entry should be in the log, and never applied", st.LastLogIndex, st.ReadIndex)
	}
	if got := o.Holder().Peek().FSM().AppliedIndex(); got < st.ReadIndex {
		t.Errorf("applied %d < read index %d", got, st.ReadIndex)
	}
}
