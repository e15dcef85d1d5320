package replica

import (
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	wal "github.com/hashicorp/raft-wal"
	walfs "github.com/hashicorp/raft-wal/fs"
	"github.com/hashicorp/raft-wal/segment"
	"github.com/hashicorp/raft-wal/types"
)

// LogStoreKind names a Raft log store implementation.
type LogStoreKind string

// The log stores Keel can use. Both fsync before they report an append, so
// an entry is durable on this node when raft counts it.
const (
	// LogStoreWAL is hashicorp/raft-wal: segment files appended in place.
	LogStoreWAL LogStoreKind = "wal"
	// LogStoreBolt is hashicorp/raft-boltdb/v2 (bbolt B+tree).
	LogStoreBolt LogStoreKind = "bolt"
)

// Stores is a node's durable Raft state: the log and the stable store
// (current term, last vote).
type Stores struct {
	Log    raft.LogStore
	Stable raft.StableStore
	io.Closer
}

// OpenStores opens (creating if needed) the log and stable stores of kind
// under dir.
func OpenStores(kind LogStoreKind, dir string, log hclog.Logger) (*Stores, error) {
	return OpenStoresFS(kind, dir, log, nil)
}

// OpenStoresFS is OpenStores with raft-wal's segment files under
// wrap(the real file system) when wrap is set (the chaos tests' disk fault
// layer; ignored for bolt).
func OpenStoresFS(kind LogStoreKind, dir string, log hclog.Logger, wrap func(types.VFS) types.VFS) (*Stores, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("replica: creating %s: %w", dir, err)
	}
	switch kind {
	case LogStoreWAL:
		wdir := filepath.Join(dir, "wal")
		if err := os.MkdirAll(wdir, 0o755); err != nil {
			return nil, fmt.Errorf("replica: creating %s: %w", wdir, err)
		}
		var w *wal.WAL
		var err error
		if wrap != nil {
			w, err = wal.Open(wdir, wal.WithLogger(log.Named("wal")), wal.WithSegmentFiler(segment.NewFiler(wdir, wrap(walfs.New()))))
		} else {
			w, err = wal.Open(wdir, wal.WithLogger(log.Named("wal")))
		}
		if err != nil {
			return nil, fmt.Errorf("replica: opening raft-wal in %s: %w", dir, err)
		}
		return &Stores{Log: w, Stable: w, Closer: w}, nil
	case LogStoreBolt:
		b, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(dir, "raft.db")})
		if err != nil {
			return nil, fmt.Errorf("replica: opening raft-boltdb in %s: %w", dir, err)
		}
		return &Stores{Log: b, Stable: b, Closer: b}, nil
	}
	return nil, fmt.Errorf("replica: log store %q: want %q or %q", kind, LogStoreWAL, LogStoreBolt)
}
