package rawimage_test

import (
	"bytes"
	"sync"
	"sync/atomic"
	"testing"
)

// TestReadNeverTearsAWrite: reads of a block that writes, zeroes and trims
// keep changing see it whole, before or after each change. Without the
// range lock the page cache hands back a mix of old and new bytes (on ext4
// here, thousands of the reads below).
func TestReadNeverTearsAWrite(t *testing.T) {
	img, _ := openNew(t, 1<<20)
	const off, size = 8192 + 512, 4096 // straddles two pages
	a, b := bytes.Repeat([]byte{0xAA}, size), bytes.Repeat([]byte{0xBB}, size)
	// A larger write spanning the block and its neighbours, in another
	// region as well.
	wide := bytes.Repeat([]byte{0xCC}, 3<<16)
	zero := make([]byte, size)

	var stop atomic.Bool
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; !stop.Load(); i++ {
			var err error
			switch i % 5 {
			case 0:
				err = img.WriteAt(a, off, false)
			case 1:
				err = img.WriteAt(b, off, false)
			case 2:
				err = img.Zero(off, size, 0)
			case 3:
				err = img.WriteAt(wide, 0, false)
			case 4:
				err = img.Trim(0, 1<<20, false)
			}
			if err != nil {
				t.Error(err)
				return
			}
		}
	}()
	var torn atomic.Int64
	var readers sync.WaitGroup
	for r := 0; r < 2; r++ {
		readers.Add(1)
		go func() {
			defer readers.Done()
			p := make([]byte, size)
			for i := 0; i < 20000; i++ {
				if err := img.ReadAt(p, off); err != nil {
					t.Error(err)
					return
				}
				if !bytes.Equal(p, a) && !bytes.Equal(p, b) && !bytes.Equal(p, zero) && !bytes.Equal(p, wide[:size]) {
					torn.Add(1)
				}
			}
		}()
	}
	readers.Wait()
	stop.Store(true)
	wg.Wait()
	if n := torn.Load(); n > 0 {
		t.Fatalf("%d of 40000 reads returned a mix of two changes", n)
	}
}

// BenchmarkReadAt4K is 4 KiB reads in parallel over a 64 MiB image, the
// range lock's cost on the hot path (compare with the commit before it).
func BenchmarkReadAt4K(b *testing.B) {
	img, _ := openNew(b, 64<<20)
	if err := img.WriteAt(bytes.Repeat([]byte{1}, 1<<20), 0, false); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(4096)
	b.RunParallel(func(pb *testing.PB) {
		p := make([]byte, 4096)
		off := uint64(0)
		for pb.Next() {
			if err := img.ReadAt(p, off); err != nil {
				b.Error(err)
				return
			}
			off = (off + 4096) % (1 << 20)
		}
	})
}
