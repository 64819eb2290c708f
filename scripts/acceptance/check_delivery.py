#!/usr/bin/env python3
"""Third-party-client acceptance checks for an MQTT broker: QoS 1/2 delivery, sessions,
takeover, retained messages, wills and will delay.

Uses paho-mqtt 2.x (MQTT 3.1.1 and 5.0). Knows nothing about the broker under test
beyond host and port.

Prints one "PASS <name>" or "FAIL <name>: <why>" line per check and exits 1 if any
check failed (2 on a usage error). Every wait is bounded; waits are on conditions,
except where the check is about a time interval (will delay, session expiry, and the
"nothing arrives" windows, which end with a marker message where one can be used).

    check_delivery.py --host 127.0.0.1 --port 1883
    check_delivery.py --port 1883 --only will,will-delay --log   # paho packet log on stderr

Client ids are "acc-<run id>-...", topics contain the run id, so reruns against a
long-running broker do not collide with persistent sessions or retained messages left
by earlier runs (retained messages a check creates are cleared at its end).
"""

import argparse
import socket
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from waiting import wait_until

V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5
PROTO_NAME = {V311: "v311", V5: "v5"}

CONNECT_TIMEOUT = 10.0  # seconds to wait for CONNACK
SUBACK_TIMEOUT = 10.0  # seconds to wait for SUBACK
ACK_TIMEOUT = 30.0  # seconds to wait for PUBACK/PUBCOMP of everything published
DELIVERY_TIMEOUT = 10.0  # seconds to wait for an expected message
GRACE = 0.3  # after a marker arrived: extra time in which a late unwanted message still fails the check

RC_SESSION_TAKEN_OVER = 0x8E

RUN_ID = uuid.uuid4().hex[:8]
LOG_PACKETS = False


class CheckFailed(Exception):
    pass


def props(packet_type, **kw):
    p = Properties(packet_type)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def rc_value(rc):
    return getattr(rc, "value", rc)


class Msg:
    __slots__ = ("topic", "payload", "qos", "retain", "t")

    def __init__(self, m):
        self.topic, self.payload, self.qos, self.retain = m.topic, bytes(m.payload), m.qos, bool(m.retain)
        self.t = time.monotonic()

    def __repr__(self):
        p = self.payload if len(self.payload) <= 24 else self.payload[:24] + b"..."
        return f"({self.topic!r}, {p!r}, q{self.qos}{', retain' if self.retain else ''})"


