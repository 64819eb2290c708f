#!/usr/bin/env python3
"""Third-party-client acceptance checks for an MQTT broker's MQTT 5 features: topic aliases,
message expiry, subscription identifiers, No Local, property pass-through, shared
subscriptions and $SYS topics.

Uses paho-mqtt 2.x, MQTT 5 only, publishers and subscribers as separate clients. Knows
nothing about the broker under test beyond host and port.

Prints one "PASS <name>" or "FAIL <name>: <why>" line per check and exits 1 if any
check failed (2 on a usage error). Every wait is bounded; waits are on conditions,
except where the check is about a time interval (message expiry while offline, the
$SYS interval, and the "nothing else arrives" windows, which end with a marker message
where one can be used).

    check_mqtt5.py --host 127.0.0.1 --port 1883
    check_mqtt5.py --port 1883 --only alias,sid --log    # paho packet log on stderr

Client ids are "acc5-<run id>-...", topics are "t5/<run id>/...", so reruns against a
long-running broker do not collide with sessions left by earlier runs.
"""

import argparse
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt

from waiting import wait_until
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

V5 = mqtt.MQTTv5

CONNECT_TIMEOUT = 10.0  # seconds to wait for CONNACK
SUBACK_TIMEOUT = 10.0  # seconds to wait for SUBACK
ACK_TIMEOUT = 30.0  # seconds to wait for PUBACK of everything published
DELIVERY_TIMEOUT = 10.0  # seconds to wait for an expected message
GRACE = 0.3  # after a marker arrived: extra time in which a late unwanted message still fails the check

RUN_ID = uuid.uuid4().hex[:8]
LOG_PACKETS = False

# the PUBLISH properties we look at (paho attribute names)
PUBLISH_PROPS = ("PayloadFormatIndicator", "MessageExpiryInterval", "TopicAlias", "ResponseTopic",
                 "CorrelationData", "UserProperty", "SubscriptionIdentifier", "ContentType")


class CheckFailed(Exception):
    pass


def props(packet_type, **kw):
    p = Properties(packet_type)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def prop_dict(properties):
    """The PUBLISH properties present on a received message, as {paho name: value}."""
    if properties is None:
        return {}
    return {k: getattr(properties, k) for k in PUBLISH_PROPS if hasattr(properties, k)}


def rc_value(rc):
    return getattr(rc, "value", rc)


class Msg:
    __slots__ = ("topic", "wire_topic", "payload", "qos", "retain", "props", "t")

    def __init__(self, m, topic):
        self.topic = topic  # after resolving a topic alias (if the client accepts them)
        self.wire_topic = m.topic  # as it was in the PUBLISH ("" when only an alias was sent)
        self.payload, self.qos, self.retain = bytes(m.payload), m.qos, bool(m.retain)
        self.props = prop_dict(getattr(m, "properties", None))
        self.t = time.monotonic()

    def __repr__(self):
        p = self.payload if len(self.payload) <= 24 else self.payload[:24] + b"..."
        pr = f", {self.props}" if self.props else ""
        return f"({self.topic!r}, {p!r}, q{self.qos}{', retain' if self.retain else ''}{pr})"


