package nbd

import (
	"context"
	"sync"
)

// testMem is a minimal in-memory Backend for the package's internal tests
// (nbdtest.Mem cannot be imported here without a cycle). Holes are tracked
// per 4 KiB block.
type testMem struct {
	mu    sync.Mutex
	data  []byte
	alloc []bool
}

func newTestMem(size uint64) *testMem {
	return &testMem{data: make([]byte, size), alloc: make([]bool, (size+4095)/4096)}
}

func (m *testMem) Size() uint64       { return uint64(len(m.data)) }
func (m *testMem) Capabilities() Caps { return CapsAll }
func (m *testMem) ReadAt(_ context.Context, p []byte, off uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(p, m.data[off:])
	return nil
}
func (m *testMem) WriteAt(_ context.Context, p []byte, off uint64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	for b := off / 4096; b*4096 < off+uint64(len(p)); b++ {
		m.alloc[b] = true
	}
	return nil
}
func (m *testMem) Flush(context.Context) error { return nil }
func (m *testMem) Trim(ctx context.Context, off, length uint64, _ bool) error {
	return m.Zero(ctx, off, length, 0)
}
func (m *testMem) Zero(_ context.Context, off, length uint64, _ ZeroFlags) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
	return nil
}
func (m *testMem) Cache(_ context.Context, off, length uint64) error { return nil }
func (m *testMem) Extents(_ context.Context, off, length uint64) ([]Extent, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Extent
	end := min(off+length, m.Size())
	for pos := off; pos < end; {
		b := pos / 4096
		next := min((b+1)*4096, end)
		var fl uint32
		if !m.alloc[b] {
			fl = StateHole | StateZero
		}
		out = pushExtent(out, Extent{Length: next - pos, Flags: fl})
		pos = next
	}
	return out, nil
}
