#!/usr/bin/env python3
"""Hostile scenario 2, control-packet flood from a client that never reads.

An MQTT 5 client connects, then sends one control packet over and over without ever
reading: 64 MiB in all, or until its socket accepts nothing for more than 10 s (the
socket has a timeout: the script never hangs). Three variants, each against a fresh
broker:

  pubrel   62 02 00 01  PUBREL for an unknown identifier (each answered with a PUBCOMP
                        0x92 carrying a Reason String)
  pingreq  c0 00        PINGREQ (each answered with a PINGRESP)
  puback   40 02 00 01  PUBACK for an unknown identifier

Expected: the broker's memory stays bounded (peak RSS under 256 MB): it stops reading from
the client (the sender blocks) and/or closes it after its write timeout; it stays up and
the unrelated probe is served throughout.
"""

import fcntl
import socket
import struct
import termios
import time

import hostile_common as hc

TOTAL = 64 * hc.MIB
STALL_LIMIT = 10.0
VARIANTS = [
    ("pubrel", b"\x62\x02\x00\x01"),
    ("pingreq", b"\xc0\x00"),
    ("puback", b"\x40\x02\x00\x01"),
]


def flood(out, args, name, unit):
    with hc.Broker(args.broker, keep=args.keep) as broker:
        sampler = hc.RssSampler(broker)
        probe = hc.Probe(broker).start()
        c = hc.Client.connect(broker.port, f"flood-{name}", hc.V5, clean=True)
        # A small receive buffer of our own: what the broker answers piles up on its side.
        chunk = unit * ((1 << 20) // len(unit))
        sent = 0
        how = "done"
        t0 = time.monotonic()
        deadline = t0 + 40
        cpu0 = broker.cpu_seconds() or 0.0
        while sent < TOTAL:
            n, how = hc.send_nonblocking(c.sock, chunk[: min(len(chunk), TOTAL - sent)], STALL_LIMIT, deadline)
            sent += n
            if how != "done":
                break
        # Let the broker take in what is still queued towards it (or show it will not:
        # no progress for STALL_LIMIT), so the RSS peak includes what it makes of it.
        left = unsent(c.sock)
        drained = "drained" if how == "done" else f"{left} bytes queued unread"
        last_change = time.monotonic()
        while left and how == "done":
            time.sleep(0.05)  # poll interval of a condition wait
            now_left = unsent(c.sock)
            if now_left != left:
                left, last_change = now_left, time.monotonic()
            elif time.monotonic() - last_change > STALL_LIMIT:
                drained = f"{left} bytes left unread"
                break
        elapsed = time.monotonic() - t0
        cpu = (broker.cpu_seconds() or cpu0) - cpu0
        # What the broker did with the connection: still open (blocked) or closed.
        state = connection_state(c.sock)
        c.close()
        out.figure(f"{name}: sent {sent / hc.MIB:.1f} of {TOTAL // hc.MIB} MiB in {elapsed:.1f}s "
                   f"(stopped: {how}, {drained}, connection {state}), broker CPU {cpu:.1f}s")
        hc.check_promises(out, broker, sampler, probe, name)


def unsent(sock):
    """Bytes in our send queue the broker has not taken (SIOCOUTQ)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return 0


def connection_state(sock):
    """The TCP state of our end: 'open' (established), 'closed by broker' (FIN received),
    'reset', or the state number."""
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return "unknown"
    return {1: "open", 8: "closed by broker (FIN)", 7: "reset/closed"}.get(state, f"tcp state {state}")


def main():
    args = hc.parse_args(__doc__).parse_args()

    def body(out, args):
        for name, unit in VARIANTS:
            flood(out, args, name, unit)

    hc.run("h02_control_flood", body, args)


if __name__ == "__main__":
    main()
