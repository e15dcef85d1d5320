package replica_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine outlives them: every
// goroutine a Node or FSM starts must end by Close (or FSM.Stop).
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
