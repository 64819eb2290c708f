#!/usr/bin/env python3
"""Hostile scenario 10, long filters from several clients.

Three MQTT 5 clients each subscribe to 1,500 distinct filters of about 64 KB (3 levels),
16 per SUBSCRIBE of about 1 MiB, reading every SUBACK; the broker runs with
`--max-subscription-bytes-per-client 64MiB --max-subscription-bytes 160MiB`. Without a
bound in bytes, the filters alone (1,500 × 3 × 64 KB, held several times over) take
gigabytes: the count bounds (100,000 per client) never apply.

Expected: each client is granted filters while its subscriptions hold under 64 MiB as
counted (each filter five times its length, plus 768 bytes per level and 512), and none
once all clients together hold 160 MiB; the rest refused with 0x97; peak RSS under
256 MB; the broker stays up and the unrelated probe is served throughout.
"""

import time

import hostile_common as hc

CLIENTS = 3
FILTERS = 1_500
PER_PACKET = 16
LENGTH = 65_000
PER_CLIENT = 64 << 20
TOTAL = 160 << 20


def cost(text):
    return 5 * len(text) + 768 * (text.count("/") + 1) + 512


def filters(client):
    return [f"long/{client}/{i:05d}" + "x" * (LENGTH - 16) for i in range(FILTERS)]


def main():
    args = hc.parse_args(__doc__).parse_args()

    def body(out, args):
        extra = ["--max-subscription-bytes-per-client", str(PER_CLIENT), "--max-subscription-bytes", str(TOTAL)]
        with hc.Broker(args.broker, extra_args=extra, keep=args.keep) as broker:
            sampler = hc.RssSampler(broker)
            probe = hc.Probe(broker).start()
            held_total, t0, clients = 0, time.monotonic(), []
            for client in range(CLIENTS):
                mine = filters(client)
                c = hc.Client.connect(broker.port, f"long-filters-{client}", hc.V5, clean=True)
                clients.append(c)  # open to the end: its subscriptions stay held
                codes = bytearray()
                try:
                    for n, start in enumerate(range(0, FILTERS, PER_PACKET)):
                        batch = [(f, 0) for f in mine[start:start + PER_PACKET]]
                        c.send(hc.subscribe_packet(n + 1, batch, hc.V5))
                        codes += hc.parse_suback(c.read_until(hc.SUBACK, 30), hc.V5)[1]
                except (hc.Closed, hc.Reset, hc.Timeout, OSError) as err:
                    out.fail(f"client {client}: subscribing ended after {len(codes)} SUBACK codes: "
                             f"{type(err).__name__} (broker {broker.status()})")
                    break
                # What the bounds grant, filter by filter, as the broker counts it.
                held, expected = 0, 0
                for f in mine:
                    if held + cost(f) > PER_CLIENT or held_total + cost(f) > TOTAL:
                        break
                    held += cost(f)
                    held_total += cost(f)
                    expected += 1
                granted = sum(1 for x in codes if x < 0x80)
                kinds = sorted({hex(x) for x in codes if x >= 0x80})
                out.figure(f"client {client}: granted {granted} of {len(codes)}, refused with {kinds}")
                out.check(granted == expected, f"client {client}: granted {expected}, as the bounds count",
                          f"client {client}: granted {granted}, expected {expected}")
                if any(x >= 0x80 and x != 0x97 for x in codes):
                    out.fail(f"client {client}: refusal codes {kinds}, expected 0x97")
            out.figure(f"{CLIENTS} × {FILTERS} filters of {LENGTH} bytes in {time.monotonic() - t0:.1f}s")
            hc.check_promises(out, broker, sampler, probe)

    hc.run("h10_long_filters", body, args)


if __name__ == "__main__":
    main()
