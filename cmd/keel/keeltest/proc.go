package keeltest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Errors of processes, wrapped with the process's name.
var (
	// ErrExited: the process had exited before it was signalled.
	ErrExited = errors.New("keeltest: process exited before it was stopped")
	// ErrTimeout: the process did not exit in time (Stop kills it then).
	ErrTimeout = errors.New("keeltest: process did not exit in time")
	// ErrCrash: the output holds a panic, a data race or a fatal runtime
	// error.
	ErrCrash = errors.New("keeltest: panic, data race or fatal error in the output")
	// ErrBadConfig is wrapped by every Validate error.
	ErrBadConfig = errors.New("keeltest: bad config")
)

// DefaultRingBytes is how much of a process's latest output Tail keeps.
const DefaultRingBytes = 256 << 10

// ProcConfig says how to start one keel process.
type ProcConfig struct {
	// Bin is the program: the keel binary (Binary builds one), or any
	// other (a benchmark's fio or nbdkit), looked up in $PATH if it has no
	// slash; required.
	Bin string
	// Name names the process in errors and in the log's header line;
	// empty: the first argument.
	Name string
	// Args are the arguments: global flags, the subcommand and its flags.
	Args []string
	// Env is added to this process's environment.
	Env []string
	// LogPath is the file that stdout and stderr are appended to, after a
	// header line; required. A restarted process appends to the same file.
	LogPath string
	// RingBytes is how much of the latest output Tail keeps in memory;
	// 0 means DefaultRingBytes.
	RingBytes int
	// Direct gives the process LogPath itself as stdout and stderr, no
	// pipe: a process that hands over to a successor (keel upgrade)
	// passes the file on, so every generation's output lands in the log
	// and none writes to a pipe that closed with its first ancestor.
	// Tail then reads the file's end.
	Direct bool
}

// Validate names the first bad field.
func (c ProcConfig) Validate() error {
	switch {
	case c.Bin == "":
		return fmt.Errorf("%w: ProcConfig.Bin is empty", ErrBadConfig)
	case c.LogPath == "":
		return fmt.Errorf("%w: ProcConfig.LogPath is empty", ErrBadConfig)
	case len(c.Args) == 0:
		return fmt.Errorf("%w: ProcConfig.Args is empty", ErrBadConfig)
	case c.RingBytes < 0:
		return fmt.Errorf("%w: ProcConfig.RingBytes %d is negative", ErrBadConfig, c.RingBytes)
	}
	return nil
}

// Proc is one run of a keel process. Its methods are safe to call from
// any goroutine.
type Proc struct {
	name     string
	cmd      *exec.Cmd // nil for a successor (Successor): not our child
	pid      int
	direct   bool // output straight to logPath (ProcConfig.Direct)
	logPath  string
	logStart int64 // where this run's output starts in logPath
	ring     *ring
	done     chan struct{} // closed once the process has been waited for
	err      error         // the exit status; set before done is closed
}

// Start starts the process and returns at once. It runs until it exits or
// is stopped; its owner must stop it (Group, Cluster, or MustStart's
// cleanup). Its process group is its own, so a Ctrl-C at a terminal reaches
// only the harness, and the kernel kills it if the harness dies.
func Start(cfg ProcConfig) (*Proc, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Name == "" {
		cfg.Name = cfg.Args[0]
	}
	if cfg.RingBytes == 0 {
		cfg.RingBytes = DefaultRingBytes
	}
	f, err := os.OpenFile(cfg.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("%s: log: %w", cfg.Name, err)
	}
	fmt.Fprintf(f, "=== %s %s: %s %s\n", time.Now().Format("15:04:05.000"), cfg.Name, filepath.Base(cfg.Bin), strings.Join(cfg.Args, " "))
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: log: %w", cfg.Name, err)
	}
	p := &Proc{name: cfg.Name, logPath: cfg.LogPath, logStart: fi.Size(), ring: newRing(cfg.RingBytes), done: make(chan struct{}), direct: cfg.Direct}
	cmd := exec.Command(cfg.Bin, cfg.Args...)
	cmd.Env = append(os.Environ(), cfg.Env...)
	if cfg.Direct {
		cmd.Stdout, cmd.Stderr = f, f
	} else {
		out := &sink{f: f, r: p.ring}
		cmd.Stdout, cmd.Stderr = out, out
	}
	// A grandchild (keel dev's servers) may hold the pipe after the child
	// exits; Wait gives up on it after this.
	cmd.WaitDelay = 5 * time.Second
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: start %s: %w", cfg.Name, cfg.Bin, err)
	}
	p.cmd, p.pid = cmd, cmd.Process.Pid
	go func() {
		err := cmd.Wait()
		f.Close()
		p.err = err
		close(p.done)
	}()
	return p, nil
}