class Client:
    """A paho MQTT 5 client (network thread via loop_start) recording what it receives.

    topic_alias_max: sent as Topic Alias Maximum in CONNECT; when > 0 the client resolves
    the aliases the broker uses towards it (paho itself does not) and records alias errors.
    Auto-reconnect is off: a dropped client stays dropped.
    """

    def __init__(self, host, port, client_id, clean=True, session_expiry=None, topic_alias_max=None,
                 request_response=False):
        self.client_id, self.clean, self.session_expiry = client_id, clean, session_expiry
        self.request_response = request_response
        self.topic_alias_max = topic_alias_max
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=V5,
                             reconnect_on_failure=False)
        self.cond = threading.Condition()
        self.messages = []  # Msg in arrival order
        self.connack = None  # reason code once CONNACK arrived
        self.connack_props = {}
        self.session_present = None
        self.subacks = {}  # mid -> list of reason codes
        self.acked = {}  # mid -> PUBACK reason code
        self.disconnected = False
        self.aliases_in = {}  # alias -> topic, set by the broker's PUBLISHes (topic_alias_max > 0)
        self.alias_errors = []
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
            if properties is not None:
                self.connack_props = {k: getattr(properties, k) for k in
                                      ("TopicAliasMaximum", "ReceiveMaximum", "MaximumQoS", "RetainAvailable",
                                       "SubscriptionIdentifierAvailable", "SharedSubscriptionAvailable",
                                       "WildcardSubscriptionAvailable", "MaximumPacketSize",
                                       "ResponseInformation")
                                      if hasattr(properties, k)}
            # paho does not limit itself to the server's Receive Maximum; clamp its in-flight window (default 20)
            rm = self.connack_props.get("ReceiveMaximum")
            if rm and rm < 20:
                client.max_inflight_messages_set(rm)
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.subacks[mid] = list(reason_codes)
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self.cond:
            topic = msg.topic
            alias = getattr(msg.properties, "TopicAlias", None) if msg.properties is not None else None
            if alias is not None:
                if not self.topic_alias_max:
                    self.alias_errors.append(f"Topic Alias {alias} sent although the client allows none")
                elif not 1 <= alias <= self.topic_alias_max:
                    self.alias_errors.append(f"Topic Alias {alias} outside 1..{self.topic_alias_max}")
                elif topic:
                    self.aliases_in[alias] = topic
                elif alias in self.aliases_in:
                    topic = self.aliases_in[alias]
                else:
                    self.alias_errors.append(f"empty topic with unknown Topic Alias {alias}")
            elif not topic:
                self.alias_errors.append("PUBLISH with an empty topic and no Topic Alias")
            self.messages.append(Msg(msg, topic))
            self.cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self.cond:
            self.acked[mid] = reason_code
            self.cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.disconnected = True
            self.cond.notify_all()

    # -- API (caller thread) --
    def _wait(self, pred, timeout):
        return wait_until(self.cond, pred, timeout)

    def connect(self):
        cp = {}
        if self.session_expiry is not None:
            cp["SessionExpiryInterval"] = self.session_expiry
        if self.topic_alias_max is not None:
            cp["TopicAliasMaximum"] = self.topic_alias_max
        if self.request_response:
            cp["RequestResponseInformation"] = 1
        self.c.connect(self.host, self.port, keepalive=60, clean_start=self.clean,
                       properties=props(PacketTypes.CONNECT, **cp) if cp else None)
        self.c.loop_start()
        if not self._wait(lambda: self.connack is not None or self.disconnected, CONNECT_TIMEOUT):
            raise CheckFailed(f"{self.client_id}: no CONNACK within {CONNECT_TIMEOUT}s")
        if self.connack is None or self.connack.is_failure:
            raise CheckFailed(f"{self.client_id}: connect refused/closed (reason {self.connack})")
        return self

    def subscribe(self, topic_filter, qos=1, no_local=False, sub_id=None):
        sp = props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=sub_id) if sub_id is not None else None
        rc, mid = self.c.subscribe(topic_filter, options=SubscribeOptions(qos=qos, noLocal=no_local), properties=sp)
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

    def publish(self, topic, payload, qos=1, properties=None):
        info = self.c.publish(topic, payload, qos=qos, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise CheckFailed(f"{self.client_id}: publish({topic!r}) returned {info.rc}")
        return info.mid

    def wait_acked(self, mids, timeout=ACK_TIMEOUT):
        """Wait for the PUBACKs of mids; fail on a missing one or an error reason code."""
        mids = set(mids)
        if not self._wait(lambda: mids <= self.acked.keys(), timeout):
            with self.cond:
                missing = sorted(mids - self.acked.keys())
            raise CheckFailed(f"{self.client_id}: {len(missing)}/{len(mids)} publishes not acknowledged "
                              f"within {timeout}s (first mids {missing[:5]})")
        with self.cond:
            bad = {mid: self.acked[mid] for mid in mids if self.acked[mid] is not None and self.acked[mid].is_failure}
        if bad:
            raise CheckFailed(f"{self.client_id}: PUBACK with error reason codes: "
                              f"{[str(rc) for rc in list(bad.values())[:5]]}")

    def publish_acked(self, topic, payload, qos=1, properties=None):
        self.wait_acked([self.publish(topic, payload, qos=qos, properties=properties)])

    def find(self, topic, payload):
        for m in self.messages:
            if m.topic == topic and m.payload == payload:
                return m
        return None

    def wait_for(self, topic, payload, timeout=DELIVERY_TIMEOUT):
        """Wait until (topic, payload) has been received; return the Msg."""
        self._wait(lambda: self.find(topic, payload) is not None, timeout)
        with self.cond:
            m = self.find(topic, payload)
            if m is None:
                raise CheckFailed(f"{self.client_id}: did not receive {topic!r} {payload!r} within {timeout}s; "
                                  f"got {len(self.messages)} messages, last {self.messages[-5:]!r}")
            return m

    def snapshot(self):
        with self.cond:
            return list(self.messages)

    def disconnect(self, end_session=False):
        """Send DISCONNECT (normal); end_session: also Session Expiry Interval 0 on it."""
        p = None
        if end_session and self.session_expiry:
            p = props(PacketTypes.DISCONNECT, SessionExpiryInterval=0)
        try:
            self.c.disconnect(properties=p)
        except Exception:
            pass

    def wait_disconnected(self, timeout):
        return self._wait(lambda: self.disconnected, timeout)

    def close(self):
        if not self.disconnected:
            self.disconnect(end_session=True)
            self.wait_disconnected(2.0)
        self.c.loop_stop()


class Checks:
    def __init__(self, host, port, sys_wait):
        self.host, self.port, self.sys_wait = host, port, sys_wait
        self.failed = []
        self.passed = []
        self._clients = []

    def new(self, tag, **kw):
        cl = Client(self.host, self.port, f"acc5-{RUN_ID}-{tag}", **kw)
        self._clients.append(cl)
        return cl

    def client(self, tag, **kw):
        return self.new(tag, **kw).connect()

    def close_all(self):
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

    def _marker(self, pub, subs, topic, what):
        """Publish a QoS 1 marker on topic, wait until every sub in subs got it, then a grace period."""
        payload = f"marker-{what}-{RUN_ID}".encode()
        pub.publish_acked(topic, payload, qos=1)
        for s in subs:
            s.wait_for(topic, payload)
        time.sleep(GRACE)
        return payload

    # ------------------------------------------------------------------ checks

    def topic_alias(self):
        """1. publisher maps alias 1 to a topic, then publishes with an empty topic and alias 1;
        then remaps alias 1 to a second topic. The subscriber (no aliases) gets full topics."""
        topic, topic2 = f"t5/{RUN_ID}/alias", f"t5/{RUN_ID}/alias2"
        sub = self.client("alias-sub").subscribe(f"t5/{RUN_ID}/+", qos=1)
        pub = self.client("alias-pub")
        tam = pub.connack_props.get("TopicAliasMaximum", 0)
        if tam < 1:
            raise CheckFailed(f"CONNACK Topic Alias Maximum is {tam}: the broker accepts no topic aliases "
                              f"(CONNACK properties {pub.connack_props})")
        a1 = lambda: props(PacketTypes.PUBLISH, TopicAlias=1)  # noqa: E731
        pub.publish_acked(topic, b"alias-set", properties=a1())
        pub.publish_acked("", b"alias-used", properties=a1())
        pub.publish_acked(topic2, b"alias-reset", properties=a1())
        pub.publish_acked("", b"alias-used-2", properties=a1())
        want = [(topic, b"alias-set"), (topic, b"alias-used"), (topic2, b"alias-reset"), (topic2, b"alias-used-2")]
        sub.wait_for(topic2, b"alias-used-2")
        time.sleep(GRACE)
        got = sub.snapshot()
        errors = []
        if [(m.topic, m.payload) for m in got] != want:
            errors.append(f"subscriber expected {want!r}, got {got!r}")
        if sub.alias_errors:
            errors.append(f"subscriber (Topic Alias Maximum 0): {sub.alias_errors}")
        if pub.disconnected:
            errors.append("publisher was disconnected")
        if errors:
            raise CheckFailed("; ".join(errors))
        return f"broker Topic Alias Maximum {tam}; alias 1 set, used, remapped, used: 4 messages on full topics"

    def topic_alias_outbound(self):
        """1b. a subscriber accepting topic aliases (Topic Alias Maximum 2) gets three topics, twice each:
        every message resolves to its topic, aliases (if the broker uses them) stay within 1..2."""
        topics = [f"t5/{RUN_ID}/alias-out/{i}" for i in range(3)]
        sub = self.client("alias-out-sub", topic_alias_max=2).subscribe(f"t5/{RUN_ID}/alias-out/#", qos=1)
        pub = self.client("alias-out-pub")
        want = [(t, f"{r}-{i}".encode()) for r in range(2) for i, t in enumerate(topics)]
        pub.wait_acked([pub.publish(t, p, qos=1) for t, p in want])
        sub.wait_for(*want[-1])
        time.sleep(GRACE)
        got = sub.snapshot()
        errors = []
        if [(m.topic, m.payload) for m in got] != want:
            errors.append(f"expected {want!r}, got {got!r}")
        if sub.alias_errors:
            errors.append(f"alias errors: {sub.alias_errors}")
        if errors:
            raise CheckFailed("; ".join(errors))
        used = sum(1 for m in got if "TopicAlias" in m.props)
        empty = sum(1 for m in got if m.wire_topic == "")
        return (f"6/6 resolved; broker sent Topic Alias on {used}, empty topic on {empty}"
                + (" (broker uses no outbound aliases)" if not used else ""))

    def message_expiry(self):
        """2. Message Expiry Interval: forwarded to an online subscriber (<= 60); a 1 s message expires
        in an offline persistent session, a 60 s one is delivered on reconnect."""
        topic = f"t5/{RUN_ID}/expiry"
        online = self.client("exp-online").subscribe(topic, qos=1)
        pub = self.client("exp-pub")
        errors = []
        pub.publish_acked(topic, b"online-60", properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=60))
        m = online.wait_for(topic, b"online-60")
        online_mei = m.props.get("MessageExpiryInterval")
        if online_mei is None:
            errors.append(f"online subscriber got the message without Message Expiry Interval ({m!r})")
        elif not 0 < online_mei <= 60:
            errors.append(f"online subscriber got Message Expiry Interval {online_mei}, want 1..60")

        s1 = self.client("exp-persist", clean=False, session_expiry=60)
        if s1.session_present:
            raise CheckFailed("first connect (fresh client id, clean_start=0): session present = 1")
        s1.subscribe(topic, qos=1)
        s1.disconnect()  # normal DISCONNECT: the session stays (expiry 60 s)
        if not s1.wait_disconnected(5.0):
            raise CheckFailed("persistent subscriber did not see its own disconnect complete")
        t_pub = time.monotonic()
        pub.wait_acked([
            pub.publish(topic, b"offline-1", properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1)),
            pub.publish(topic, b"offline-60", properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=60)),
        ])
        time.sleep(max(0.0, t_pub + 2.5 - time.monotonic()))  # the interval is the point: > 1 s expiry
        s2 = self.client("exp-persist", clean=False, session_expiry=60)
        waited = time.monotonic() - t_pub
        if not s2.session_present:
            raise CheckFailed(f"reconnect {waited:.2f}s later (session expiry 60s): session present = 0, want 1")
        s2.wait_for(topic, b"offline-60")
        self._marker(pub, [s2], topic, "expiry")
        got = [m for m in s2.snapshot() if not m.payload.startswith(b"marker-")]
        if [m.payload for m in got] != [b"offline-60"]:
            errors.append(f"after {waited:.2f}s offline expected only b'offline-60', got {got!r}")
        queued_mei = got[0].props.get("MessageExpiryInterval") if got else None
        if got and got[0].payload == b"offline-60":
            if queued_mei is None:
                errors.append("queued message delivered without Message Expiry Interval")
            elif not 0 < queued_mei <= 60:
                errors.append(f"queued message delivered with Message Expiry Interval {queued_mei}, want 1..60")
        if errors:
            raise CheckFailed("; ".join(errors))
        return (f"online: expiry {online_mei}; after {waited:.2f}s offline: 1s message dropped, "
                f"60s message delivered with expiry {queued_mei}")

    def subscription_ids(self):
        """3. overlapping subscriptions with identifiers 7 and 9 on one client: one copy with {7, 9}."""
        base = f"t5/{RUN_ID}/sid"
        sub = self.client("sid-sub").subscribe(f"{base}/+", qos=1, sub_id=7).subscribe(f"{base}/#", qos=1, sub_id=9)
        other = self.client("sid-other").subscribe(f"{base}/#", qos=1)  # no identifier: must get none
        pub = self.client("sid-pub")
        caps = sub.connack_props
        if caps.get("SubscriptionIdentifierAvailable", 1) == 0:
            raise CheckFailed(f"CONNACK says Subscription Identifier Available = 0 ({caps})")
        topic = f"{base}/x"
        pub.publish_acked(topic, b"sid")
        sub.wait_for(topic, b"sid")
        other.wait_for(topic, b"sid")
        self._marker(pub, [sub, other], f"{base}/y/z", "sid")  # matches only the '#' subscription (id 9)
        errors = []
        copies = [m for m in sub.snapshot() if m.topic == topic]
        ids = [sorted(m.props.get("SubscriptionIdentifier", [])) for m in copies]
        if len(copies) != 1:
            note = (" (MQTT-3.3.4-5 allows one copy per subscription, each with its own identifier, "
                    "but this check wants one copy)") if sorted(ids) == [[7], [9]] else ""
            errors.append(f"{topic}: {len(copies)} copies with identifiers {ids}, want 1 copy with [7, 9]{note}")
        elif ids[0] != [7, 9]:
            errors.append(f"{topic}: identifiers {ids[0]}, want [7, 9]")
        mk = [m for m in sub.snapshot() if m.topic == f"{base}/y/z"]
        mk_ids = [sorted(m.props.get("SubscriptionIdentifier", [])) for m in mk]
        if mk_ids != [[9]]:
            errors.append(f"{base}/y/z (only '#' matches): identifiers {mk_ids}, want [[9]]")
        leaked = [m for m in other.snapshot() if "SubscriptionIdentifier" in m.props]
        if leaked:
            errors.append(f"subscriber without identifiers got some: {leaked!r}")
        if errors:
            raise CheckFailed("; ".join(errors))
        return "one copy with identifiers [7, 9]; '#'-only match carries [9]; none for a subscriber without"

    def no_local(self):
        """4. a No Local subscriber does not get its own publish; another subscriber does."""
        topic = f"t5/{RUN_ID}/nolocal"
        a = self.client("nl-self").subscribe(topic, qos=1, no_local=True)
        b = self.client("nl-other").subscribe(topic, qos=1)
        c = self.client("nl-marker")
        a.publish_acked(topic, b"own")
        b.wait_for(topic, b"own")
        marker = self._marker(c, [a, b], topic, "nolocal")
        errors = []
        got_a = [m.payload for m in a.snapshot()]
        got_b = [m.payload for m in b.snapshot()]
        if got_a != [marker]:
            errors.append(f"No Local subscriber got {got_a!r}, want only the marker")
        if got_b != [b"own", marker]:
            errors.append(f"other subscriber got {got_b!r}, want [b'own', marker]")
        if errors:
            raise CheckFailed("; ".join(errors))
        return "own message not echoed, other subscriber and the marker unaffected"

    def property_passthrough(self):
        """5. User Properties (order, repeats, non-ASCII), Response Topic, Correlation Data (binary),
        Content Type and Payload Format Indicator arrive unchanged, at QoS 0 and QoS 1."""
        topic = f"t5/{RUN_ID}/props"
        sub = self.client("props-sub").subscribe(topic, qos=1)
        pub = self.client("props-pub")
        sent = {
            "UserProperty": [("k1", "v1"), ("k2", "zwei"), ("k1", "v2"), ("k\u00e9y", "v\u00e4l \u2713"), ("", "")],
            "ResponseTopic": f"t5/{RUN_ID}/reply/\u00fc",
            "CorrelationData": bytes([0, 1, 2, 255]) + RUN_ID.encode(),
            "ContentType": "application/json; charset=utf-8",
            "PayloadFormatIndicator": 1,
        }
        payloads = {0: '{"q": 0, "s": "h\u00e9llo"}'.encode(), 1: '{"q": 1, "s": "h\u00e9llo"}'.encode()}
        mids = []
        for qos, payload in payloads.items():
            mids.append(pub.publish(topic, payload, qos=qos, properties=props(PacketTypes.PUBLISH, **sent)))
        pub.wait_acked(mids[1:])  # on_publish for QoS 0 is only "written"; wait_for below covers delivery
        errors = []
        for qos, payload in payloads.items():
            m = sub.wait_for(topic, payload)
            got = {k: m.props.get(k) for k in sent}
            for k, v in sent.items():
                if got[k] != v:
                    errors.append(f"QoS {qos}: {k} sent {v!r}, received {got[k]!r}")
            extra = set(m.props) - set(sent)
            if extra:
                errors.append(f"QoS {qos}: unexpected properties {sorted(extra)} on the delivered message")
        if errors:
            raise CheckFailed("; ".join(errors))
        return "5 user properties in order + response topic, correlation data, content type, format indicator"

    def request_response(self):
        """5b. Request/response: a requester asks for Response Information in CONNECT, subscribes
        below it, sends a request with that Response Topic and Correlation Data; the responder answers
        on the Response Topic with the same Correlation Data, which the requester receives."""
        requests = f"t5/{RUN_ID}/requests"
        responder = self.client("responder").subscribe(requests, qos=1)
        requester = self.client("requester", request_response=True)
        base = requester.connack_props.get("ResponseInformation")
        if not base:
            raise CheckFailed(f"no Response Information in CONNACK: {requester.connack_props!r}")
        reply_to = f"{base}/{RUN_ID}"
        requester.subscribe(f"{base}/#", qos=1)
        correlation = b"\x00req-" + RUN_ID.encode()
        requester.publish_acked(requests, b"ping", qos=1,
                                properties=props(PacketTypes.PUBLISH, ResponseTopic=reply_to,
                                                 CorrelationData=correlation))
        request = responder.wait_for(requests, b"ping")
        if request.props.get("ResponseTopic") != reply_to or request.props.get("CorrelationData") != correlation:
            raise CheckFailed(f"request arrived with {request.props!r}")
        responder.publish_acked(request.props["ResponseTopic"], b"pong", qos=1,
                                properties=props(PacketTypes.PUBLISH,
                                                 CorrelationData=request.props["CorrelationData"]))
        reply = requester.wait_for(reply_to, b"pong")
        if reply.props.get("CorrelationData") != correlation:
            raise CheckFailed(f"reply correlation data {reply.props.get('CorrelationData')!r}")
        return f"Response Information {base!r}; reply received with its correlation data"

    def shared_subscriptions(self, n_msgs):
        """6. 3 members of $share/g<run>/t5/<run>/jobs plus a plain subscriber; n QoS 1 messages:
        each message exactly once across the group, >= 2 members used, the plain subscriber gets all."""
        topic = f"t5/{RUN_ID}/jobs"
        shared = f"$share/g{RUN_ID}/{topic}"
        members = [self.client(f"share-m{i}").subscribe(shared, qos=1) for i in range(3)]
        caps = members[0].connack_props
        if caps.get("SharedSubscriptionAvailable", 1) == 0:
            raise CheckFailed(f"CONNACK says Shared Subscription Available = 0 ({caps})")
        plain = self.client("share-plain").subscribe(topic, qos=1)
        pub = self.client("share-pub")
        want = [str(i).encode() for i in range(n_msgs)]
        t0 = time.monotonic()
        mids = [pub.publish(topic, p, qos=1) for p in want]

        def group_distinct():
            return len({m.payload for s in members for m in s.snapshot()})

        def plain_distinct():
            return len({m.payload for m in plain.snapshot()})

        deadline = t0 + 60.0
        while time.monotonic() < deadline and (group_distinct() < n_msgs or plain_distinct() < n_msgs):
            time.sleep(0.05)
        pub.wait_acked(mids)
        time.sleep(GRACE)  # catch duplicates arriving just after the last expected message
        elapsed = time.monotonic() - t0
        per_member = [[m.payload for m in s.snapshot()] for s in members]
        counts = {}
        for got in per_member:
            for p in got:
                counts[p] = counts.get(p, 0) + 1
        missing = [p for p in want if p not in counts]
        dups = {p: c for p, c in counts.items() if c > 1}
        stray = [p for p in counts if p not in set(want)]
        plain_got = [m.payload for m in plain.snapshot()]
        errors = []
        if missing:
            errors.append(f"group: {len(missing)} messages missing (first {[p.decode() for p in missing[:5]]})")
        if dups:
            errors.append(f"group: {len(dups)} messages received more than once "
                          f"(e.g. {[(p.decode(), c) for p, c in list(dups.items())[:5]]})")
        if stray:
            errors.append(f"group: unexpected payloads {stray[:5]!r}")
        used = sum(1 for got in per_member if got)
        if used < 2:
            errors.append(f"only {used} of 3 members received anything")
        if sorted(plain_got, key=lambda p: int(p)) != want or len(plain_got) != n_msgs:
            errors.append(f"plain subscriber: {len(set(plain_got))} distinct / {len(plain_got)} received, want {n_msgs}")
        elif plain_got != want:
            errors.append("plain subscriber: all received but OUT OF ORDER")
        if errors:
            raise CheckFailed(f"split {[len(g) for g in per_member]}; " + "; ".join(errors))
        return (f"{n_msgs} messages: group split {[len(g) for g in per_member]}, each once; "
                f"plain subscriber {len(plain_got)} in order, {elapsed:.1f}s")

    def sys_topics(self):
        """7. $SYS/#: $SYS/broker/version and $SYS/broker/clients/connected arrive, and a periodic
        (non-retained) update arrives, all within --sys-wait seconds."""
        sub = self.new("sys-sub")
        sub.connect()
        t0 = time.monotonic()  # retained $SYS messages may arrive before paho reports the SUBACK
        sub.subscribe("$SYS/#", qos=0)
        version_t, connected_t = "$SYS/broker/version", "$SYS/broker/clients/connected"

        def is_event(topic):  # "$SYS/broker/clients/<client id>/<event>", not a periodic statistic
            return topic.startswith("$SYS/broker/clients/") and topic.count("/") >= 4

        def state():
            ms = sub.messages
            has_version = any(m.topic == version_t for m in ms)
            conn = [m for m in ms if m.topic == connected_t]
            conn_ok = any(m.payload.strip().isdigit() and int(m.payload) >= 1 for m in conn)
            live = next((m for m in ms if not m.retain and m.topic.startswith("$SYS/") and not is_event(m.topic)),
                        None)
            return has_version, conn_ok, live

        sub._wait(lambda: all(state()), self.sys_wait)
        with sub.cond:
            has_version, conn_ok, live = state()
            ms = list(sub.messages)
        errors = []
        if not ms:
            raise CheckFailed(f"no $SYS message at all within {self.sys_wait}s")
        bad = [m.topic for m in ms if not m.topic.startswith("$SYS/")]
        if bad:
            errors.append(f"non-$SYS topics delivered on '$SYS/#': {bad[:5]}")
        if not has_version:
            errors.append(f"no {version_t} within {self.sys_wait}s")
        if not conn_ok:
            vals = [m.payload for m in ms if m.topic == connected_t]
            errors.append(f"no {connected_t} with an integer >= 1 within {self.sys_wait}s (got {vals[-3:]!r})")
        if live is None:
            errors.append(f"no periodic (RETAIN=0) $SYS update within {self.sys_wait}s")
        topics = sorted({m.topic for m in ms})
        if errors:
            raise CheckFailed(f"{len(ms)} messages on {len(topics)} topics; " + "; ".join(errors))
        version = next(m.payload for m in ms if m.topic == version_t).decode(errors="replace")
        connected = [m.payload.decode() for m in ms if m.topic == connected_t][-1]
        first = min(m.t for m in ms) - t0
        return (f"{len(topics)} topics; version {version!r}, clients/connected {connected}; first message after "
                f"{first:.2f}s, first periodic update ({live.topic}) {live.t - t0:.2f}s after SUBSCRIBE")


