package keeltest

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/keelstore/keel/services/proxy"
)

// ProxyConfig describes a `keel proxy` in front of a cluster.
type ProxyConfig struct {
	// Name is the proxy's --writer and names it in messages; required.
	Name string
	// Listen is --listen: 127.0.0.1:PORT or unix:PATH. Empty: a free
	// loopback port, another one if it is taken meanwhile.
	Listen string
	// HTTP is --http, 127.0.0.1:PORT. Empty: a free loopback port, another
	// one if it is taken meanwhile.
	HTTP string
	// LogPath is the file the output is appended to. Empty: the cluster's
	// LogDir/proxy-NAME.log.
	LogPath string
	// Flags go after the harness's own (--servers with every node's HTTP
	// address, --listen, --http, --writer), so a later flag given here wins.
	Flags []string
	// GlobalFlags go before the subcommand, after the cluster's
	// GlobalFlags, e.g. --cpu-profile FILE.
	GlobalFlags []string
}

// Proxy is one `keel proxy` over its runs: every run listens on the same
// addresses with the same flags and appends to the same log.
type Proxy struct {
	Name    string
	Listen  string // --listen
	HTTP    string // --http: status and metrics, 127.0.0.1:PORT
	LogPath string

	c    *Cluster
	args []string

	mu   sync.Mutex // guards proc
	proc *Proc
}

// StartProxy starts a proxy and waits until it logs "proxy serving".
func (c *Cluster) StartProxy(ctx context.Context, cfg ProxyConfig) (*Proxy, error) {
	if cfg.Name == "" {
		return nil, fmt.Errorf("%w: ProxyConfig.Name is empty", ErrBadConfig)
	}
	p := &Proxy{Name: cfg.Name, c: c, LogPath: cfg.LogPath}
	if p.LogPath == "" {
		p.LogPath = filepath.Join(c.cfg.LogDir, "proxy-"+cfg.Name+".log")
	}
	certs, err := c.CertDir("proxy-" + cfg.Name)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.proxies = append(c.proxies, p)
	c.mu.Unlock()
	for attempt := 1; ; attempt++ {
		p.Listen = cfg.Listen
		var err error
		if p.Listen == "" {
			if p.Listen, err = FreeAddr(); err != nil {
				return nil, err
			}
		}
		p.HTTP = cfg.HTTP
		if p.HTTP == "" {
			if p.HTTP, err = FreeAddr(); err != nil {
				return nil, err
			}
		}
		p.args = append(slices.Concat(c.cfg.GlobalFlags, cfg.GlobalFlags), "proxy", "--servers", strings.Join(c.HTTPAddrs(), ","),
			"--listen", p.Listen, "--http", p.HTTP, "--writer", cfg.Name)
		if certs != "" {
			p.args = append(p.args, "--cluster-tls", certs)
		}
		p.args = append(p.args, cfg.Flags...)
		if c.cfg.PidFiles {
			p.args = append(p.args, "--pid-file", p.PidFile())
		}
		if err := p.start(); err != nil {
			return nil, err
		}
		err = p.WaitServing(ctx)
		if !errors.Is(err, ErrPortTaken) {
			return p, err
		}
		if attempt == 3 {
			return p, fmt.Errorf("proxy %s: ports taken three times: %w", cfg.Name, err)
		}
		c.cfg.Logf("proxy %s: a port was taken; retrying", cfg.Name)
	}
}

func (p *Proxy) start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.proc != nil && !p.proc.Exited() {
		return fmt.Errorf("proxy %s: started while still running", p.Name)
	}
	proc, err := p.c.group.Start(ProcConfig{Bin: p.c.cfg.Bin, Name: "proxy " + p.Name, Args: p.args, Env: p.c.cfg.Env, LogPath: p.LogPath, Direct: p.c.cfg.PidFiles})
	if err != nil {
		return err
	}
	p.proc = proc
	return nil
}

// PidFile is the proxy's --pid-file (ClusterConfig.PidFiles), beside its
// log.
func (p *Proxy) PidFile() string { return strings.TrimSuffix(p.LogPath, ".log") + ".pid" }

