package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/nbdserve"
	"github.com/keelstore/keel/services/server"
	"github.com/keelstore/keel/services/wire"
	"github.com/keelstore/keel/upgrade"
)

type serverFlags struct {
	dir          string
	id           string
	raftAddr     string
	nbdAddr      string
	httpAddr     string
	bootstrap    bool
	size         string
	join         string
	logStore     string
	writeTimeout time.Duration
	drain        time.Duration
	snapEntries  uint64
	snapBytes    uint64
	snapInterval time.Duration
	trailingLogs uint64
	memLimit     string
	logCache     string
	heartbeat    time.Duration
	pidFile      string
	upgradeTO    time.Duration
	election     time.Duration
	lease        time.Duration
	tls          nbdTLSFlags
}

func newServerCmd(g *globalFlags) *cobra.Command {
	f := &serverFlags{}
	cmd := &cobra.Command{
		Use:   "server --dir DIR --id ID --raft HOST:PORT --nbd ADDR --http HOST:PORT (--bootstrap --size SIZE | --join HTTP-ADDR)",
		Short: "Run one replica of a volume (Raft over a plain raw image)",
		Long: `Run one member of a replicated volume. One process per volume per machine.

DIR holds the volume as a plain raw image, DIR/disk.img (qemu can boot it),
and the Raft state. --bootstrap starts a new one-node cluster of --size;
--join asks any member (its --http address) to add this node, which joins as
a non-voter, pulls the image from its peers and becomes a voter once caught
up. A node restarted on an existing DIR needs neither.

Every node serves NBD on --nbd. Reads come from the local image; writes are
committed through Raft on a quorum before they are acknowledged (a follower
forwards them to the leader). Without a quorum, reads keep working and
writes fail with EIO after --write-timeout.

SIGHUP (keel upgrade --pid-file PATH) replaces the process by a fresh start
of its binary in place: a leader hands leadership over, the old process
stops Raft and releases DIR, the new one (which inherited the Raft, HTTP and
NBD listeners) opens it and takes over every NBD connection. A new binary
that fails is refused and the old process keeps serving. Upgrade one node
at a time (docs/upgrade.md).`,
		Example: `  keel server --dir /var/lib/keel/vm1 --id n1 --raft 10.0.0.1:7001 --nbd 10.0.0.1:10809 --http 10.0.0.1:7002 --bootstrap --size 64G
  keel server --dir /var/lib/keel/vm1 --id n2 --raft 10.0.0.2:7001 --nbd 10.0.0.2:10809 --http 10.0.0.2:7002 --join 10.0.0.1:7002`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runServer(cmd.Context(), g, f) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.pidFile, "pid-file", "", "write the pid here once serving; SIGHUP (keel upgrade --pid-file) replaces the process by a fresh start of its binary: leadership is handed over, NBD connections are kept")
	fl.DurationVar(&f.upgradeTO, "upgrade-timeout", 60*time.Second, "how long a new process may take to get ready and take over at an upgrade before it is killed")
	fl.StringVar(&f.dir, "dir", "", "data directory: DIR/disk.img and the Raft state (required)")
	fl.StringVar(&f.id, "id", "", "this node's id in the cluster, e.g. n1 (required)")
	fl.StringVar(&f.raftAddr, "raft", "", "HOST:PORT for Raft traffic between servers (required)")
	fl.StringVar(&f.nbdAddr, "nbd", "", "NBD address: HOST:PORT or unix:PATH (required)")
	fl.StringVar(&f.httpAddr, "http", "", "HOST:PORT for status, metrics and admin calls (required)")
	fl.BoolVar(&f.bootstrap, "bootstrap", false, "start a new one-node cluster (needs --size)")
	fl.StringVar(&f.size, "size", "", "volume size for --bootstrap, e.g. 64G")
	fl.StringVar(&f.join, "join", "", "HTTP address of any member to join")
	fl.StringVar(&f.logStore, "log-store", string(replica.LogStoreWAL), "Raft log store: wal or bolt")
	fl.DurationVar(&f.writeTimeout, "write-timeout", 10*time.Second, "how long a write waits for a quorum before failing with EIO")
	fl.DurationVar(&f.drain, "drain-timeout", 60*time.Second, "on stop, how long in-flight NBD requests may take")
	fl.Uint64Var(&f.snapBytes, "snapshot-bytes", 0, "take a snapshot after this many bytes written (default 512 MiB)")
	fl.Uint64Var(&f.snapEntries, "snapshot-threshold", 0, "take a snapshot after this many log entries (default 16384)")
	fl.DurationVar(&f.snapInterval, "snapshot-interval", 0, "check for a snapshot this often (default 10s)")
	fl.Uint64Var(&f.trailingLogs, "trailing-logs", 0, "log entries kept behind a snapshot for lagging followers (default 4096)")
	fl.DurationVar(&f.heartbeat, "heartbeat-timeout", replica.DefaultHeartbeatTimeout, "Raft: a follower without contact from the leader this long starts an election")
	fl.DurationVar(&f.election, "election-timeout", replica.DefaultElectionTimeout, "Raft: a candidate without a result this long starts another election")
	fl.DurationVar(&f.lease, "leader-lease-timeout", replica.DefaultLeaderLeaseTimeout, "Raft: a leader without contact from a quorum this long steps down (at most --heartbeat-timeout)")
	fl.StringVar(&f.logCache, "log-cache", "16M", "memory for the cache of recent Raft log entries in front of the log store (1M to 4G); 0 turns it off")
	f.tls.register(fl, false)
	fl.StringVar(&f.memLimit, "memory-limit", "192M", "soft limit for the Go heap (GOMEMLIMIT); the garbage collector works harder near it")
	for _, name := range []string{"dir", "id", "raft", "nbd", "http"} {
		_ = cmd.MarkFlagRequired(name)
	}
	return cmd
}

