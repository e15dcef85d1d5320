package main

import (
	"strings"
	"testing"
	"time"
)

func TestPatternRoundTrip(t *testing.T) {
	for _, bs := range []int{512, 4096, 1 << 20} {
		b, scratch := make([]byte, bs), make([]byte, bs)
		if lo, hi, err := decodeBlock(b, 7, scratch); err != nil || lo != 0 || hi != 0 {
			t.Fatalf("bs %d: zeroes decode as %d..%d, %v; want 0..0", bs, lo, hi, err)
		}
		fillPattern(b, 42, 7)
		if lo, hi, err := decodeBlock(b, 7, scratch); err != nil || lo != 42 || hi != 42 {
			t.Fatalf("bs %d: write 42 decodes as %d..%d, %v", bs, lo, hi, err)
		}
	}
}

func TestPatternTornAndBad(t *testing.T) {
	const bs = 64 << 10
	old, cur, scratch := make([]byte, bs), make([]byte, bs), make([]byte, bs)
	fillPattern(old, 5, 3)
	fillPattern(cur, 9, 3)
	torn := append(append([]byte{}, cur[:3*pageSize]...), old[3*pageSize:]...)
	if lo, hi, err := decodeBlock(torn, 3, scratch); err != nil || lo != 5 || hi != 9 {
		t.Errorf("pages of writes 9 then 5 decode as %d..%d, %v; want 5..9", lo, hi, err)
	}
	half := append(append([]byte{}, cur[:pageSize]...), make([]byte, bs-pageSize)...)
	if lo, hi, err := decodeBlock(half, 3, scratch); err != nil || lo != 0 || hi != 9 {
		t.Errorf("a page of write 9 then zeroes decode as %d..%d, %v; want 0..9", lo, hi, err)
	}
	for name, tc := range map[string]struct {
		b    []byte
		blk  uint64
		want string
	}{
		"another block":     {cur, 4, "misplaced"},
		"a page moved":      {append(append([]byte{}, cur[pageSize:2*pageSize]...), cur[pageSize:]...), 3, "misplaced"},
		"a flipped byte":    {func() []byte { b := append([]byte{}, cur...); b[5*pageSize+100] ^= 1; return b }(), 3, "corrupt"},
		"torn inside page":  {append(append([]byte{}, cur[:100]...), old[100:]...), 3, "corrupt"},
		"garbage, no magic": {func() []byte { b := make([]byte, bs); b[9] = 1; return b }(), 3, "neither zeroes nor a pattern"},
	} {
		if _, _, err := decodeBlock(tc.b, tc.blk, scratch); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v; want one saying %q", name, err, tc.want)
		}
	}
}

func TestPercentiles(t *testing.T) {
	var ds []time.Duration
	for i := 1; i <= 100; i++ {
		ds = append(ds, time.Duration(i)*time.Millisecond)
	}
	if p := percentiles(ds); p.N != 100 || p.P50 != 50 || p.P99 != 99 || p.Max != 100 {
		t.Errorf("percentiles of 1..100 ms: %+v; want p50 50, p99 99, max 100", p)
	}
	if p := percentiles(ds[:3]); p.P50 != 2 || p.P99 != 3 || p.Max != 3 {
		t.Errorf("percentiles of 1..3 ms: %+v; want p50 2, p99 3, max 3", p)
	}
}
