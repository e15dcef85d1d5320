package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/keelstore/keel/nbd"
	"github.com/keelstore/keel/replica/rawimage"
	"github.com/keelstore/keel/services/nbdserve"
	"github.com/keelstore/keel/upgrade"
)

type serveFlags struct {
	file     string
	size     string
	listen   string
	name     string
	readOnly bool
	drain    time.Duration
	pidFile  string
	upgrade  time.Duration
	tls      nbdTLSFlags
}

func newServeCmd(g *globalFlags) *cobra.Command {
	f := &serveFlags{}
	cmd := &cobra.Command{
		Use:   "serve --file PATH [--size SIZE] [--listen ADDR] [--name NAME] [--read-only]",
		Short: "Serve one raw image over NBD (standalone, no replication)",
		Long: `Serve one raw image file over NBD.

The image is created (sparse) at --size when it does not exist; an existing
image keeps its size, and a --size that disagrees with it is refused.
ADDR is HOST:PORT or unix:PATH. SIGTERM or SIGINT stops the server
gracefully: no new request is read, every request already read is answered,
then connections are closed (clients such as qemu reconnect and resend).`,
		Example: `  keel serve --file disk.img --size 10G --listen 127.0.0.1:10809
  keel serve --file disk.img --listen unix:/run/keel/disk.sock --read-only
  keel serve --file disk.img --listen 0.0.0.0:10809 --tls-certificates /etc/keel/nbd --tls-verify-peer   # nbds://`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runServe(cmd.Context(), g, f) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.file, "file", "", "path of the raw image file (required)")
	fl.StringVar(&f.size, "size", "", "size of the image, e.g. 10G; required to create it")
	fl.StringVar(&f.listen, "listen", "127.0.0.1:10809", "address to serve NBD on: HOST:PORT or unix:PATH")
	fl.StringVar(&f.name, "name", "keel", "export name (clients asking for the empty name get it too)")
	fl.BoolVar(&f.readOnly, "read-only", false, "refuse writes, trims and zeroes")
	fl.DurationVar(&f.drain, "drain-timeout", 60*time.Second, "on stop, how long in-flight requests may take before connections are closed anyway")
	fl.StringVar(&f.pidFile, "pid-file", "", "write the pid here once serving; SIGHUP (keel upgrade --pid-file) replaces the process by a fresh start of its binary without dropping a connection")
	fl.DurationVar(&f.upgrade, "upgrade-timeout", 60*time.Second, "how long a new process may take to get ready and take over at an upgrade before it is killed")
	f.tls.register(fl, false)
	_ = cmd.MarkFlagRequired("file")
	return cmd
}

func runServe(ctx context.Context, g *globalFlags, f *serveFlags) error {
	log, err := g.logger("keel")
	if err != nil {
		return err
	}
	size, err := parseVolumeSize(f.size)
	if err != nil {
		return err
	}
	ntls, err := f.tls.load()
	if err != nil {
		return err
	}
	u, err := upgrade.New(upgrade.Config{PIDFile: f.pidFile, Timeout: f.upgrade, Version: version, Log: log.Named("upgrade")})
	if err != nil {
		return err
	}
	defer u.Stop()
	fail := func(err error) error { u.Fail(err); return err }
	img, err := openServeImage(u, f.file, rawimage.Options{Size: size, ReadOnly: f.readOnly})
	if err != nil {
		return fail(err)
	}
	defer img.Close()

	l, uri, err := nbdserve.ListenWith(f.listen, u)
	if err != nil {
		return fail(fmt.Errorf("--listen: %w", err))
	}
	hup, stopHup := relaySIGHUP()
	defer stopHup()
	srv, err := nbdserve.NewStandalone(nbdserve.StandaloneConfig{
		Image: img, Listener: l, Name: f.name, Description: "keel image " + f.file,
		ReadOnly: f.readOnly, DrainTimeout: f.drain, Log: log, Upgrader: u, Upgrades: hup,
		TLS: ntls.Mode, TLSConfig: ntls.Server,
	})
	if err != nil {
		l.Close()
		return fail(err)
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if ntls.Mode == nbd.TLSRequire {
		uri = nbdserve.TLSURI(uri)
	}
	log.Info("serving", "image", img.Path(), "size", img.Size(), "read_only", f.readOnly, "uri", uri, "tls", ntls.String(), "took_over", u.HasParent())
	if err := srv.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "keel serve:", err)
		return err
	}
	return nil
}

// imageFile is the name the image is passed to an upgrade's child under.
const imageFile = "keel-image"

// openServeImage opens the image, or takes the one the parent passed (its
// flock is shared with the parent's), and passes it on to the next child.
func openServeImage(u *upgrade.Upgrader, path string, opts rawimage.Options) (*rawimage.File, error) {
	var img *rawimage.File
	f, err := u.File(imageFile)
	switch {
	case err != nil:
		return nil, err
	case f != nil:
		img, err = rawimage.Inherit(f, path, opts.ReadOnly)
	default:
		img, err = rawimage.Open(path, opts)
	}
	if err != nil {
		return nil, err
	}
	if err := u.AddFile(imageFile, img.File()); err != nil {
		img.Close()
		return nil, err
	}
	return img, nil
}
