package proxy

import "sync"

// readAheadWindow is how far past a small sequential read the proxy
// fetches into its cache. Reads of the window or more get no read-ahead:
// a reader that asks for that much at a time keeps its own requests in
// flight, and fetching ahead of them would only fetch twice.
const readAheadWindow = 128 << 10

// readAhead tells sequential reads from random ones. It remembers the
// last few streams (where each stream's next read would start, and how
// far ahead of it was fetched); a read that starts where a stream left
// off is sequential and may fetch ahead, any other read starts a stream
// of its own and fetches only what it asked for.
type readAhead struct {
	mu      sync.Mutex // guards the following
	streams [8]stream
	rr      int // the stream a new one replaces
}

type stream struct {
	used  bool
	next  uint64 // where the stream's next read would start
	until uint64 // fetched (or being fetched) ahead up to here
}

// plan records the read [off, off+n) and returns where its fetch should
// end: off+n, or further for a small sequential read that misses at its
// end (miss) and whose stream has less than half a window fetched ahead.
func (r *readAhead) plan(off, n uint64, miss bool) uint64 {
	end := off + n
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := range r.streams {
		s := &r.streams[i]
		if !s.used || s.next != off {
			continue
		}
		s.next = end
		if !miss || n >= readAheadWindow || s.until >= end+readAheadWindow/2 {
			return end
		}
		s.until = end + readAheadWindow
		return s.until
	}
	r.streams[r.rr] = stream{used: true, next: end, until: end}
	r.rr = (r.rr + 1) % len(r.streams)
	return end
}
