"""Keeps 32 writes in flight until the server hangs up, for TestGracefulStop.

Usage: /usr/bin/python3 graceful.py URI

Write number i fills 64 KiB block i % blocks with the byte (i % 251) + 1.
Prints "ready" once 64 writes are acknowledged (the test then sends SIGTERM
to the server), and after the connection ends one JSON line:
{"issued", "block", "blocks", "acked": [i...], "failed": {i: errno}, "end"}.
"""
import json
import sys

import nbd

BLOCK = 64 * 1024
DEPTH = 32


def main():
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    blocks = h.get_size() // BLOCK
    acked, failed = [], {}
    state = {"inflight": 0}

    def done(i, err):
        state["inflight"] -= 1
        if err.value == 0:
            acked.append(i)
        else:
            failed[i] = err.value
        return 1

    issued, announced, end = 0, False, ""
    try:
        while True:
            while state["inflight"] < DEPTH:
                buf = bytes([(issued % 251) + 1]) * BLOCK
                h.aio_pwrite(buf, (issued % blocks) * BLOCK,
                             completion=lambda err, i=issued: done(i, err))
                state["inflight"] += 1
                issued += 1
            h.poll(-1)
            if not announced and len(acked) >= 64:
                print("ready", flush=True)
                announced = True
    except nbd.Error as e:
        end = e.string
    print(json.dumps({"issued": issued, "block": BLOCK, "blocks": blocks,
                      "acked": acked, "failed": failed, "end": end}), flush=True)


main()
