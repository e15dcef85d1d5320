// Package server is the `keel server` process: one replica of one volume.
// New builds its supervision tree and Run owns the stop order:
//
//   - RaftService (under a supervisor of its own) opens the replica.Node
//     and publishes it in a NodeHolder for the others;
//   - API serves the HTTP API (status, cluster admin, forwarded writes,
//     verification digests, the image-sync source, Prometheus metrics,
//     and the status page of services/statuspage, whose history a
//     service of the tree samples);
//   - Membership registers the leader and promotes caught-up non-voters;
//   - Resyncer pulls the image from peers after a snapshot install;
//   - Volume is the replicated volume as an nbd.Backend, served over NBD
//     by services/nbdserve.
//
// It imports nbd, replica, supervise, services/nbdserve, services/statuspage
// and services/wire;
// never services/proxy, cmd or chaos. services/server/servertest runs one
// in-process for tests.
package server
