package replica

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	"github.com/hashicorp/raft-wal/types"
	"golang.org/x/sys/unix"

	"github.com/keelstore/keel/replica/rawimage"
)

// A node's data directory:
//
//	DIR/disk.img        the volume: a plain raw image, qemu can boot it
//	DIR/raft/           the Raft log and stable store
//	DIR/snapshots/      metadata-only snapshots (a few hundred bytes each)
//	DIR/LOCK            flock held while a process runs this node
//	DIR/resync-needed   present while the image is being pulled from peers
const (
	ImageFile    = "disk.img"
	raftDir      = "raft"
	lockFile     = "LOCK"
	resyncMarker = "resync-needed"
)

// Errors of a Node.
var (
	// ErrDirLocked: another process runs a node on the same directory.
	ErrDirLocked = errors.New("replica: data directory is in use by another process")
	// ErrNotLeader: the call needs the leader; Leader says where it is.
	ErrNotLeader = errors.New("replica: not the leader")
	// ErrNoLeader: there is no leader (no quorum) within the wait.
	ErrNoLeader = errors.New("replica: no leader (quorum lost?)")
)

// Raft timing defaults. A leader killed outright is replaced after about
// the heartbeat timeout plus an election: measured with chaos/stall on
// loopback (2 cores, 12 kills each), the stall a client of keel proxy sees
// was p50 2.2 s / max 3.9 s with 1s/1s/500ms, 1.0 s / 1.3 s with
// 500ms/500ms/250ms, and 0.6 s / 0.8 s with 300ms/300ms/150ms, with no
// spurious elections idle or under load. 200ms/200ms/100ms caused
// spurious step-downs under heavy load (quorum contact gaps of 150-300 ms
// on a busy machine), so the lease stays at 250ms. Slower links need more.
const (
	DefaultHeartbeatTimeout   = 300 * time.Millisecond
	DefaultElectionTimeout    = 300 * time.Millisecond
	DefaultLeaderLeaseTimeout = 250 * time.Millisecond
)

// NodeConfig configures a Node. Zero fields take the documented defaults.
type NodeConfig struct {
	// ID names the node in the cluster. Required; letters, digits, '-',
	// '_' and '.'.
	ID string
	// Dir is the node's data directory (see the layout above). Required.
	Dir string
	// RaftAddr is the address the Raft transport listens on and that peers
	// dial (HOST:PORT). Required unless Transport is set.
	RaftAddr string
	// Self is what this node registers for others: its HTTP and NBD
	// addresses. Its ID and Raft fields are filled in from ID and the
	// transport.
	Self NodeInfo
	// Bootstrap starts a new one-node cluster when the directory holds no
	// Raft state yet; ignored when it does.
	Bootstrap bool
	// Size creates the image at this many bytes when it does not exist
	// (bootstrap, or a joining node told the size by the cluster). Zero:
	// the image must exist.
	Size uint64
	// LogStore chooses the log store. Default LogStoreWAL (see the closing
	// notes of the replicated volume issue for the measurement).
	LogStore LogStoreKind
	// LogCacheBytes bounds the memory of the cache of recent entries in
	// front of the log store (see LogCache). Default DefaultLogCacheBytes
	// (16 MiB); -1 turns the cache off; otherwise 1 MiB to 4 GiB. It
	// counts against the server's heap limit.
	LogCacheBytes int64
	// Transport overrides the TCP transport (tests use raft's in-memory
	// transport).
	Transport raft.Transport
	// WrapTransport, if set, wraps the transport (the TCP one, or
	// Transport) before raft gets it: the hook of the chaos tests' network
	// fault layer. The node still closes the transport it made itself.
	WrapTransport func(raft.Transport) raft.Transport
	// WrapWALFS, if set, wraps the file system under raft-wal's segment
	// files: the hook of the chaos tests' disk fault layer.
	WrapWALFS func(types.VFS) types.VFS
	// ImageHook, if set, sees every operation on the image first: the hook
	// of the chaos tests' fault layer under the image.
	ImageHook rawimage.Hook
	// HeartbeatTimeout, ElectionTimeout and LeaderLeaseTimeout are Raft's.
	// Defaults DefaultHeartbeatTimeout and friends.
	HeartbeatTimeout, ElectionTimeout, LeaderLeaseTimeout time.Duration
	// A snapshot is taken once SnapshotBytes have been written since the
	// last one, or SnapshotThreshold entries (checked every
	// SnapshotInterval). A snapshot costs an fdatasync of the image, so
	// taking one every few entries under small random writes would be
	// expensive; counting bytes keeps the log's disk use bounded under
	// large writes. TrailingLogs is how many entries stay in the log behind
	// a snapshot, so a briefly absent follower catches up from the log
	// rather than by a resync. Defaults 512 MiB, 16384, 10s, 4096.
	SnapshotBytes                   uint64
	SnapshotThreshold, TrailingLogs uint64
	SnapshotInterval                time.Duration
	// Restore pulls the image from up-to-date peers so that it holds every
	// write up to st.Index (see FSMConfig.Restore). Required for a node
	// that may ever fall behind a snapshot.
	Restore func(ctx context.Context, img *rawimage.File, st State) error
	// OnFatal is called when the image cannot be written (see FSMConfig).
	OnFatal func(error)
	// Forwarder carries a command proposed on a node that is not the
	// leader to the leader (see Node.Propose). Nil: Propose on a follower
	// fails with ErrNotLeader.
	Forwarder Forwarder
	// Level is the feature level this node speaks: it reads the log at it
	// and reports it. Default CurrentLevel; tests lower it to play an
	// older build. At most CurrentLevel.
	Level Level
	// Log is the node's logger.
	Log hclog.Logger
}

