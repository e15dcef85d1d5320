package upgrade

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
	"github.com/hashicorp/go-hclog"
)

// handoverName is the name the handover socket is passed under.
const handoverName = "keel-handover"

// Config configures an Upgrader.
type Config struct {
	// PIDFile, when set, names the running process: written once the
	// first process is ready, and rewritten by each child once it has
	// taken over (never before). Its status file, PIDFile + ".upgrade",
	// records the outcome of each upgrade (see Status).
	PIDFile string
	// Timeout bounds an upgrade, from starting the child to its taking
	// over; a child still not done is killed. Default 60s.
	Timeout time.Duration
	// Version is this binary's version, told to the parent when ready.
	Version string
	// Log receives the upgrade's events.
	Log hclog.Logger
}

// Validate checks the configuration.
func (c Config) Validate() error {
	if c.Timeout < 0 {
		return fmt.Errorf("upgrade: Timeout %v: must be positive (0: 60s)", c.Timeout)
	}
	return nil
}

// Upgrader is a process under upgrade control. One per process.
type Upgrader struct {
	cfg    Config
	tf     *tableflip.Upgrader
	parent *sock // the handover socket to the parent; nil in a first process

	mu       sync.Mutex // guards the following
	attempts int        // upgrades tried by this process
}

// New starts upgrade control: it picks up what a parent passed (listeners
// and the handover socket), if any.
func New(cfg Config) (*Upgrader, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 60 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = hclog.NewNullLogger()
	}
	// A process under upgrade control may outlive the pipe its first
	// ancestor's stdout and stderr were (a supervisor that stopped reading
	// when that ancestor exited, a restarted journald): a log line must
	// then fail, not kill the process with SIGPIPE.
	signal.Ignore(syscall.SIGPIPE)
	tf, err := tableflip.New(tableflip.Options{UpgradeTimeout: cfg.Timeout, PIDFile: cfg.PIDFile})
	if err != nil {
		return nil, fmt.Errorf("upgrade: %w", err)
	}
	u := &Upgrader{cfg: cfg, tf: tf}
	if tf.HasParent() {
		f, err := tf.File(handoverName)
		if err != nil || f == nil {
			tf.Stop()
			return nil, fmt.Errorf("upgrade: the parent passed no handover socket: %v", err)
		}
		if u.parent, err = fileSock(f); err != nil {
			tf.Stop()
			return nil, err
		}
	}
	return u, nil
}

// HasParent reports whether this process is a child taking over.
func (u *Upgrader) HasParent() bool { return u.parent != nil }

// Listen returns the listener the parent passed for network and addr, or
// a new one; either way the next child inherits it.
func (u *Upgrader) Listen(network, addr string) (net.Listener, error) {
	l, err := u.tf.Listen(network, addr)
	if err != nil {
		return nil, fmt.Errorf("upgrade: listening on %s %s: %w", network, addr, err)
	}
	return l, nil
}

// Inherited returns the listener the parent passed for network and addr,
// or nil.
func (u *Upgrader) Inherited(network, addr string) (net.Listener, error) {
	return u.tf.Listener(network, addr)
}

// AddListener makes l inherited by the next child.
func (u *Upgrader) AddListener(network, addr string, l net.Listener) error {
	tl, ok := l.(tableflip.Listener)
	if !ok {
		return fmt.Errorf("upgrade: a %T cannot be passed on", l)
	}
	return u.tf.AddListener(network, addr, tl)
}

// File returns the file the parent passed under name (a copy the caller
// owns), or nil.
func (u *Upgrader) File(name string) (*os.File, error) {
	f, err := u.tf.File(name)
	if err != nil {
		return nil, fmt.Errorf("upgrade: inherited file %s: %w", name, err)
	}
	return f, nil
}

// AddFile makes f (a duplicate of it) inherited by the next child under
// name; the caller keeps f.
func (u *Upgrader) AddFile(name string, f *os.File) error {
	if err := u.tf.AddFile(name, f); err != nil {
		return fmt.Errorf("upgrade: passing %s on: %w", name, err)
	}
	return nil
}

// TakeOver is the child's second phase, called once it is prepared: it
// tells the parent so, takes the parent's process state (resumeState) and
// resumes, with resume, each connection the parent hands over, until the
// parent has none left. Then call Ready. A first process has nothing to
// take over.
func (u *Upgrader) TakeOver(resumeState func([]byte) error, resume func(state []byte, f *os.File) error) error {
	if u.parent == nil {
		return nil
	}
	return childSession(u.parent, os.Getpid(), u.cfg.Version, resumeState, resume)
}

