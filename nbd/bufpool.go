package nbd

import (
	"math/bits"
	"sync"
)

// Payload buffers come from pools by power-of-two size class, from 4 KiB up
// to the maximum payload, so the hot path allocates nothing.

const (
	minClassShift = 12 // 4 KiB
	maxClassShift = 25 // 32 MiB
)

var bufPools [maxClassShift - minClassShift + 1]sync.Pool

func sizeClass(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// getBuf returns a buffer of length n. Buffers above the largest class are
// allocated and never pooled.
func getBuf(n int) *[]byte {
	c := sizeClass(n)
	if c >= len(bufPools) {
		b := make([]byte, n)
		return &b
	}
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<(c+minClassShift))
	return &b
}

// putBuf returns a buffer from getBuf to its pool.
func putBuf(p *[]byte) {
	if p == nil {
		return
	}
	c := sizeClass(cap(*p))
	if c >= len(bufPools) || cap(*p) != 1<<(c+minClassShift) {
		return
	}
	bufPools[c].Put(p)
}
