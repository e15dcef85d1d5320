// Package chaos holds Keel's fault injection and the soak that proves
// nothing acknowledged is lost under it. It has no code of its own; its
// subpackages:
//
//	chaos/soak          the workload (NBD clients through keel proxy, every
//	                    written block tagged and checksummed), the recorded
//	                    history and its checker (porcupine, one register per
//	                    block), the seeded fault planner and injector, and
//	                    TestSoak, the short soak of `go test ./...`
//	chaos/cmd/keel-chaos the soak as a command, for long runs
//	chaos/netfault      faults under the Raft transport (a raft.Transport
//	                    wrapper) and under the proxy's links to the servers
//	                    (a dialer): partitions, delay, resets
//	chaos/diskfault     faults under raft-wal's files (types.VFS): EIO,
//	                    ENOSPC, slow I/O, power loss
//	chaos/faultpoint    panics at supervise's named points
//	chaos/control       the control socket through which a soak switches
//	                    the faults of a running keel process
//	chaos/stall         measures the stall a client sees at a leader kill
//
// # How faults reach real processes
//
// Production code never imports chaos (deps_test.go enforces it on the
// untagged build). Instead, production packages expose small hooks that
// cost nothing when unset:
//
//   - replica.NodeConfig.WrapTransport wraps the Raft transport;
//   - replica.NodeConfig.WrapWALFS wraps raft-wal's file system;
//   - proxy.Config.Dial opens the proxy's connections to the servers;
//   - supervise.Point(name) marks a named point in a supervised service's
//     loop, and supervise.SetPointHook installs what runs there.
//
// cmd/keel/chaos.go, compiled only with `go build -tags chaos`, fills the
// hooks with the layers of chaos/ when $KEEL_CHAOS_DIR is set, and serves
// a control socket per process in that directory (control.SocketPath:
// the server's id, or "proxy-" and the proxy's writer name). The soak
// starts a cluster of such a binary with the harness cmd/keel/keeltest
// and tells each process over its socket which fault to switch on; kills
// and pauses are real signals to real processes. A plain `go build` of
// keel compiles cmd/keel/chaoshooks.go instead, whose hooks do nothing,
// and links nothing of chaos/ (`go list -deps ./cmd/keel` shows it).
//
// Everything random (which fault, whom, for how long, the workload's
// choices, which unsynced bytes survive a power loss) comes from one seed,
// printed with every result so that a run can be replayed; timing is the
// machine's, so a replay repeats the faults, not the interleaving.
package chaos