// Forwarder sends a command to the leader and returns the leader's result
// for it: what Apply returned there, including a refusal in Result.Err.
// An error means the outcome is unknown (not delivered, not answered, or
// the leader was not the leader any more); the caller may retry, which is
// safe for writes with a request id and for absolute overwrites. Forward
// must give up when ctx ends and should let the leader know ctx's
// deadline. The server package implements it over HTTP.
type Forwarder interface {
	Forward(ctx context.Context, leader NodeInfo, c *Command) (Result, error)
}

func (c *NodeConfig) defaults() {
	if c.LogStore == "" {
		c.LogStore = LogStoreWAL
	}
	if c.LogCacheBytes == 0 {
		c.LogCacheBytes = DefaultLogCacheBytes
	}
	if c.HeartbeatTimeout == 0 {
		c.HeartbeatTimeout = DefaultHeartbeatTimeout
	}
	if c.ElectionTimeout == 0 {
		c.ElectionTimeout = DefaultElectionTimeout
	}
	if c.LeaderLeaseTimeout == 0 {
		c.LeaderLeaseTimeout = DefaultLeaderLeaseTimeout
	}
	if c.SnapshotBytes == 0 {
		c.SnapshotBytes = 512 << 20
	}
	if c.SnapshotThreshold == 0 {
		c.SnapshotThreshold = 16384
	}
	if c.SnapshotInterval == 0 {
		c.SnapshotInterval = 10 * time.Second
	}
	if c.TrailingLogs == 0 {
		c.TrailingLogs = 4096
	}
	if c.Log == nil {
		c.Log = hclog.NewNullLogger()
	}
	if c.Level == 0 {
		c.Level = CurrentLevel
	}
}

