package proxy

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/keelstore/keel/services/wire"
)

// TestApplyStreamsRetryLater: a server that refused the stream is written
// to by POST until streamRetry has passed (on the injected clock), then
// the stream is tried again and used once the server offers it; a stream
// the server ended is dialled again at the next write.
func TestApplyStreamsRetryLater(t *testing.T) {
	var refuse atomic.Bool
	refuse.Store(true)
	var posts atomic.Int32
	echo := func(_ context.Context, cmd []byte) wire.StreamAnswer {
		return wire.StreamAnswer{Response: wire.ApplyResponse{Index: uint64(len(cmd))}}
	}
	var ss atomic.Pointer[wire.StreamServer] // the server's current run
	ss.Store(&wire.StreamServer{Apply: echo})
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/apply", func(w http.ResponseWriter, r *http.Request) {
		posts.Add(1)
		wire.WriteJSON(w, http.StatusOK, wire.ApplyResponse{Index: uint64(r.ContentLength)})
	})
	mux.HandleFunc("POST "+wire.StreamPath, func(w http.ResponseWriter, r *http.Request) {
		if refuse.Load() {
			http.NotFound(w, r) // what a build without the route answers
			return
		}
		ss.Load().ServeHTTP(w, r)
	})
	hs := httptest.NewServer(mux)
	defer hs.Close()
	defer func() { ss.Load().Close() }()
	addr := strings.TrimPrefix(hs.URL, "http://")

	var mu sync.Mutex
	now := time.Unix(1000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); defer mu.Unlock(); now = now.Add(d) }
	a := newApplyStreams(wire.NewClient(0, nil), hclog.NewNullLogger(), clock)
	defer a.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	send := func(step string, wantStreamed bool) {
		t.Helper()
		r, streamed, err := a.apply(ctx, addr, &outgoing{enc: []byte("abc"), head: [][]byte{[]byte("ab"), []byte("c")}})
		if err != nil || r.Index != 3 || streamed != wantStreamed {
			t.Fatalf("%s: %+v streamed %v, %v; want index 3, streamed %v", step, r, streamed, err, wantStreamed)
		}
	}
	send("refused", false)
	refuse.Store(false) // the server was upgraded
	send("before the retry", false)
	advance(streamRetry - time.Second)
	send("just before the retry", false)
	if posts.Load() != 3 {
		t.Fatalf("%d POSTs, want 3", posts.Load())
	}
	advance(time.Second)
	send("after the retry", true)
	send("on the stream", true)
	old := ss.Swap(&wire.StreamServer{Apply: echo}) // the server restarts: the stream ends
	old.Close()
	// The write that finds the stream ended may fail (it is re-sent by
	// send); the next one dials a new stream.
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, streamed, err := a.apply(ctx, addr, &outgoing{enc: []byte("abc"), head: [][]byte{[]byte("abc")}})
		if err == nil && streamed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new stream after the server closed the old one: %v", err)
		}
	}
	if posts.Load() != 3 {
		t.Errorf("%d POSTs, want still 3", posts.Load())
	}
}