func runServer(ctx context.Context, g *globalFlags, f *serverFlags) error {
	log, err := g.logger("keel")
	if err != nil {
		return err
	}
	log = log.With("node", f.id)
	if err := checkDir("--dir", f.dir); err != nil {
		return err
	}
	if f.writeTimeout < 100*time.Millisecond || f.writeTimeout > time.Hour {
		return fmt.Errorf("--write-timeout %v: must be from 100ms to 1h", f.writeTimeout)
	}
	fresh := !hasRaftState(f.dir)
	switch {
	case f.bootstrap && f.join != "":
		return errors.New("--bootstrap and --join exclude each other")
	case fresh && !f.bootstrap && f.join == "":
		return fmt.Errorf("%s holds no node yet: give --bootstrap --size SIZE to start a cluster, or --join HTTP-ADDR to join one", f.dir)
	case f.bootstrap && f.size == "" && fresh:
		return errors.New("--bootstrap needs --size")
	case !fresh && (f.bootstrap || f.join != ""):
		log.Info("existing node directory: --bootstrap/--join ignored", "dir", f.dir)
	}
	memLimit, err := parseSize(f.memLimit)
	if err != nil || memLimit < 32<<20 {
		return fmt.Errorf("--memory-limit %q: want a size of at least 32M", f.memLimit)
	}
	debug.SetMemoryLimit(int64(memLimit))
	logCache, err := parseSize(f.logCache)
	if err != nil {
		return fmt.Errorf("--log-cache %q: %w", f.logCache, err)
	}
	logCacheBytes := int64(logCache)
	if logCache == 0 {
		logCacheBytes = -1 // off
	} else if logCache < 1<<20 || logCache > 4<<30 {
		return fmt.Errorf("--log-cache %s: must be 0 (off) or from 1M to 4G", f.logCache)
	}
	size, err := parseVolumeSize(f.size)
	if err != nil {
		return err
	}
	ntls, err := f.tls.load()
	if err != nil {
		return err
	}

	u, err := upgrade.New(upgrade.Config{PIDFile: f.pidFile, Timeout: f.upgradeTO, Version: version, Log: log.Named("upgrade")})
	if err != nil {
		return err
	}
	defer u.Stop()
	var ls listeners
	fail := func(err error) error {
		ls.close()
		u.Fail(err) // a child tells its parent, which keeps serving
		return err
	}
	httpL, err := u.Listen("tcp", f.httpAddr)
	if err != nil {
		return fail(fmt.Errorf("--http %s: %w", f.httpAddr, err))
	}
	ls = append(ls, httpL)
	raftL, err := u.Listen("tcp", f.raftAddr)
	if err != nil {
		return fail(fmt.Errorf("--raft %s: %w", f.raftAddr, err))
	}
	ls = append(ls, raftL)
	nbdL, uri, err := nbdserve.ListenWith(f.nbdAddr, u)
	if err != nil {
		return fail(fmt.Errorf("--nbd: %w", err))
	}
	ls = append(ls, nbdL)
	client := wire.NewClient(10 * time.Second)
	self := replica.NodeInfo{ID: f.id, Raft: f.raftAddr, HTTP: httpL.Addr().String(), NBD: f.nbdAddr}

	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	hup, stopHup := relaySIGHUP()
	defer stopHup()

	if fresh && f.join != "" {
		size, err = server.Join(ctx, client, f.join, self, replica.CurrentLevel, version, log)
		if err != nil {
			return fail(err)
		}
	}
	if !fresh {
		size = 0 // the image exists; its size is what it is
	}

	nodeCfg := replica.NodeConfig{
		ID: f.id, Dir: f.dir, RaftAddr: f.raftAddr, Self: self,
		Bootstrap: f.bootstrap, Size: size,
		LogStore: replica.LogStoreKind(f.logStore), LogCacheBytes: logCacheBytes,
		HeartbeatTimeout: f.heartbeat, ElectionTimeout: f.election, LeaderLeaseTimeout: f.lease,
		SnapshotBytes: f.snapBytes, SnapshotThreshold: f.snapEntries, SnapshotInterval: f.snapInterval, TrailingLogs: f.trailingLogs,
		OnFatal: func(err error) {
			if errors.Is(err, replica.ErrUnknownCommand) {
				log.Error("stopping: the log holds an entry of a newer build; run that build (or newer) on this node", "error", err, "version", version, "level", replica.CurrentLevel)
			} else {
				log.Error("stopping: the image cannot be written; fix the disk, then restart this node", "error", err)
			}
			fmt.Fprintln(os.Stderr, "keel server: FATAL:", err)
			os.Exit(70)
		},
		Log: log.Named("replica"),
	}
	stopChaos, err := chaosServer(f.id, &nodeCfg, log)
	if err != nil {
		return fail(err)
	}
	defer stopChaos()
	volSize := size
	if volSize == 0 {
		st, err := os.Stat(filepath.Join(f.dir, replica.ImageFile))
		if err != nil {
			return fail(fmt.Errorf("%s: %w", f.dir, err))
		}
		volSize = uint64(st.Size())
	}
	srv, err := server.New(server.Config{
		Node: nodeCfg, HTTP: httpL, NBD: nbdL, Raft: raftL, VolumeSize: volSize,
		WriteTimeout: f.writeTimeout, DrainTimeout: f.drain, Client: client, Version: version, Log: log,
		Upgrader: u, Upgrades: hup, NBDTLS: ntls.Mode, NBDTLSConfig: ntls.Server,
	})
	if err != nil {
		return fail(err)
	}
	log.Info("server starting", "version", version, "level", replica.CurrentLevel, "dir", f.dir, "raft", f.raftAddr, "http", httpL.Addr().String(), "nbd", uri, "nbd_tls", ntls.String(), "size", volSize, "taking_over", u.HasParent())
	return srv.Run(ctx)
}

// hasRaftState reports whether dir already holds a node.
func hasRaftState(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, "raft"))
	return err == nil
}

// listeners are the ones opened so far, closed if the start fails.
type listeners []net.Listener

func (ls listeners) close() {
	for _, l := range ls {
		l.Close()
	}
}
