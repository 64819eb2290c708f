#!/usr/bin/env python3
"""Hostile scenario 3, byte accounting: messages that cost the broker far more memory than
their bytes on the wire, or that pin a large read buffer. Each part runs against a fresh
broker; each must keep peak RSS under 256 MB, the broker up and the probe served.

(a) properties: an MQTT 5 persistent session (Session Expiry 3600) subscribes QoS 1 to
    acct/# and disconnects; a publisher sends 100 QoS 1 PUBLISHes to acct/x, each carrying
    140,000 user properties (short key and value; the packet under 1 MiB), waiting for the
    PUBACK of each.
(b) pinning, retained: in one socket send, a 1,000,000-byte QoS 0 PUBLISH to junk/x
    followed at once by a 1-byte RETAINED PUBLISH to pin/N; N = 0..299. Afterwards a
    subscriber to pin/# must get all 300 retained messages.
(c) pinning, queued: the same, the small message (QoS 1) going to an offline persistent
    subscriber's queue (q/#) instead of being retained. Afterwards the subscriber
    reconnects and must get all 300.
"""

import time

import hostile_common as hc

USER_PROPERTIES = 140_000
ACCT_MESSAGES = 100
PIN_COUNT = 300
JUNK_SIZE = 1_000_000


def part_a(out, args):
    with hc.Broker(args.broker, keep=args.keep) as broker:
        sampler = hc.RssSampler(broker)
        sub = hc.Client.connect(broker.port, "acct-sub", hc.V5, clean=False,
                                props=[(hc.P_SESSION_EXPIRY, 3600)])
        codes = sub.subscribe([("acct/#", 1)])
        if codes[0] >= 0x80:
            raise RuntimeError(f"acct/# subscription refused: 0x{codes[0]:02x}")
        sub.disconnect()
        # key "k", value "v": 7 bytes per property.
        raw = (b"\x26\x00\x01k\x00\x01v") * USER_PROPERTIES
        probe = hc.Probe(broker).start()
        pub = hc.Client.connect(broker.port, "acct-pub", hc.V5, clean=True)
        acked, reasons, ended = 0, {}, None
        t0 = time.monotonic()
        deadline = t0 + 40
        for i in range(ACCT_MESSAGES):
            pid = pub.packet_id()
            data = hc.publish_packet("acct/x", str(i).encode(), 1, False, pid, hc.V5, raw_props=raw)
            if i == 0:
                out.figure(f"(a) PUBLISH size {len(data)} bytes, {USER_PROPERTIES} user properties")
            try:
                pub.send(data)
                while True:
                    pkt = pub.read_until(hc.PUBACK, max(0.1, deadline - time.monotonic()))
                    got, reason = hc.parse_ack(pkt)
                    if got == pid:
                        break
            except (hc.Closed, hc.Reset, hc.Timeout, OSError) as err:
                ended = f"{type(err).__name__} after {acked} PUBACKs"
                break
            acked += 1
            reasons[reason] = reasons.get(reason, 0) + 1
        pub.close()
        out.figure(f"(a) {acked}/{ACCT_MESSAGES} PUBACKed in {time.monotonic() - t0:.1f}s, reasons "
                   f"{ {hex(k): v for k, v in reasons.items()} }" + (f", publisher: {ended}" if ended else ""))
        hc.check_promises(out, broker, sampler, probe, "(a) user properties")


def pin_attack(out, broker, small_packet, label):
    """Sends PIN_COUNT pairs (1 MB junk QoS 0 + a small packet) each in one send; ends with a
    PINGREQ round trip so everything was taken in."""
    junk = hc.publish_packet("junk/x", b"j" * JUNK_SIZE)
    pub = hc.Client.connect(broker.port, f"pin-pub-{label}", hc.V311, clean=True)
    t0 = time.monotonic()
    acks = 0
    try:
        for n in range(PIN_COUNT):
            pub.send(junk + small_packet(n))
            while True:  # PUBACKs of the QoS 1 small messages, as they come
                pkt = pub.reader.poll()
                if pkt is None:
                    break
                acks += pkt.type == hc.PUBACK
        pub.send(hc.PINGREQ_BYTES)
        pub.read_until(hc.PINGRESP, 30, on_other=lambda p: None)
    except (hc.Closed, hc.Reset, hc.Timeout, OSError) as err:
        out.fail(f"{label}: publisher connection ended: {type(err).__name__} (broker {broker.status()})")
    pub.close()
    out.figure(f"{label}: {PIN_COUNT} x ({len(junk)} + small) bytes sent in {time.monotonic() - t0:.1f}s")


def collect(client, prefix, want, timeout):
    """Distinct topics under `prefix` received (acknowledging QoS 1) until `want` or timeout."""
    topics = set()
    deadline = time.monotonic() + timeout
    while len(topics) < want:
        try:
            pkt = client.read(max(0.0, deadline - time.monotonic()))
        except hc.Timeout:
            break
        if pkt.type != hc.PUBLISH:
            continue
        topic, _, qos, _, pid = hc.parse_publish(pkt, client.version)
        if qos == 1:
            client.send(hc.ack_packet(hc.PUBACK, pid, client.version))
        if topic.startswith(prefix):
            topics.add(topic)
    return len(topics)


def part_b(out, args):
    with hc.Broker(args.broker, keep=args.keep) as broker:
        sampler = hc.RssSampler(broker)
        probe = hc.Probe(broker).start()
        pin_attack(out, broker, lambda n: hc.publish_packet(f"pin/{n}", b"p", 0, True), "(b) retained")
        if broker.alive():
            c = hc.Client.connect(broker.port, "pin-check", hc.V311)
            c.send(hc.subscribe_packet(1, [("pin/#", 0)]))
            got = collect(c, "pin/", PIN_COUNT, 15)
            c.close()
            out.check(got == PIN_COUNT, f"(b) retained: {got}/{PIN_COUNT} retained messages kept",
                      f"(b) retained: only {got}/{PIN_COUNT} retained messages kept")
        hc.check_promises(out, broker, sampler, probe, "(b) retained")


def part_c(out, args):
    with hc.Broker(args.broker, keep=args.keep) as broker:
        sampler = hc.RssSampler(broker)
        sub = hc.Client.connect(broker.port, "pinq-sub", hc.V311, clean=False)
        codes = sub.subscribe([("q/#", 1)])
        if codes[0] >= 0x80:
            raise RuntimeError(f"q/# subscription refused: 0x{codes[0]:02x}")
        sub.disconnect()
        probe = hc.Probe(broker).start()
        pin_attack(out, broker, lambda n: hc.publish_packet(f"q/{n}", b"q", 1, False, n + 1), "(c) queued")
        # Promises first (the peak is the attack's), then the queue's content.
        alive = hc.check_promises(out, broker, sampler, probe, "(c) queued")
        if alive:
            sub = hc.Client.connect(broker.port, "pinq-sub", hc.V311, clean=False)
            got = collect(sub, "q/", PIN_COUNT, 15)
            sub.close()
            out.check(got == PIN_COUNT, f"(c) queued: {got}/{PIN_COUNT} queued messages delivered",
                      f"(c) queued: only {got}/{PIN_COUNT} queued messages delivered")


def main():
    args = hc.parse_args(__doc__).parse_args()

    def body(out, args):
        part_a(out, args)
        part_b(out, args)
        part_c(out, args)

    hc.run("h03_byte_accounting", body, args)


if __name__ == "__main__":
    main()
