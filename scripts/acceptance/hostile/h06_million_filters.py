#!/usr/bin/env python3
"""Hostile scenario 6, a million filters from one client.

One MQTT 5 client subscribes to 1,000,000 distinct filters f/0 .. f/999999 in SUBSCRIBE
packets of about 1 MiB each, reading every SUBACK.

Expected: the broker grants up to --max-subscriptions-per-client (default 100,000) and
refuses the rest with SUBACK failure codes (0x97 Quota exceeded, or 0x80 / 0x8F); peak
RSS under 256 MB; the broker stays up and the unrelated probe is served throughout.
"""

import time

import hostile_common as hc

FILTERS = 1_000_000
MAX_PER_CLIENT = 100_000
REFUSALS = {0x97, 0x80, 0x8F}


def build():
    packets, batch, size = [], [], 0
    for i in range(FILTERS):
        flt = f"f/{i}"
        entry = len(flt) + 3
        if batch and size + entry > hc.PACKET_BUDGET - 64:
            packets.append(batch)
            batch, size = [], 0
        batch.append((flt, 0))
        size += entry
    packets.append(batch)
    return [(hc.subscribe_packet(i + 1, b, hc.V5), len(b)) for i, b in enumerate(packets)]


def main():
    args = hc.parse_args(__doc__).parse_args()

    def body(out, args):
        packets = build()
        with hc.Broker(args.broker, keep=args.keep) as broker:
            sampler = hc.RssSampler(broker)
            probe = hc.Probe(broker).start()
            c = hc.Client.connect(broker.port, "million-filters", hc.V5, clean=True)
            codes = bytearray()
            t0 = time.monotonic()
            deadline = t0 + 40
            try:
                for data, n in packets:
                    c.send(data)
                    pkt = c.read_until(hc.SUBACK, max(0.1, deadline - time.monotonic()))
                    got = hc.parse_suback(pkt, hc.V5)[1]
                    if len(got) != n:
                        out.fail(f"SUBACK with {len(got)} codes for {n} filters")
                    codes += got
            except (hc.Closed, hc.Reset, hc.Timeout, OSError) as err:
                out.fail(f"subscribing ended after {len(codes)} SUBACK codes: {type(err).__name__} "
                         f"(broker {broker.status()})")
            c.close()
            granted = sum(1 for x in codes if x < 0x80)
            refused = len(codes) - granted
            kinds = sorted({x for x in codes if x >= 0x80})
            out.figure(f"{len(packets)} SUBSCRIBEs in {time.monotonic() - t0:.1f}s: granted {granted}, "
                       f"refused {refused}" + (f" (codes {[hex(x) for x in kinds]})" if kinds else ""))
            if len(codes) == FILTERS:
                first_refused = next((i for i, x in enumerate(codes) if x >= 0x80), None)
                out.check(granted == MAX_PER_CLIENT,
                          f"granted exactly {MAX_PER_CLIENT}",
                          f"granted {granted}, expected {MAX_PER_CLIENT} (--max-subscriptions-per-client)")
                if first_refused is not None and any(x < 0x80 for x in codes[first_refused:]):
                    out.fail("a filter was granted after an earlier one was refused")
                bad = [hex(x) for x in kinds if x not in REFUSALS]
                if bad:
                    out.fail(f"refusal codes {bad} not in {[hex(x) for x in sorted(REFUSALS)]}")
            hc.check_promises(out, broker, sampler, probe)

    hc.run("h06_million_filters", body, args)


if __name__ == "__main__":
    main()
