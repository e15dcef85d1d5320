// Package nbdserve serves NBD from a process: the NBD listener as a suture
// service with one supervised service per client connection (a panic
// while serving one costs that connection only), Listen for HOST:PORT and
// unix:PATH addresses, LocalImage (a raw image as an nbd.Backend), and
// Standalone, the supervision tree of `keel serve`. Every process that
// holds NBD clients (keel serve, keel server, keel proxy) serves them
// through this package.
//
// It imports nbd, replica/rawimage and supervise; never services/server,
// services/proxy, cmd or chaos.
package nbdserve
