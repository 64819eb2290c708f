#!/usr/bin/env python3
"""Crash durability with unmodified paho-mqtt clients (MQTT 3.1.1 and 5).

1. Start the broker on a fresh data directory.
2. A v5 client publishes 100 retained QoS 1 messages (dur/<run>/keep/0..99), all acknowledged.
3. A persistent QoS 1 subscriber (3.1.1, clean_session=0) subscribes to dur/<run>/stream and leaves.
4. A v5 publisher streams QoS 1 messages; once --kill-after of them are acknowledged the broker
   gets SIGKILL, mid-stream.
5. Restart on the same data directory.
6. The subscriber reconnects: session present, and every message the publisher saw
   acknowledged arrives; a new subscriber gets 100/100 retained messages.

Exit status 0 when all holds. Usage:
  check_durability.py --broker-cmd "target/release/ringmq --cores 2" [--port 19883]
"""

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from waiting import wait_until

RUN = uuid.uuid4().hex[:8]
WAIT = 60.0


class Failed(Exception):
    pass


# Deep queues: this check is about the crash, not the queue's bound (check_offline_queue.py
# runs at default flags).
DEEP_QUEUES = ["--max-queued-messages", "1000000", "--max-queued-bytes", str(1 << 30)]


def start_broker(cmd, port, data_dir, flags=DEEP_QUEUES):
    # A broker just killed can keep its listening socket a moment (the kernel tears its
    # io_uring down asynchronously): a connect then succeeds against a dead listener and
    # would pass for the new broker's. Wait until the port refuses first.
    gone = time.monotonic() + 10
    while time.monotonic() < gone:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            time.sleep(0.05)
        except OSError:
            break
    args = shlex.split(cmd) + ["--bind", f"127.0.0.1:{port}", "--data-dir", data_dir, "--log-level", "warn"] + flags
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise Failed(f"broker exited with {proc.returncode} during start-up")
            time.sleep(0.05)
    proc.kill()
    raise Failed("broker did not listen within 30 s")


class Waiter:
    """A condition plus state shared with paho's network thread."""

    def __init__(self):
        self.cond = threading.Condition()

    def wait(self, pred, timeout=WAIT):
        return wait_until(self.cond, pred, timeout)


def client(client_id, protocol, clean=True, expiry=None):
    w = Waiter()
    w.connack = None
    w.session_present = None
    w.acked = set()
    w.messages = []
    w.subacks = set()
    if protocol == mqtt.MQTTv5:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                        reconnect_on_failure=False)
    else:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                        clean_session=clean, reconnect_on_failure=False)

    def on_connect(cl, ud, flags, rc, props):
        with w.cond:
            w.connack = rc
            w.session_present = bool(flags.session_present)
            w.cond.notify_all()

    def on_publish(cl, ud, mid, rc, props):
        with w.cond:
            w.acked.add(mid)
            w.cond.notify_all()

    def on_message(cl, ud, msg):
        with w.cond:
            w.messages.append((msg.topic, bytes(msg.payload), msg.retain))
            w.cond.notify_all()

    def on_subscribe(cl, ud, mid, rcs, props):
        with w.cond:
            w.subacks.add(mid)
            w.cond.notify_all()

    c.on_connect, c.on_publish, c.on_message = on_connect, on_publish, on_message
    c.on_subscribe = on_subscribe
    c.max_inflight_messages_set(200)
    w.client = c
    return c, w


def connect(c, w, port, protocol, clean=True, expiry=None):
    if protocol == mqtt.MQTTv5:
        props = None
        if expiry is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = expiry
        c.connect("127.0.0.1", port, keepalive=60, clean_start=clean, properties=props)
    else:
        c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    if not w.wait(lambda: w.connack is not None, 10) or w.connack.is_failure:
        raise Failed(f"connect refused or timed out: {w.connack}")