class Client:
    """A paho client recording what it receives.

    threaded=True: paho's network thread (loop_start). threaded=False: the caller pumps the
    network loop (used for clients whose socket gets closed abruptly, so no thread races it).
    Auto-reconnect is off: a dropped client stays dropped.
    """

    def __init__(self, host, port, proto, client_id, clean=True, session_expiry=None, will=None, threaded=True):
        self.proto, self.client_id, self.clean = proto, client_id, clean
        self.session_expiry, self.threaded = session_expiry, threaded
        kw = {} if proto == V5 else {"clean_session": clean}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto,
                             reconnect_on_failure=False, **kw)
        if will is not None:  # dict(topic, payload, qos, retain, delay)
            wp = None
            if will.get("delay") is not None:
                wp = props(PacketTypes.WILLMESSAGE, WillDelayInterval=will["delay"])
            self.c.will_set(will["topic"], will["payload"], qos=will.get("qos", 0), retain=will.get("retain", False),
                            properties=wp)
        self.cond = threading.Condition()
        self.messages = []  # Msg in arrival order
        self.distinct = set()  # (topic, payload) received at least once
        self.connack = None  # reason code once CONNACK arrived
        self.session_present = None
        self.subacks = {}  # mid -> list of reason codes
        self.acked = set()  # mids whose PUBACK/PUBCOMP arrived (QoS 0: once written)
        self.disconnected = False
        self.disconnect_rc = None
        self.disconnect_from_server = None  # True: the server sent DISCONNECT; False: connection just closed
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect
        self.c.on_publish = self._on_publish
        if LOG_PACKETS:
            self.c.on_log = lambda client, userdata, level, buf: print(
                f"  [{time.monotonic():.3f} {client_id}] {buf}", file=sys.stderr, flush=True)
        self.host, self.port = host, port

    # -- callbacks (network thread) --
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.connack = reason_code
            self.session_present = bool(flags.session_present)
            # paho does not limit itself to the server's Receive Maximum (v5); exceeding it makes e.g.
            # Mosquitto drop QoS 2 PUBLISHes without PUBREC, so clamp paho's in-flight window (default 20)
            rm = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
            if rm and rm < 20:
                client.max_inflight_messages_set(rm)
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.subacks[mid] = list(reason_codes)
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self.cond:
            m = Msg(msg)
            self.messages.append(m)
            self.distinct.add((m.topic, m.payload))
            self.cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self.cond:
            self.acked.add(mid)
            self.cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.disconnected = True
            self.disconnect_rc = rc_value(reason_code)
            self.disconnect_from_server = bool(getattr(flags, "is_disconnect_packet_from_server", False))
            self.cond.notify_all()

    # -- API (caller thread) --
    def _wait(self, pred, timeout):
        deadline = time.monotonic() + timeout
        if not self.threaded:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.c.loop(timeout=min(0.05, left))
            return True
        return wait_until(self.cond, pred, deadline - time.monotonic())

    def connect(self):
        kwargs = {}
        if self.proto == V5:
            kwargs["clean_start"] = self.clean
            if self.session_expiry is not None:
                kwargs["properties"] = props(PacketTypes.CONNECT, SessionExpiryInterval=self.session_expiry)
        self.c.connect(self.host, self.port, keepalive=60, **kwargs)
        if self.threaded:
            self.c.loop_start()
        if not self._wait(lambda: self.connack is not None or self.disconnected, CONNECT_TIMEOUT):
            raise CheckFailed(f"{self.client_id}: no CONNACK within {CONNECT_TIMEOUT}s")
        if self.connack is None or self.connack.is_failure:
            raise CheckFailed(f"{self.client_id}: connect refused/closed (reason {self.connack})")
        return self

    def subscribe(self, topic_filter, qos=0):
        rc, mid = self.c.subscribe(topic_filter, qos=qos)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise CheckFailed(f"{self.client_id}: subscribe({topic_filter!r}) returned {rc}")
        if not self._wait(lambda: mid in self.subacks, SUBACK_TIMEOUT):
            raise CheckFailed(f"{self.client_id}: no SUBACK for {topic_filter!r} within {SUBACK_TIMEOUT}s")
        codes = self.subacks[mid]
        if len(codes) != 1 or codes[0].is_failure:
            raise CheckFailed(f"{self.client_id}: SUBACK for {topic_filter!r} refused: {codes}")
        granted = rc_value(codes[0])
        if granted != qos:
            raise CheckFailed(f"{self.client_id}: SUBACK for {topic_filter!r} granted QoS {granted}, requested {qos}")
        return self

    def publish(self, topic, payload, qos=0, retain=False):
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise CheckFailed(f"{self.client_id}: publish({topic!r}) returned {info.rc}")
        return info.mid

    def wait_acked(self, mids, timeout=ACK_TIMEOUT):
        mids = set(mids)
        if not self._wait(lambda: mids <= self.acked, timeout):
            with self.cond:
                missing = sorted(mids - self.acked)
            raise CheckFailed(f"{self.client_id}: {len(missing)}/{len(mids)} publishes not acknowledged "
                              f"within {timeout}s (first mids {missing[:5]})")

    def publish_acked(self, topic, payload, qos=1, retain=False):
        self.wait_acked([self.publish(topic, payload, qos=qos, retain=retain)])

    def wait_for(self, topic, payload, timeout=DELIVERY_TIMEOUT):
        """Wait until (topic, payload) has been received; return the Msg."""
        def find():
            for m in self.messages:
                if m.topic == topic and m.payload == payload:
                    return m
            return None
        self._wait(lambda: find() is not None, timeout)
        with self.cond:
            m = find()
            if m is None:
                raise CheckFailed(f"{self.client_id}: did not receive {topic!r} {payload!r} within {timeout}s; "
                                  f"got {len(self.messages)} messages, last {self.messages[-5:]!r}")
            return m

    def wait_count(self, pred, n, timeout):
        self._wait(lambda: sum(1 for m in self.messages if pred(m)) >= n, timeout)
        with self.cond:
            return sum(1 for m in self.messages if pred(m))

    def wait_disconnected(self, timeout):
        return self._wait(lambda: self.disconnected, timeout)

    def snapshot(self):
        with self.cond:
            return list(self.messages)

    def disconnect(self, end_session=False):
        """Send DISCONNECT (normal). end_session (v5): also set Session Expiry Interval 0 on it."""
        p = None
        if end_session and self.proto == V5 and self.session_expiry:
            p = props(PacketTypes.DISCONNECT, SessionExpiryInterval=0)
        try:
            self.c.disconnect(properties=p)
        except Exception:
            pass
        if not self.threaded:
            self._wait(lambda: self.disconnected, 5.0)

    def close(self):
        if not self.disconnected:
            self.disconnect(end_session=True)
        if self.threaded:
            self.c.loop_stop()

    def kill_socket(self):
        """Close the TCP connection without DISCONNECT (only for threaded=False clients)."""
        assert not self.threaded
        sock = self.c.socket()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        self.disconnected = True  # nothing more to do with this paho object; close() must not touch it


