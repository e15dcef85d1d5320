package nbd

import (
	"bytes"
	"errors"
	"testing"
)

// TestGather: small buffers go out together, up to gatherMax bytes a
// write, big ones on their own, and the bytes arrive in order.
func TestGather(t *testing.T) {
	fill := func(n int, c byte) []byte { return bytes.Repeat([]byte{c}, n) }
	for _, tc := range []struct {
		name   string
		bufs   [][]byte
		writes []int // the length of each write
	}{
		{"headers and small payloads", [][]byte{fill(16, 1), fill(4096, 2), fill(16, 3), fill(4096, 4)}, []int{16 + 4096 + 16 + 4096}},
		{"one header", [][]byte{fill(16, 1)}, []int{16}},
		{"a big payload between headers", [][]byte{fill(16, 1), fill(1<<20, 2), fill(16, 3)}, []int{16, 1 << 20, 16}},
		{"runs split at the bound", [][]byte{fill(200<<10, 1), fill(100<<10, 2), fill(16, 3)}, []int{200 << 10, 100<<10 + 16}},
		{"exactly the bound", [][]byte{fill(gatherMax, 1), fill(8, 2)}, []int{gatherMax, 8}},
		{"nothing", nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []int
			var out bytes.Buffer
			var scratch []byte
			n, err := gather(tc.bufs, &scratch, func(b []byte) (int, error) {
				got = append(got, len(b))
				return out.Write(b)
			})
			if err != nil {
				t.Fatal(err)
			}
			if want := bytes.Join(tc.bufs, nil); !bytes.Equal(out.Bytes(), want) || n != int64(len(want)) {
				t.Fatalf("wrote %d bytes (n=%d), want %d in order", out.Len(), n, len(want))
			}
			if len(got) != len(tc.writes) {
				t.Fatalf("writes %v, want %v", got, tc.writes)
			}
			for i := range got {
				if got[i] != tc.writes[i] {
					t.Fatalf("writes %v, want %v", got, tc.writes)
				}
			}
			if cap(scratch) > 2*gatherMax {
				t.Fatalf("scratch kept %d bytes, more than %d", cap(scratch), 2*gatherMax)
			}
		})
	}
	// A failed write stops there and says how much went out.
	boom := errors.New("boom")
	n, err := gather([][]byte{fill(16, 1), fill(1<<20, 2), fill(16, 3)}, new([]byte), func(b []byte) (int, error) {
		if len(b) > 16 {
			return 100, boom
		}
		return len(b), nil
	})
	if !errors.Is(err, boom) || n != 116 {
		t.Fatalf("gather after a failed write: n=%d err=%v, want 116, boom", n, err)
	}
}
