package raft

// This file is Keel's patch (see third_party/KEEL-PATCH.md in Keel): how
// the follower side of NetworkTransport decodes.

// keelMaxInitLen is the most elements the follower's decoder allocates for
// a collection before it has read them (codec.DecodeOptions.MaxInitLen).
// By default go-msgpack allocates at most 256 KiB at a time and grows, so
// a 1 MiB write's Data was allocated four times and copied three times
// over, and that decode was a third of a follower's CPU under 1 MiB
// writes. An AppendEntries decodes into byte slices and a slice of *Log,
// so what a bad length from a peer can make the decoder allocate up front
// is at most this many bytes, or 8 times as many for the entry slice.
const keelMaxInitLen = 4<<20 + 64<<10
