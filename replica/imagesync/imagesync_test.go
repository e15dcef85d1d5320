package imagesync_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cespare/xxhash/v2"
	"github.com/hashicorp/go-hclog"

	"github.com/keelstore/keel/replica/imagesync"
	"github.com/keelstore/keel/replica/rawimage"
)

const (
	kib = 1 << 10
	mib = 1 << 20
)

// testLog routes hclog to t.Log.
func testLog(t *testing.T, name string) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: name, Output: tWriter{t}, Level: hclog.Debug})
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// newImage creates a sparse image of size bytes, closed when the test ends.
func newImage(t *testing.T, size uint64) *rawimage.File {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	img, err := rawimage.Open(path, rawimage.Options{Size: size})
	if err != nil {
		t.Fatalf("Open(%s, %d): %v", path, size, err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// random returns n random bytes (no 4 KiB block of them is all zero in
// practice) that depend on seed.
func random(n int, seed uint64) []byte {
	p := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16), 1})
	r.Read(p)
	return p
}

func write(t *testing.T, img *rawimage.File, p []byte, off uint64) {
	t.Helper()
	if err := img.WriteAt(p, off, false); err != nil {
		t.Fatalf("WriteAt(%d bytes at %d): %v", len(p), off, err)
	}
}

func contents(t *testing.T, img *rawimage.File) []byte {
	t.Helper()
	p := make([]byte, img.Size())
	if err := img.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	return p
}

// sameImage fails the test unless a and b hold the same bytes, naming the
// first 4 KiB block that differs.
func sameImage(t *testing.T, a, b *rawimage.File) {
	t.Helper()
	pa, pb := contents(t, a), contents(t, b)
	if len(pa) != len(pb) {
		t.Fatalf("images of %d and %d bytes", len(pa), len(pb))
	}
	for off := 0; off < len(pa); off += 4 * kib {
		end := min(off+4*kib, len(pa))
		if !bytes.Equal(pa[off:end], pb[off:end]) {
			t.Fatalf("images differ in the 4 KiB block at %d", off)
		}
	}
}

// allocated is how many bytes of the image's file are allocated on disk.
func allocated(t *testing.T, img *rawimage.File) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(img.Path(), &st); err != nil {
		t.Fatal(err)
	}
	return uint64(st.Blocks) * 512
}

// allHole reports whether Extents reports [off, off+length) as hole.
func allHole(t *testing.T, img *rawimage.File, off, length uint64) bool {
	t.Helper()
	for pos := off; pos < off+length; {
		ex, err := img.Extents(pos, off+length-pos)
		if err != nil {
			t.Fatal(err)
		}
		if len(ex) == 0 {
			t.Fatalf("Extents(%d, %d) returned nothing", pos, off+length-pos)
		}
		for _, e := range ex {
			if !e.Hole {
				return false
			}
			pos += e.Length
		}
	}
	return true
}

// testPeer serves an image over real HTTP on 127.0.0.1, mounted like the
// services package mounts it. hook, when set, sees every request first and
// may answer it itself (returning true) to simulate failures.
type testPeer struct {
	img    *rawimage.File
	srv    *httptest.Server
	url    string
	ranges atomic.Int64 // range requests seen
}

func startPeer(t *testing.T, img *rawimage.File, hook func(w http.ResponseWriter, r *http.Request) bool) *testPeer {
	t.Helper()
	p := &testPeer{img: img}
	h := http.StripPrefix("/v1/sync", imagesync.Handler(img, testLog(t, "source")))
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/range") {
			p.ranges.Add(1)
		}
		if hook != nil && hook(w, r) {
			return
		}
		h.ServeHTTP(w, r)
	})
	p.srv = httptest.NewServer(mux)
	t.Cleanup(p.srv.Close)
	p.url = p.srv.URL + "/v1/sync"
	return p
}

// hangUp drops the connection without an answer, like a process that died.
func hangUp(w http.ResponseWriter) {
	conn, _, err := w.(http.Hijacker).Hijack()
	if err == nil {
		conn.Close()
	}
}