// Validate checks the configuration; errors name the field.
func (c NodeConfig) Validate() error {
	if c.ID == "" || strings.IndexFunc(c.ID, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.')
	}) >= 0 || len(c.ID) > 64 {
		return fmt.Errorf("replica: ID %q: want 1 to 64 letters, digits, '-', '_' or '.'", c.ID)
	}
	if c.Dir == "" {
		return errors.New("replica: Dir is required")
	}
	if c.Transport == nil {
		if _, _, err := net.SplitHostPort(c.RaftAddr); err != nil {
			return fmt.Errorf("replica: RaftAddr %q: want HOST:PORT: %w", c.RaftAddr, err)
		}
	}
	if c.Size%512 != 0 {
		return fmt.Errorf("replica: Size %d: must be a multiple of 512", c.Size)
	}
	c.defaults()
	if c.HeartbeatTimeout < 5*time.Millisecond || c.ElectionTimeout < 5*time.Millisecond || c.LeaderLeaseTimeout < 5*time.Millisecond {
		return fmt.Errorf("replica: HeartbeatTimeout %v, ElectionTimeout %v, LeaderLeaseTimeout %v: each must be at least 5ms", c.HeartbeatTimeout, c.ElectionTimeout, c.LeaderLeaseTimeout)
	}
	if c.LeaderLeaseTimeout > c.HeartbeatTimeout {
		return fmt.Errorf("replica: LeaderLeaseTimeout %v: must be at most HeartbeatTimeout %v", c.LeaderLeaseTimeout, c.HeartbeatTimeout)
	}
	if c.ElectionTimeout < c.HeartbeatTimeout {
		return fmt.Errorf("replica: ElectionTimeout %v: must be at least HeartbeatTimeout %v", c.ElectionTimeout, c.HeartbeatTimeout)
	}
	if c.SnapshotInterval < 5*time.Millisecond {
		return fmt.Errorf("replica: SnapshotInterval %v: must be at least 5ms", c.SnapshotInterval)
	}
	if c.Level > CurrentLevel {
		return fmt.Errorf("replica: Level %d: this build speaks levels 1 to %d", c.Level, CurrentLevel)
	}
	if c.LogStore != LogStoreWAL && c.LogStore != LogStoreBolt {
		return fmt.Errorf("replica: LogStore %q: want %q or %q", c.LogStore, LogStoreWAL, LogStoreBolt)
	}
	if err := validLogCacheBytes(c.LogCacheBytes); err != nil {
		return err
	}
	return nil
}

// Node is one member of a volume's cluster: the image, the FSM, the stores
// and Raft.
type Node struct {
	cfg    NodeConfig
	log    hclog.Logger
	lock   *os.File
	img    *rawimage.File
	stores *Stores
	snaps  *raft.FileSnapshotStore
	trans  raft.Transport
	// ownTrans is the transport before WrapTransport.
	ownTrans raft.Transport
	fsm      *FSM
	raft     *raft.Raft

	// ctx is the node's lifetime: cancelled by Close, it ends everything
	// the node runs in the background (the snapshot trigger, an image
	// pull), and wg tracks the node's own goroutines.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	resyncing atomic.Bool // the image is being pulled from peers: not readable
	replayTo  uint64      // the log's last index at open (Replayed)

	readMu   sync.Mutex    // serialises the barrier of ReadBarrier
	readTerm atomic.Uint64 // the term whose every earlier entry the image holds (leader)

	levelsMu sync.Mutex       // guards levels and the writes of clusterLevel and levelTerm
	levels   map[string]Level // members' feature levels as last reported (NoteLevel)
	// clusterLevel is the lowest level of the members as RefreshLevels
	// found it in term levelTerm; in any other term the node assumes
	// LevelLegacy until refreshed (a new leader does not trust a figure
	// from before it led).
	clusterLevel atomic.Uint32
	levelTerm    atomic.Uint64

	digesting  atomic.Int32  // Digests running (DigestProgress)
	digestDone atomic.Uint64 // bytes the latest Digest has fingerprinted
}

