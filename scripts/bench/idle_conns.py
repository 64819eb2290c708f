#!/usr/bin/env python3
"""Broker memory per idle MQTT connection, measured with a client independent of ringmq.

Opens N TCP connections to a broker, sends each an MQTT 3.1.1 CONNECT (clean session,
keep-alive 0 unless --keepalive), reads its CONNACK, then holds every socket idle. The
broker's resident memory (VmRSS from /proc/PID/status) is read before the first connection
and again once all are connected and the broker had --settle seconds to go quiet:

    RSS per connection = (RSS after - RSS before) / N

    scripts/bench/idle_conns.py --port 1883 --pid $(pidof ringmq) -n 19000

Needs N + a few open files (`ulimit -n`). Raw sockets only: no MQTT library. With
--keepalive K (seconds) the script sends PINGREQ every K/2 s while it holds the sockets;
with the default 0 it sends nothing after CONNECT.
"""

import argparse
import json
import os
import resource
import selectors
import socket
import struct
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def varint(n):
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id, keepalive):
    cid = client_id.encode()
    # Variable header: protocol name "MQTT", level 4 (3.1.1), flags: clean session.
    body = struct.pack("!H4sBBH", 4, b"MQTT", 4, 0x02, keepalive)
    body += struct.pack("!H", len(cid)) + cid
    return b"\x10" + varint(len(body)) + body


def read_connack(sock, deadline):
    buf = b""
    while len(buf) < 4:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(4 - len(buf))
        if not chunk:
            raise ConnectionError("closed before CONNACK")
        buf += chunk
    if buf[0] != 0x20 or buf[1] != 2:
        raise ConnectionError(f"not a CONNACK: {buf.hex()}")
    if buf[3] != 0:
        raise ConnectionError(f"CONNACK return code {buf[3]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--pid", type=int, required=True, help="the broker's process id")
    ap.add_argument("-n", "--connections", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=200, help="CONNECTs in flight at once")
    ap.add_argument("--keepalive", type=int, default=0)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to wait before the RSS is read")
    ap.add_argument("--hold", type=float, default=0.0, help="seconds to hold the sockets after measuring")
    ap.add_argument("--prefix", default=f"idle-{os.getpid()}-")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections + 64
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        soft = min(want, hard)
    if soft < want:
        sys.exit(f"open files limited to {soft}: lower -n or raise the hard limit")

    before = rss_kib(args.pid)
    socks = []
    started = time.monotonic()
    deadline = started + 60 + args.connections / 500
    i = 0
    while i < args.connections:
        batch = []
        for _ in range(min(args.batch, args.connections - i)):
            s = socket.create_connection((args.host, args.port), timeout=10)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(connect_packet(f"{args.prefix}{i}", args.keepalive))
            batch.append(s)
            i += 1
        for s in batch:
            read_connack(s, deadline)
            s.setblocking(False)
        socks.extend(batch)
    connect_secs = time.monotonic() - started

    # Hold idle (answering nothing; with --keepalive, PINGREQ now and then).
    settle_until = time.monotonic() + args.settle
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    last_ping = time.monotonic()

    def idle(until):
        nonlocal last_ping
        closed = 0
        while time.monotonic() < until:
            for key, _ in sel.select(timeout=0.2):
                try:
                    data = key.fileobj.recv(4096)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(key.fileobj)
                    closed += 1
            if args.keepalive and time.monotonic() - last_ping >= args.keepalive / 2:
                for s in socks:
                    try:
                        s.send(b"\xc0\x00")
                    except OSError:
                        pass
                last_ping = time.monotonic()
        return closed

    closed = idle(settle_until)
    after = rss_kib(args.pid)
    per_conn = (after - before) * 1024 / args.connections
    result = {
        "connections": args.connections,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "bytes_per_connection": round(per_conn, 1),
        "connect_seconds": round(connect_secs, 2),
        "closed_by_broker": closed,
    }
    print(
        f"{args.connections} idle connections: RSS {before} KiB -> {after} KiB, "
        f"{per_conn:.0f} B per connection (connected in {connect_secs:.1f} s, "
        f"{closed} closed by the broker)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.hold:
        idle(time.monotonic() + args.hold)
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