func urls(peers ...*testPeer) []string {
	var out []string
	for _, p := range peers {
		out = append(out, p.url)
	}
	return out
}

// progressLog records Progress reports and checks they never go backwards.
type progressLog struct {
	mu      sync.Mutex
	reports []imagesync.Progress
}

func (l *progressLog) record(p imagesync.Progress) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.reports = append(l.reports, p)
}

func (l *progressLog) check(t *testing.T, st imagesync.Stats, wantErr bool) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.reports) == 0 {
		t.Fatal("no Progress report")
	}
	for i := 1; i < len(l.reports); i++ {
		a, b := l.reports[i-1], l.reports[i]
		if b.BytesCompared < a.BytesCompared || b.BytesMoved < a.BytesMoved || b.BytesZeroed < a.BytesZeroed {
			t.Errorf("progress went backwards: %+v then %+v", a, b)
		}
		if a.Done {
			t.Errorf("report %d of %d has Done set", i, len(l.reports))
		}
	}
	last := l.reports[len(l.reports)-1]
	if !last.Done || (last.Err != nil) != wantErr {
		t.Errorf("final report %+v: want Done, error %v", last, wantErr)
	}
	if last.BytesCompared != st.Compared || last.BytesMoved != st.Moved || last.BytesZeroed != st.Zeroed {
		t.Errorf("final report %+v disagrees with stats %+v", last, st)
	}
}

func TestHashesAndRangeWireFormat(t *testing.T) {
	const size = 3*mib + 1536 // the last chunk is short and not 4 KiB aligned
	img := newImage(t, size)
	want := make([]byte, size)
	put := func(p []byte, off int) {
		write(t, img, p, uint64(off))
		copy(want[off:], p)
	}
	put(random(4*kib, 1), 4*kib)                      // chunk 0: data, holes around it
	put(random(8*kib, 2), 700*kib)                    // chunk 0 again
	put(make([]byte, 64*kib), 2*mib)                  // chunk 2: allocated, but zero bytes
	put(random(1536, 3), 3*mib)                       // chunk 3: short, data
	if err := img.Trim(mib, mib, false); err != nil { // chunk 1: a hole
		t.Fatal(err)
	}
	p := startPeer(t, img, nil)

	resp, err := http.Get(fmt.Sprintf("%s/hashes?offset=0&length=%d&chunk=%d", p.url, size, mib))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("hashes: %s: %s", resp.Status, body)
	}
	if got := resp.Header.Get(imagesync.SizeHeader); got != fmt.Sprint(size) {
		t.Errorf("%s %q, want %d", imagesync.SizeHeader, got, size)
	}
	record := func(kind byte, sum uint64) []byte {
		return binary.BigEndian.AppendUint64([]byte{kind}, sum)
	}
	var wantBody []byte
	wantBody = append(wantBody, record(0, xxhash.Sum64(want[:mib]))...)
	wantBody = append(wantBody, record(1, 0)...)
	wantBody = append(wantBody, record(1, 0)...)
	wantBody = append(wantBody, record(0, xxhash.Sum64(want[3*mib:]))...)
	if !bytes.Equal(body, wantBody) {
		t.Errorf("hashes body\n got  %x\n want %x", body, wantBody)
	}

	// A window in the middle, with 4 KiB chunks.
	resp, err = http.Get(fmt.Sprintf("%s/hashes?offset=%d&length=%d&chunk=%d", p.url, 700*kib, 12*kib, 4*kib))
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	wantBody = nil
	wantBody = append(wantBody, record(0, xxhash.Sum64(want[700*kib:704*kib]))...)
	wantBody = append(wantBody, record(0, xxhash.Sum64(want[704*kib:708*kib]))...)
	wantBody = append(wantBody, record(1, 0)...)
	if !bytes.Equal(body, wantBody) {
		t.Errorf("hashes of 4 KiB chunks at 700 KiB\n got  %x\n want %x", body, wantBody)
	}

	for _, r := range [][2]int{{0, mib}, {3 * mib, 1536}, {696 * kib, 16 * kib}} {
		resp, err := http.Get(fmt.Sprintf("%s/range?offset=%d&length=%d", p.url, r[0], r[1]))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || resp.Header.Get(imagesync.SizeHeader) != fmt.Sprint(size) ||
			resp.Header.Get("Content-Type") != "application/octet-stream" {
			t.Errorf("range %v: %s, headers %v", r, resp.Status, resp.Header)
		}
		if !bytes.Equal(body, want[r[0]:r[0]+r[1]]) {
			t.Errorf("range %v: wrong bytes", r)
		}
	}
}