// Run starts the process and waits until it exits. If ctx ends first it
// stops the process (SIGTERM, then SIGKILL after stop) and returns ctx's
// cause. Otherwise it returns the exit status: nil for status 0.
func Run(ctx context.Context, cfg ProcConfig, stop time.Duration) error {
	p, err := Start(cfg)
	if err != nil {
		return err
	}
	select {
	case <-p.Done():
		if err := p.Err(); err != nil {
			return fmt.Errorf("%s: %w", p.Name(), err)
		}
		return nil
	case <-ctx.Done():
		if err := p.Stop(stop); errors.Is(err, ErrTimeout) {
			return fmt.Errorf("%s: %w (%v)", p.Name(), context.Cause(ctx), err)
		}
		return fmt.Errorf("%s: %w", p.Name(), context.Cause(ctx))
	}
}

// Name is the process's name.
func (p *Proc) Name() string { return p.name }

// Pid is the process id.
func (p *Proc) Pid() int { return p.pid }

// Successor is the process pid that took over from p (an upgrade: p's
// child, which p's exit left to init). Its output goes where p's went (p
// must be Direct); it is signalled by pid, and its exit is found by
// polling (its status is unknown: Err is nil).
func (p *Proc) Successor(pid int) *Proc {
	fi, err := os.Stat(p.logPath)
	start := p.logStart
	if err == nil {
		start = fi.Size()
	}
	q := &Proc{name: p.name, pid: pid, direct: true, logPath: p.logPath, logStart: start, ring: p.ring, done: make(chan struct{})}
	go func() {
		for pidAlive(pid) {
			time.Sleep(50 * time.Millisecond)
		}
		close(q.done)
	}()
	return q
}

// pidAlive reports whether pid runs: it exists and is not a zombie (a
// successor's parent may not reap it).
func pidAlive(pid int) bool {
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// pid (comm) STATE ...: comm may hold spaces and parentheses.
	if i := strings.LastIndexByte(string(b), ')'); i >= 0 && i+2 < len(b) {
		return b[i+2] != 'Z'
	}
	return true
}

// LogPath is the file the output goes to.
func (p *Proc) LogPath() string { return p.logPath }

// Done is closed once the process has exited and been waited for.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Err is the exit status once exited (nil for status 0), and nil before.
func (p *Proc) Err() error {
	if !p.Exited() {
		return nil
	}
	return p.err
}

// ExitCode is the exit status, or -1 if the process runs or was killed by
// a signal.
func (p *Proc) ExitCode() int {
	if !p.Exited() || p.cmd == nil {
		return -1
	}
	return p.cmd.ProcessState.ExitCode()
}

// ExitSignal is the signal that ended the process, if one did.
func (p *Proc) ExitSignal() (syscall.Signal, bool) {
	if !p.Exited() || p.cmd == nil {
		return 0, false
	}
	ws, ok := p.cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() {
		return 0, false
	}
	return ws.Signal(), true
}

// Signal sends sig; ErrExited if the process has exited.
func (p *Proc) Signal(sig os.Signal) error {
	if p.Exited() {
		return fmt.Errorf("%s: %w: %v", p.name, ErrExited, p.err)
	}
	var err error
	if p.cmd != nil {
		err = p.cmd.Process.Signal(sig)
	} else {
		err = syscall.Kill(p.pid, sig.(syscall.Signal))
	}
	if err != nil {
		return fmt.Errorf("%s: signal %v: %w", p.name, sig, err)
	}
	return nil
}

// Wait waits up to timeout for the exit and returns its status (nil for
// status 0), or ErrTimeout.
func (p *Proc) Wait(timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-p.done:
		if p.err != nil {
			return fmt.Errorf("%s: %w", p.name, p.err)
		}
		return nil
	case <-t.C:
		return fmt.Errorf("%s: %w within %v", p.name, ErrTimeout, timeout)
	}
}

// Stop is StopWith(SIGTERM, timeout).
func (p *Proc) Stop(timeout time.Duration) error { return p.StopWith(syscall.SIGTERM, timeout) }

// StopWith sends sig and waits up to timeout for the exit, then kills the
// process. It returns the exit status (nil for status 0), ErrTimeout if it
// had to kill, and ErrExited if the process had exited before. Before the
// kill it sends SIGQUIT and waits a moment, so that a Go process prints
// every goroutine's stack into its log: where a stop hangs is the first
// thing anyone reading a failure needs.
func (p *Proc) StopWith(sig os.Signal, timeout time.Duration) error {
	if err := p.Signal(sig); err != nil {
		return err
	}
	err := p.Wait(timeout)
	if errors.Is(err, ErrTimeout) {
		if p.Signal(syscall.SIGQUIT) == nil {
			_ = p.Wait(quitWait)
		}
		_ = p.Signal(syscall.SIGKILL)
		<-p.done
		return fmt.Errorf("%w of %v", err, sig)
	}
	if err != nil {
		return fmt.Errorf("%w (after %v)", err, sig)
	}
	return nil
}