// OpenNode opens or creates the node's directory and starts Raft. ctx
// bounds the opening (which finishes an interrupted image resync before
// Raft starts, and that can take long); the node then runs until Close,
// whatever becomes of ctx.
func OpenNode(ctx context.Context, cfg NodeConfig) (_ *Node, err error) {
	cfg.defaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	n := &Node{cfg: cfg, log: cfg.Log, levels: map[string]Level{}}
	n.ctx, n.cancel = context.WithCancel(context.WithoutCancel(ctx))
	defer func() {
		if err != nil {
			n.cancel()
			n.fsmStop()
			n.closeResources()
		}
	}()
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("replica: creating %s: %w", cfg.Dir, err)
	}
	if n.lock, err = lockDir(cfg.Dir); err != nil {
		return nil, err
	}
	n.img, err = rawimage.Open(filepath.Join(cfg.Dir, ImageFile), rawimage.Options{Size: cfg.Size, Hook: cfg.ImageHook})
	if err != nil {
		return nil, err
	}
	if n.stores, err = OpenStoresFS(cfg.LogStore, filepath.Join(cfg.Dir, raftDir), cfg.Log, cfg.WrapWALFS); err != nil {
		return nil, err
	}
	if cfg.LogCacheBytes > 0 {
		n.stores.Log = NewLogCache(n.stores.Log, cfg.LogCacheBytes)
	}
	if n.snaps, err = raft.NewFileSnapshotStoreWithLogger(cfg.Dir, 3, cfg.Log.Named("snapshots")); err != nil {
		return nil, fmt.Errorf("replica: snapshot store: %w", err)
	}

	// The FSM starts from the newest local snapshot's state; raft replays
	// the log after it (NoSnapshotRestoreOnStart: the image already holds
	// at least everything up to the snapshot).
	st, err := n.latestState()
	if err != nil {
		return nil, err
	}
	n.fsm = NewFSM(n.ctx, FSMConfig{
		Image:   n.img,
		Log:     cfg.Log.Named("fsm"),
		OnFatal: cfg.OnFatal,
		Restore: n.restore,
		Level:   cfg.Level,
	}, st)
	if _, err := os.Stat(filepath.Join(cfg.Dir, resyncMarker)); err == nil {
		// A resync was interrupted: the image is not yet what the snapshot
		// promises. Finish it before raft counts on it.
		n.log.Warn("an interrupted image resync must finish before this node starts", "index", st.Index)
		if err := n.restore(ctx, st); err != nil {
			return nil, err
		}
	}

	n.trans = cfg.Transport
	if n.trans == nil {
		addr, err := net.ResolveTCPAddr("tcp", cfg.RaftAddr)
		if err != nil {
			return nil, fmt.Errorf("replica: RaftAddr %q: %w", cfg.RaftAddr, err)
		}
		n.trans, err = raft.NewTCPTransportWithLogger(cfg.RaftAddr, addr, 4, 10*time.Second, TransportLogger(cfg.Log.Named("transport")))
		if err != nil {
			return nil, fmt.Errorf("replica: raft transport on %s: %w", cfg.RaftAddr, err)
		}
	}
	n.ownTrans = n.trans
	n.trans = drainPipelines(n.trans) // pipeline.go: hashicorp/raft#612
	if cfg.WrapTransport != nil {
		n.trans = cfg.WrapTransport(n.trans)
	}

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.ID)
	rc.Logger = RaftLogger(cfg.Log.Named("raft"))
	rc.HeartbeatTimeout = cfg.HeartbeatTimeout
	rc.ElectionTimeout = cfg.ElectionTimeout
	rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimeout
	rc.SnapshotThreshold = cfg.SnapshotThreshold
	rc.SnapshotInterval = cfg.SnapshotInterval
	rc.TrailingLogs = cfg.TrailingLogs
	rc.NoSnapshotRestoreOnStart = true
	rc.CommitTimeout = 5 * time.Millisecond
	rc.BatchApplyCh = true // group commit: concurrent writes share a log append and its fsync
	// Entries carry up to 32 MiB of data; 16 per AppendEntries bounds what
	// one replication round holds in memory while still grouping small
	// writes (16 and 32 measured alike for throughput on 2 cores).
	rc.MaxAppendEntries = 16
	if err := raft.ValidateConfig(rc); err != nil {
		return nil, fmt.Errorf("replica: raft config: %w", err)
	}

	if cfg.Bootstrap {
		has, err := raft.HasExistingState(n.stores.Log, n.stores.Stable, n.snaps)
		if err != nil {
			return nil, fmt.Errorf("replica: checking for raft state: %w", err)
		}
		if !has {
			conf := raft.Configuration{Servers: []raft.Server{{
				Suffrage: raft.Voter, ID: rc.LocalID, Address: n.trans.LocalAddr(),
			}}}
			if err := raft.BootstrapCluster(rc, n.stores.Log, n.stores.Stable, n.snaps, n.trans, conf); err != nil {
				return nil, fmt.Errorf("replica: bootstrapping: %w", err)
			}
			n.log.Info("bootstrapped a new cluster", "id", cfg.ID, "size", n.img.Size())
		}
	}
	// Every entry the log holds now may have reached the image before
	// this open (a restart, a reopen after a panic); raft applies again
	// those after the last snapshot, in order, so until it is past them
	// a block may read as it was some entries ago (Replayed).
	if n.replayTo, err = lastCommand(n.stores.Log); err != nil {
		return nil, err
	}
	n.raft, err = raft.NewRaft(rc, n.fsm, n.stores.Log, n.stores.Stable, n.snaps, n.trans)
	if err != nil {
		return nil, fmt.Errorf("replica: starting raft: %w", err)
	}
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		n.snapshotByBytes(n.ctx)
	}()
	return n, nil
}

