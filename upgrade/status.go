package upgrade

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Status is the outcome of one upgrade, as the parent records it in the
// status file beside the PID file.
type Status struct {
	// Pid is the process that tried the upgrade; Attempt counts its tries.
	Pid     int `json:"pid"`
	Attempt int `json:"attempt"`
	// OK: the child took over; NewPid and NewVersion are the child's.
	OK         bool   `json:"ok"`
	NewPid     int    `json:"new_pid,omitempty"`
	NewVersion string `json:"new_version,omitempty"`
	// Error says why the upgrade failed (the child's reason and exit status).
	Error string `json:"error,omitempty"`
}

// StatusPath is the status file beside pidFile.
func StatusPath(pidFile string) string { return pidFile + ".upgrade" }

func writeStatus(path string, st Status) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// ReadStatus reads a status file; a missing one is the zero Status.
func ReadStatus(path string) (Status, error) {
	var st Status
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return st, nil
	}
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("upgrade: status file %s: %w", path, err)
	}
	return st, nil
}

// ReadPID reads a PID file.
func ReadPID(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("upgrade: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("upgrade: PID file %s holds %q, not a pid", path, b)
	}
	return pid, nil
}

// Alive reports whether pid names a running (not exited, not zombie) process.
func Alive(pid int) bool {
	if err := syscall.Kill(pid, 0); err != nil && !errors.Is(err, syscall.EPERM) {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return !errors.Is(err, os.ErrNotExist)
	}
	// pid (comm) state ...: the state follows the last ')'.
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z' && s[i+2] != 'X'
	}
	return true
}

// ErrTimeout is returned by Trigger when the upgrade did not finish in time.
var ErrTimeout = errors.New("upgrade: no outcome before the timeout")

// Trigger asks the process named by pidFile to upgrade (SIGHUP) and waits
// for the outcome: the Status of a successful upgrade once the new process
// has written the PID file and the old one has exited, or an error wrapping
// ErrUpgradeFailed with the reason the old process recorded. every is how
// often the files are read.
func Trigger(ctx context.Context, pidFile string, every time.Duration) (Status, error) {
	pid, err := ReadPID(pidFile)
	if err != nil {
		return Status{}, err
	}
	if !Alive(pid) {
		return Status{}, fmt.Errorf("upgrade: process %d named by %s is not running", pid, pidFile)
	}
	statusPath := StatusPath(pidFile)
	before, err := ReadStatus(statusPath)
	if err != nil {
		return Status{}, err
	}
	base := 0
	if before.Pid == pid {
		base = before.Attempt
	}
	if err := syscall.Kill(pid, syscall.SIGHUP); err != nil {
		return Status{}, fmt.Errorf("upgrade: signalling %d: %w", pid, err)
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		st, err := ReadStatus(statusPath)
		if err != nil {
			return st, err
		}
		if st.Pid == pid && st.Attempt > base {
			if !st.OK {
				return st, fmt.Errorf("%w: %s", ErrUpgradeFailed, strings.TrimPrefix(st.Error, ErrUpgradeFailed.Error()+": "))
			}
			now, perr := ReadPID(pidFile)
			if perr == nil && now == st.NewPid && !Alive(pid) {
				return st, nil
			}
		} else if !Alive(pid) {
			if again, _ := ReadStatus(statusPath); again.Pid == pid && again.Attempt > base {
				continue // recorded just before it exited
			}
			return st, fmt.Errorf("%w: process %d exited without recording an outcome", ErrUpgradeFailed, pid)
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return st, fmt.Errorf("%w: %w", ErrTimeout, context.Cause(ctx))
		}
	}
}

// WritePIDFile writes this process's pid to path, atomically, for a
// process that is not under upgrade control (New writes it otherwise).
func WritePIDFile(path string) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("upgrade: PID file: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(strconv.Itoa(os.Getpid())); err != nil {
		tmp.Close()
		return fmt.Errorf("upgrade: PID file: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("upgrade: PID file: %w", err)
	}
	return os.Rename(tmp.Name(), path)
}

// Refusals records upgrade requests a process cannot carry out, so that
// `keel upgrade` reports the refusal at once instead of waiting.
type Refusals struct {
	PIDFile string
	Reason  string
	n       int
}

// Refuse records one refused request.
func (r *Refusals) Refuse() error {
	r.n++
	return writeStatus(StatusPath(r.PIDFile), Status{Pid: os.Getpid(), Attempt: r.n, Error: ErrUpgradeFailed.Error() + ": " + r.Reason})
}
