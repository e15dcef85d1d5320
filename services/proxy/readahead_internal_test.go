package proxy

import "testing"

func TestReadAheadSequentialOnly(t *testing.T) {
	const k4 = 4 << 10
	var r readAhead
	// The first read of a stream is not known to be sequential.
	if got := r.plan(0, k4, true); got != k4 {
		t.Fatalf("first read: fetch to %d, want %d (no read-ahead)", got, k4)
	}
	// The next one is: it fetches a window ahead.
	if got, want := r.plan(k4, k4, true), uint64(2*k4+readAheadWindow); got != want {
		t.Fatalf("second sequential read: fetch to %d, want %d", got, want)
	}
	// The stream's following reads have enough fetched ahead...
	off := uint64(2 * k4)
	for ; off+k4+readAheadWindow/2 <= 2*k4+readAheadWindow; off += k4 {
		if got := r.plan(off, k4, true); got != off+k4 {
			t.Fatalf("read at %d with the window fetched: fetch to %d, want %d", off, got, off+k4)
		}
	}
	// ...until less than half a window is left: then the next window.
	if got, want := r.plan(off, k4, true), off+k4+readAheadWindow; got != want {
		t.Fatalf("read at %d near the window's end: fetch to %d, want %d", off, got, want)
	}

	// Random reads never fetch ahead, even one that lands on a stream's
	// neighbourhood without continuing it.
	var rr readAhead
	for i, off := range []uint64{900 * k4, 13 * k4, 500 * k4, 14*k4 + 512, 901*k4 + k4, 7 * k4} {
		if got := rr.plan(off, k4, true); got != off+k4 {
			t.Errorf("random read %d at %d: fetch to %d, want %d", i, off, got, off+k4)
		}
	}
	// Large sequential reads keep their own requests in flight: none.
	var lr readAhead
	for off := uint64(0); off < 8<<20; off += 1 << 20 {
		if got := lr.plan(off, 1<<20, true); got != off+1<<20 {
			t.Errorf("1 MiB sequential read at %d: fetch to %d, want no read-ahead", off, got)
		}
	}
	// A sequential read served from the cache fetches nothing, and the
	// stream goes on.
	var hr readAhead
	hr.plan(0, k4, true)
	if got := hr.plan(k4, k4, false); got != 2*k4 {
		t.Errorf("sequential hit: fetch to %d, want %d", got, 2*k4)
	}
	if got := hr.plan(2*k4, k4, true); got != 3*k4+readAheadWindow {
		t.Errorf("sequential miss after a hit: fetch to %d, want %d", got, 3*k4+readAheadWindow)
	}
	// Interleaved streams are told apart.
	var ir readAhead
	ir.plan(0, k4, true)
	ir.plan(1<<30, k4, true)
	if got := ir.plan(k4, k4, true); got != 2*k4+readAheadWindow {
		t.Errorf("stream 1 after stream 2 started: fetch to %d, want read-ahead", got)
	}
	if got := ir.plan(1<<30+k4, k4, true); got != 1<<30+2*k4+readAheadWindow {
		t.Errorf("stream 2: fetch to %d, want read-ahead", got)
	}
}