CHECK_GROUPS = ["alias", "alias-out", "expiry", "sid", "nolocal", "props", "reqresp", "shared", "sys"]


def main():
    global LOG_PACKETS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--shared-messages", type=int, default=300, help="QoS 1 messages in the shared check (300)")
    ap.add_argument("--sys-wait", type=float, default=15.0,
                    help="seconds to wait for $SYS messages (15; Mosquitto's default sys_interval is 10)")
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

    ck = Checks(args.host, args.port, args.sys_wait)
    print(f"# check_mqtt5 against {args.host}:{args.port}, run id {RUN_ID}", flush=True)
    if want("alias"):
        ck.run("topic-alias-v5", ck.topic_alias)
    if want("alias-out"):
        ck.run("topic-alias-to-subscriber-v5", ck.topic_alias_outbound)
    if want("expiry"):
        ck.run("message-expiry-v5", ck.message_expiry)
    if want("sid"):
        ck.run("subscription-identifiers-v5", ck.subscription_ids)
    if want("nolocal"):
        ck.run("no-local-v5", ck.no_local)
    if want("props"):
        ck.run("property-passthrough-v5", ck.property_passthrough)
    if want("reqresp"):
        ck.run("request-response-v5", ck.request_response)
    if want("shared"):
        ck.run(f"shared-subscription-{args.shared_messages}-v5", lambda: ck.shared_subscriptions(args.shared_messages))
    if want("sys"):
        ck.run("sys-topics", ck.sys_topics)

    print(f"# {len(ck.passed)} passed, {len(ck.failed)} failed" + (f": {', '.join(ck.failed)}" if ck.failed else ""),
          flush=True)
    sys.exit(1 if ck.failed else 0)


if __name__ == "__main__":
    main()