def run(args):
    data_dir = tempfile.mkdtemp(prefix="ringmq-durability-")
    keep = f"dur/{RUN}/keep"
    stream = f"dur/{RUN}/stream"
    sub_id = f"dur-{RUN}-sub"
    broker = start_broker(args.broker_cmd, args.port, data_dir)
    try:
        # 2. retained
        pub, pw = client(f"dur-{RUN}-retainer", mqtt.MQTTv5)
        connect(pub, pw, args.port, mqtt.MQTTv5)
        mids = [pub.publish(f"{keep}/{i}", f"kept-{i}", qos=1, retain=True).mid for i in range(100)]
        if not pw.wait(lambda: set(mids) <= pw.acked):
            raise Failed("retained messages not all acknowledged")
        pub.disconnect()
        pub.loop_stop()
        # 3. persistent subscriber leaves
        sub, sw = client(sub_id, mqtt.MQTTv311, clean=False)
        connect(sub, sw, args.port, mqtt.MQTTv311)
        _, mid = sub.subscribe(stream, qos=1)
        if not sw.wait(lambda: mid in sw.subacks):
            raise Failed("no SUBACK for the persistent subscriber")
        sub.disconnect()
        sub.loop_stop()
        # 4. stream, SIGKILL mid-stream
        streamer, tw = client(f"dur-{RUN}-streamer", mqtt.MQTTv5)
        connect(streamer, tw, args.port, mqtt.MQTTv5)
        payload_of = {}
        sent = 0
        while len(tw.acked) < args.kill_after and sent < args.messages:
            info = streamer.publish(stream, f"{sent}".encode(), qos=1)
            payload_of[info.mid] = sent
            sent += 1
        if not tw.wait(lambda: len(tw.acked) >= args.kill_after):
            raise Failed(f"only {len(tw.acked)} acknowledged before the kill")
        broker.send_signal(signal.SIGKILL)
        broker.wait()
        with tw.cond:
            acked = {payload_of[mid] for mid in tw.acked if mid in payload_of}
        streamer.loop_stop()
        print(f"killed the broker after {len(acked)} of {sent} QoS 1 messages acknowledged", flush=True)
        # 5. restart
        t0 = time.monotonic()
        broker = start_broker(args.broker_cmd, args.port, data_dir)
        print(f"restarted and listening in {time.monotonic() - t0:.2f} s", flush=True)
        # 6. subscriber returns
        sub, sw = client(sub_id, mqtt.MQTTv311, clean=False)
        connect(sub, sw, args.port, mqtt.MQTTv311)
        if not sw.session_present:
            raise Failed("session present = 0 after restart")

        def received():
            return {int(p) for (_, p, _) in sw.messages if p.isdigit()}

        sw.wait(lambda: acked <= received())
        lost = acked - received()
        if lost:
            raise Failed(f"{len(lost)} acknowledged messages lost, e.g. {sorted(lost)[:10]}")
        got = received()
        check, cw = client(f"dur-{RUN}-check", mqtt.MQTTv5)
        connect(check, cw, args.port, mqtt.MQTTv5)
        check.subscribe(f"{keep}/#", qos=1)  # retained messages follow the SUBACK
        cw.wait(lambda: len([1 for (_, _, r) in cw.messages if r]) >= 100, 20)
        retained = {t for (t, _, r) in cw.messages if r}
        if len(retained) != 100:
            raise Failed(f"{len(retained)}/100 retained messages after restart")
        print(f"PASS durability: session present, {len(acked)}/{len(acked)} acknowledged messages delivered "
              f"({len(got)} distinct received), 0 lost; 100/100 retained", flush=True)
        for c in (sub, check):
            c.disconnect()
            c.loop_stop()
    finally:
        stop_broker(broker, data_dir)


def stop_broker(broker, data_dir):
    """SIGTERM (SIGKILL after 10 s), then the data directory goes."""
    broker.send_signal(signal.SIGTERM)
    try:
        broker.wait(timeout=10)
    except subprocess.TimeoutExpired:
        broker.kill()
    shutil.rmtree(data_dir, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker-cmd", default=os.path.join("target", "release", "ringmq") + " --cores 2")
    ap.add_argument("--port", type=int, default=19883)
    ap.add_argument("--messages", type=int, default=50000, help="QoS 1 messages the streamer may send (50000)")
    ap.add_argument("--kill-after", type=int, default=5000, help="SIGKILL once this many are acknowledged (5000)")
    args = ap.parse_args()
    try:
        run(args)
    except Failed as e:
        print(f"FAIL durability: {e}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
