#!/usr/bin/env python3
"""Hostile scenario 1, deep filters.

One client subscribes to "/"*d + "+" for d = 0..12000 (SUBSCRIBE packets each under
1 MiB; every SUBACK read), then publishes QoS 0 to "/"*12000 (12,001 levels).

Expected: filters deeper than the broker's level bound (default 128 levels) are refused in
the SUBACK (v5: 0x97, 0x8F or 0x80; v3: 0x80) while shallower ones are granted; the deep
PUBLISH ends that client's connection (protocol error); the broker survives, its peak
RSS stays under 256 MB and the unrelated probe is served throughout.

Part A: MQTT 5, clean session. Part B: MQTT 3.1.1 persistent session (clean_session=0);
after the attack the broker is stopped (SIGTERM) and restarted on the same data
directory, and must come up and serve (probe again).
"""

import time

import hostile_common as hc

MAX_DEPTH = 12000
LEVEL_BOUND = 128  # the broker's default bound on topic levels
V5_REFUSALS = {0x97, 0x8F, 0x80}
V3_REFUSALS = {0x80}
ATTACK_LIMIT = 50.0  # seconds for all the SUBACKs


def build_subscribes(version):
    """SUBSCRIBE packets covering d = 0..MAX_DEPTH, each under the packet budget."""
    packets, batch, size = [], [], 0
    for d in range(MAX_DEPTH + 1):
        flt = "/" * d + "+"
        entry = len(flt) + 3
        if batch and size + entry > hc.PACKET_BUDGET - 64:
            packets.append(batch)
            batch, size = [], 0
        batch.append(flt)
        size += entry
    packets.append(batch)
    return [(hc.subscribe_packet(i + 1, [(f, 0) for f in b], version), len(b)) for i, b in enumerate(packets)]


def attack(out, broker, version, client_id, clean, label):
    """Subscribes deep, checks the SUBACKs, publishes deep, checks the connection ends.

    One SUBSCRIBE at a time, each after the previous one's SUBACK; then the deep PUBLISH
    and a PINGREQ."""
    packets = build_subscribes(version)
    refusals = V5_REFUSALS if version == hc.V5 else V3_REFUSALS
    props = [(hc.P_SESSION_EXPIRY, 3600)] if version == hc.V5 and not clean else None
    c = hc.Client.connect(broker.port, client_id, version, clean=clean, props=props)
    t0 = time.monotonic()
    deadline = t0 + ATTACK_LIMIT
    codes = []
    try:
        for data, n in packets:
            c.sock.settimeout(max(0.1, deadline - time.monotonic()))
            c.sock.sendall(data)
            pkt = c.read_until(hc.SUBACK, max(0.1, deadline - time.monotonic()))
            got = hc.parse_suback(pkt, version)[1]
            if len(got) != n:
                out.fail(f"{label}: SUBACK with {len(got)} codes for {n} filters")
            codes.extend(got)
    except (hc.Closed, hc.Reset, hc.Timeout, OSError) as err:
        out.fail(f"{label}: only {len(codes)} of {MAX_DEPTH + 1} filters answered in "
                 f"{time.monotonic() - t0:.0f}s: {type(err).__name__} (broker {broker.status()})")
        c.close()
        return
    elapsed = time.monotonic() - t0
    granted = [d for d, code in enumerate(codes) if code < 0x80]
    refused = [d for d, code in enumerate(codes) if code >= 0x80]
    bad_codes = sorted({code for code in codes if code >= 0x80 and code not in refusals})
    out.figure(f"{label}: {len(packets)} SUBSCRIBEs answered in {elapsed:.1f}s, granted {len(granted)}, "
               f"refused {len(refused)} (deepest granted: {max(granted) + 1 if granted else 0} levels)")
    # Levels of "/"*d + "+" are d + 1. Up to the bound: granted. Past it (one level of
    # slack for how a bound is counted): refused with an allowed code.
    shallow_refused = [d for d in refused if d + 1 <= LEVEL_BOUND]
    deep_granted = [d for d in granted if d + 1 > LEVEL_BOUND + 1]
    if shallow_refused:
        out.fail(f"{label}: filters within {LEVEL_BOUND} levels refused (first: {shallow_refused[0] + 1} levels)")
    if deep_granted:
        out.fail(f"{label}: {len(deep_granted)} filters deeper than {LEVEL_BOUND + 1} levels granted "
                 f"(deepest {deep_granted[-1] + 1} levels)")
    if bad_codes:
        out.fail(f"{label}: refusal codes {[hex(x) for x in bad_codes]} not in {[hex(x) for x in sorted(refusals)]}")

    # The deep PUBLISH, then a PINGREQ: a PINGRESP means the broker carried on.
    topic = "/" * MAX_DEPTH
    c.send(hc.publish_packet(topic, b"deep", 0, False, 0, version) + hc.PINGREQ_BYTES)
    how, seen = hc.wait_for_end(c, 5.0)
    c.close()
    names = [p.name for p in seen]
    if "PINGRESP" in names or how == "timeout":
        out.fail(f"{label}: the {MAX_DEPTH + 1}-level PUBLISH did not end the connection ({how}, got {names})")
    else:
        ok = version != hc.V5 or not how.startswith("disconnect") or int(how[13:15], 16) >= 0x80
        out.check(ok, f"{label}: deep PUBLISH ended the connection ({how})",
                  f"{label}: deep PUBLISH answered with a success DISCONNECT ({how})")


def part_a(out, args):
    with hc.Broker(args.broker, keep=args.keep) as broker:
        sampler = hc.RssSampler(broker)
        probe = hc.Probe(broker).start()
        attack(out, broker, hc.V5, "deep-v5", True, "v5")
        hc.check_promises(out, broker, sampler, probe, "v5")


def part_b(out, args):
    with hc.Broker(args.broker, keep=args.keep) as broker:
        sampler = hc.RssSampler(broker)
        probe = hc.Probe(broker).start()
        attack(out, broker, hc.V311, "deep-v3-persistent", False, "v3 persistent")
        hc.check_promises(out, broker, sampler, probe, "v3 persistent")
        how = broker.stop()
        out.figure(f"v3 persistent: stopped ({how})")
        # Restart on the same data directory: it must come up and serve.
        t0 = time.monotonic()
        try:
            broker.start(timeout=30)
        except hc.StartFailed as err:
            out.fail(f"v3 persistent restart: {err}")
            return
        out.figure(f"restart: serving after {time.monotonic() - t0:.1f}s")
        sampler = hc.RssSampler(broker)
        probe = hc.Probe(broker, count=20).start()
        try:
            c = hc.Client.connect(broker.port, "deep-v3-persistent", hc.V311, clean=False)
            out.figure(f"restart: persistent client back (session present {int(c.session_present)})")
            c.disconnect()
        except Exception as err:  # noqa: BLE001
            out.fail(f"restart: persistent client could not reconnect: {err!r}")
        probe.wait_done(10)
        hc.check_promises(out, broker, sampler, probe, "after restart")


def main():
    args = hc.parse_args(__doc__).parse_args()

    def body(out, args):
        part_a(out, args)
        part_b(out, args)

    hc.run("h01_deep_filters", body, args)


if __name__ == "__main__":
    main()
