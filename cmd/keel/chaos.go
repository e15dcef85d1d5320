//go:build chaos

package main

// Built only with -tags chaos: the fault layers of chaos/ installed into
// keel's hooks, and a control socket through which a soak switches them
// (package chaos/control). A plain build never compiles this file, so
// keel's production binary links nothing of chaos/ (deps_test.go checks
// the untagged build).

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	walfs "github.com/hashicorp/raft-wal/fs"
	"github.com/hashicorp/raft-wal/types"

	"github.com/keelstore/keel/chaos/control"
	"github.com/keelstore/keel/chaos/diskfault"
	"github.com/keelstore/keel/chaos/faultpoint"
	"github.com/keelstore/keel/chaos/imagefault"
	"github.com/keelstore/keel/chaos/netfault"
	"github.com/keelstore/keel/replica"
	"github.com/keelstore/keel/services/proxy"
	"github.com/keelstore/keel/supervise"
)

// envSeed seeds the layers' random choices (default 1).
const envSeed = "KEEL_CHAOS_SEED"

func init() {
	chaosServer = func(id string, cfg *replica.NodeConfig, log hclog.Logger) (func(), error) {
		dir := os.Getenv(control.EnvDir)
		if dir == "" {
			return func() {}, nil
		}
		seed := uint64(1)
		if s := os.Getenv(envSeed); s != "" {
			v, err := strconv.ParseUint(s, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("$%s: %w", envSeed, err)
			}
			seed = v
		}
		tab := netfault.NewTable(seed)
		cfg.WrapTransport = func(t raft.Transport) raft.Transport { return netfault.Wrap(t, tab) }
		disk := diskfault.New(walfs.New(), seed)
		cfg.WrapWALFS = func(types.VFS) types.VFS { return disk }
		image := imagefault.New(filepath.Join(cfg.Dir, replica.ImageFile), seed)
		cfg.ImageHook = image
		crash := func() {
			pending := disk.Pending()
			lost, err := disk.Crash()
			blocks := image.Pending()
			undone, kept, ierr := image.Crash()
			log.Warn("CHAOS: simulated power loss", "bytes_unsynced", pending, "bytes_lost", lost, "error", err,
				"image_blocks_unsynced", blocks, "image_blocks_lost", undone, "image_blocks_kept", kept, "image_error", ierr)
			_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {} // SIGKILL is on its way
		}
		disk.OnCrash(crash)
		srv := &control.Server{Path: control.SocketPath(dir, id), Net: tab, Points: points(), Disk: disk, Image: image, Crash: crash}
		return serveControl(srv, log)
	}
	chaosProxy = func(writer string, cfg *proxy.Config, log hclog.Logger) (func(), error) {
		dir := os.Getenv(control.EnvDir)
		if dir == "" {
			return func() {}, nil
		}
		tab := netfault.NewTable(1)
		dialer := netfault.NewDialer(tab)
		cfg.Dial = dialer.DialContext
		srv := &control.Server{Path: control.SocketPath(dir, "proxy-"+writer), Net: tab, Dialer: dialer, Points: points()}
		return serveControl(srv, log)
	}
}

// points installs a panic-point table as supervise's hook.
func points() *faultpoint.Table {
	t := faultpoint.NewTable()
	supervise.SetPointHook(t.Hit)
	return t
}

// serveControl binds the control socket (before the process reports
// itself up, so a soak finds it) and serves it until the returned stop is
// called.
func serveControl(srv *control.Server, log hclog.Logger) (func(), error) {
	l, err := control.Listen(srv.Path)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.ServeListener(ctx, l); err != nil {
			log.Error("chaos control socket", "path", srv.Path, "error", err)
		}
	}()
	log.Warn("CHAOS BUILD: fault layers installed", "control", srv.Path)
	return func() { cancel(); <-done }, nil
}
