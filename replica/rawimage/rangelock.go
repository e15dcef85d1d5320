package rawimage

import "sync"

// The page cache does not make a read atomic with a write to the same
// range: on ext4 and tmpfs a 4 KiB pread racing a 4 KiB pwrite of the same
// page returns a mix of the two, old bytes and new (measured on this
// kernel: about one read in twenty on ext4 under a tight loop). A disk
// never tears a sector like that, and a guest or the proxy reading a block
// while a replica applies a write to it must get the block before or after
// the write. So every read takes the regions it covers shared and every
// change takes them exclusively, for the length of the system call.

const (
	// regionShift: the image is locked in regions of 64 KiB.
	regionShift = 16
	// stripes is how many locks the regions share (region number modulo
	// stripes). A request covering as many regions takes them all.
	stripes = 256
)

// rangeLock serialises changes against reads of overlapping regions.
type rangeLock struct {
	mu [stripes]sync.RWMutex
}

// span is the stripes a request covers, as a contiguous run of stripe
// numbers that may wrap (first..first+n-1 modulo stripes). Taking them in
// ascending order of stripe number keeps two requests from deadlocking.
type span struct{ first, n int }

func spanOf(off, length uint64) span {
	if length == 0 {
		length = 1
	}
	first := off >> regionShift
	last := (off + length - 1) >> regionShift
	n := last - first + 1
	if n >= stripes {
		return span{0, stripes}
	}
	return span{int(first % stripes), int(n)}
}

// each calls f on the span's stripes in ascending stripe order.
func (s span) each(f func(i int)) {
	if s.first+s.n <= stripes {
		for i := s.first; i < s.first+s.n; i++ {
			f(i)
		}
		return
	}
	// Wrapped: stripes 0..end, then first..stripes-1.
	end := s.first + s.n - stripes
	for i := 0; i < end; i++ {
		f(i)
	}
	for i := s.first; i < stripes; i++ {
		f(i)
	}
}

func (l *rangeLock) rlock(off, length uint64) span {
	s := spanOf(off, length)
	s.each(func(i int) { l.mu[i].RLock() })
	return s
}

func (l *rangeLock) runlock(s span) { s.each(func(i int) { l.mu[i].RUnlock() }) }

func (l *rangeLock) lock(off, length uint64) span {
	s := spanOf(off, length)
	s.each(func(i int) { l.mu[i].Lock() })
	return s
}

func (l *rangeLock) unlock(s span) { s.each(func(i int) { l.mu[i].Unlock() }) }