// snapshotByBytes asks for a snapshot whenever SnapshotBytes have been
// applied since the last one, until ctx ends.
func (n *Node) snapshotByBytes(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	last := n.fsm.AppliedBytes()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if b := n.fsm.AppliedBytes(); b-last >= n.cfg.SnapshotBytes {
			if err := n.raft.Snapshot().Error(); err != nil && !errors.Is(err, raft.ErrNothingNewToSnapshot) {
				n.log.Warn("snapshot failed", "error", err)
				continue
			}
			last = b
		}
	}
}

// lockDir takes DIR/LOCK so two processes never run the same node.
func lockDir(dir string) (*os.File, error) {
	path := filepath.Join(dir, lockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("replica: opening %s: %w", path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		holder, _ := os.ReadFile(path)
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s (held by pid %s)", ErrDirLocked, dir, strings.TrimSpace(string(holder)))
		}
		return nil, fmt.Errorf("replica: locking %s: %w", path, err)
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return f, nil
}

// latestState reads the newest local snapshot's state, or a fresh state.
func (n *Node) latestState() (State, error) {
	metas, err := n.snaps.List()
	if err != nil {
		return State{}, fmt.Errorf("replica: listing snapshots: %w", err)
	}
	if len(metas) == 0 {
		return State{}, nil
	}
	_, rc, err := n.snaps.Open(metas[0].ID)
	if err != nil {
		return State{}, fmt.Errorf("replica: opening snapshot %s: %w", metas[0].ID, err)
	}
	defer rc.Close()
	st, err := ReadState(rc)
	if err != nil {
		return State{}, err
	}
	if st.Size != 0 && st.Size != n.img.Size() {
		return State{}, fmt.Errorf("replica: snapshot %s is of a %d-byte volume but %s is %d bytes", metas[0].ID, st.Size, n.img.Path(), n.img.Size())
	}
	n.log.Info("starting from snapshot", "id", metas[0].ID, "index", st.Index)
	return st, nil
}

// restore runs the configured image restore under the resync marker, so
// a crash in the middle is finished at the next start.
func (n *Node) restore(ctx context.Context, st State) error {
	if n.cfg.Restore == nil {
		return errors.New("replica: no image source configured for a resync")
	}
	n.resyncing.Store(true)
	defer n.resyncing.Store(false)
	marker := filepath.Join(n.cfg.Dir, resyncMarker)
	if err := writeDurable(marker, []byte(strconv.FormatUint(st.Index, 10)+"\n")); err != nil {
		return err
	}
	if err := n.cfg.Restore(ctx, n.img, st); err != nil {
		return err
	}
	if err := n.img.Sync(); err != nil {
		return err
	}
	if err := os.Remove(marker); err != nil {
		return fmt.Errorf("replica: removing %s: %w", marker, err)
	}
	syncDir(n.cfg.Dir)
	return nil
}

func writeDurable(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("replica: writing %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("replica: writing %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("replica: syncing %s: %w", path, err)
	}
	f.Close()
	syncDir(filepath.Dir(path))
	return nil
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
}

// Resyncing reports whether the image is being pulled from peers; while it
// is, the image holds a mix of old and new ranges and must not be read.
func (n *Node) Resyncing() bool { return n.resyncing.Load() }

// lastCommand is the index of the last command in the log (raft's no-op
// and configuration entries never reach the FSM's applied index), 0 if
// there is none after the log's first index.
func lastCommand(logs raft.LogStore) (uint64, error) {
	first, err := logs.FirstIndex()
	if err != nil {
		return 0, fmt.Errorf("replica: reading the log's first index: %w", err)
	}
	last, err := logs.LastIndex()
	if err != nil {
		return 0, fmt.Errorf("replica: reading the log's last index: %w", err)
	}
	for i := last; i >= first && i > 0; i-- {
		var l raft.Log
		if err := logs.GetLog(i, &l); err != nil {
			return 0, fmt.Errorf("replica: reading log entry %d: %w", i, err)
		}
		if l.Type == raft.LogCommand {
			return i, nil
		}
	}
	return 0, nil
}

// Replaying reports whether raft is applying again entries the log held
// when the node opened, which the image may already have had: until it is
// past them, a block may read as an earlier entry left it (a write seen
// undone), so the node must not serve reads. Without a leader nothing is
// applied and the image stays as it was before the open, so it is
// readable then (without quorum reads go on). A replay that starts
// between a reader's check and its read is not covered.
func (n *Node) Replaying() bool {
	if n.fsm.AppliedIndex() >= n.replayTo {
		return false
	}
	_, ok := n.Leader()
	return ok
}

// ID is the node's id.
func (n *Node) ID() string { return n.cfg.ID }

// Raft is the node's raft instance.
func (n *Node) Raft() *raft.Raft { return n.raft }

// FSM is the node's state machine.
func (n *Node) FSM() *FSM { return n.fsm }

// Image is the node's raw image.
func (n *Node) Image() *rawimage.File { return n.img }

// Dir is the node's data directory.
func (n *Node) Dir() string { return n.cfg.Dir }

// Self is this node's registry entry.
func (n *Node) Self() NodeInfo {
	s := n.cfg.Self
	s.ID = n.cfg.ID
	s.Raft = string(n.trans.LocalAddr())
	return s
}

// IsLeader reports whether this node is the leader now.
func (n *Node) IsLeader() bool { return n.raft.State() == raft.Leader }

// ReadBarrier returns once a read of this node's image sees every write
// the cluster acknowledged before the call, as far as this node can tell.
// A leader elected a moment ago may hold committed entries it has not
// applied yet (it was a follower a moment ago): the first read of each
// term waits for a raft barrier, which is applied after every earlier
// entry; later reads of the term cost one atomic load (the leader applies
// a write before it is acknowledged). On a follower it returns at once: a
// follower's reads see the writes made through it (Propose waits for the
// local apply), not necessarily those made elsewhere.
//
// An error means the barrier could not be committed before ctx ended or
// leadership was lost; the caller decides whether to read anyway.
func (n *Node) ReadBarrier(ctx context.Context) error {
	if !n.IsLeader() {
		return nil
	}
	term := n.raft.CurrentTerm()
	if n.readTerm.Load() == term {
		return nil
	}
	n.readMu.Lock()
	defer n.readMu.Unlock()
	if n.readTerm.Load() == term {
		return nil // another reader's barrier covered this term
	}
	timeout := 10 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
	}
	if timeout <= 0 {
		return context.DeadlineExceeded
	}
	f := n.raft.Barrier(timeout)
	errc := make(chan error, 1)
	go func() { errc <- f.Error() }() // ends with the barrier (at most timeout)
	select {
	case err := <-errc:
		if err != nil {
			return fmt.Errorf("replica: read barrier: %w", err)
		}
		// Still the same term: everything committed before the barrier,
		// which includes every entry of earlier terms, is applied.
		if n.raft.CurrentTerm() == term {
			n.readTerm.Store(term)
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Leader returns the leader's registry entry, if there is a leader.
func (n *Node) Leader() (NodeInfo, bool) {
	addr, id := n.raft.LeaderWithID()
	if id == "" {
		return NodeInfo{}, false
	}
	info, ok := n.fsm.State().Nodes[string(id)]
	if !ok {
		info = NodeInfo{ID: string(id), Raft: string(addr)}
	}
	return info, true
}

// Propose commits a command through the leader, wherever it is, and
// returns its result once this node has applied it too, so a caller on
// any node reads its own writes. On the leader it is Apply; elsewhere the
// command goes to the leader through the configured Forwarder. ctx bounds
// the whole call, and its deadline travels with a forwarded command. A
// refusal by the state machine (ErrStaleEpoch, ErrWriterHeld,
// ErrOutOfRange) is a result, in Result.Err; an error means the command
// may or may not have been committed.
func (n *Node) Propose(ctx context.Context, c *Command) (Result, error) {
	if n.IsLeader() {
		return n.Apply(ctx, c)
	}
	leader, ok := n.Leader()
	if !ok {
		return Result{}, ErrNoLeader
	}
	if n.cfg.Forwarder == nil {
		return Result{}, fmt.Errorf("%w: leader is %s and no forwarder is configured", ErrNotLeader, leader.ID)
	}
	res, err := n.cfg.Forwarder.Forward(ctx, leader, c)
	if err != nil {
		return Result{}, fmt.Errorf("replica: forwarding %v to leader %s: %w", c.Kind, leader.ID, err)
	}
	if err := n.fsm.WaitApplied(ctx, res.Index); err != nil {
		return Result{}, fmt.Errorf("replica: %v committed at index %d but not yet applied here: %w", c.Kind, res.Index, err)
	}
	return res, nil
}

// Apply commits a command through Raft on this node, which must be the
// leader (others get ErrNotLeader; Propose forwards instead). The entry is
// written in the form the cluster's lowest member reads (ClusterLevel); a
// command that needs a higher level is not proposed and answered with
// ErrFeatureLevel in Result.Err. It returns
// once the command is committed on a quorum and applied here, or fails:
// ErrNotLeader when leadership was lost (the command may or may not have
// been committed), ErrNoLeader when Raft could not take the command before
// ctx's deadline. Without a deadline Raft waits as long as it leads.
func (n *Node) Apply(ctx context.Context, c *Command) (Result, error) {
	if !n.IsLeader() {
		return Result{}, ErrNotLeader
	}
	var timeout time.Duration // 0: raft waits to enqueue as long as it must
	if d, ok := ctx.Deadline(); ok {
		if timeout = time.Until(d); timeout <= 0 {
			return Result{}, fmt.Errorf("%w: %w", ErrNoLeader, context.DeadlineExceeded)
		}
	}
	if err := ctx.Err(); err != nil {
		return Result{}, fmt.Errorf("replica: apply: %w", err)
	}
	data, err := c.appendForLog(n.ClusterLevel()) // c.Encoded, when it is that form
	if err != nil {
		// Refused before it was proposed: a result, like the FSM's
		// refusals, so it reads the same through a Forwarder.
		return Result{Err: err}, nil
	}
	f := n.raft.Apply(data, timeout)
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) ||
			errors.Is(err, raft.ErrLeadershipTransferInProgress) || errors.Is(err, raft.ErrRaftShutdown) {
			return Result{}, fmt.Errorf("%w: %w", ErrNotLeader, err)
		}
		if errors.Is(err, raft.ErrEnqueueTimeout) {
			return Result{}, fmt.Errorf("%w: %w", ErrNoLeader, err)
		}
		return Result{}, fmt.Errorf("replica: apply: %w", err)
	}
	res, ok := f.Response().(Result)
	if !ok {
		return Result{}, fmt.Errorf("replica: apply: unexpected response %T", f.Response())
	}
	return res, nil
}

// Level is the feature level this node speaks.
func (n *Node) Level() Level { return n.cfg.Level }

// NoteLevel records the feature level member id reported (zero: it said
// none, a build before levels). A level below the cluster's lowers it at
// once: a leader notes a joining node's level before adding it.
func (n *Node) NoteLevel(id string, l Level) {
	l = l.Or()
	n.levelsMu.Lock()
	defer n.levelsMu.Unlock()
	n.levels[id] = l
	if Level(n.clusterLevel.Load()) > l {
		n.clusterLevel.Store(uint32(l))
	}
}

// RefreshLevels sets the cluster's level to the lowest of this node's and
// of every other member, as last noted (NoteLevel): the members are the
// Raft configuration's servers and the registry's entries (a joining node
// is registered before it is added, so its level counts from then on). A
// member never heard from counts as LevelLegacy. The leader's Membership
// calls it after polling the members' status.
func (n *Node) RefreshLevels() (Level, error) {
	term := n.raft.CurrentTerm()
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return 0, fmt.Errorf("replica: refreshing levels: %w", err)
	}
	members := map[string]bool{}
	for _, s := range f.Configuration().Servers {
		members[string(s.ID)] = true
	}
	for id := range n.fsm.State().Nodes {
		members[id] = true
	}
	low := n.cfg.Level
	n.levelsMu.Lock()
	defer n.levelsMu.Unlock()
	for id := range members {
		if id == n.cfg.ID {
			continue
		}
		l, ok := n.levels[id]
		if !ok {
			l = LevelLegacy
		}
		low = min(low, l)
	}
	n.clusterLevel.Store(uint32(low))
	n.levelTerm.Store(term)
	return low, nil
}