func TestHandlerRejectsBadRequests(t *testing.T) {
	const size = 8*mib + 512
	img := newImage(t, size)
	write(t, img, random(mib, 1), 0)
	p := startPeer(t, img, nil)
	for _, c := range []struct {
		query string
		code  int
		says  string
	}{
		{"hashes?offset=0&length=4096", 400, "missing chunk"},
		{"hashes?length=4096&chunk=4096", 400, "missing offset"},
		{"hashes?offset=-4096&length=4096&chunk=4096", 400, "offset"},
		{"hashes?offset=0&length=abc&chunk=4096", 400, "length"},
		{"hashes?offset=0&length=4096&chunk=0x1000", 400, "chunk"},
		{"hashes?offset=0&length=4096&chunk=99999999999999999999999", 400, "chunk"},
		{"hashes?offset=0&offset=4096&length=4096&chunk=4096", 400, "offset given 2 times"},
		{"hashes?offset=512&length=4096&chunk=4096", 400, "multiple of 4096"},
		{"hashes?offset=0&length=4096&chunk=512", 400, "chunk 512"},
		{"hashes?offset=0&length=4096&chunk=0", 400, "chunk 0"},
		{"hashes?offset=0&length=12288&chunk=8192", 400, "not a multiple of chunk"},
		{"hashes?offset=0&length=0&chunk=4096", 400, "length is 0"},
		{"hashes?offset=0&length=12582912&chunk=4096", 400, "outside the image"},
		{"hashes?offset=8392704&length=4096&chunk=4096", 400, "outside the image"},
		{"hashes?offset=18446744073709547520&length=8192&chunk=4096", 400, "outside the image"},
		{"hashes?offset=0&length=2147483648&chunk=4096", 400, "exceeds the limit"},
		{"hashes?offset=0&length=4096&chunk=134217728", 400, "exceeds the limit"},
		{"range?offset=0", 400, "missing length"},
		{"range?offset=1&length=4096", 400, "multiple of 4096"},
		{"range?offset=0&length=100", 400, "not a multiple of 4096"},
		{"range?offset=0&length=134217728", 400, "exceeds the limit"},
		{"range?offset=8388608&length=8192", 400, "outside the image"},
		{"range?offset=18446744073709547520&length=8192", 400, "outside the image"},
		{"range?offset=0&length=-1", 400, "length"},
		{"range?offset=0&length=", 400, "length"},
		{"snapshot", 404, "no such sync endpoint"},
		// The legitimate short tail at the image end.
		{"range?offset=8388608&length=512", 200, ""},
		{"hashes?offset=8388608&length=512&chunk=4096", 200, ""},
		{"hashes?offset=4194304&length=4194816&chunk=1048576", 200, ""},
	} {
		resp, err := http.Get(p.url + "/" + c.query)
		if err != nil {
			t.Fatalf("%s: %v", c.query, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != c.code || !strings.Contains(string(body), c.says) {
			t.Errorf("%s: %s %q, want %d saying %q", c.query, resp.Status, body, c.code, c.says)
		}
	}
	resp, err := http.Post(p.url+"/range?offset=0&length=4096", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST: %s, want 405", resp.Status)
	}
	// Still serving.
	resp, err = http.Get(p.url + "/range?offset=0&length=4096")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, random(mib, 1)[:4096]) {
		t.Errorf("after bad requests: %s, %d bytes", resp.Status, len(body))
	}
}

func TestIdenticalImagesMoveNothing(t *testing.T) {
	const size = 8 * mib
	data := random(3*mib, 7)
	var peers []*testPeer
	for range 2 {
		img := newImage(t, size)
		write(t, img, data, 2*mib)
		peers = append(peers, startPeer(t, img, nil))
	}
	local := newImage(t, size)
	write(t, local, data, 2*mib)
	var prog progressLog
	st, err := imagesync.Sync(context.Background(), imagesync.Config{
		Image: local, Peers: urls(peers...), ChunkSize: 256 * kib, SegmentSize: mib,
		Log: testLog(t, "sync"), Progress: prog.record,
	})
	if err != nil {
		t.Fatal(err)
	}
	if st.Moved != 0 || st.Zeroed != 0 || st.ChunksDiffering != 0 || st.Compared != size || st.Chunks != size/(256*kib) {
		t.Errorf("stats %+v: want nothing moved, %d bytes in %d chunks compared", st, size, size/(256*kib))
	}
	for _, p := range peers {
		if n := p.ranges.Load(); n != 0 {
			t.Errorf("peer %s served %d range requests, want 0", p.url, n)
		}
	}
	prog.check(t, st, false)
	sameImage(t, local, peers[0].img)
}

func TestOnlyDifferingChunksMove(t *testing.T) {
	const size, chunk = 16 * mib, 64 * kib
	base := random(size, 1)
	peerImg, local := newImage(t, size), newImage(t, size)
	write(t, peerImg, base, 0)
	write(t, local, base, 0)
	// Five 4 KiB writes touching three chunks.
	for i, off := range []uint64{100 * kib, 104 * kib, 120 * kib, 5*mib + 8*kib, 15*mib + 60*kib} {
		write(t, peerImg, random(4*kib, uint64(100+i)), off)
	}
	peer := startPeer(t, peerImg, nil)
	st, err := imagesync.Sync(context.Background(), imagesync.Config{
		Image: local, Peers: urls(peer), ChunkSize: chunk, SegmentSize: 2 * mib, Log: testLog(t, "sync"),
	})
	if err != nil {
		t.Fatal(err)
	}
	if st.Moved != 3*chunk || st.ChunksDiffering != 3 || st.Zeroed != 0 || st.PerPeer[peer.url] != 3*chunk {
		t.Errorf("stats %+v: want 3 differing chunks, %d bytes moved from %s", st, 3*chunk, peer.url)
	}
	sameImage(t, local, peerImg)
}

func TestPeerHolesBecomeLocalHoles(t *testing.T) {
	const size, chunk = 8 * mib, 256 * kib
	data := random(size, 3)
	peerImg, local := newImage(t, size), newImage(t, size)
	write(t, peerImg, data, 0)
	write(t, local, data, 0)
	// On the peer: two trimmed chunks, and one chunk overwritten with zero
	// bytes (allocated, but all zero: reported as zero too).
	if err := peerImg.Trim(mib, 2*chunk, false); err != nil {
		t.Fatal(err)
	}
	write(t, peerImg, make([]byte, chunk), 6*mib)
	peer := startPeer(t, peerImg, nil)
	st, err := imagesync.Sync(context.Background(), imagesync.Config{
		Image: local, Peers: urls(peer), ChunkSize: chunk, SegmentSize: mib, Log: testLog(t, "sync"),
	})
	if err != nil {
		t.Fatal(err)
	}
	if st.Moved != 0 || st.Zeroed != 3*chunk || st.ChunksDiffering != 3 {
		t.Errorf("stats %+v: want 0 moved, %d zeroed in 3 chunks", st, 3*chunk)
	}
	if n := peer.ranges.Load(); n != 0 {
		t.Errorf("%d range requests for zero chunks, want 0", n)
	}
	for _, off := range []uint64{mib, mib + chunk, 6 * mib} {
		if !allHole(t, local, off, chunk) {
			t.Errorf("local chunk at %d is not a hole", off)
		}
	}
	if allHole(t, local, 0, chunk) {
		t.Error("local chunk 0 became a hole")
	}
	sameImage(t, local, peerImg)
}

// barrier holds each of n peers' first request until all n have one, so
// every peer is sure to get a segment before any finishes.
type barrier struct {
	once  sync.Map // peer index -> *sync.Once
	wg    sync.WaitGroup
	ready chan struct{}
}

func newBarrier(n int) *barrier {
	b := &barrier{ready: make(chan struct{})}
	b.wg.Add(n)
	go func() { b.wg.Wait(); close(b.ready) }()
	return b
}

func (b *barrier) hook(i int) func(http.ResponseWriter, *http.Request) bool {
	return func(w http.ResponseWriter, r *http.Request) bool {
		o, _ := b.once.LoadOrStore(i, new(sync.Once))
		o.(*sync.Once).Do(b.wg.Done)
		select {
		case <-b.ready:
		case <-r.Context().Done():
		case <-time.After(10 * time.Second):
		}
		return false
	}
}

func TestNewSparseImageFromThreePeers(t *testing.T) {
	const size, chunk = 32 * mib, 64 * kib
	// Data everywhere but sparse: a 4 KiB write in most chunks, a few full
	// megabytes, and some chunks left empty.
	var writes [][2]uint64 // offset, length
	dataChunks := 0
	for c := uint64(0); c < size/chunk; c++ {
		if c%7 == 3 {
			continue
		}
		writes = append(writes, [2]uint64{c*chunk + (c%16)*4*kib, 4 * kib})
		dataChunks++
	}
	b := newBarrier(3)
	var peers []*testPeer
	for i := range 3 {
		img := newImage(t, size)
		for j, w := range writes {
			write(t, img, random(int(w[1]), uint64(j)), w[0])
		}
		peers = append(peers, startPeer(t, img, b.hook(i)))
	}
	local := newImage(t, size)
	st, err := imagesync.Sync(context.Background(), imagesync.Config{
		Image: local, Peers: urls(peers...), ChunkSize: chunk, SegmentSize: mib, PerPeer: 2,
		Log: testLog(t, "sync"),
	})
	if err != nil {
		t.Fatal(err)
	}
	sameImage(t, local, peers[0].img)
	if st.Moved != uint64(dataChunks)*chunk || st.ChunksDiffering != dataChunks || st.Zeroed != 0 {
		t.Errorf("stats %+v: want %d data chunks (%d bytes) moved, none zeroed", st, dataChunks, dataChunks*chunk)
	}
	var sum uint64
	for _, p := range peers {
		if st.PerPeer[p.url] == 0 {
			t.Errorf("peer %s served nothing: %v", p.url, st.PerPeer)
		}
		sum += st.PerPeer[p.url]
	}
	if sum != st.Moved {
		t.Errorf("per-peer bytes %v add up to %d, moved %d", st.PerPeer, sum, st.Moved)
	}
	// Fetched chunks were written sparsely: the copy allocates no more
	// than the original (plus a little filesystem metadata).
	if got, src := allocated(t, local), allocated(t, peers[0].img); got > src+64*kib {
		t.Errorf("local image allocates %d bytes, the peer's %d", got, src)
	}
}

func TestSparse64MiBWith4MiBDataMoves4MiB(t *testing.T) {
	const size = 64 * mib
	offsets := []uint64{3 * mib, 17 * mib, 40 * mib, 63 * mib}
	var peers []*testPeer
	for range 2 {
		img := newImage(t, size)
		for i, off := range offsets {
			write(t, img, random(mib, uint64(i)), off)
		}
		peers = append(peers, startPeer(t, img, nil))
	}
	local := newImage(t, size)
	var prog progressLog
	st, err := imagesync.Sync(context.Background(), imagesync.Config{
		Image: local, Peers: urls(peers...), SegmentSize: 8 * mib, // default 1 MiB chunks
		Log: testLog(t, "sync"), Progress: prog.record, ProgressInterval: time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	if st.Moved != 4*mib || st.Compared != size || st.Chunks != 64 || st.ChunksDiffering != 4 {
		t.Errorf("stats %+v: want 4 MiB moved in 4 of 64 chunks", st)
	}
	if got := allocated(t, local); got < 4*mib || got > 4*mib+64*kib {
		t.Errorf("local image allocates %d bytes, want about 4 MiB", got)
	}
	prog.check(t, st, false)
	sameImage(t, local, peers[0].img)
}

func TestPeerDiesMidSync(t *testing.T) {
	const size, chunk = 16 * mib, 64 * kib
	data := random(size, 9)
	imgs := []*rawimage.File{newImage(t, size), newImage(t, size)}
	for _, img := range imgs {
		write(t, img, data, 0)
	}
	var dying *testPeer
	dying = startPeer(t, imgs[0], func(w http.ResponseWriter, r *http.Request) bool {
		if dying.ranges.Load() > 3 {
			hangUp(w)
			return true
		}
		return false
	})
	healthy := startPeer(t, imgs[1], nil)
	// A peer that is not there at all: connection refused.
	gone := httptest.NewServer(http.NotFoundHandler())
	gone.Close()
	goneURL := gone.URL + "/v1/sync"

	local := newImage(t, size)
	var prog progressLog
	st, err := imagesync.Sync(context.Background(), imagesync.Config{
		Image: local, Peers: []string{dying.url, healthy.url, goneURL}, ChunkSize: chunk, SegmentSize: mib,
		RetryBackoff: time.Millisecond, Log: testLog(t, "sync"), Progress: prog.record,
	})
	if err != nil {
		t.Fatal(err)
	}
	sameImage(t, local, healthy.img)
	if st.Moved != size || st.PerPeer[goneURL] != 0 || st.PerPeer[dying.url] > 3*mib ||
		st.PerPeer[dying.url]+st.PerPeer[healthy.url] != size {
		t.Errorf("stats %+v: want %d bytes moved, at most 3 MiB from the dying peer, the rest from the healthy one", st, size)
	}
	if n := dying.ranges.Load(); n <= 3 {
		t.Errorf("the dying peer saw %d range requests; the test wants it to die mid-sync", n)
	}
	prog.check(t, st, false)
	if last := prog.reports[len(prog.reports)-1]; last.Peers != 1 {
		t.Errorf("final report has %d peers left, want 1 (two dropped)", last.Peers)
	}
}

// Peers that break off a range body half way, or answer hashes that do not
// follow the wire format, lose their segments to the healthy peer; what the
// short bodies delivered in whole chunks is kept, and not fetched again.
func TestShortBodiesAndBadHashesGoElsewhere(t *testing.T) {
	const size, chunk = 8 * mib, 64 * kib
	data := random(size, 21)
	imgs := []*rawimage.File{newImage(t, size), newImage(t, size), newImage(t, size)}
	for _, img := range imgs {
		write(t, img, data, 0)
	}
	short := startPeer(t, imgs[0], func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasSuffix(r.URL.Path, "/range") {
			return false
		}
		var off, length int
		fmt.Sscan(r.URL.Query().Get("offset"), &off)
		fmt.Sscan(r.URL.Query().Get("length"), &length)
		w.Header().Set("Content-Length", fmt.Sprint(length))
		w.Header().Set(imagesync.SizeHeader, fmt.Sprint(size))
		w.Write(data[off : off+length/2+100]) // then the connection drops
		return true
	})
	garbage := startPeer(t, imgs[1], func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasSuffix(r.URL.Path, "/hashes") {
			return false
		}
		var length int
		fmt.Sscan(r.URL.Query().Get("length"), &length)
		w.Header().Set(imagesync.SizeHeader, fmt.Sprint(size))
		w.Write(bytes.Repeat([]byte{7}, length/chunk*9)) // kind 7 does not exist
		return true
	})
	healthy := startPeer(t, imgs[2], nil)
	local := newImage(t, size)
	st, err := imagesync.Sync(context.Background(), imagesync.Config{
		Image: local, Peers: urls(short, garbage, healthy), ChunkSize: chunk, SegmentSize: mib,
		RetryBackoff: time.Millisecond, Log: testLog(t, "sync"),
	})
	if err != nil {
		t.Fatal(err)
	}
	sameImage(t, local, healthy.img)
	if st.Moved != size || st.PerPeer[garbage.url] != 0 || st.PerPeer[short.url]+st.PerPeer[healthy.url] != size {
		t.Errorf("stats %+v: want %d bytes moved, each exactly once, none from the garbage peer", st, size)
	}
	if short.ranges.Load() == 0 {
		t.Error("the short-body peer was never asked for a range")
	}
}

func TestAllPeersDeadThenResume(t *testing.T) {
	const size, chunk = 16 * mib, 64 * kib
	data := random(size, 11)
	var dead atomic.Bool
	var served atomic.Int64
	failing := func(w http.ResponseWriter, r *http.Request) bool {
		if strings.HasSuffix(r.URL.Path, "/range") && served.Add(1) > 5 {
			dead.Store(true)
		}
		if dead.Load() {
			http.Error(w, "going down", http.StatusServiceUnavailable)
			return true
		}
		return false
	}
	var peers []*testPeer
	for range 2 {
		img := newImage(t, size)
		write(t, img, data, 0)
		peers = append(peers, startPeer(t, img, failing))
	}
	local := newImage(t, size)
	cfg := imagesync.Config{
		Image: local, Peers: urls(peers...), ChunkSize: chunk, SegmentSize: mib,
		RetryBackoff: time.Millisecond, Log: testLog(t, "sync"),
	}
	st1, err := imagesync.Sync(context.Background(), cfg)
	if !errors.Is(err, imagesync.ErrNoPeers) || !strings.Contains(err.Error(), "503") {
		t.Fatalf("Sync with every peer failing: %v, want ErrNoPeers naming the 503", err)
	}
	t.Logf("first run: %v; stats %+v", err, st1)
	if st1.Moved == 0 || st1.Moved >= size {
		t.Fatalf("first run moved %d bytes; the test wants it to fail part way", st1.Moved)
	}

	// The peers come back; the second run moves only the rest.
	served.Store(-1 << 40)
	dead.Store(false)
	st2, err := imagesync.Sync(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if st1.Moved+st2.Moved != size {
		t.Errorf("moved %d + %d bytes in two runs, want %d in all (one copy)", st1.Moved, st2.Moved, size)
	}
	sameImage(t, local, peers[0].img)
}

// A segment that fails on the only peer every time does not loop forever:
// the sync ends with ErrNoPeers after MaxPeerFailures tries, having copied
// everything else, though the peer's other answers keep it from being
// dropped.
func TestSegmentFailingEverywhereEnds(t *testing.T) {
	const size, chunk = 8 * mib, 64 * kib
	img := newImage(t, size)
	write(t, img, random(size, 5), 0)
	peer := startPeer(t, img, func(w http.ResponseWriter, r *http.Request) bool {
		if strings.HasSuffix(r.URL.Path, "/hashes") && r.URL.Query().Get("offset") == fmt.Sprint(3*mib) {
			http.Error(w, "bad sector", http.StatusInternalServerError)
			return true
		}
		return false
	})
	local := newImage(t, size)
	st, err := imagesync.Sync(context.Background(), imagesync.Config{
		Image: local, Peers: urls(peer), ChunkSize: chunk, SegmentSize: mib, PerPeer: 1,
		RetryBackoff: time.Millisecond, MaxPeerFailures: 2, Log: testLog(t, "sync"),
	})
	if !errors.Is(err, imagesync.ErrNoPeers) || !strings.Contains(err.Error(), "1 segments (1048576 bytes)") {
		t.Fatalf("Sync: %v, want ErrNoPeers with one segment left", err)
	}
	if st.Moved != size-mib || st.Compared != size-mib {
		t.Errorf("stats %+v: want everything but one segment copied", st)
	}
}

func TestCancelReturnsPromptly(t *testing.T) {
	const size = 16 * mib
	img := newImage(t, size)
	write(t, img, random(size, 13), 0)
	release := make(chan struct{})
	stuck := make(chan struct{}, 1)
	peer := startPeer(t, img, func(w http.ResponseWriter, r *http.Request) bool {
		if strings.HasSuffix(r.URL.Path, "/range") {
			select {
			case stuck <- struct{}{}:
			default:
			}
			select {
			case <-r.Context().Done():
			case <-release:
			}
			return true
		}
		return false
	})
	// Registered after the server's cleanup, so it runs before the server
	// closes (which waits for its handlers).
	t.Cleanup(func() { close(release) })
	local := newImage(t, size)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var prog progressLog
	type result struct {
		st  imagesync.Stats
		err error
	}
	done := make(chan result, 1)
	go func() {
		st, err := imagesync.Sync(ctx, imagesync.Config{
			Image: local, Peers: urls(peer), SegmentSize: 2 * mib, Log: testLog(t, "sync"), Progress: prog.record,
		})
		done <- result{st, err}
	}()
	select {
	case <-stuck:
	case <-time.After(10 * time.Second):
		t.Fatal("no range request within 10s")
	}
	cancel()
	select {
	case r := <-done:
		if !errors.Is(r.err, context.Canceled) {
			t.Errorf("Sync after cancel: %v, want context.Canceled", r.err)
		}
		prog.check(t, r.st, true)
	case <-time.After(5 * time.Second):
		t.Fatal("Sync still running 5s after its context was cancelled")
	}
}

func TestSizeMismatchFails(t *testing.T) {
	peerImg := newImage(t, 8*mib)
	write(t, peerImg, random(mib, 1), 0)
	peer := startPeer(t, peerImg, nil)
	local := newImage(t, 4*mib)
	_, err := imagesync.Sync(context.Background(), imagesync.Config{
		Image: local, Peers: urls(peer), Log: testLog(t, "sync"),
	})
	if !errors.Is(err, imagesync.ErrSizeMismatch) || !strings.Contains(err.Error(), "8388608") ||
		!strings.Contains(err.Error(), "4194304") {
		t.Fatalf("Sync from a peer of another size: %v, want ErrSizeMismatch naming both sizes", err)
	}
	if !allHole(t, local, 0, 4*mib) {
		t.Error("the local image was written to")
	}
}

func TestConfigValidate(t *testing.T) {
	img := newImage(t, mib)
	good := imagesync.Config{Image: img, Peers: []string{"http://127.0.0.1:1/v1/sync"}}
	if err := good.Validate(); err != nil {
		t.Fatalf("Validate(%+v): %v", good, err)
	}
	for _, c := range []struct {
		edit func(*imagesync.Config)
		says string
	}{
		{func(c *imagesync.Config) { c.Image = nil }, "Config.Image"},
		{func(c *imagesync.Config) { c.Peers = nil }, "Config.Peers"},
		{func(c *imagesync.Config) { c.Peers = []string{"127.0.0.1:7001"} }, "Config.Peers[0]"},
		{func(c *imagesync.Config) { c.Peers = append(c.Peers, c.Peers[0]+"/") }, "listed twice"},
		{func(c *imagesync.Config) { c.ChunkSize = 1000 }, "Config.ChunkSize"},
		{func(c *imagesync.Config) { c.ChunkSize = 128 * mib }, "Config.ChunkSize"},
		{func(c *imagesync.Config) { c.ChunkSize, c.SegmentSize = 8*kib, 12*kib }, "Config.SegmentSize"},
		{func(c *imagesync.Config) { c.SegmentSize = 2 << 30 }, "Config.SegmentSize"},
		{func(c *imagesync.Config) { c.PerPeer = -1 }, "Config.PerPeer"},
		{func(c *imagesync.Config) { c.PerPeer = 1000 }, "Config.PerPeer"},
		{func(c *imagesync.Config) { c.MaxPeerFailures = -1 }, "Config.MaxPeerFailures"},
	} {
		cfg := good
		cfg.Peers = append([]string(nil), good.Peers...)
		c.edit(&cfg)
		err := cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), c.says) {
			t.Errorf("Validate: %v, want an error naming %s", err, c.says)
		}
		if _, serr := imagesync.Sync(context.Background(), cfg); serr == nil {
			t.Errorf("Sync with a config that fails Validate (%v) succeeded", err)
		}
	}
}
