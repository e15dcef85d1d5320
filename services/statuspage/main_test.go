package statuspage_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine outlives them: the
// Sampler owns nothing but its own loop, and returns when stopped.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
