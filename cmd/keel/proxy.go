package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/keelstore/keel/services/proxy"
	"github.com/keelstore/keel/upgrade"
	"github.com/spf13/cobra"
)

type proxyFlags struct {
	listen       string
	servers      string
	cache        string
	takeover     bool
	writer       string
	name         string
	writeTimeout time.Duration
	readTimeout  time.Duration
	attempt      time.Duration
	relayAfter   time.Duration
	poll         time.Duration
	connect      time.Duration
	drain        time.Duration
	http         string
	pidFile      string
	upgradeTO    time.Duration
	tls          nbdTLSFlags
}

func newProxyCmd(g *globalFlags) *cobra.Command {
	f := &proxyFlags{}
	cmd := &cobra.Command{
		Use:   "proxy --servers HTTP-ADDR,... [--listen ADDR] [--cache SIZE] [--takeover]",
		Short: "Serve a replicated volume to a local NBD client (qemu), across failovers",
		Long: `Serve a replicated volume over NBD to the VM on this host.

The proxy finds the cluster's leader from --servers (the servers' --http
addresses; one is enough, the others are learned from it) and commits every
write through it as the volume's only writer. When the leader is lost it
finds the next one and re-sends what was not yet answered; each write is
applied exactly once. The client's connection stays open throughout: it
sees a stall, not an error. Reads go to any replica that has applied the
proxy's last acknowledged write, through a read cache of --cache bytes.

One writer at a time: a second proxy for the same volume serves reads but
answers writes with EPERM, unless it was started with --takeover: its first
write then takes the volume over and fences the first proxy (whose later
writes fail with EPERM and never land). Use --takeover for the destination
of a VM migration: the source keeps writing until it is paused, and the
destination takes over when it first writes. A proxy restarted under the same
--writer name (default: hostname and --listen) takes the volume back without
--takeover.

Without a quorum, reads continue and writes wait --write-timeout, then fail
with EIO. On SIGTERM or SIGINT the proxy answers every request already read,
closes the connections (qemu reconnects) and releases the volume.`,
		Example: `  keel proxy --servers 10.0.0.1:7002,10.0.0.2:7002 --listen unix:/run/keel/vm1.sock --cache 256M
  keel proxy --servers 10.0.0.1:7002 --listen 127.0.0.1:10809 --takeover   # VM migrated here`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runProxy(cmd.Context(), g, f) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.listen, "listen", "127.0.0.1:10809", "address to serve NBD on: HOST:PORT or unix:PATH")
	fl.StringVar(&f.servers, "servers", "", "comma-separated HTTP API addresses (keel server --http) of the volume's servers (required)")
	fl.StringVar(&f.cache, "cache", "128M", "read cache size, e.g. 256M; 0 turns it off")
	fl.BoolVar(&f.takeover, "takeover", false, "at this proxy's first write, take the volume over from the proxy holding it (fences that proxy)")
	fl.StringVar(&f.writer, "writer", "", "name this proxy claims the volume under (default: HOSTNAME/LISTEN)")
	fl.StringVar(&f.name, "name", "keel", "export name (clients asking for the empty name get it too)")
	fl.DurationVar(&f.writeTimeout, "write-timeout", 30*time.Second, "how long a write waits for a leader and a quorum before failing with EIO")
	fl.DurationVar(&f.readTimeout, "read-timeout", 30*time.Second, "how long a read waits for an up-to-date replica before failing with EIO")
	fl.DurationVar(&f.attempt, "attempt-timeout", 0, "how long one call to the leader may take before the write is re-sent (default 5s, or --write-timeout if shorter)")
	fl.DurationVar(&f.relayAfter, "relay-after", 0, "once no leader has answered this proxy for this long, send writes through a follower that can reach one (default 500ms)")
	fl.DurationVar(&f.poll, "poll-interval", 200*time.Millisecond, "how often each server's status is read while a leader is known")
	fl.DurationVar(&f.connect, "connect-timeout", 60*time.Second, "at start, how long to wait for a server to answer")
	fl.StringVar(&f.http, "http", "", "serve status (/v1/status) and Prometheus metrics (/metrics) on HOST:PORT; off by default")
	fl.DurationVar(&f.drain, "drain-timeout", 60*time.Second, "on stop, how long in-flight requests may take before connections are closed anyway")
	fl.StringVar(&f.pidFile, "pid-file", "", "write the pid here once serving; SIGHUP (keel upgrade --pid-file) replaces the process by a fresh start of its binary without dropping a connection")
	fl.DurationVar(&f.upgradeTO, "upgrade-timeout", 60*time.Second, "how long a new process may take to get ready and take over at an upgrade before it is killed")
	f.tls.register(fl, true)
	_ = cmd.MarkFlagRequired("servers")
	return cmd
}

