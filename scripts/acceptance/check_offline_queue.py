#!/usr/bin/env python3
"""An offline persistent session keeps every acknowledged message, at default flags, across a SIGKILL
(unmodified paho-mqtt clients).

1. Start the broker on a fresh data directory with its default flags (queue of 1,000 in memory).
2. A persistent QoS 1 subscriber (3.1.1, clean_session=0) subscribes and leaves.
3. A v5 publisher sends --messages QoS 1 messages (50,000); every one is acknowledged.
4. SIGKILL, and a restart on the same data directory.
5. The subscriber reconnects: session present, and all of them arrive, in the order published,
   each once.

Exit status 0 when all holds. Usage:
  check_offline_queue.py --broker-cmd "target/release/ringmq --cores 2" [--port 19884]
"""

import argparse
import os
import signal
import sys
import tempfile
import time

import paho.mqtt.client as mqtt

from check_durability import RUN, Failed, client, connect, start_broker, stop_broker


def run(args):
    data_dir = tempfile.mkdtemp(prefix="ringmq-offline-")
    topic = f"offline/{RUN}/stream"
    sub_id = f"offline-{RUN}-sub"
    broker = start_broker(args.broker_cmd, args.port, data_dir, flags=[])
    try:
        # 2. the persistent subscriber leaves
        sub, sw = client(sub_id, mqtt.MQTTv311, clean=False)
        connect(sub, sw, args.port, mqtt.MQTTv311)
        _, mid = sub.subscribe(topic, qos=1)
        if not sw.wait(lambda: mid in sw.subacks):
            raise Failed("no SUBACK for the persistent subscriber")
        sub.disconnect()
        sub.loop_stop()
        # 3. every message acknowledged
        pub, pw = client(f"offline-{RUN}-pub", mqtt.MQTTv5)
        connect(pub, pw, args.port, mqtt.MQTTv5)
        t0 = time.monotonic()
        mids = [pub.publish(topic, str(i).encode(), qos=1).mid for i in range(args.messages)]
        if not pw.wait(lambda: len(pw.acked) >= len(set(mids)), 300):
            raise Failed(f"only {len(pw.acked)} of {args.messages} acknowledged")
        print(f"{args.messages} QoS 1 messages acknowledged in {time.monotonic() - t0:.1f} s", flush=True)
        pub.disconnect()
        pub.loop_stop()
        # 4. SIGKILL and restart
        broker.send_signal(signal.SIGKILL)
        broker.wait()
        t0 = time.monotonic()
        broker = start_broker(args.broker_cmd, args.port, data_dir, flags=[])
        print(f"killed; restarted and listening in {time.monotonic() - t0:.2f} s", flush=True)
        # 5. everything, in order, once. (For a moment after a SIGKILL the kernel may keep
        # the killed broker's listening socket, which shares the port with the new one's:
        # a connection it takes is never answered, so connecting is retried.)
        deadline = time.monotonic() + 30
        while True:
            sub, sw = client(sub_id, mqtt.MQTTv311, clean=False)
            try:
                connect(sub, sw, args.port, mqtt.MQTTv311)
                break
            except (Failed, OSError):
                sub.loop_stop()
                if time.monotonic() > deadline:
                    raise
        if not sw.session_present:
            raise Failed("session present = 0 after restart")
        t0 = time.monotonic()
        sw.wait(lambda: len(sw.messages) >= args.messages, 300)
        got = [int(p) for (_, p, _) in sw.messages]
        print(f"{len(got)} received in {time.monotonic() - t0:.1f} s", flush=True)
        if got[:args.messages] != list(range(args.messages)):
            missing = sorted(set(range(args.messages)) - set(got))
            first_bad = next((i for i, (a, b) in enumerate(zip(got, range(args.messages))) if a != b), len(got))
            raise Failed(f"{len(got)} received, {len(missing)} missing (e.g. {missing[:10]}), "
                         f"first out of order at position {first_bad}")
        if len(got) != args.messages:
            raise Failed(f"{len(got) - args.messages} duplicates")
        print(f"PASS offline queue: {args.messages}/{args.messages} acknowledged messages delivered in order "
              f"after SIGKILL, at default flags", flush=True)
        sub.disconnect()
        sub.loop_stop()
    finally:
        stop_broker(broker, data_dir)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker-cmd", default=os.path.join("target", "release", "ringmq") + " --cores 2")
    ap.add_argument("--port", type=int, default=19884)
    ap.add_argument("--messages", type=int, default=50000)
    args = ap.parse_args()
    try:
        run(args)
    except Failed as e:
        print(f"FAIL offline queue: {e}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
