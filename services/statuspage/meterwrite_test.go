package statuspage

import (
	"testing"
	"time"
)

// TestMeterWrite: a write counted by hand (an apply-stream frame) counts
// as WriteHandler's do: one op, its bytes, its latency's bucket.
func TestMeterWrite(t *testing.T) {
	var m Meter
	m.Write(4096, 3*time.Millisecond)
	tt := m.Totals()
	if tt.Writes.Ops != 1 || tt.Writes.Bytes != 4096 || tt.Reads.Ops != 0 {
		t.Errorf("writes %d ops %d bytes, reads %d; want 1 write of 4096 bytes, no read", tt.Writes.Ops, tt.Writes.Bytes, tt.Reads.Ops)
	}
	if b := bucketOf(3 * time.Millisecond); tt.Writes.Latency[b] != 1 {
		t.Errorf("latency buckets %v, want the one write in bucket %d", tt.Writes.Latency, b)
	}
}
