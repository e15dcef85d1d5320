package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"
)

// Off a terminal, keel verify prints a progress line at each interval
// while the digests run (none before they have begun), and stops when
// they are done.
func TestVerifyProgressLines(t *testing.T) {
	var out bytes.Buffer
	p := &verifyProgress{w: &out, every: time.Millisecond}
	digested := make(chan struct{})
	polls := 0
	p.watch(context.Background(), digested, func(context.Context) (uint64, uint64) {
		polls++
		switch {
		case polls == 1:
			return 0, 0 // the digests have not begun
		case polls < 4:
			return uint64(polls-1) << 30, 4 << 30
		}
		close(digested)
		return 4 << 30, 4 << 30
	})
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("%d progress lines, want 3 (none for the poll before the digests began):\n%s", len(lines), out.String())
	}
	for i, want := range []string{"1.0GiB of 4.0GiB", "2.0GiB of 4.0GiB", "4.0GiB of 4.0GiB"} {
		if !strings.HasPrefix(lines[i], "verifying: [") || !strings.Contains(lines[i], want) {
			t.Errorf("line %d %q, want %q", i, lines[i], want)
		}
	}
	if !strings.Contains(lines[1], " 50%") {
		t.Errorf("line %q: want 50%%", lines[1])
	}

	// On a terminal the line is rewritten in place and ended once.
	out.Reset()
	p = &verifyProgress{w: &out, tty: true}
	digested = make(chan struct{})
	polls = 0
	p.watch(context.Background(), digested, func(context.Context) (uint64, uint64) {
		polls++
		if polls == 2 {
			close(digested)
		}
		return 1 << 30, 2 << 30
	})
	if s := out.String(); strings.Count(s, "\r\x1b[K") < 1 || strings.Count(s, "\n") != 1 || !strings.HasSuffix(s, "\n") {
		t.Errorf("terminal output %q: want lines rewritten with \\r and one final newline", s)
	}
}