func runProxy(ctx context.Context, g *globalFlags, f *proxyFlags) error {
	log, err := g.logger("keel")
	if err != nil {
		return err
	}
	var servers []string
	for _, s := range strings.Split(f.servers, ",") {
		if s = strings.TrimSpace(s); s != "" {
			servers = append(servers, s)
		}
	}
	cache, err := parseSize(f.cache)
	if err != nil {
		return fmt.Errorf("--cache: %w", err)
	}
	if f.connect <= 0 {
		return fmt.Errorf("--connect-timeout %v: must be positive", f.connect)
	}
	ntls, err := f.tls.load()
	if err != nil {
		return err
	}
	writer := f.writer
	if writer == "" {
		host, _ := os.Hostname()
		writer = host + "/" + f.listen
	}
	u, err := upgrade.New(upgrade.Config{PIDFile: f.pidFile, Timeout: f.upgradeTO, Version: version, Log: log.Named("upgrade")})
	if err != nil {
		return err
	}
	defer u.Stop()
	var httpL net.Listener
	if f.http != "" {
		if httpL, err = u.Listen("tcp", f.http); err != nil {
			u.Fail(err)
			return fmt.Errorf("--http %s: %w", f.http, err)
		}
	}
	pcfg := proxy.Config{
		Servers: servers, Writer: writer, Takeover: f.takeover, CacheBytes: cache,
		WriteTimeout: f.writeTimeout, ReadTimeout: f.readTimeout, AttemptTimeout: f.attempt, RelayAfter: f.relayAfter, Version: version,
		PollInterval: f.poll, Log: log.Named("proxy"), Inherited: u.HasParent(),
		UpstreamTLS: ntls.Upstream,
	}
	stopChaos, err := chaosProxy(writer, &pcfg, log)
	if err != nil {
		if httpL != nil {
			httpL.Close()
		}
		return err
	}
	defer stopChaos()
	hup, stopHup := relaySIGHUP()
	defer stopHup()
	pr, err := proxy.NewProcess(proxy.ProcessConfig{
		Proxy:  pcfg,
		Listen: f.listen, ExportName: f.name, HTTP: httpL,
		ConnectTimeout: f.connect, DrainTimeout: f.drain, Log: log,
		Upgrader: u, Upgrades: hup, TLS: ntls.Mode, TLSConfig: ntls.Server,
	})
	if err != nil {
		if httpL != nil {
			httpL.Close()
		}
		u.Fail(err)
		return proxyFlagError(err)
	}
	// The cache is the bulk of the heap: let the garbage collector work
	// to keep the process near cache + 48 MiB rather than twice the cache.
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(int64(cache) + 48<<20)
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	return pr.Run(ctx)
}

// proxyFlagError names the flag behind a ProxyConfig field in err.
func proxyFlagError(err error) error {
	r := strings.NewReplacer(
		"proxy: Servers", "--servers", "proxy: Writer", "--writer",
		"proxy: WriteTimeout", "--write-timeout", "proxy: ReadTimeout", "--read-timeout",
		"proxy: AttemptTimeout", "--attempt-timeout", "proxy: RelayAfter", "--relay-after", "proxy: PollInterval", "--poll-interval",
		"proxy: ConnectTimeout", "--connect-timeout")
	return errors.New(r.Replace(err.Error()))
}
