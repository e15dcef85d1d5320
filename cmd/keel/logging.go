package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"

	"github.com/hashicorp/go-hclog"
	gsyslog "github.com/hashicorp/go-syslog"
)

// The logging flags, on every command: --log-level, --log-json (stderr as
// JSON lines), --syslog (every line also to syslog, as Consul does it,
// through hashicorp/go-syslog), --syslog-facility and --syslog-addr.

// syslogFacilities are the facilities --syslog-facility takes.
var syslogFacilities = []string{"KERN", "USER", "MAIL", "DAEMON", "AUTH", "SYSLOG", "LPR", "NEWS", "UUCP", "CRON", "AUTHPRIV", "FTP",
	"LOCAL0", "LOCAL1", "LOCAL2", "LOCAL3", "LOCAL4", "LOCAL5", "LOCAL6", "LOCAL7"}

// errBadLogFlag is the cause of every refused logging flag.
var errBadLogFlag = errors.New("bad logging flag")

// openSyslog connects to the syslog daemon: the local one (/dev/log)
// when addr is empty, else addr as NETWORK:HOST:PORT (udp:..., tcp:...).
func openSyslog(facility, addr, tag string) (gsyslog.Syslogger, error) {
	f := strings.ToUpper(facility)
	ok := false
	for _, have := range syslogFacilities {
		ok = ok || have == f
	}
	if !ok {
		return nil, fmt.Errorf("--syslog-facility %q: want one of %s: %w", facility, strings.Join(syslogFacilities, ", "), errBadLogFlag)
	}
	if addr == "" {
		s, err := gsyslog.NewLogger(gsyslog.LOG_INFO, f, tag)
		if err != nil {
			return nil, fmt.Errorf("--syslog: connecting to the local syslog daemon: %w", err)
		}
		return s, nil
	}
	network, raddr, found := strings.Cut(addr, ":")
	if !found || (network != "udp" && network != "tcp" && network != "unix" && network != "unixgram") {
		return nil, fmt.Errorf("--syslog-addr %q: want udp:HOST:PORT, tcp:HOST:PORT or unix:PATH: %w", addr, errBadLogFlag)
	}
	s, err := gsyslog.DialLogger(network, raddr, gsyslog.LOG_INFO, f, tag)
	if err != nil {
		return nil, fmt.Errorf("--syslog-addr %s: %w", addr, err)
	}
	return s, nil
}

// syslogPriority maps an hclog level to a syslog priority.
func syslogPriority(l hclog.Level) gsyslog.Priority {
	switch {
	case l >= hclog.Error:
		return gsyslog.LOG_ERR
	case l == hclog.Warn:
		return gsyslog.LOG_WARNING
	case l == hclog.Info:
		return gsyslog.LOG_INFO
	default:
		return gsyslog.LOG_DEBUG
	}
}

// syslogSink is an hclog.SinkAdapter that sends each line at or above
// level to syslog at the matching priority, formatted as text without a
// time (syslog stamps its own).
type syslogSink struct {
	level hclog.Level
	out   gsyslog.Syslogger

	mu  sync.Mutex   // guards the following
	buf bytes.Buffer // one formatted line
	fmt hclog.Logger // formats into buf
}

func newSyslogSink(level hclog.Level, out gsyslog.Syslogger) *syslogSink {
	s := &syslogSink{level: level, out: out}
	s.fmt = hclog.New(&hclog.LoggerOptions{Output: &s.buf, Level: hclog.Trace, DisableTime: true})
	return s
}

// Accept is hclog.SinkAdapter's one method.
func (s *syslogSink) Accept(name string, level hclog.Level, msg string, args ...any) {
	if level < s.level || level == hclog.Off {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.buf.Reset()
	s.fmt.ResetNamed(name).Log(level, msg, args...)
	// A syslog daemon that went away loses lines; stderr still has them.
	_ = s.out.WriteLevel(syslogPriority(level), bytes.TrimRight(s.buf.Bytes(), "\n"))
}

// logger returns the named logger of a command: to stderr (as text or
// JSON lines) at --log-level and, with --syslog, to syslog as well.
func (g *globalFlags) logger(name string) (hclog.Logger, error) {
	return g.loggerTo(name, os.Stderr)
}

func (g *globalFlags) loggerTo(name string, w io.Writer) (hclog.Logger, error) {
	level := hclog.LevelFromString(g.logLevel)
	if level == hclog.NoLevel {
		return nil, fmt.Errorf("--log-level %q: want trace, debug, info, warn or error: %w", g.logLevel, errBadLogFlag)
	}
	opts := &hclog.LoggerOptions{Name: name, Level: level, Output: w, JSONFormat: g.logJSON}
	if !g.syslog {
		if g.syslogAddr != "" {
			return nil, fmt.Errorf("--syslog-addr needs --syslog: %w", errBadLogFlag)
		}
		return hclog.New(opts), nil
	}
	if g.sys == nil {
		s, err := openSyslog(g.syslogFacility, g.syslogAddr, "keel")
		if err != nil {
			return nil, err
		}
		g.sys = s
	}
	l := hclog.NewInterceptLogger(opts)
	l.RegisterSink(newSyslogSink(level, g.sys))
	return l, nil
}

// closeSyslog closes the syslog connection, if one was opened.
func (g *globalFlags) closeSyslog() {
	if g.sys != nil {
		g.sys.Close()
		g.sys = nil
	}
}

// childLogArgs are the logging flags to give a child keel process (keel
// dev's servers and proxy) so that it logs as this one does.
func (g *globalFlags) childLogArgs() []string {
	args := []string{"--log-level", g.logLevel}
	if g.logJSON {
		args = append(args, "--log-json")
	}
	if g.syslog {
		args = append(args, "--syslog", "--syslog-facility", g.syslogFacility)
		if g.syslogAddr != "" {
			args = append(args, "--syslog-addr", g.syslogAddr)
		}
	}
	return args
}
