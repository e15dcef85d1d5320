package main

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// parseSize reads a size the way qemu-img does: a number of bytes, or a
// number with a binary suffix k, M, G, T, P or E (also written K, KiB, MB,
// GiB...). "1.5G" is allowed; the result must be a whole number of bytes.
func parseSize(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, fmt.Errorf("size is empty")
	}
	i := 0
	for i < len(t) && (t[i] >= '0' && t[i] <= '9' || t[i] == '.') {
		i++
	}
	num, suffix := t[:i], strings.ToLower(strings.TrimSpace(t[i:]))
	suffix = strings.TrimSuffix(strings.TrimSuffix(suffix, "ib"), "b")
	shift := map[string]uint{"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
	sh, ok := shift[suffix]
	if !ok || num == "" {
		return 0, fmt.Errorf("size %q: want a number of bytes, optionally with a suffix K, M, G, T, P or E", s)
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	v := f * math.Pow(2, float64(sh))
	if v >= math.MaxUint64 || v != math.Trunc(v) {
		return 0, fmt.Errorf("size %q is not a whole number of bytes that fits 64 bits", s)
	}
	return uint64(v), nil
}
