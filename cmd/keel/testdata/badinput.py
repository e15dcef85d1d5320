"""Sends requests a careful client never would, for TestBadRequests.

Usage: /usr/bin/python3 badinput.py URI rw|ro

libnbd's client-side checks are turned off (strict mode 0) so the requests
reach the server. For each case this reports the errno the server answered
with and whether a normal read on the same connection still works and still
returns the known data. The expectations live in e2e_test.go.

In rw mode the script first writes PATTERN over [0, 64 KiB); in ro mode the
test has put it in the image. The last 4 KiB of the export stay zero.

Prints one JSON object: {"cases": [{"name", "errno" (null on success),
"after" ("ok" or what went wrong), "zeroed" (zero cases only)}]}.
"""
import json
import sys

import nbd

PATTERN = b"\x5a" * 65536  # badPattern in e2e_test.go
MIB = 1 << 20


class Mismatch(Exception):
    """The request succeeded but the data is wrong."""


def connect(uri, structured=True, meta=True):
    h = nbd.NBD()
    h.set_strict_mode(0)
    if not structured:
        h.set_request_structured_replies(False)
    if meta:
        h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


class Cases:
    def __init__(self, uri):
        self.uri = uri
        self.out = []

    def check_after(self, h, size):
        try:
            if h.pread(len(PATTERN), 0) != PATTERN:
                return "the data at offset 0 changed"
            if h.pread(4096, size - 4096) != bytes(4096):
                return "the last 4 KiB are no longer zero"
            return "ok"
        except nbd.Error as e:
            return "normal read failed: %s" % e.string

    def run(self, name, h, fn, zero_range=None):
        size = h.get_size()
        case = {"name": name, "errno": None}
        try:
            fn(h, size)
        except nbd.Error as e:
            case["errno"] = e.errno or ("errnum %d" % e.errnum)
        except Mismatch as e:
            case["errno"] = "mismatch: %s" % e
        case["after"] = self.check_after(h, size)
        if zero_range is not None:
            try:
                n, off = zero_range
                case["zeroed"] = h.pread(n, off) == bytes(n)
            except nbd.Error as e:
                case["after"] = "read of the zeroed range failed: %s" % e.string
        self.out.append(case)


def block_status(h, n, off):
    h.block_status(n, off, lambda *args: 0)


def rw(c):
    h = connect(c.uri)
    h.pwrite(PATTERN, 0)
    unknown = 1 << 9
    big = 33 * MIB
    c.run("read past end", h, lambda h, s: h.pread(512, s))
    c.run("read straddling end", h, lambda h, s: h.pread(1024, s - 512))
    c.run("write past end", h, lambda h, s: h.pwrite(b"\xee" * 512, s))
    c.run("write straddling end", h, lambda h, s: h.pwrite(b"\xee" * 1024, s - 512))
    c.run("zero past end", h, lambda h, s: h.zero(512, s))
    c.run("trim past end", h, lambda h, s: h.trim(512, s))
    c.run("cache past end", h, lambda h, s: h.cache(512, s))
    c.run("block status past end", h, lambda h, s: block_status(h, 512, s))
    c.run("read misaligned offset", h, lambda h, s: h.pread(512, 1))
    c.run("read misaligned length", h, lambda h, s: h.pread(100, 0))
    c.run("write misaligned", h, lambda h, s: h.pwrite(b"\xee" * 512, 1))
    c.run("zero misaligned", h, lambda h, s: h.zero(100, 0))
    c.run("trim misaligned", h, lambda h, s: h.trim(100, 512))
    c.run("read 33 MiB", h, lambda h, s: h.pread(big, 0))
    c.run("write 33 MiB", h, lambda h, s: h.pwrite(b"\xee" * big, 0))
    c.run("read unknown flag", h, lambda h, s: h.pread(512, 0, unknown))
    c.run("write unknown flag", h, lambda h, s: h.pwrite(b"\xee" * 4096, 0, unknown))
    c.run("read with NO_HOLE", h, lambda h, s: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE))
    c.run("write with DF", h, lambda h, s: h.pwrite(b"\xee" * 4096, 0, nbd.CMD_FLAG_DF))
    c.run("read with FUA", h, lambda h, s: h.pread(512, 0, nbd.CMD_FLAG_FUA))
    c.run("read with DF", h, lambda h, s: h.pread(64 * 1024, 0, nbd.CMD_FLAG_DF))
    c.run("read 0 bytes", h, lambda h, s: h.pread(0, 0))
    c.run("write 0 bytes", h, lambda h, s: h.pwrite(b"", 0))
    c.run("flush with FUA", h, lambda h, s: h.flush(nbd.CMD_FLAG_FUA))

    def fill_then_zero(flags, off):
        def fn(h, s):
            h.pwrite(b"\xcc" * MIB, off)
            h.zero(MIB, off, flags)
        return fn
    c.run("zero FAST_ZERO", h, fill_then_zero(nbd.CMD_FLAG_FAST_ZERO, 1 * MIB),
          zero_range=(MIB, 1 * MIB))
    c.run("zero FAST_ZERO NO_HOLE", h,
          fill_then_zero(nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE, 2 * MIB),
          zero_range=(MIB, 2 * MIB))

    # At the limits, not over them.
    c.run("read 32 MiB", h, lambda h, s: h.pread(32 * MIB, 0))

    def write_max(h, s):
        h.pwrite(b"\xdd" * (32 * MIB), 4 * MIB)
        if h.pread(32 * MIB, 4 * MIB) != b"\xdd" * (32 * MIB):
            raise Mismatch("32 MiB did not read back")
    c.run("write 32 MiB", h, write_max)
    c.run("block status whole disk", h, lambda h, s: block_status(h, s, 0))

    # CAN_MULTI_CONN: what one connection wrote and flushed, another reads.
    h2 = connect(c.uri)

    def second(h, s):
        h.pwrite(b"\x33" * 4096, 40 * MIB)
        h.flush()
        if h2.pread(4096, 40 * MIB) != b"\x33" * 4096:
            raise Mismatch("second connection read stale data")
    c.run("second connection sees data", h, second)

    # Simple replies: an oversize read is EINVAL, not EOVERFLOW.
    hs = connect(c.uri, structured=False, meta=False)
    c.run("simple: read 33 MiB", hs, lambda h, s: h.pread(big, 0))

    # BLOCK_STATUS without a negotiated meta context.
    hn = connect(c.uri, meta=False)
    c.run("no meta: block status", hn, lambda h, s: block_status(h, 512, 0))
    for x in (h, h2, hs, hn):
        x.shutdown()


def ro(c):
    h = connect(c.uri)
    c.run("write", h, lambda h, s: h.pwrite(b"\xee" * 4096, 0))
    c.run("zero", h, lambda h, s: h.zero(4096, 0))
    c.run("trim", h, lambda h, s: h.trim(4096, 0))
    c.run("write past end", h, lambda h, s: h.pwrite(b"\xee" * 512, s))
    c.run("read", h, lambda h, s: h.pread(4096, 0))
    c.run("cache", h, lambda h, s: h.cache(4096, 0))
    c.run("block status", h, lambda h, s: block_status(h, s, 0))
    h.shutdown()


def main():
    uri, mode = sys.argv[1], sys.argv[2]
    c = Cases(uri)
    {"rw": rw, "ro": ro}[mode](c)
    print(json.dumps({"cases": c.out}))


main()
