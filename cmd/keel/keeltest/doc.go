// Package keeltest is the process harness of Keel's end-to-end tests and
// tools: it builds the keel binary once, starts `keel` subcommands (or any
// other program: fio, nbdkit) as child processes, in the background or to
// their end (output to a file and to an in-memory ring), signals, stops,
// kills, pauses and waits for them, hands out free loopback ports and short
// unix socket directories, scans a process's output for panics, data races
// and fatal runtime errors, and runs a cluster of `keel server`s (and
// `keel proxy`s in front of it) on loopback, read through services/wire.
//
// The core API returns errors and takes a context where it waits, so that
// programs (chaos/stall, benchmark drivers) use it as tests do; the Must...
// functions and the TCluster and TProxy wrappers in testing.go add t.Fatal
// and t.Cleanup for tests. Every process started is stopped by its owner:
// a Group or Cluster (Close, StopAll), or the test's cleanup; and the kernel
// kills it if the harness's process dies first (Pdeathsig). Servers listen
// on 127.0.0.1 or unix sockets only.
//
// Production code never imports this package.
package keeltest