// Adopt makes the process pid, which took over from the current run in an
// upgrade, the current run.
func (p *Proxy) Adopt(pid int) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.proc == nil {
		return fmt.Errorf("proxy %s: never started", p.Name)
	}
	p.proc = p.proc.Successor(pid)
	p.c.group.Adopt(p.proc)
	return nil
}

// Args are every run's arguments.
func (p *Proxy) Args() []string { return slices.Clone(p.args) }

// URI is the proxy's export as libnbd, qemu and fio spell it.
func (p *Proxy) URI() string { return nbdURI(p.Listen) }

// Proc is the current (or last) run.
func (p *Proxy) Proc() *Proc {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.proc
}

// Running reports whether the current run has not exited.
func (p *Proxy) Running() bool {
	proc := p.Proc()
	return proc != nil && !proc.Exited()
}

// RunOutput is what the current (or last) run has printed.
func (p *Proxy) RunOutput() string { return p.Proc().Output() }

// Output is what every run has printed, each after a header line.
func (p *Proxy) Output() string {
	b, err := readFrom(p.LogPath, 0)
	if err != nil {
		return fmt.Sprintf("(reading %s: %v)", p.LogPath, err)
	}
	return string(b)
}

// WaitServing waits until the current run logs "proxy serving".
// ErrPortTaken: it could not bind its address, and exited.
func (p *Proxy) WaitServing(ctx context.Context) error {
	proc := p.Proc()
	return Poll(ctx, p.c.cfg.UpTimeout, p.c.cfg.PollEvery, fmt.Sprintf("proxy %s logs \"proxy serving\"", p.Name), func() (bool, string, error) {
		out := proc.Output()
		if strings.Contains(out, "proxy serving") {
			return true, "", nil
		}
		if proc.Exited() {
			if strings.Contains(proc.Output(), "address already in use") {
				return false, "", ErrPortTaken
			}
			return false, "", fmt.Errorf("proxy %s exited while starting: %v\n%s", p.Name, proc.Err(), p.Output())
		}
		return false, lastLines(out, 5), nil
	})
}

// WaitLog waits, up to the cluster's UpTimeout, until the current run's
// output contains s.
func (p *Proxy) WaitLog(ctx context.Context, s string) error {
	proc := p.Proc()
	return Poll(ctx, p.c.cfg.UpTimeout, p.c.cfg.PollEvery, fmt.Sprintf("proxy %s logs %q", p.Name, s), func() (bool, string, error) {
		out := proc.Output()
		return strings.Contains(out, s), lastLines(out, 5), nil
	})
}

// Restart starts the proxy again on the same addresses and waits until it
// serves.
func (p *Proxy) Restart(ctx context.Context) error {
	if err := p.start(); err != nil {
		return err
	}
	if err := p.WaitServing(ctx); err != nil {
		return fmt.Errorf("proxy %s restarting on %s: %w", p.Name, p.Listen, err)
	}
	return nil
}

// Kill sends SIGKILL and waits until the process is gone.
func (p *Proxy) Kill() error { return p.Proc().Kill() }

// Stop sends SIGTERM and waits up to the cluster's StopTimeout; nil means
// exit status 0.
func (p *Proxy) Stop() error { return p.Proc().Stop(p.c.cfg.StopTimeout) }

// Status fetches the proxy's GET /v1/status.
func (p *Proxy) Status(ctx context.Context) (proxy.Status, error) {
	var st proxy.Status
	err := p.c.client.Do(ctx, http.MethodGet, p.HTTP, "/v1/status", nil, &st)
	return st, err
}

// Counter reads one of the proxy's counters (cache_hits, retries, ...).
func (p *Proxy) Counter(ctx context.Context, name string) (uint64, error) {
	st, err := p.Status(ctx)
	if err != nil {
		return 0, err
	}
	v, ok := st.Counters[name]
	if !ok {
		return 0, fmt.Errorf("proxy %s status has no counter %q: %v", p.Name, name, st.Counters)
	}
	return v, nil
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	ls := strings.Split(strings.TrimSpace(s), "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, "\n")
}
