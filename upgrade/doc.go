// Package upgrade replaces a running keel process by a new binary without
// closing what clients hold: listeners pass to the child through
// cloudflare/tableflip, and live connections, once the child is ready,
// pass one at a time over a unix socketpair (SCM_RIGHTS) that tableflip
// hands the child too. It imports nothing of Keel's; services/ and cmd/
// import it.
//
// An upgrade has two phases. In the first the child starts, inherits the
// listeners and the handover socket, prepares whatever it can without
// disturbing the parent (the proxy connects to the servers and learns the
// leader) and says READY. In the second the parent stops accepting, hands
// the process state and then each connection (all quiesced at a request
// boundary first, each with its state as opaque bytes); the child acknowledges each
// connection before it reads from it, and only after the last one tells
// tableflip it is ready, which writes the PID file and lets the parent
// exit. A child that exits, crashes or misses the deadline before that
// changes nothing: every connection it did not acknowledge is resumed by
// the parent, which accepts again, logs the failure and records it in the
// status file that `keel upgrade` reads.
//
// The handover socket carries one message per SOCK_SEQPACKET packet:
//
//	byte 0     version (1)
//	byte 1     kind:
//	           'R' child->parent  ready; payload: pid (4 bytes, big endian), version (rest)
//	           'F' child->parent  failed to prepare; payload: the reason (text)
//	           'S' parent->child  the process state (after every connection is quiesced)
//	           'C' parent->child  a connection; payload: its state; one fd as SCM_RIGHTS
//	           'A' child->parent  the last connection is the child's; payload empty
//	           'D' parent->child  no more connections; payload empty
//	bytes 2..  payload
package upgrade
