package wire

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// streamServer serves a StreamServer with apply on an httptest server and
// returns its address; the test's end closes both.
func streamServer(t *testing.T, apply StreamApplier) (*StreamServer, string) {
	t.Helper()
	ss := &StreamServer{Apply: apply, Level: Level}
	mux := http.NewServeMux()
	mux.Handle("POST "+StreamPath, ss)
	hs := httptest.NewServer(mux)
	t.Cleanup(func() { ss.Close(); hs.Close() })
	return ss, strings.TrimPrefix(hs.URL, "http://")
}

// echoIndex answers each command with its first 8 bytes as the index.
func echoIndex(_ context.Context, cmd []byte) StreamAnswer {
	var b [8]byte
	copy(b[:], cmd)
	return StreamAnswer{Response: ApplyResponse{Index: binary.BigEndian.Uint64(b[:])}}
}

func cmdFor(i uint64) []byte { return binary.BigEndian.AppendUint64(nil, i) }

// TestStreamOutOfOrder: the server answers the second request before the
// first; each call still gets its own answer.
func TestStreamOutOfOrder(t *testing.T) {
	second := make(chan struct{})
	_, addr := streamServer(t, func(ctx context.Context, cmd []byte) StreamAnswer {
		if cmd[7] == 1 {
			select { // the first waits until the second was answered
			case <-second:
			case <-ctx.Done():
				return StreamAnswer{Status: StreamFailed, Response: ApplyResponse{Error: "waited in vain"}}
			}
		}
		return echoIndex(ctx, cmd)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := NewClient(0, nil).DialStream(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	first := make(chan error, 1)
	go func() {
		r, err := s.Apply(ctx, cmdFor(1))
		if err == nil && r.Index != 1 {
			err = errors.New("first request got another's answer")
		}
		first <- err
	}()
	r, err := s.Apply(ctx, cmdFor(2))
	if err != nil || r.Index != 2 {
		t.Fatalf("second request: %+v, %v", r, err)
	}
	close(second)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	// Many at once, all answered.
	var wg sync.WaitGroup
	for i := uint64(10); i < 200; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if r, err := s.Apply(ctx, cmdFor(i)); err != nil || r.Index != i {
				t.Errorf("request %d: %+v, %v", i, r, err)
			}
		}()
	}
	wg.Wait()
}

// TestStreamDeadlineTravels: the server applies within the caller's
// deadline, which the frame carries.
func TestStreamDeadlineTravels(t *testing.T) {
	got := make(chan time.Duration, 1)
	_, addr := streamServer(t, func(ctx context.Context, cmd []byte) StreamAnswer {
		d, ok := ctx.Deadline()
		if !ok {
			got <- -1
		} else {
			got <- time.Until(d)
		}
		return echoIndex(ctx, cmd)
	})
	s, err := NewClient(0, nil).DialStream(context.Background(), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if _, err := s.Apply(ctx, cmdFor(1)); err != nil {
		t.Fatal(err)
	}
	if d := <-got; d <= 0 || d > 3*time.Second {
		t.Errorf("the server's deadline is %v away, want within the caller's 3s", d)
	}
}

// TestStreamUnsupported: a server without the route (an older build)
// answers the upgrade 404: ErrStreamUnsupported.
func TestStreamUnsupported(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/apply", func(w http.ResponseWriter, r *http.Request) {})
	hs := httptest.NewServer(mux)
	defer hs.Close()
	_, err := NewClient(0, nil).DialStream(context.Background(), hs.URL)
	if !errors.Is(err, ErrStreamUnsupported) || !strings.Contains(err.Error(), "404") {
		t.Fatalf("DialStream to a server without the stream: %v, want ErrStreamUnsupported (404)", err)
	}
}

// rawStream opens an upgraded connection by hand, for sending garbage.
func rawStream(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_, _ = io.WriteString(c, "POST "+StreamPath+" HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: "+StreamProtocol+"\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	return c, br
}

// TestStreamGarbage: a bad frame gets a connection-level answer (tag 0)
// saying why and closes that connection only; a stream beside it goes on.
func TestStreamGarbage(t *testing.T) {
	_, addr := streamServer(t, echoIndex)
	good, err := NewClient(0, nil).DialStream(context.Background(), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer good.Close()
	for name, frame := range map[string][]byte{
		"magic":     []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
		"too big":   AppendFrameHeader(nil, FrameHeader{Kind: FrameRequest, Tag: 1, Length: 16 << 20}),
		"an answer": AppendAnswer(nil, 5, StreamAnswer{}),
	} {
		c, br := rawStream(t, addr)
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(frame); err != nil {
			t.Fatal(err)
		}
		var hdr [FrameHeaderSize]byte
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			t.Fatalf("%s: no answer: %v", name, err)
		}
		h, err := ParseFrameHeader(hdr[:])
		if err != nil || h.Tag != 0 {
			t.Fatalf("%s: answer header %+v %v, want tag 0", name, h, err)
		}
		body := make([]byte, h.Length)
		if _, err := io.ReadFull(br, body); err != nil {
			t.Fatal(err)
		}
		a, err := ParseAnswer(body)
		if err != nil || a.Status != StreamFailed || !strings.Contains(a.Response.Error, "bad apply-stream frame") {
			t.Errorf("%s: answer %+v %v, want a failure naming the bad frame", name, a, err)
		}
		if _, err := br.ReadByte(); err != io.EOF {
			t.Errorf("%s: the connection was not closed after the answer: %v", name, err)
		}
		if r, err := good.Apply(context.Background(), cmdFor(9)); err != nil || r.Index != 9 {
			t.Fatalf("%s: the other stream: %+v %v", name, r, err)
		}
	}
}

// TestStreamCloseDrains: Close answers the requests already read, then
// closes the connection; the client sees the stream end and later calls
// fail with ErrStreamClosed.
func TestStreamCloseDrains(t *testing.T) {
	started, release := make(chan struct{}), make(chan struct{})
	ss, addr := streamServer(t, func(ctx context.Context, cmd []byte) StreamAnswer {
		close(started)
		<-release
		return echoIndex(ctx, cmd)
	})
	s, err := NewClient(0, nil).DialStream(context.Background(), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	answered := make(chan error, 1)
	go func() {
		r, err := s.Apply(context.Background(), cmdFor(3))
		if err == nil && r.Index != 3 {
			err = errors.New("wrong answer")
		}
		answered <- err
	}()
	<-started
	closed := make(chan struct{})
	go func() { defer close(closed); ss.Close() }()
	close(release)
	if err := <-answered; err != nil {
		t.Fatalf("the request in flight at Close: %v, want its answer", err)
	}
	<-closed
	<-s.Done()
	if _, err := s.Apply(context.Background(), cmdFor(4)); !errors.Is(err, ErrStreamClosed) {
		t.Fatalf("Apply after the server closed: %v, want ErrStreamClosed", err)
	}
	if _, err := NewClient(0, nil).DialStream(context.Background(), addr); err == nil {
		t.Fatal("a closed StreamServer took a new upgrade")
	}
}

// TestStreamTLS: over an https API the stream is upgraded from the TLS
// connection, with the client transport's TLS configuration.
func TestStreamTLS(t *testing.T) {
	ss := &StreamServer{Apply: echoIndex, Level: Level}
	mux := http.NewServeMux()
	mux.Handle("POST "+StreamPath, ss)
	hs := httptest.NewUnstartedServer(mux)
	hs.EnableHTTP2 = true // the client must still get HTTP/1.1 for the upgrade
	hs.StartTLS()
	defer hs.Close()
	defer ss.Close()
	c := &Client{HTTP: hs.Client()}
	s, err := c.DialStream(context.Background(), hs.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if r, err := s.Apply(context.Background(), cmdFor(5)); err != nil || r.Index != 5 {
		t.Fatalf("over TLS: %+v, %v", r, err)
	}
	if _, err := NewClient(0, nil).DialStream(context.Background(), hs.URL); err == nil {
		t.Fatal("a client that does not trust the server's certificate got a stream")
	}
}

// gateConn holds its first Write until release is closed.
type gateConn struct {
	net.Conn
	once    sync.Once
	entered chan struct{}
	release chan struct{}
}

func (c *gateConn) Write(b []byte) (int, error) {
	c.once.Do(func() { close(c.entered); <-c.release })
	return c.Conn.Write(b)
}

// TestStreamCoalescesFrames: requests made while another is being written
// queue up and go out together in the next write, and each still gets
// its own answer.
func TestStreamCoalescesFrames(t *testing.T) {
	_, addr := streamServer(t, echoIndex)
	gc := &gateConn{entered: make(chan struct{}), release: make(chan struct{})}
	c := NewClient(0, nil)
	c.HTTP.Transport.(*http.Transport).DialContext = func(ctx context.Context, network, a string) (net.Conn, error) {
		nc, err := (&net.Dialer{}).DialContext(ctx, network, a)
		if err != nil {
			return nil, err
		}
		gc.Conn = nc
		return gc, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The handshake's write goes through gateConn too: let it pass, then
	// hold the first frame's.
	gc.once.Do(func() {})
	s, err := c.DialStream(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	gc.once = sync.Once{}

	const queued = 10
	var wg sync.WaitGroup
	apply := func(i uint64) {
		defer wg.Done()
		if r, err := s.Apply(ctx, cmdFor(i)); err != nil || r.Index != i {
			t.Errorf("request %d: %+v, %v", i, r, err)
		}
	}
	wg.Add(1)
	go apply(1)
	select {
	case <-gc.entered:
	case <-ctx.Done():
		t.Fatal("the first frame's write never started")
	}
	for i := uint64(2); i < 2+queued; i++ {
		wg.Add(1)
		go apply(i)
	}
	for {
		s.wmu.Lock()
		n := len(s.wqueue)
		s.wmu.Unlock()
		if n == queued {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("%d frames queued behind the first, want %d", n, queued)
		}
		time.Sleep(time.Millisecond)
	}
	close(gc.release)
	wg.Wait()
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.batches != 2 {
		t.Errorf("%d writes for 1 + %d frames, want 2", s.batches, queued)
	}
}