class Checks:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.failed = []
        self.passed = []
        self._clients = []
        self._cleanup = []  # callables run after the check (e.g. clear retained messages)

    def new(self, proto, tag, **kw):
        cl = Client(self.host, self.port, proto, f"acc-{RUN_ID}-{tag}", **kw)
        self._clients.append(cl)
        return cl

    def client(self, proto, tag, **kw):
        return self.new(proto, tag, **kw).connect()

    def close_all(self):
        for fn in self._cleanup:
            try:
                fn()
            except Exception as e:
                print(f"# cleanup error: {type(e).__name__}: {e}", flush=True)
        self._cleanup = []
        for cl in self._clients:
            try:
                cl.close()
            except Exception:
                pass
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

    def _marker(self, pub, sub, topic, what):
        """Publish a QoS 1 marker on topic, wait until sub got it, then a grace period."""
        payload = f"marker-{what}-{RUN_ID}".encode()
        pub.publish_acked(topic, payload, qos=1)
        sub.wait_for(topic, payload)
        time.sleep(GRACE)
        return payload

    # ------------------------------------------------------------------ checks

    def qos_downgrade(self, proto):
        """1. subscription QoS q_s, publish QoS q_p -> delivered with QoS min(q_p, q_s); all 9 combinations."""
        n = PROTO_NAME[proto]
        subs = {}
        for qs in range(3):
            topic = f"acc/{RUN_ID}/qos/{n}/s{qs}"
            subs[qs] = (topic, self.client(proto, f"qos-{n}-sub{qs}").subscribe(topic, qos=qs))
        pub = self.client(proto, f"qos-{n}-pub")
        mids = []
        for qs, (topic, _) in subs.items():
            for qp in range(3):
                mids.append(pub.publish(topic, f"p{qp}".encode(), qos=qp))
        pub.wait_acked(mids)
        errors, seen = [], []
        for qs, (topic, sub) in subs.items():
            sub.wait_count(lambda m: True, 3, DELIVERY_TIMEOUT)
        time.sleep(GRACE)  # catch duplicates
        for qs, (topic, sub) in subs.items():
            got = sub.snapshot()
            for qp in range(3):
                ms = [m for m in got if m.payload == f"p{qp}".encode()]
                want = min(qp, qs)
                if len(ms) != 1:
                    # QoS 1 may legitimately duplicate, but not on a clean local link; report it
                    errors.append(f"sub q{qs}/pub q{qp}: received {len(ms)} times")
                elif ms[0].qos != want:
                    errors.append(f"sub q{qs}/pub q{qp}: delivered QoS {ms[0].qos}, want {want}")
                else:
                    seen.append(f"{qs}{qp}->{ms[0].qos}")
        if errors:
            raise CheckFailed("; ".join(errors))
        return "sub/pub->delivered: " + " ".join(seen)

    def qos1_order(self, n_msgs, window):
        """2. n QoS 1 messages from one publisher arrive in order at a QoS 1 subscriber (v3.1.1).

        The publisher keeps at most `window` messages published but not yet received: brokers may
        bound a subscriber's queue (Mosquitto: max_queued_messages 1000, then drops), and a
        Python subscriber is slower than the broker."""
        topic = f"acc/{RUN_ID}/order"
        sub = self.client(V311, "order-sub").subscribe(topic, qos=1)
        pub = self.client(V311, "order-pub")
        t0 = time.monotonic()
        mids = []
        for i in range(n_msgs):
            if i - len(sub.distinct) >= window:
                if not sub._wait(lambda: i - len(sub.distinct) < window, DELIVERY_TIMEOUT):
                    raise CheckFailed(f"subscriber stalled: {len(sub.distinct)} distinct received after {i} "
                                      f"published, nothing new for {DELIVERY_TIMEOUT}s")
            mids.append(pub.publish(topic, str(i).encode(), qos=1))
        want = [str(i).encode() for i in range(n_msgs)]
        wantset = set(want)
        sub._wait(lambda: len(sub.distinct) >= n_msgs, 60.0)  # only want payloads are published on topic
        pub.wait_acked(mids)
        time.sleep(GRACE)
        got = [m.payload for m in sub.snapshot()]
        first, seen = [], set()
        for p in got:
            if p not in seen:
                seen.add(p)
                first.append(p)
        missing = [p for p in want if p not in seen]
        bad_qos = sum(1 for m in sub.snapshot() if m.qos != 1)
        dups = len(got) - len(first)
        errors = []
        if missing:
            errors.append(f"{len(missing)} missing (first {[p.decode() for p in missing[:5]]})")
        firsts_in_want = [p for p in first if p in wantset]
        if firsts_in_want != [p for p in want if p in seen]:
            k = next(i for i, (a, b) in enumerate(zip(firsts_in_want, [p for p in want if p in seen])) if a != b)
            errors.append(f"OUT OF ORDER at position {k}: got {[p.decode() for p in firsts_in_want[k:k + 5]]}")
        if bad_qos:
            errors.append(f"{bad_qos} delivered with QoS != 1")
        if errors:
            raise CheckFailed(f"{len(seen)}/{n_msgs} received; " + "; ".join(errors))
        return f"{n_msgs}/{n_msgs} in order, {dups} duplicates, window {window}, {time.monotonic() - t0:.1f}s"

    def qos2_exactly_once(self, proto, n_msgs):
        """3. n QoS 2 messages arrive exactly once."""
        n = PROTO_NAME[proto]
        topic = f"acc/{RUN_ID}/qos2/{n}"
        sub = self.client(proto, f"qos2-{n}-sub").subscribe(topic, qos=2)
        pub = self.client(proto, f"qos2-{n}-pub")
        t0 = time.monotonic()
        mids = [pub.publish(topic, str(i).encode(), qos=2) for i in range(n_msgs)]
        sub.wait_count(lambda m: True, n_msgs, 60.0)
        pub.wait_acked(mids)
        self._marker(pub, sub, topic, "qos2")
        got = [m.payload for m in sub.snapshot() if not m.payload.startswith(b"marker-")]
        want = [str(i).encode() for i in range(n_msgs)]
        counts = {}
        for p in got:
            counts[p] = counts.get(p, 0) + 1
        missing = [p for p in want if p not in counts]
        dup = [p for p, c in counts.items() if c > 1]
        errors = []
        if missing:
            errors.append(f"{len(missing)} missing (first {[p.decode() for p in missing[:5]]})")
        if dup:
            errors.append(f"{len(dup)} delivered more than once (first {[p.decode() for p in dup[:5]]})")
        extra = [p for p in counts if p not in set(want)]
        if extra:
            errors.append(f"unexpected payloads {extra[:5]!r}")
        if any(m.qos != 2 for m in sub.snapshot() if not m.payload.startswith(b"marker-")):
            errors.append("some delivered with QoS != 2")
        if errors:
            raise CheckFailed(f"{len(got)} received for {n_msgs} published; " + "; ".join(errors))
        order = "in order" if got == want else "NOT in order"
        return f"{n_msgs}/{n_msgs} exactly once ({order}), {time.monotonic() - t0:.1f}s"

    def persistent_session_v311(self):
        """4. clean_session=False: offline QoS 1 messages are queued and delivered on reconnect."""
        topic = f"acc/{RUN_ID}/persist"
        s1 = self.client(V311, "persist-sub", clean=False)
        if s1.session_present:
            raise CheckFailed("first connect (fresh client id, clean_session=0): session present = 1")
        s1.subscribe(topic, qos=1)
        s1.disconnect()
        if not s1.wait_disconnected(5.0):
            raise CheckFailed("subscriber did not see its own disconnect complete")
        pub = self.client(V311, "persist-pub")
        want = [f"offline-{i}".encode() for i in range(10)]
        pub.wait_acked([pub.publish(topic, p, qos=1) for p in want])
        s2 = self.client(V311, "persist-sub", clean=False)
        if not s2.session_present:
            raise CheckFailed("reconnect with clean_session=0: CONNACK session present = 0, want 1")
        n = s2.wait_count(lambda m: m.topic == topic, 10, DELIVERY_TIMEOUT)
        self._marker(pub, s2, topic, "persist")
        got = [m.payload for m in s2.snapshot() if m.topic == topic and not m.payload.startswith(b"marker")]
        if got != want:
            raise CheckFailed(f"after reconnect received {n} queued messages {got!r}, want the 10 in order")
        qos = {m.qos for m in s2.snapshot()}
        s2.disconnect()
        s2.wait_disconnected(5.0)
        s3 = self.client(V311, "persist-sub", clean=True)
        if s3.session_present:
            raise CheckFailed("reconnect with clean_session=1: CONNACK session present = 1, want 0")
        return f"session present 0/1/0, 10 queued messages in order (QoS {sorted(qos)})"

    def session_expiry_v5(self):
        """5. v5 Session Expiry Interval 3: session survives a 1 s absence, not a 5 s one."""
        topic = f"acc/{RUN_ID}/expiry"
        s1 = self.client(V5, "expiry-sub", clean=True, session_expiry=3)
        s1.subscribe(topic, qos=1)
        s1.disconnect()
        s1.wait_disconnected(5.0)
        t_off = time.monotonic()
        pub = self.client(V5, "expiry-pub")
        pub.publish_acked(topic, b"while-offline", qos=1)
        s2 = self.new(V5, "expiry-sub", clean=False, session_expiry=3)
        s2.connect()
        dt = time.monotonic() - t_off
        if not s2.session_present:
            raise CheckFailed(f"reconnect {dt:.2f}s after disconnect (expiry 3s): session present = 0, want 1")
        s2.wait_for(topic, b"while-offline")
        s2.disconnect()
        s2.wait_disconnected(5.0)
        t_off = time.monotonic()
        time.sleep(5.0)  # the interval is the point: longer than the 3 s expiry
        s3 = self.new(V5, "expiry-sub", clean=False, session_expiry=0)
        s3.connect()
        dt2 = time.monotonic() - t_off
        if s3.session_present:
            raise CheckFailed(f"reconnect {dt2:.2f}s after disconnect (expiry 3s): session present = 1, want 0")
        return f"after {dt:.2f}s: present=1 + queued message; after {dt2:.2f}s: present=0"

    def takeover_v5(self):
        """6. same client id connects again (clean_start=0): old connection gets DISCONNECT 0x8E, session moves."""
        topic = f"acc/{RUN_ID}/takeover"
        a = self.client(V5, "takeover", clean=False, session_expiry=60)
        a.subscribe(topic, qos=1)
        b = self.new(V5, "takeover", clean=False, session_expiry=60)
        b.connect()
        errors = []
        if not a.wait_disconnected(5.0):
            errors.append("A was not disconnected within 5s of B's CONNACK")
        elif not a.disconnect_from_server:
            errors.append("A's connection was closed without a DISCONNECT packet, want DISCONNECT 0x8e "
                          f"(Session taken over) (paho reports {a.disconnect_rc:#x})")
        elif a.disconnect_rc != RC_SESSION_TAKEN_OVER:
            errors.append(f"A got DISCONNECT with reason code {a.disconnect_rc:#x}, want 0x8e (Session taken over)")
        if not b.session_present:
            errors.append("B: session present = 0, want 1")
        pub = self.client(V5, "takeover-pub")
        pub.publish_acked(topic, b"to-b", qos=1)
        try:
            m = b.wait_for(topic, b"to-b")
            if m.qos != 1:
                errors.append(f"B got the message with QoS {m.qos}, want 1")
        except CheckFailed as e:
            errors.append(f"B did not receive on A's subscription: {e}")
        if a.snapshot():
            errors.append(f"A received {a.snapshot()!r}")
        if errors:
            raise CheckFailed("; ".join(errors))
        return "A got DISCONNECT 0x8e, B session present=1 and received on A's subscription"

    def retained(self):
        """7. retained messages: last one wins, empty payload clears, 64 retained topics delivered on '#'."""
        base = f"rt/{RUN_ID}"
        topic = f"{base}/a"
        pub = self.client(V311, "rt-pub")
        pub.publish_acked(topic, b"1", qos=1, retain=True)
        pub.publish_acked(topic, b"2", qos=1, retain=True)
        self._cleanup.append(lambda: pub.publish_acked(topic, b"", qos=1, retain=True))
        s1 = self.client(V311, "rt-sub1").subscribe(topic, qos=1)
        s1.wait_for(topic, b"2")
        self._marker(pub, s1, topic, "rt")
        got = [m for m in s1.snapshot() if not m.payload.startswith(b"marker")]
        errors = []
        if [(m.payload, m.retain) for m in got] != [(b"2", True)]:
            errors.append(f"new subscriber on {topic} got {got!r}, want only '2' with retain=1")
        mk = [m for m in s1.snapshot() if m.payload.startswith(b"marker")]
        if any(m.retain for m in mk):
            errors.append("live (non-retained) marker delivered with retain=1")
        # clear
        pub.publish_acked(topic, b"", qos=1, retain=True)
        s2 = self.client(V311, "rt-sub2").subscribe(topic, qos=1)
        time.sleep(1.0)  # the bounded wait is the point: nothing may arrive
        if s2.snapshot():
            errors.append(f"after the empty retained publish a new subscriber got {s2.snapshot()!r}")
        # 64 retained topics
        topics = [f"rt64/{RUN_ID}/{i}" for i in range(64)]
        self._cleanup.append(lambda: pub.wait_acked([pub.publish(t, b"", qos=1, retain=True) for t in topics]))
        pub.wait_acked([pub.publish(t, f"v{i}".encode(), qos=1, retain=True) for i, t in enumerate(topics)])
        s3 = self.client(V311, "rt64-sub").subscribe(f"rt64/{RUN_ID}/#", qos=1)
        s3.wait_count(lambda m: True, 64, DELIVERY_TIMEOUT)
        time.sleep(GRACE)
        got = s3.snapshot()
        gotset = {(m.topic, m.payload) for m in got}
        want = {(t, f"v{i}".encode()) for i, t in enumerate(topics)}
        if gotset != want or len(got) != 64:
            errors.append(f"rt64/#: got {len(got)} messages, {len(want - gotset)} of 64 missing, "
                          f"{len(gotset - want)} unexpected")
        notret = [m for m in got if not m.retain]
        if notret:
            errors.append(f"rt64/#: {len(notret)} delivered without retain flag")
        if errors:
            raise CheckFailed("; ".join(errors))
        return "only latest '2' (retain=1); cleared by empty payload; 64/64 rt64 retained with retain=1"

    def will_v311(self):
        """8. abrupt close -> will published; normal DISCONNECT -> no will."""
        wt = f"will/{RUN_ID}"
        sub = self.client(V311, "will-sub").subscribe(f"{wt}/#", qos=1)
        w1 = self.new(V311, "will-abrupt", will=dict(topic=f"{wt}/1", payload=b"gone-1", qos=1), threaded=False)
        w1.connect()
        w1.kill_socket()
        t0 = time.monotonic()
        m = sub.wait_for(f"{wt}/1", b"gone-1")
        dt = m.t - t0
        errors = []
        if m.qos != 1:
            errors.append(f"will delivered with QoS {m.qos}, want 1")
        w2 = self.new(V311, "will-clean", will=dict(topic=f"{wt}/2", payload=b"gone-2", qos=1), threaded=False)
        w2.connect()
        w2.disconnect()
        if not w2.disconnected:
            errors.append("normal-disconnect client: paho did not finish its DISCONNECT within 5s")
        time.sleep(2.0)  # bounded wait for a wrongly published will, then a marker
        pub = self.client(V311, "will-pub")
        self._marker(pub, sub, f"{wt}/2", "will")
        bad = [m for m in sub.snapshot() if m.payload == b"gone-2"]
        if bad:
            errors.append(f"will published after a normal DISCONNECT: {bad!r}")
        if errors:
            raise CheckFailed("; ".join(errors))
        return f"will arrived {dt * 1000:.0f} ms after abrupt close; none after DISCONNECT (2s + marker)"

    def will_delay_v5(self):
        """9. Will Delay Interval 2 (session expiry 30): will after ~2 s; cancelled by a reconnect within 1 s."""
        wt = f"willdelay/{RUN_ID}"
        sub = self.client(V5, "wd-sub").subscribe(f"{wt}/#", qos=1)
        w1 = self.new(V5, "wd-abrupt", clean=True, session_expiry=30,
                      will=dict(topic=f"{wt}/1", payload=b"late-1", qos=1, delay=2), threaded=False)
        w1.connect()
        w1.kill_socket()
        t0 = time.monotonic()
        errors = []
        try:
            m = sub.wait_for(f"{wt}/1", b"late-1", timeout=8.0)
            dt = m.t - t0
            if not (1.5 <= dt < 6.0):
                errors.append(f"delayed will arrived {dt:.2f}s after the close, want 1.5s..6s")
        except CheckFailed:
            dt = None
            errors.append("delayed will did not arrive within 8s of the close")
        # second client: abrupt close, reconnect (clean_start=0) within 1 s -> will must not be sent
        w2 = self.new(V5, "wd-back", clean=True, session_expiry=30,
                      will=dict(topic=f"{wt}/2", payload=b"late-2", qos=1, delay=2), threaded=False)
        w2.connect()
        w2.kill_socket()
        t1 = time.monotonic()
        time.sleep(0.3)
        w2b = self.new(V5, "wd-back", clean=False, session_expiry=30)
        w2b.connect()
        dt_back = time.monotonic() - t1
        if not w2b.session_present:
            errors.append(f"reconnect {dt_back:.2f}s after close: session present = 0, want 1")
        time.sleep(max(0.0, t1 + 4.0 - time.monotonic()))  # 4 s after the close, then a marker
        pub = self.client(V5, "wd-pub")
        self._marker(pub, sub, f"{wt}/2", "wd")
        bad = [m for m in sub.snapshot() if m.payload == b"late-2"]
        if bad:
            errors.append(f"will published although the client reconnected after {dt_back:.2f}s: "
                          f"{bad!r} at +{bad[0].t - t1:.2f}s")
        if errors:
            raise CheckFailed("; ".join(errors))
        return (f"will arrived {dt:.2f}s after abrupt close; reconnect after {dt_back:.2f}s "
                f"(session present=1) suppressed the will (checked 4s + marker)")


