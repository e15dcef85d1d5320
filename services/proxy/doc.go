// Package proxy is the `keel proxy` process, beside qemu on the VM host.
// Proxy is the nbd.Backend: it claims the volume as its one writer,
// commits writes through the leader with request ids (re-sent across
// failovers, applied once), and reads from any up-to-date replica through
// a read-through block cache. The cluster view polls every server for the
// leader and applied indexes. NewProcess builds the supervision tree (the
// proxy, its HTTP API, the NBD listener) and Run owns the stop order.
//
// It imports nbd, replica (commands), supervise, services/nbdserve and
// services/wire; never services/server, cmd or chaos.
package proxy
