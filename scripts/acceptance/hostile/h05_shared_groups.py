#!/usr/bin/env python3
"""Hostile scenario 5, many shared subscription groups.

One MQTT 5 client subscribes (QoS 1) to 20,000 groups $share/gN/# (N = 0..19999), reads
its SUBACKs and then nothing more (it never acknowledges what it is sent). Then the
unrelated probe publishes 200 QoS 0 messages at 100 ms intervals; its topic also matches
every one of those groups' `#`, which is the point: each probe message is a message for
20,000 groups too.

Expected: the probe gets every message within 1 s; peak RSS under 256 MB; the broker
stays up and serving.
"""

import time

import hostile_common as hc

GROUPS = 20_000
PROBE_MESSAGES = 200
SUBACK_WAIT = 20.0


def main():
    args = hc.parse_args(__doc__).parse_args()

    def body(out, args):
        with hc.Broker(args.broker, keep=args.keep) as broker:
            sampler = hc.RssSampler(broker)
            c = hc.Client.connect(broker.port, "groups-attacker", hc.V5, clean=True)
            filters = [(f"$share/g{n}/#", 1) for n in range(GROUPS)]
            batches = [filters[i:i + 5000] for i in range(0, GROUPS, 5000)]
            t0 = time.monotonic()
            codes = []
            try:
                for i, batch in enumerate(batches):
                    c.send(hc.subscribe_packet(i + 1, batch, hc.V5))
                deadline = t0 + SUBACK_WAIT
                while len(codes) < GROUPS:
                    pkt = c.read_until(hc.SUBACK, max(0.0, deadline - time.monotonic()))
                    codes.extend(hc.parse_suback(pkt, hc.V5)[1])
                granted = sum(1 for x in codes if x < 0x80)
                out.figure(f"{GROUPS} shared groups: SUBACKs after {time.monotonic() - t0:.2f}s, "
                           f"{granted} granted, {len(codes) - granted} refused")
            except hc.Timeout:
                out.fail(f"SUBACKs for only {len(codes)} of {GROUPS} groups within {SUBACK_WAIT:.0f}s")
            except (hc.Closed, hc.Reset, OSError) as err:
                out.fail(f"attacker connection ended while subscribing: {type(err).__name__} "
                         f"(broker {broker.status()})")
            # The attacker now reads nothing; the probe runs its 200 messages.
            probe = hc.Probe(broker, count=PROBE_MESSAGES).start()
            probe.wait_done(PROBE_MESSAGES * 0.1 + 15)
            hc.check_promises(out, broker, sampler, probe)
            c.close()

    hc.run("h05_shared_groups", body, args)


if __name__ == "__main__":
    main()