// Fail tells the parent why this child gives up; it then should exit.
func (u *Upgrader) Fail(err error) {
	if u.parent != nil {
		_ = u.parent.send(msg{kind: kindFail, payload: []byte(err.Error())}, nil)
	}
}

// Ready says this process serves: it writes the PID file and, in a child,
// lets the parent go.
func (u *Upgrader) Ready() error {
	if err := u.tf.Ready(); err != nil {
		return fmt.Errorf("upgrade: %w", err)
	}
	if u.parent != nil {
		u.parent.Close()
	}
	return nil
}

// ErrUpgradeFailed wraps the reason of every failed upgrade.
var ErrUpgradeFailed = errors.New("upgrade failed")

// Upgrade replaces this process by a fresh start of its binary: the child
// inherits the listeners and, once ready, what h hands over. It returns
// nil once the child has taken over (this process should then stop what
// is left, and exit); otherwise this process keeps serving (h.Resume has
// been called) and the error says why. The outcome goes to the status
// file either way.
func (u *Upgrader) Upgrade(ctx context.Context, h Handover) error {
	u.mu.Lock()
	u.attempts++
	attempt := u.attempts
	u.mu.Unlock()
	log := u.cfg.Log.With("attempt", attempt)
	log.Info("upgrade: starting the new process")
	st := Status{Pid: os.Getpid(), Attempt: attempt}

	child, err := u.upgrade(ctx, h)
	if err != nil {
		err = fmt.Errorf("%w: %w", ErrUpgradeFailed, err)
		log.Error("upgrade failed; this process keeps serving", "error", err)
		st.Error = err.Error()
	} else {
		log.Info("upgrade: the new process took over", "pid", child.Pid, "version", child.Version)
		st.OK, st.NewPid, st.NewVersion = true, child.Pid, child.Version
	}
	if u.cfg.PIDFile != "" {
		if werr := writeStatus(StatusPath(u.cfg.PIDFile), st); werr != nil {
			log.Warn("could not record the upgrade's outcome", "error", werr)
		}
	}
	return err
}

func (u *Upgrader) upgrade(ctx context.Context, h Handover) (Child, error) {
	s, childEnd, err := socketpair()
	if err != nil {
		return Child{}, err
	}
	// tableflip keeps a duplicate to pass to the child (and replaces the
	// previous attempt's); ours is not needed.
	err = u.tf.AddFile(handoverName, childEnd)
	childEnd.Close()
	if err != nil {
		s.Close()
		return Child{}, fmt.Errorf("passing the handover socket: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, u.cfg.Timeout+5*time.Second)
	defer cancel()
	done := make(chan struct{})
	var tfErr error
	go func() { // bounded by Config.Timeout
		defer close(done)
		tfErr = u.upgradeWhenParentGone(ctx)
	}()
	child, err := parentSession(ctx, s, done, func() error { return tfErr }, h)
	if err != nil {
		// A child that is still there must not take over later.
		if child.Pid > 0 {
			_ = syscall.Kill(child.Pid, syscall.SIGKILL)
		}
		cancel()
		<-done
	}
	return child, err
}

// upgradeWhenParentGone is tableflip's Upgrade, once this process's own
// parent is gone: tableflip refuses an upgrade until its watcher has seen
// the parent exit, which may lag the exit `keel upgrade` waited for by a
// moment; that refusal starts no child, so it is retried.
func (u *Upgrader) upgradeWhenParentGone(ctx context.Context) error {
	if u.tf.HasParent() {
		if err := u.tf.WaitForParent(ctx); err != nil {
			return fmt.Errorf("waiting for the previous process to exit: %w", err)
		}
	}
	for range 100 {
		err := u.tf.Upgrade()
		if err == nil || err.Error() != "parent hasn't exited" {
			return err
		}
		select {
		case <-time.After(10 * time.Millisecond):
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
	return errors.New("tableflip still reports the previous process alive")
}

// Exit is closed once a child has taken over.
func (u *Upgrader) Exit() <-chan struct{} { return u.tf.Exit() }

// Stop ends upgrade control (a process stopping for good); unix socket
// listeners are unlinked unless a child took over.
func (u *Upgrader) Stop() { u.tf.Stop() }
