#!/usr/bin/env python3
"""Third-party-client acceptance checks for an MQTT broker: QoS 0 only.

Uses paho-mqtt 2.x (MQTT 3.1.1 and 5.0) and the mosquitto_pub / mosquitto_sub
command-line clients. Knows nothing about the broker under test beyond host and port.

Prints one "PASS <name>" or "FAIL <name>: <why>" line per check and exits 1 if any
check failed (2 on a usage error). Every wait is bounded.

    check_qos0.py --host 127.0.0.1 --port 1883
"""

import argparse
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt

from waiting import wait_until

V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5
PROTO_NAME = {V311: "v311", V5: "v5"}

CONNECT_TIMEOUT = 10.0  # seconds to wait for CONNACK
SUBACK_TIMEOUT = 10.0  # seconds to wait for SUBACK
DELIVERY_TIMEOUT = 10.0  # seconds to wait for an expected message
GRACE = 0.3  # after a marker arrived: extra time in which a late unwanted message still fails the check

RUN_ID = uuid.uuid4().hex[:8]


class CheckFailed(Exception):
    pass


class Client:
    """A paho client running its own network thread, recording every message it receives."""

    def __init__(self, host, port, proto, tag):
        self.proto = proto
        self.client_id = f"acc-{RUN_ID}-{tag}"
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=proto)
        self.cond = threading.Condition()
        self.messages = []  # (topic, payload bytes) in arrival order
        self.retained = []  # (topic, payload) of messages delivered with the RETAIN flag set
        self.connack = None  # reason code once CONNACK arrived
        self.subacks = {}  # mid -> list of reason codes
        self.disconnected = False
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect
        self.host, self.port = host, port

    # -- callbacks (network thread) --
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.connack = reason_code
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.subacks[mid] = list(reason_codes)
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            if msg.retain:
                self.retained.append((msg.topic, bytes(msg.payload)))
            self.cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.disconnected = True
            self.cond.notify_all()

    # -- API (caller thread) --
    def _wait(self, pred, timeout):
        return wait_until(self.cond, pred, timeout)

    def connect(self):
        kwargs = {}
        if self.proto == V5:
            kwargs["clean_start"] = True
        self.c.connect(self.host, self.port, keepalive=60, **kwargs)
        self.c.loop_start()
        if not self._wait(lambda: self.connack is not None or self.disconnected, CONNECT_TIMEOUT):
            raise CheckFailed(f"{self.client_id}: no CONNACK within {CONNECT_TIMEOUT}s")
        if self.connack is None or self.connack.is_failure:
            raise CheckFailed(f"{self.client_id}: connect refused/closed (reason {self.connack})")
        return self

    def subscribe(self, topic_filter):
        rc, mid = self.c.subscribe(topic_filter, qos=0)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise CheckFailed(f"{self.client_id}: subscribe({topic_filter!r}) returned {rc}")
        if not self._wait(lambda: mid in self.subacks, SUBACK_TIMEOUT):
            raise CheckFailed(f"{self.client_id}: no SUBACK for {topic_filter!r} within {SUBACK_TIMEOUT}s")
        codes = self.subacks[mid]
        if len(codes) != 1 or codes[0].is_failure:
            raise CheckFailed(f"{self.client_id}: SUBACK for {topic_filter!r} refused: {codes}")
        return self

    def publish(self, topic, payload):
        info = self.c.publish(topic, payload, qos=0)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise CheckFailed(f"{self.client_id}: publish({topic!r}) returned {info.rc}")

    def wait_for(self, topic, payload, timeout=DELIVERY_TIMEOUT):
        """Wait until (topic, payload) has been received; return the messages received up to and including it."""
        want = (topic, payload)
        ok = self._wait(lambda: want in self.messages, timeout)
        with self.cond:
            if not ok:
                raise CheckFailed(
                    f"{self.client_id}: did not receive {topic!r} {payload!r} within {timeout}s; "
                    f"got {self.messages[-10:]!r}"
                )
            return list(self.messages[: self.messages.index(want) + 1])

    def wait_count(self, n, timeout):
        self._wait(lambda: len(self.messages) >= n, timeout)
        with self.cond:
            return len(self.messages)

    def snapshot(self):
        with self.cond:
            return list(self.messages)

    def close(self):
        try:
            self.c.disconnect()
        except Exception:
            pass
        self.c.loop_stop()


