package keeltest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// Package is the import path of the keel command.
const Package = "github.com/keelstore/keel/cmd/keel"

// Environment read by Binary.
const (
	EnvBin  = "KEEL_E2E_BIN"  // use this binary instead of building one
	EnvRace = "KEEL_E2E_RACE" // when 1, build with -race
)

var (
	buildMu  sync.Mutex // guards the following
	builtBin string
	builtDir string
	buildErr error
)

// Binary returns the keel binary under test: $KEEL_E2E_BIN if set, else one
// built on the first call into a temporary directory (with -race when
// $KEEL_E2E_RACE is 1) from inside the keel module. Later calls return the
// same binary, or the same error; ctx bounds the build. RemoveBinary
// removes it.
func Binary(ctx context.Context) (string, error) {
	buildMu.Lock()
	defer buildMu.Unlock()
	if builtBin != "" || buildErr != nil {
		return builtBin, buildErr
	}
	if bin := os.Getenv(EnvBin); bin != "" {
		p, err := filepath.Abs(bin)
		if err != nil {
			buildErr = fmt.Errorf("keeltest: $%s: %w", EnvBin, err)
		}
		builtBin = p
		return builtBin, buildErr
	}
	dir, err := os.MkdirTemp("", "keel-e2e-bin-")
	if err != nil {
		buildErr = fmt.Errorf("keeltest: %w", err)
		return "", buildErr
	}
	builtDir = dir
	bin := filepath.Join(dir, "keel")
	if buildErr = Build(ctx, bin, os.Getenv(EnvRace) == "1"); buildErr == nil {
		builtBin = bin
	}
	return builtBin, buildErr
}

// RemoveBinary removes what Binary built; a TestMain or a main defers it.
func RemoveBinary() {
	buildMu.Lock()
	defer buildMu.Unlock()
	if builtDir != "" {
		os.RemoveAll(builtDir)
	}
	builtBin, builtDir, buildErr = "", "", nil
}

// Build runs `go build -o out [-race] github.com/keelstore/keel/cmd/keel`
// under ctx and at most 5 minutes; the working directory must lie inside
// the keel module.
func Build(ctx context.Context, out string, race bool) error {
	return BuildWith(ctx, out, BuildOptions{Race: race})
}

// BuildOptions are the choices of BuildWith.
type BuildOptions struct {
	// Race builds with -race.
	Race bool
	// Version, if set, is linked in as the binary's version
	// (-ldflags "-X main.version=..."): a second build for mixed-version
	// tests. Empty: the default ("dev").
	Version string
}

// BuildWith is Build with options.
func BuildWith(ctx context.Context, out string, o BuildOptions) error {
	args := []string{"build", "-o", out}
	if o.Race {
		args = append(args, "-race")
	}
	if o.Version != "" {
		args = append(args, "-ldflags", "-X main.version="+o.Version)
	}
	args = append(args, Package)
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	b, err := exec.CommandContext(ctx, "go", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("keeltest: go %s: %w\n%s", strings.Join(args, " "), err, b)
	}
	return nil
}