// ClusterLevel is the feature level every member speaks, as this node
// last found it in the current term (RefreshLevels), or LevelLegacy.
func (n *Node) ClusterLevel() Level {
	if n.levelTerm.Load() != n.raft.CurrentTerm() {
		return LevelLegacy
	}
	return Level(n.clusterLevel.Load())
}

// WaitLeader waits until some node is leader, or ctx ends (ErrNoLeader).
func (n *Node) WaitLeader(ctx context.Context) (NodeInfo, error) {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		if l, ok := n.Leader(); ok {
			return l, nil
		}
		select {
		case <-ctx.Done():
			return NodeInfo{}, fmt.Errorf("%w: %v", ErrNoLeader, ctx.Err())
		case <-t.C:
		}
	}
}

// Close stops the node: its background work ends and is waited for (an
// image pull in progress must not hold Raft's shutdown), leadership is
// handed over when this node leads a cluster of more than one, then Raft
// stops and the stores close.
func (n *Node) Close() error {
	n.cancel()
	n.wg.Wait()
	n.fsmStop()
	if n.raft != nil {
		if n.IsLeader() && n.voters() > 1 {
			if err := n.raft.LeadershipTransfer().Error(); err != nil {
				n.log.Warn("leadership transfer before stopping failed", "error", err)
			}
		}
		if err := n.raft.Shutdown().Error(); err != nil {
			n.log.Warn("raft shutdown", "error", err)
		}
	}
	return n.closeResources()
}

func (n *Node) fsmStop() {
	if n.fsm != nil {
		n.fsm.Stop()
	}
}

func (n *Node) voters() int {
	f := n.raft.GetConfiguration()
	if f.Error() != nil {
		return 0
	}
	c := 0
	for _, s := range f.Configuration().Servers {
		if s.Suffrage == raft.Voter {
			c++
		}
	}
	return c
}

func (n *Node) closeResources() error {
	var errs []error
	if tc, ok := n.ownTrans.(raft.WithClose); ok && n.cfg.Transport == nil {
		errs = append(errs, tc.Close())
	}
	if n.stores != nil {
		errs = append(errs, n.stores.Close())
	}
	if n.img != nil {
		errs = append(errs, n.img.Sync(), n.img.Close())
	}
	if n.lock != nil {
		errs = append(errs, n.lock.Close())
	}
	return errors.Join(errs...)
}