CHECK_GROUPS = ["qos", "order", "qos2", "persist", "expiry", "takeover", "retained", "will", "will-delay"]


def main():
    global LOG_PACKETS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--order-messages", type=int, default=2000, help="QoS 1 messages in the order check (2000)")
    ap.add_argument("--order-window", type=int, default=500,
                    help="max messages published but not yet received in the order check (500)")
    ap.add_argument("--qos2-messages", type=int, default=500, help="QoS 2 messages per exactly-once check (500)")
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(CHECK_GROUPS))
    ap.add_argument("--log", action="store_true", help="print paho's packet log (on_log) to stderr")
    args = ap.parse_args()
    LOG_PACKETS = args.log
    only = set(filter(None, args.only.split(",")))
    unknown = only - set(CHECK_GROUPS)
    if unknown:
        ap.error(f"unknown check group(s) {sorted(unknown)}; known: {CHECK_GROUPS}")

    def want(group):
        return not only or group in only

    ck = Checks(args.host, args.port)
    print(f"# check_delivery against {args.host}:{args.port}, run id {RUN_ID}", flush=True)
    for proto in (V311, V5):
        if want("qos"):
            ck.run(f"qos-downgrade-{PROTO_NAME[proto]}", lambda x=proto: ck.qos_downgrade(x))
    if want("order"):
        ck.run(f"qos1-order-{args.order_messages}-v311", lambda: ck.qos1_order(args.order_messages, args.order_window))
    for proto in (V5, V311):
        if want("qos2"):
            ck.run(f"qos2-exactly-once-{args.qos2_messages}-{PROTO_NAME[proto]}",
                   lambda x=proto: ck.qos2_exactly_once(x, args.qos2_messages))
    if want("persist"):
        ck.run("persistent-session-v311", ck.persistent_session_v311)
    if want("expiry"):
        ck.run("session-expiry-v5", ck.session_expiry_v5)
    if want("takeover"):
        ck.run("session-takeover-v5", ck.takeover_v5)
    if want("retained"):
        ck.run("retained-v311", ck.retained)
    if want("will"):
        ck.run("will-v311", ck.will_v311)
    if want("will-delay"):
        ck.run("will-delay-v5", ck.will_delay_v5)

    print(f"# {len(ck.passed)} passed, {len(ck.failed)} failed" + (f": {', '.join(ck.failed)}" if ck.failed else ""),
          flush=True)
    sys.exit(1 if ck.failed else 0)


if __name__ == "__main__":
    main()
