package main

import (
	"fmt"
	"math/big"
	"strings"
)

// parseSize reads a size the way qemu-img does: a number of bytes, or a
// number with a binary suffix k, M, G, T, P or E (also written K, KiB, MB,
// GiB...). "1.5G" is allowed; the result must be a whole number of bytes
// that fits 64 bits. The arithmetic is exact.
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
	if !ok || num == "" || strings.Count(num, ".") > 1 || num == "." {
		return 0, fmt.Errorf("size %q: want a number of bytes, optionally with a suffix K, M, G, T, P or E", s)
	}
	v, ok := new(big.Rat).SetString(num)
	if !ok {
		return 0, fmt.Errorf("size %q: %q is not a number", s, num)
	}
	v.Mul(v, new(big.Rat).SetInt(new(big.Int).Lsh(big.NewInt(1), sh)))
	if !v.IsInt() {
		return 0, fmt.Errorf("size %q is not a whole number of bytes", s)
	}
	if !v.Num().IsUint64() {
		return 0, fmt.Errorf("size %q does not fit 64 bits", s)
	}
	return v.Num().Uint64(), nil
}

// parseVolumeSize reads --size: empty means 0 (use the existing image),
// anything else must be a positive multiple of 512 bytes.
func parseVolumeSize(s string) (uint64, error) {
	if s == "" {
		return 0, nil
	}
	size, err := parseSize(s)
	if err != nil {
		return 0, fmt.Errorf("--size: %w", err)
	}
	if size == 0 || size%512 != 0 {
		return 0, fmt.Errorf("--size %s: must be a positive multiple of 512 bytes", s)
	}
	return size, nil
}
