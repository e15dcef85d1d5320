package keeltest

import (
	"fmt"
	"strings"
)

// CrashLines returns the lines of out that show a Go panic ("panic:"), a
// fatal runtime error ("fatal error:") or a report of the race detector
// ("DATA RACE").
func CrashLines(out string) []string {
	var bad []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "panic:") || strings.HasPrefix(l, "fatal error:") || strings.Contains(l, "DATA RACE") {
			bad = append(bad, l)
		}
	}
	return bad
}

func scanErr(name, out string) error {
	bad := CrashLines(out)
	if len(bad) == 0 {
		return nil
	}
	return fmt.Errorf("%s: %w:\n%s", name, ErrCrash, strings.Join(bad, "\n"))
}

// lastBytes is the end of s, at most n bytes, saying what it left out.
func lastBytes(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return fmt.Sprintf("(first %d bytes left out)\n%s", len(s)-n, s[len(s)-n:])
}
