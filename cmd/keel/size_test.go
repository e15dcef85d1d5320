package main

import (
	"errors"
	"strconv"
	"testing"
)

func TestParseSize(t *testing.T) {
	good := []struct {
		in   string
		want uint64
	}{
		{"512", 512},
		{"0", 0}, // parseSize reads it; serve refuses zero on its own
		{"1k", 1 << 10},
		{"1K", 1 << 10},
		{"1KiB", 1 << 10},
		{"1kb", 1 << 10},
		{"64M", 64 << 20},
		{"64MiB", 64 << 20},
		{"1G", 1 << 30},
		{"1.5G", 3 << 29},
		{"0.5k", 512},
		{"2T", 2 << 40},
		{"3P", 3 << 50},
		{"15E", 15 << 60},
		{" 10G ", 10 << 30},
		{"10 G", 10 << 30},
		{"4096b", 4096},
	}
	for _, c := range good {
		got, err := parseSize(c.in)
		if err != nil || got != c.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d, nil", c.in, got, err, c.want)
		}
	}

	bad := []struct {
		in string
		// want, when set, must be in the error's chain.
		want error
	}{
		{"", nil},
		{"   ", nil},
		{"abc", nil},
		{"G", nil},     // a suffix with no number
		{"1X", nil},    // unknown suffix
		{"1KB2", nil},  // trailing garbage
		{"1.3", nil},   // not a whole number of bytes
		{"0.3k", nil},  // 307.2 bytes
		{"-1", nil},    // negative
		{"1..5G", nil}, // two decimal points
		{"1e3", nil},   // no exponents (e is the exa suffix)
		{"16E", nil},   // 2^64: does not fit
		{"100E", nil},  // far too big
		{"1e400", nil}, // no exponents
	}
	for _, c := range bad {
		got, err := parseSize(c.in)
		if err == nil {
			t.Errorf("parseSize(%q) = %d, nil; want an error", c.in, got)
			continue
		}
		if c.want != nil && !errors.Is(err, c.want) {
			t.Errorf("parseSize(%q) error %v; want one wrapping %v", c.in, err, c.want)
		}
		if got != 0 {
			t.Errorf("parseSize(%q) returned %d with its error", c.in, got)
		}
	}
}

// A plain byte count is exact or refused, never rounded: float64 holds
// integers exactly only up to 2^53.
func TestParseSizeExactIntegers(t *testing.T) {
	for _, v := range []uint64{1<<53 + 1, 1<<62 + 512, 1<<64 - 1} {
		in := strconv.FormatUint(v, 10)
		got, err := parseSize(in)
		if err == nil && got != v {
			t.Errorf("parseSize(%q) = %d, nil; want %d or an error", in, got, v)
		}
	}
}
