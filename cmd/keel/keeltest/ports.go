package keeltest

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"sync"
)

// Ports come from a range below Linux's ephemeral ports (which start at
// 32768), so that outgoing connections do not take them, handed out once
// per process in order from a random start, each checked free just before.
// Another process may still take one before keel binds it; the cluster
// helpers then start the process again on new ports.
const (
	portLow  = 20000
	portHigh = 32000
)

// ErrNoPort: no free port in the harness's range.
var ErrNoPort = errors.New("keeltest: no free TCP port on 127.0.0.1 in [20000, 32000)")

var (
	portMu   sync.Mutex // guards portNext
	portNext int
)

// FreePort returns a TCP port that nothing listens on on 127.0.0.1 now.
func FreePort() (int, error) {
	portMu.Lock()
	defer portMu.Unlock()
	if portNext == 0 {
		portNext = portLow + rand.IntN(10000)
	}
	for range 2000 {
		p := portNext
		if portNext++; portNext >= portHigh {
			portNext = portLow
		}
		if PortFree(p) {
			return p, nil
		}
	}
	return 0, ErrNoPort
}

// FreeAddr is FreePort as 127.0.0.1:PORT.
func FreeAddr() (string, error) {
	p, err := FreePort()
	if err != nil {
		return "", err
	}
	return Loopback(p), nil
}

// PortFree reports whether 127.0.0.1:p can be bound now.
func PortFree(p int) bool {
	l, err := net.Listen("tcp", Loopback(p))
	if err != nil {
		return false
	}
	l.Close()
	return true
}

// Loopback is 127.0.0.1:p.
func Loopback(p int) string { return fmt.Sprintf("127.0.0.1:%d", p) }

// SocketDir makes a new directory for unix sockets under os.TempDir; the
// caller removes it. Socket paths are limited to 108 bytes, which a test's
// t.TempDir (it holds the test's name) may exceed.
func SocketDir() (string, error) {
	dir, err := os.MkdirTemp("", "keel")
	if err != nil {
		return "", fmt.Errorf("keeltest: socket directory: %w", err)
	}
	return dir, nil
}