// quitWait is how long a process that did not stop gets to print its
// goroutines after SIGQUIT before it is killed.
const quitWait = 5 * time.Second

// Kill sends SIGKILL and waits for the exit; ErrExited if it had exited.
func (p *Proc) Kill() error {
	if err := p.Signal(syscall.SIGKILL); err != nil {
		return err
	}
	<-p.done
	return nil
}

// Pause stops the process with SIGSTOP.
func (p *Proc) Pause() error { return p.Signal(syscall.SIGSTOP) }

// Resume continues a paused process with SIGCONT.
func (p *Proc) Resume() error { return p.Signal(syscall.SIGCONT) }

// Output is everything this run has printed so far.
func (p *Proc) Output() string {
	b, err := readFrom(p.logPath, p.logStart)
	if err != nil {
		return fmt.Sprintf("(reading %s: %v)", p.logPath, err)
	}
	return string(b)
}

// Lines are this run's complete output lines so far.
func (p *Proc) Lines() []string {
	s := p.Output()
	i := strings.LastIndexByte(s, '\n')
	if i < 0 {
		return nil
	}
	return strings.Split(s[:i], "\n")
}

// Tail is the latest output, at most the ring's size (of a Direct
// process, the log's end).
func (p *Proc) Tail() string {
	if !p.direct {
		return p.ring.String()
	}
	s := p.Output()
	return s[max(0, len(s)-len(p.ring.buf)):]
}

// Scan returns ErrCrash with the offending lines if this run's output
// holds a panic, a data race or a fatal runtime error.
func (p *Proc) Scan() error { return scanErr(p.name, p.Output()) }

func readFrom(path string, off int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		return nil, err
	}
	return io.ReadAll(f)
}

// sink writes a process's output to its log file and its ring; a failing
// file write is remembered, never returned, so the child never sees EPIPE.
type sink struct {
	mu  sync.Mutex // guards the following
	f   *os.File
	r   *ring
	err error
}

func (s *sink) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		_, s.err = s.f.Write(b)
	}
	s.r.Write(b)
	return len(b), nil
}

// ring keeps the last len(buf) bytes written.
type ring struct {
	mu   sync.Mutex // guards the following
	buf  []byte
	pos  int // next write position
	full bool
}

func newRing(n int) *ring { return &ring{buf: make([]byte, n)} }

func (r *ring) Write(b []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(b) >= len(r.buf) {
		copy(r.buf, b[len(b)-len(r.buf):])
		r.pos, r.full = 0, true
		return
	}
	n := copy(r.buf[r.pos:], b)
	if n < len(b) {
		copy(r.buf, b[n:])
		r.full = true
	}
	r.pos = (r.pos + len(b)) % len(r.buf)
	if r.pos == 0 && len(b) > 0 {
		r.full = true
	}
}

func (r *ring) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.full {
		return string(r.buf[:r.pos])
	}
	return string(r.buf[r.pos:]) + string(r.buf[:r.pos])
}

// Group owns the processes it starts: StopAll and KillAll end them all.
type Group struct {
	mu    sync.Mutex // guards procs
	procs []*Proc
}

// Start is Start for a process the group then owns.
func (g *Group) Start(cfg ProcConfig) (*Proc, error) {
	p, err := Start(cfg)
	if err != nil {
		return nil, err
	}
	g.mu.Lock()
	g.procs = append(g.procs, p)
	g.mu.Unlock()
	return p, nil
}

// Adopt makes the group own p too (a Successor).
func (g *Group) Adopt(p *Proc) {
	g.mu.Lock()
	g.procs = append(g.procs, p)
	g.mu.Unlock()
}

// Running lists the group's processes that have not exited.
func (g *Group) Running() []*Proc {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []*Proc
	for _, p := range g.procs {
		if !p.Exited() {
			out = append(out, p)
		}
	}
	return out
}

// StopAll stops first in order, then every other running process at once,
// each with SIGTERM and up to timeout; it returns their exit errors,
// joined. Processes that had exited before are not errors.
func (g *Group) StopAll(timeout time.Duration, first ...*Proc) error {
	var errs []error
	for _, p := range first {
		if p != nil && !p.Exited() {
			errs = append(errs, ignoreExited(p.Stop(timeout)))
		}
	}
	rest := g.Running()
	stopErrs := make([]error, len(rest))
	var wg sync.WaitGroup
	for i, p := range rest {
		wg.Add(1)
		go func() {
			defer wg.Done()
			stopErrs[i] = ignoreExited(p.Stop(timeout))
		}()
	}
	wg.Wait()
	return errors.Join(append(errs, stopErrs...)...)
}

// KillAll kills every running process and waits for them.
func (g *Group) KillAll() {
	for _, p := range g.Running() {
		_ = p.Kill()
	}
}

func ignoreExited(err error) error {
	if errors.Is(err, ErrExited) {
		return nil
	}
	return err
}