class Checks:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.failed = []
        self.passed = []
        self._clients = []

    def client(self, proto, tag):
        cl = Client(self.host, self.port, proto, tag)
        self._clients.append(cl)
        return cl.connect()

    def close_all(self):
        for cl in self._clients:
            cl.close()
        self._clients = []

    def run(self, name, fn):
        t0 = time.monotonic()
        try:
            detail = fn()
        except CheckFailed as e:
            self.failed.append(name)
            print(f"FAIL {name}: {e}", flush=True)
        except Exception as e:  # an unexpected error in a check is a failure of that check
            self.failed.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        else:
            self.passed.append(name)
            extra = f" ({detail})" if detail else ""
            print(f"PASS {name}{extra} [{time.monotonic() - t0:.2f}s]", flush=True)
        finally:
            self.close_all()

    # ------------------------------------------------------------------ checks

    def qos0_pubsub(self, pub_proto, sub_proto):
        tag = f"{PROTO_NAME[pub_proto]}-to-{PROTO_NAME[sub_proto]}"
        topic = f"acc/{RUN_ID}/qos0/{tag}"
        sub = self.client(sub_proto, f"sub-{tag}").subscribe(topic)
        pub = self.client(pub_proto, f"pub-{tag}")
        payloads = [f"{tag} #{i}".encode() for i in range(5)] + [b"", bytes(range(256)) * 4]
        for p in payloads:
            pub.publish(topic, p)
        got = sub.wait_for(topic, payloads[-1])
        if got != [(topic, p) for p in payloads]:
            raise CheckFailed(f"expected {len(payloads)} messages in order, got {[(t, p[:20]) for t, p in got]!r}")
        if sub.retained:
            # MQTT-3.3.1-9 / v5 3.3.1.3: RETAIN is 0 on a message sent for an established subscription
            raise CheckFailed(f"{len(sub.retained)} live messages delivered with RETAIN=1")
        return f"{len(payloads)} messages in order, RETAIN=0"

    def _expect_exactly(self, sub, marker_topic, marker_payload, expected):
        """Wait for the marker, allow a short grace, then require the received list == expected (which ends with the marker)."""
        sub.wait_for(marker_topic, marker_payload)
        time.sleep(GRACE)
        got = sub.snapshot()
        if got != expected:
            raise CheckFailed(f"{sub.client_id}: expected {expected!r}, got {got!r}")

    def wildcard_plus(self, proto):
        sub = self.client(proto, f"sub-plus-{PROTO_NAME[proto]}").subscribe("a/+/c")
        pub = self.client(proto, f"pub-plus-{PROTO_NAME[proto]}")
        p = PROTO_NAME[proto].encode()
        pub.publish("a/b/d", b"no1-" + p)  # must not match
        pub.publish("a/b/c/d", b"no2-" + p)  # must not match
        pub.publish("a/c", b"no3-" + p)  # must not match (+ is exactly one level)
        pub.publish("a/b/c", b"yes1-" + p)  # must match
        pub.publish("a//c", b"yes2-" + p)  # must match: + matches an empty level
        pub.publish("a/x/c", b"yes3-" + p)  # marker, must match
        self._expect_exactly(
            sub, "a/x/c", b"yes3-" + p,
            [("a/b/c", b"yes1-" + p), ("a//c", b"yes2-" + p), ("a/x/c", b"yes3-" + p)],
        )
        return "a/+/c got a/b/c a//c a/x/c, not a/b/d a/b/c/d a/c"

    def wildcard_hash(self, proto):
        sub = self.client(proto, f"sub-hash-{PROTO_NAME[proto]}").subscribe("a/#")
        pub = self.client(proto, f"pub-hash-{PROTO_NAME[proto]}")
        p = PROTO_NAME[proto].encode()
        pub.publish("b", b"no1-" + p)  # must not match
        pub.publish("ab/c", b"no2-" + p)  # must not match
        pub.publish("a", b"yes1-" + p)  # parent level: must match (MQTT-4.7.1.2)
        pub.publish("a/b", b"yes2-" + p)
        pub.publish("b/a", b"no3-" + p)  # must not match
        pub.publish("a/b/c", b"yes3-" + p)  # marker
        self._expect_exactly(
            sub, "a/b/c", b"yes3-" + p,
            [("a", b"yes1-" + p), ("a/b", b"yes2-" + p), ("a/b/c", b"yes3-" + p)],
        )
        return "a/# got a a/b a/b/c, not b ab/c b/a"

    def dollar_rule(self):
        subs = [
            self.client(V311, "dollar-hash-v311").subscribe("#"),
            self.client(V5, "dollar-hash-v5").subscribe("#"),
            self.client(V311, "dollar-plus-v311").subscribe("+/x"),
            self.client(V5, "dollar-plus-v5").subscribe("+/x"),
        ]
        dollar311 = self.client(V311, "dollar-exact-v311").subscribe("$test/#")
        dollar5 = self.client(V5, "dollar-exact-v5").subscribe("$test/#")
        pub = self.client(V311, "dollar-pub")
        marker_topic = f"m{RUN_ID}/x"  # matches "#" and "+/x", not "$test/#"
        pub.publish("$test/x", b"dollar-1")
        pub.publish(marker_topic, b"marker")
        pub.publish("$test/y/z", b"dollar-2")
        pub.publish(marker_topic, b"marker-2")
        errors = []
        for s in subs:
            s.wait_for(marker_topic, b"marker-2")
        time.sleep(GRACE)
        for s in subs:
            bad = [m for m in s.snapshot() if m[0].startswith("$")]
            if bad:
                errors.append(f"{s.client_id} got {bad!r}")
            mine = [m for m in s.snapshot() if m[0] == marker_topic]
            if mine != [(marker_topic, b"marker"), (marker_topic, b"marker-2")]:
                errors.append(f"{s.client_id} marker messages wrong: {mine!r}")
        for d in (dollar311, dollar5):
            got = d.wait_for("$test/y/z", b"dollar-2")
            time.sleep(GRACE)
            got = d.snapshot()
            if got != [("$test/x", b"dollar-1"), ("$test/y/z", b"dollar-2")]:
                errors.append(f"{d.client_id} expected the two $test messages only, got {got!r}")
        if errors:
            raise CheckFailed("; ".join(errors))
        return "'#' and '+/x' (v311, v5) got no $test/*; '$test/#' (v311, v5) got both"

    def many_pairs(self, pairs, n, rate):
        protos = [V311, V5]
        subs, pubs = [], []
        for i in range(pairs):
            topic = f"pair/{RUN_ID}/{i}"
            subs.append((topic, self.client(protos[i % 2], f"pair-sub-{i}").subscribe(topic)))
        for i in range(pairs):
            pubs.append(self.client(protos[(i // 2) % 2], f"pair-pub-{i}"))
        interval = 1.0 / rate
        errors = []

        def publish_all(i):
            topic = subs[i][0]
            start = time.monotonic()
            try:
                for k in range(n):
                    # pace against the schedule, not per-message sleeps, so drift does not accumulate
                    delay = start + k * interval - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    pubs[i].publish(topic, f"{i}:{k}".encode())
            except Exception as e:
                errors.append(f"publisher {i}: {e}")

        threads = [threading.Thread(target=publish_all, args=(i,), daemon=True) for i in range(pairs)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        total = pairs * n
        deadline = t0 + n * interval + 60.0
        while time.monotonic() < deadline:
            got = sum(len(s.snapshot()) for _, s in subs)
            if got >= total:
                break
            time.sleep(0.1)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        time.sleep(GRACE)  # catch duplicates arriving just after the last expected message
        elapsed = time.monotonic() - t0
        got = 0
        for i, (topic, s) in enumerate(subs):
            msgs = s.snapshot()
            got += len(msgs)
            want = [(topic, f"{i}:{k}".encode()) for k in range(n)]
            if msgs != want:
                missing = len(set(want) - set(msgs))
                extra = len(msgs) - (n - missing)
                order = "in order" if [m for m in msgs if m in want] == [m for m in want if m in msgs] else "OUT OF ORDER"
                errors.append(f"pair {i}: {len(msgs)}/{n} received, {missing} missing, {extra} unexpected/duplicate, {order}")
        if errors:
            shown = errors[:8] + ([f"... and {len(errors) - 8} more"] if len(errors) > 8 else [])
            raise CheckFailed(f"{got}/{total} delivered in {elapsed:.1f}s; " + "; ".join(shown))
        return f"{got}/{total} delivered, each pair in order, {elapsed:.1f}s"

    # ---------------------------------------------------------- mosquitto CLI

    def cli_sub(self, version, pub_version):
        for tool in ("mosquitto_sub", "mosquitto_pub", "stdbuf"):
            if shutil.which(tool) is None:
                raise CheckFailed(f"{tool} not found in PATH")
        h, p = self.host, str(self.port)
        # stdbuf -oL: mosquitto_sub's stdout is block-buffered on a pipe; we need its debug lines as they happen
        cmd = ["stdbuf", "-oL", "mosquitto_sub", "-h", h, "-p", p, "-V", version, "-t", "w/+", "-C", "3", "-W", "10", "-d",
               "-i", f"acc-{RUN_ID}-cli-sub-{version}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        lines = queue.Queue()

        def reader():
            for line in proc.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=reader, daemon=True).start()
        out = []
        try:
            # 1. wait (bounded) for the SUBACK in mosquitto_sub's debug output
            deadline = time.monotonic() + SUBACK_TIMEOUT
            subscribed = False
            while time.monotonic() < deadline and not subscribed:
                try:
                    line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if line is None:
                    break
                out.append(line)
                subscribed = "SUBACK" in line
            if not subscribed:
                raise CheckFailed(f"mosquitto_sub never reported a SUBACK; output: {out!r}")
            # 2. publish three messages with separate mosquitto_pub runs
            payloads = [f"cli-{version}-{k}-{RUN_ID}" for k in range(3)]
            for k, m in enumerate(payloads):
                r = subprocess.run(
                    ["mosquitto_pub", "-h", h, "-p", p, "-V", pub_version, "-t", f"w/{k + 1}", "-m", m, "-q", "0",
                     "-i", f"acc-{RUN_ID}-cli-pub-{pub_version}-{k}"],
                    capture_output=True, text=True, timeout=15,
                )
                if r.returncode != 0:
                    raise CheckFailed(f"mosquitto_pub exited {r.returncode}: {r.stdout}{r.stderr}")
            # 3. mosquitto_sub must exit 0 on its own after 3 messages (-C 3; -W 10 bounds it)
            try:
                rc = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                raise CheckFailed("mosquitto_sub did not exit within 15s")
            while True:
                try:
                    line = lines.get(timeout=2)
                except queue.Empty:
                    break
                if line is None:
                    break
                out.append(line)
            if rc != 0:
                raise CheckFailed(f"mosquitto_sub exited {rc} (27 = -W timeout); output: {out!r}")
            missing = [m for m in payloads if m not in out]
            if missing:
                raise CheckFailed(f"mosquitto_sub output lacks {missing!r}; output: {out!r}")
            return f"mosquitto_sub -V {version} got 3 messages from mosquitto_pub -V {pub_version}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pairs", type=int, default=64, help="publisher/subscriber pairs (default 64)")
    ap.add_argument("--messages", type=int, default=100, help="QoS 0 messages per pair (default 100)")
    ap.add_argument("--rate", type=float, default=200.0, help="messages/s per publisher (default 200)")
    args = ap.parse_args()

    ck = Checks(args.host, args.port)
    print(f"# check_qos0 against {args.host}:{args.port}, run id {RUN_ID}", flush=True)
    for pub_proto in (V311, V5):
        for sub_proto in (V311, V5):
            ck.run(f"qos0-pubsub-{PROTO_NAME[pub_proto]}-to-{PROTO_NAME[sub_proto]}",
                   lambda a=pub_proto, b=sub_proto: ck.qos0_pubsub(a, b))
    for proto in (V311, V5):
        ck.run(f"wildcard-plus-{PROTO_NAME[proto]}", lambda x=proto: ck.wildcard_plus(x))
        ck.run(f"wildcard-hash-{PROTO_NAME[proto]}", lambda x=proto: ck.wildcard_hash(x))
    ck.run("dollar-topics-not-matched-by-wildcards", ck.dollar_rule)
    ck.run(f"pairs-{args.pairs}x{args.messages}-qos0", lambda: ck.many_pairs(args.pairs, args.messages, args.rate))
    ck.run("mosquitto-cli-sub-v311", lambda: ck.cli_sub("mqttv311", "mqttv311"))
    ck.run("mosquitto-cli-sub-v5", lambda: ck.cli_sub("mqttv5", "mqttv5"))
    ck.run("mosquitto-cli-sub-v5-pub-v311", lambda: ck.cli_sub("mqttv5", "mqttv311"))
    ck.run("mosquitto-cli-sub-v311-pub-v5", lambda: ck.cli_sub("mqttv311", "mqttv5"))

    print(f"# {len(ck.passed)} passed, {len(ck.failed)} failed" + (f": {', '.join(ck.failed)}" if ck.failed else ""),
          flush=True)
    sys.exit(1 if ck.failed else 0)


if __name__ == "__main__":
    main()
