#!/usr/bin/env python3
"""Hostile scenario 4, one filter repeated throughout one SUBSCRIBE.

1,000 retained messages x/0 .. x/999 are stored (their presence checked by a subscriber).
Then one client sends one SUBSCRIBE just under 1 MiB holding 170,000 copies of x/#
(QoS 0) and reads what it gets for 5 s, then disconnects.

Expected: the SUBACK answers every filter (170,000 codes); the client gets the retained
messages (each of the 1,000 topics at least once); peak RSS stays under 256 MB; the
broker stays up and the unrelated probe is served throughout. The broker's CPU time
(utime + stime) spent from the SUBSCRIBE until the broker settles after the disconnect
is reported.
"""

import time

import hostile_common as hc

RETAINED = 1000
COPIES = 170_000
READ_FOR = 5.0


def store_retained(out, broker):
    c = hc.Client.connect(broker.port, "rep-setup", hc.V311)
    c.send(b"".join(hc.publish_packet(f"x/{i}", f"r{i}".encode(), 0, True) for i in range(RETAINED)))
    c.send(hc.PINGREQ_BYTES)
    c.read_until(hc.PINGRESP, 10)
    c.disconnect()
    # Check they are all there (routed to their owner shards): a subscriber gets all.
    c = hc.Client.connect(broker.port, "rep-check", hc.V311)
    c.send(hc.subscribe_packet(1, [("x/#", 0)]))
    topics = set()
    deadline = time.monotonic() + 15
    while len(topics) < RETAINED and time.monotonic() < deadline:
        try:
            pkt = c.read(max(0.0, deadline - time.monotonic()))
        except hc.Timeout:
            break
        if pkt.type == hc.PUBLISH:
            topics.add(hc.parse_publish(pkt, hc.V311)[0])
    c.disconnect()
    if len(topics) != RETAINED:
        raise RuntimeError(f"setup: only {len(topics)} of {RETAINED} retained messages stored")
    out.figure(f"setup: {RETAINED} retained x/i stored")


def settle_cpu(broker, quiet=0.5, timeout=20.0):
    """CPU seconds once the broker stopped burning CPU (no more than 5% of one core over
    `quiet` s), or after `timeout`."""
    deadline = time.monotonic() + timeout
    last = broker.cpu_seconds()
    while time.monotonic() < deadline and last is not None:
        time.sleep(quiet)  # the measuring window of the condition
        now = broker.cpu_seconds()
        if now is None or now - last <= 0.05 * quiet:
            return now if now is not None else last
        last = now
    return last


def attack(out, broker):
    data = hc.subscribe_packet(1, [("x/#", 0)] * COPIES)
    if len(data) >= hc.MIB:
        raise RuntimeError(f"SUBSCRIBE is {len(data)} bytes, not under 1 MiB")
    c = hc.Client.connect(broker.port, "rep-attacker", hc.V311)
    cpu0 = broker.cpu_seconds()
    t0 = time.monotonic()
    suback = None
    publishes, topics = 0, set()
    ended = None
    try:
        c.send(data)
        deadline = t0 + READ_FOR
        while time.monotonic() < deadline:
            try:
                pkt = c.read(max(0.0, deadline - time.monotonic()))
            except hc.Timeout:
                break
            if pkt.type == hc.SUBACK:
                suback = (time.monotonic() - t0, hc.parse_suback(pkt, hc.V311)[1])
            elif pkt.type == hc.PUBLISH:
                publishes += 1
                topics.add(hc.parse_publish(pkt, hc.V311)[0])
    except (hc.Closed, hc.Reset, OSError) as err:
        ended = type(err).__name__
    c.disconnect()
    cpu1 = settle_cpu(broker)
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    out.figure(f"SUBSCRIBE of {len(data)} bytes ({COPIES} x x/#); read {READ_FOR:.0f}s: {publishes} PUBLISHes, "
               f"{len(topics)} distinct topics" + (f", connection ended: {ended}" if ended else ""))
    out.figure(f"broker CPU for the attack {cpu:.1f}s" if cpu is not None else "broker CPU n/a (process gone)")
    if suback is None:
        out.fail(f"no SUBACK within {READ_FOR:.0f}s")
    else:
        at, codes = suback
        granted = sum(1 for x in codes if x < 0x80)
        out.check(len(codes) == COPIES, f"SUBACK after {at:.2f}s: {granted} granted, {len(codes) - granted} refused",
                  f"SUBACK with {len(codes)} codes for {COPIES} filters")
    out.check(len(topics) == RETAINED, f"all {RETAINED} retained topics received",
              f"only {len(topics)} of {RETAINED} retained topics received in {READ_FOR:.0f}s")


def main():
    args = hc.parse_args(__doc__).parse_args()

    def body(out, args):
        with hc.Broker(args.broker, keep=args.keep) as broker:
            sampler = hc.RssSampler(broker)
            store_retained(out, broker)
            probe = hc.Probe(broker).start()
            attack(out, broker)
            hc.check_promises(out, broker, sampler, probe)

    hc.run("h04_repeated_filters", body, args)


if __name__ == "__main__":
    main()
