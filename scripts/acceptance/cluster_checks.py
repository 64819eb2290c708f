#!/usr/bin/env python3
"""The client side of scripts/acceptance/cluster.sh: checks of a ringmq cluster (nodes on an
etcd) with unmodified paho-mqtt clients. One subcommand per step; each prints "# " detail
lines and one PASS or FAIL line, and exits 0 when its checks held (1 otherwise); the waits
(wait-port, wait-closed, etcd-ready) print a FAIL line only. Every wait
is on a condition with a deadline. Clients that log a history (--log) append JSON lines
for scripts/acceptance/history_check.py.

  cluster_checks.py wait-port HOST:PORT [--pid PID] [--timeout S]   until it accepts TCP
  cluster_checks.py wait-closed HOST:PORT [--timeout S]              until it refuses TCP
  cluster_checks.py etcd-ready HOST:PORT [--timeout S]               until etcd answers a range
  cluster_checks.py --run R ready --node a=ADDR --node b=ADDR ...    until a publish on each node
                                                                     reaches a subscriber on each
  cluster_checks.py --run R qos --pub ADDR --sub ADDR --log F        step 2: QoS 0/1/2 once each
  cluster_checks.py --run R shared --pub ADDR --member ADDR ...      step 3: $share group over nodes
  cluster_checks.py --run R session --first ADDR --pub ADDR --second ADDR --log F
                                                                     step 5: persistent session moves
  cluster_checks.py --run R crash --pub ADDR --sub a=ADDR ... --kill-pid PID --log F
                                                                     step 6: SIGKILL a node mid-stream
  cluster_checks.py --run R crash-after --sub a=ADDR ... --pub2 ADDR --pub3 ADDR --log F
                                                                     step 6: after the restart
  cluster_checks.py --run R fence --c ADDR --a ADDR --b ADDR --node a=ADDR ... --ttl S
                    --cut CMD --heal CMD                             step 7: C cut from etcd
  cluster_checks.py --run R linkcut --a ADDR --b ADDR --c ADDR --cut CMD... --heal CMD...
                    [--half-cut CMD... --half-heal CMD...] --log F
                                                                     step 9: C's node links cut

--run R makes client ids and topics unique to one run (the crash and crash-after halves must
share it). Addresses are HOST:PORT (IPv4).
"""

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from history_check import ranges  # same directory: sys.path[0]
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from waiting import wait_until

WAIT = 20.0
RUN = "x"
SERVER_UNAVAILABLE = 0x88  # v5 CONNACK; 3.1.1 return code 3 reads as the same in paho
USE_ANOTHER_SERVER = 0x9C  # v5 DISCONNECT
# Longer than any client here lives: an idle connection parks after --park-after, and
# (ringmq 798ec84 on) a PINGREQ that revives it does not count as activity, so a client
# alive for 1.5 keep-alives is closed for a keep-alive timeout despite its PINGREQs.
KEEP_ALIVE = 120


class Failed(Exception):
    pass


def hostport(addr):
    host, _, port = addr.rpartition(":")
    return host, int(port)


def named(items):
    """["a=1.2.3.4:5", ...] -> {"a": "1.2.3.4:5", ...} in order."""
    out = {}
    for item in items:
        name, sep, addr = item.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=HOST:PORT, got {item}")
        out[name] = addr
    return out


def info(text):
    print(f"# {text}", flush=True)


class History:
    """A JSON-lines event log shared by the clients of one process."""

    def __init__(self, path):
        self.f = open(path, "a", encoding="utf-8") if path else None
        self.lock = threading.Lock()

    def event(self, client, kind, seq, **extra):
        if self.f is None:
            return
        line = json.dumps({"client": client, "kind": kind, "seq": seq, "t": round(time.time(), 6), **extra})
        with self.lock:
            self.f.write(line + "\n")
            self.f.flush()


NO_HISTORY = History(None)


class Client:
    """A paho client and what its network thread saw, under one condition.

    Payloads "NAME SEQ" are numbered messages of publisher NAME: a client given a history
    logs them as "received" (others, e.g. markers, only land in .messages)."""

    def __init__(self, cid, addr, v5=False, clean=True, expiry=None, history=NO_HISTORY, name=None):
        self.id, self.addr, self.v5, self.clean, self.expiry = cid, addr, v5, clean, expiry
        self.name = name or cid
        self.history = history
        self.cond = threading.Condition()
        self.connack = None  # ReasonCode
        self.connack_at = None  # time.monotonic()
        self.session_present = None
        self.disconnected_at = None
        self.disconnect_reason = None
        self.subacks = {}
        self.acked_mids = {}  # mid -> time
        self.failed_mids = {}  # mid -> reason (a v5 PUBACK >= 0x80)
        self.seq_of = {}  # mid -> (publisher, seq) of numbered publishes
        self.acked = {}  # publisher -> set of seq
        self.messages = []  # (topic, payload, qos, retain, time)
        self.received = {}  # publisher -> [seq, ...]
        kwargs = dict(client_id=cid, reconnect_on_failure=False)
        if v5:
            kwargs["protocol"] = mqtt.MQTTv5
        else:
            kwargs["protocol"] = mqtt.MQTTv311
            kwargs["clean_session"] = clean
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        c.max_inflight_messages_set(200)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        self.c = c

    # ---- paho's network thread ----
    def _on_connect(self, client, userdata, flags, rc, props):
        with self.cond:
            self.connack = rc
            self.connack_at = time.monotonic()
            self.session_present = bool(flags.session_present)
            self.cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, rc, props):
        with self.cond:
            if self.disconnected_at is None:
                self.disconnected_at = time.monotonic()
                self.disconnect_reason = rc
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, rcs, props):
        with self.cond:
            self.subacks[mid] = rcs
            self.cond.notify_all()

    def _on_publish(self, client, userdata, mid, rc, props):
        with self.cond:
            if rc is not None and rc.is_failure:
                self.failed_mids[mid] = rc
            else:
                self.acked_mids[mid] = time.monotonic()
                self._log_ack(mid)
            self.cond.notify_all()

    def _log_ack(self, mid):
        # Either side may come first: the PUBACK, or the caller's note of what the mid was.
        if mid in self.seq_of and mid in self.acked_mids:
            pub, seq = self.seq_of.pop(mid)
            self.acked.setdefault(pub, set()).add(seq)
            self.history.event(pub, "acked", seq)

    def _on_message(self, client, userdata, msg):
        payload = bytes(msg.payload)
        with self.cond:
            now = time.monotonic()
            self.messages.append((msg.topic, payload, msg.qos, bool(msg.retain), now))
            parts = payload.split(b" ")
            if len(parts) == 2 and parts[1].isdigit():
                pub, seq = parts[0].decode(), int(parts[1])
                self.received.setdefault(pub, []).append(seq)
                self.history.event(self.name, "received", seq, publisher=pub, topic=msg.topic, qos=msg.qos,
                                   dup=bool(msg.dup))
            self.cond.notify_all()

    # ---- the caller's side ----
    def wait(self, pred, timeout=WAIT):
        return wait_until(self.cond, pred, timeout)

    def start(self):
        """Sends CONNECT; the CONNACK (or the end of the connection) is waited for with
        wait_connack."""
        host, port = hostport(self.addr)
        if self.v5:
            props = None
            if self.expiry is not None:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.expiry
            self.c.connect(host, port, keepalive=KEEP_ALIVE, clean_start=self.clean, properties=props)
        else:
            self.c.connect(host, port, keepalive=KEEP_ALIVE)
        self.c.loop_start()

    def wait_connack(self, timeout=WAIT):
        self.wait(lambda: self.connack is not None or self.disconnected_at is not None, timeout)
        return self.connack

    def connect(self, timeout=WAIT):
        """Connected, or Failed."""
        try:
            self.start()
        except OSError as e:
            raise Failed(f"{self.id}: cannot connect to {self.addr}: {e}") from None
        rc = self.wait_connack(timeout)
        if rc is None:
            self.close()
            raise Failed(f"{self.id}: no CONNACK from {self.addr} within {timeout:.0f} s")
        if rc.is_failure:
            self.close()
            raise Failed(f"{self.id}: CONNECT to {self.addr} refused: {rc} ({rc.value:#x})")
        return self

    def subscribe(self, topics, qos=1, timeout=WAIT):
        """Subscribes (a filter or a list of filters) and waits for the SUBACK: each filter
        granted, or Failed."""
        topics = [topics] if isinstance(topics, str) else topics
        rc, mid = self.c.subscribe([(t, qos) for t in topics])
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise Failed(f"{self.id}: SUBSCRIBE not sent ({mqtt.error_string(rc)})")
        if not self.wait(lambda: mid in self.subacks, timeout):
            raise Failed(f"{self.id}: no SUBACK from {self.addr} within {timeout:.0f} s for {topics}")
        rcs = self.subacks[mid]
        bad = [r for r in rcs if r.is_failure]
        if bad:
            raise Failed(f"{self.id}: subscription refused by {self.addr}: {bad}")
        return [r.value for r in rcs]

    def publish_seq(self, topic, pub, seq, qos):
        """Publishes "PUB SEQ", logging it as sent (and acked once paho's on_publish says so)."""
        info_ = self.c.publish(topic, f"{pub} {seq}".encode(), qos=qos)
        self.history.event(pub, "sent", seq, qos=qos)
        if qos > 0:
            with self.cond:
                self.seq_of[info_.mid] = (pub, seq)
                self._log_ack(info_.mid)
        return info_

    def publish(self, topic, payload, qos=1, retain=False):
        return self.c.publish(topic, payload, qos=qos, retain=retain)

    def wait_acked(self, infos, timeout=WAIT):
        mids = {i.mid for i in infos}
        ok = self.wait(lambda: mids <= set(self.acked_mids) or bool(mids & set(self.failed_mids)), timeout)
        failed = mids & set(self.failed_mids)
        if failed:
            raise Failed(f"{self.id}: publishes refused: {[str(self.failed_mids[m]) for m in sorted(failed)][:5]}")
        if not ok:
            raise Failed(f"{self.id}: {len(mids - set(self.acked_mids))} of {len(mids)} publishes not "
                         f"acknowledged by {self.addr} within {timeout:.0f} s")

    def got(self, topic=None):
        with self.cond:
            return [m for m in self.messages if topic is None or m[0] == topic]

    def close(self):
        """DISCONNECT (if still connected) and stop the network thread."""
        try:
            if self.connack is not None and not self.connack.is_failure and self.disconnected_at is None:
                self.c.disconnect()
                self.wait(lambda: self.disconnected_at is not None, 5)
            elif self.disconnected_at is None:
                self.c.disconnect()
        finally:
            self.c.loop_stop()


def uid(prefix):
    return f"{prefix}-{RUN}-{uuid.uuid4().hex[:4]}"


# ---------------------------------------------------------------- plumbing
def alive(pid):
    """Whether `pid` runs (an exited child its parent did not reap yet does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def cmd_wait_port(args):
    host, port = hostport(args.addr)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if args.pid and not alive(args.pid):
            print(f"FAIL {args.step}: process {args.pid} exited before {args.addr} accepted connections")
            return 1
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return 0
        except OSError:
            time.sleep(0.05)
    print(f"FAIL {args.step}: {args.addr} not accepting connections after {args.timeout:.0f} s")
    return 1


def cmd_wait_closed(args):
    # A node just killed can keep its listening socket a moment (the kernel tears its
    # io_uring down asynchronously): wait until the port refuses before starting another.
    host, port = hostport(args.addr)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            time.sleep(0.05)
        except OSError:
            return 0
    print(f"FAIL {args.step}: {args.addr} still accepts connections after {args.timeout:.0f} s")
    return 1


def etcd_answers(addr):
    body = b'{"key":"AA=="}'
    try:
        with socket.create_connection(hostport(addr), timeout=1) as s:
            s.settimeout(1)
            s.sendall(b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                      b"Connection: close\r\n\r\n%s" % (len(body), body))
            answer = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
    except OSError:
        return False
    return answer.startswith(b"HTTP/1.1 200") and b"revision" in answer


def cmd_etcd_ready(args):
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if etcd_answers(args.addr):
            return 0
        time.sleep(0.1)
    print(f"FAIL {args.step}: etcd on {args.addr} did not answer a range request within {args.timeout:.0f} s")
    return 1


# ---------------------------------------------------------------- steps
def ready(nodes, timeout):
    """Until a publish on every node reaches a subscriber on every node (links up, routes
    known): returns the seconds it took, or Failed."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    topic = f"acc/{RUN}/ready/{uuid.uuid4().hex[:6]}"
    clients = {}
    try:
        for name, addr in nodes.items():
            # A node starting (or fenced) may refuse or not answer yet: try again until the deadline.
            while True:
                c = Client(uid(f"ready-{name}"), addr)
                try:
                    c.connect(timeout=max(1.0, min(5.0, deadline - time.monotonic())))
                    c.subscribe(f"{topic}/+", qos=1, timeout=max(1.0, deadline - time.monotonic()))
                    clients[name] = c
                    break
                except Failed as e:
                    c.close()
                    if time.monotonic() >= deadline:
                        raise Failed(f"node {name} ({addr}) does not serve: {e}") from None
                    time.sleep(0.2)

        def complete(c):
            return {t.rsplit("/", 1)[1] for (t, _, _, _, _) in c.messages} >= set(nodes)

        rounds = 0
        while True:
            rounds += 1
            for name, c in clients.items():
                c.publish(f"{topic}/{name}", b"ready", qos=1)
            step = time.monotonic() + 0.5
            for c in clients.values():
                c.wait(lambda: complete(c), max(0.0, step - time.monotonic()))
            if all(complete(c) for c in clients.values()):
                return time.monotonic() - t0, rounds
            if time.monotonic() >= deadline:
                missing = {n: sorted(set(nodes) - {t.rsplit("/", 1)[1] for (t, _, _, _, _) in c.messages})
                           for n, c in clients.items()}
                raise Failed(f"publishes did not reach every node within {timeout:.0f} s; "
                             f"subscriber on node <- nodes whose publishes never arrived: {missing}")
    finally:
        for c in clients.values():
            c.close()


def cmd_ready(args):
    nodes = named(args.node)
    took, rounds = ready(nodes, args.timeout)
    print(f"PASS {args.step}: a publish on each of {','.join(nodes)} reached a subscriber on each "
          f"after {took:.2f} s ({rounds} rounds)")


def cmd_qos(args):
    hist = History(args.log)
    base = f"acc/{RUN}/qos"
    sub = Client(f"qos-sub-{RUN}", args.sub, history=hist, name="qos-sub").connect()
    granted = sub.subscribe(f"{base}/#", qos=2)
    if granted != [2]:
        raise Failed(f"subscription on {args.sub} granted {granted}, not QoS 2")
    pub = Client(f"qos-pub-{RUN}", args.pub, history=hist).connect()
    infos = []
    for qos in (0, 1, 2):
        for i in range(args.n):
            infos.append((qos, pub.publish_seq(f"{base}/q{qos}", f"qos{qos}", i, qos)))
    pub.wait_acked([i for q, i in infos if q > 0])
    # The end of each stream: a marker on its topic at its QoS (MQTT orders a publisher's
    # messages per topic and QoS only; paho hands a QoS 2 message over at PUBREL, after a
    # QoS 1 message sent later on another topic).
    pub.wait_acked([i for q, i in [(q, pub.publish(f"{base}/q{q}", f"qos{q} end".encode(), qos=q))
                                   for q in (0, 1, 2)] if q > 0])
    ends = {f"qos{q} end".encode() for q in (0, 1, 2)}
    if not sub.wait(lambda: ends <= {p for (_, p, _, _, _) in sub.messages}):
        got_ends = ends & {p for (_, p, _, _, _) in sub.got()}
        raise Failed(f"end markers published on {args.pub} never reached {args.sub}: {sorted(ends - got_ends)}")
    problems = []
    summary = []
    for qos in (0, 1, 2):
        got = sub.got(f"{base}/q{qos}")
        seqs = [int(p.split(b" ")[1]) for (_, p, _, _, _) in got if not p.endswith(b" end")]
        qoses = sorted({q for (_, _, q, _, _) in got})
        if got[-1][1] != f"qos{qos} end".encode():
            problems.append(f"QoS {qos}: the end marker was not last")
        if seqs != list(range(args.n)):
            problems.append(f"QoS {qos}: received {len(seqs)} of {args.n} ({len(set(seqs))} distinct, "
                            f"in order: {seqs == sorted(seqs)})")
        if qoses != [qos]:
            problems.append(f"QoS {qos}: delivered at QoS {qoses}")
        summary.append(f"QoS {qos}: {len(seqs)}/{args.n}")
    sub.close()
    pub.close()
    if problems:
        raise Failed("; ".join(problems))
    print(f"PASS {args.step}: publish on {args.pub}, subscriber on {args.sub}: {', '.join(summary)}, "
          f"each exactly once and in order at its QoS (end markers seen)")


def cmd_shared(args):
    base = f"acc/{RUN}/shared"
    group = f"$share/g{RUN}/{base}/data"
    members = []
    for i, addr in enumerate(args.member):
        m = Client(f"shared-{i}-{RUN}", addr).connect()
        # The group's filter, and the end marker every member gets.
        m.subscribe([group, f"{base}/end"], qos=1)
        members.append(m)
    pub = Client(f"shared-pub-{RUN}", args.pub).connect()
    pub.wait_acked([pub.publish(f"{base}/data", str(i).encode(), qos=1) for i in range(args.n)])
    pub.wait_acked([pub.publish(f"{base}/end", b"end", qos=1)])
    for m in members:
        if not m.wait(lambda: any(t == f"{base}/end" for (t, _, _, _, _) in m.messages)):
            raise Failed(f"the end marker never reached the member on {m.addr}")
    counts = {}
    per_member = []
    for m in members:
        got = [int(p) for (t, p, _, _, _) in m.got(f"{base}/data")]
        per_member.append(len(got))
        for i in got:
            counts[i] = counts.get(i, 0) + 1
    for c in members + [pub]:
        c.close()
    total = sum(per_member)
    twice = sorted(i for i, n in counts.items() if n > 1)
    missing = sorted(set(range(args.n)) - set(counts))
    dist = ", ".join(f"{m.addr}: {n}" for m, n in zip(members, per_member))
    info(f"members' share: {dist}")
    problems = []
    if twice:
        problems.append(f"{len(twice)} messages went to more than one member, e.g. {twice[:10]}")
    if missing:
        problems.append(f"{len(missing)} messages reached no member, e.g. {missing[:10]}")
    if total != args.n:
        problems.append(f"{total} deliveries for {args.n} messages")
    if any(n == 0 for n in per_member):
        problems.append(f"a member got none ({dist})")
    if problems:
        raise Failed("; ".join(problems))
    print(f"PASS {args.step}: {args.n} messages published on {args.pub}, {total} deliveries, each message to "
          f"exactly one of {len(members)} members on different nodes ({dist})")


def cmd_session(args):
    hist = History(args.log)
    topic = f"acc/{RUN}/session"
    cid = f"roamer-{RUN}"
    first = Client(cid, args.first, clean=False, history=hist, name="roamer").connect()
    if first.session_present:
        raise Failed(f"a fresh client id got session present on {args.first}")
    first.subscribe(topic, qos=1)
    first.close()
    info(f"roamer subscribed on {args.first} (clean_session=0, QoS 1) and disconnected")
    pub = Client(f"roam-pub-{RUN}", args.pub, history=hist).connect()
    pub.wait_acked([pub.publish_seq(topic, "roam-pub", i, 1) for i in range(args.n)])
    info(f"{args.n} QoS 1 messages published on {args.pub} while it was away, all acknowledged")
    second = Client(cid, args.second, clean=False, history=hist, name="roamer")
    t0 = time.monotonic()
    second.connect()
    info(f"roamer connected to {args.second} in {second.connack_at - t0:.2f} s, session present "
         f"= {second.session_present}")
    # The end: a marker from the same publisher on the same topic, after the queue.
    pub.wait_acked([pub.publish(topic, b"roam-pub end", qos=1)])
    end = second.wait(lambda: any(p == b"roam-pub end" for (_, p, _, _, _) in second.messages))
    got = list(second.received.get("roam-pub", []))
    second.close()
    pub.close()
    problems = []
    if not second.session_present:
        problems.append("CONNACK on the second node had session present = 0")
    if not end:
        problems.append("the end marker never arrived")
    if sorted(set(got)) != list(range(args.n)):
        problems.append(f"{len(set(got))} of {args.n} queued messages delivered")
    firsts = list(dict.fromkeys(got))
    if firsts != sorted(firsts):
        problems.append("delivered out of order")
    if problems:
        raise Failed("; ".join(problems))
    dups = len(got) - len(set(got))
    print(f"PASS {args.step}: session taken from {args.first} to {args.second} (session present), "
          f"{args.n}/{args.n} messages queued while away delivered in order ({dups} duplicates)")


def cmd_crash(args):
    hist = History(args.log)
    topic = f"acc/{RUN}/hist"
    subs = {}
    for name, addr in named(args.sub).items():
        s = Client(f"hist-{name}-{RUN}", addr, clean=False, history=hist, name=f"hist-{name}").connect()
        s.subscribe(topic, qos=1)
        subs[name] = s
    info(f"persistent QoS 1 subscribers hist-{','.join(subs)} on {', '.join(s.addr for s in subs.values())}")
    pub = Client(f"hist-pub-{RUN}", args.pub, history=hist).connect()
    seq = 0
    killed_at = None
    deadline = time.monotonic() + args.timeout
    window = 100

    def acked():
        return len(pub.acked.get("hist-pub", ()))

    while pub.disconnected_at is None:
        if time.monotonic() > deadline:
            raise Failed(f"the publisher on {args.pub} still connected {args.timeout:.0f} s in "
                         f"({acked()} acknowledged, killed: {killed_at is not None})")
        if killed_at is None and acked() >= args.kill_after:
            os.kill(args.kill_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            info(f"SIGKILL to pid {args.kill_pid} after {acked()} acknowledged, {seq} sent")
        # A bounded window of unacknowledged publishes: the stream goes on up to the kill.
        with pub.cond:
            room = seq - acked() < window
        if room:
            pub.publish_seq(topic, "hist-pub", seq, 1)
            seq += 1
        else:
            pub.wait(lambda: seq - acked() < window or pub.disconnected_at is not None, 1.0)
    n_acked = acked()
    if killed_at is None:
        raise Failed(f"the publisher's connection to {args.pub} ended before the kill ({n_acked} acknowledged): "
                     f"{pub.disconnect_reason}")
    info(f"publisher disconnected {pub.disconnected_at - killed_at:.2f} s after the kill: {seq} sent, "
         f"{n_acked} acknowledged")
    pub.c.loop_stop()
    want = set(pub.acked.get("hist-pub", ()))
    # The survivors' subscribers get what was acknowledged (the rest is checked after the
    # restart, from their persistent sessions); then they leave, their sessions kept.
    for name, s in subs.items():
        if s.addr == args.pub:
            s.wait(lambda: s.disconnected_at is not None, 10)
            s.c.loop_stop()
            continue
        s.wait(lambda: want <= set(s.received.get("hist-pub", ())), 10)
        info(f"hist-{name} on {s.addr}: {len(want & set(s.received.get('hist-pub', ())))} of {len(want)} "
             f"acknowledged received before it left")
        s.close()
    print(f"PASS {args.step}: node on {args.pub} killed (SIGKILL) mid-stream: {seq} QoS 1 messages sent, "
          f"{n_acked} acknowledged")


def cmd_crash_after(args):
    hist = History(args.log)
    topic = f"acc/{RUN}/hist"
    with open(args.log, encoding="utf-8") as f:
        events = [json.loads(line) for line in f if line.strip()]
    want = {"hist-pub": {e["seq"] for e in events if e["client"] == "hist-pub" and e["kind"] == "acked"}}
    # What each subscriber received before the crash (acknowledged to the node, not owed again).
    before = {}
    for e in events:
        if e["kind"] == "received":
            before.setdefault(e["client"], {}).setdefault(e["publisher"], set()).add(e["seq"])
    subs = {}
    problems = []
    for name, addr in named(args.sub).items():
        s = Client(f"hist-{name}-{RUN}", addr, clean=False, history=hist, name=f"hist-{name}").connect()
        if not s.session_present:
            problems.append(f"hist-{name} on {addr}: session present = 0")
        subs[name] = s
    info("persistent subscribers back: session present " +
         ", ".join(f"hist-{n}={s.session_present}" for n, s in subs.items()))

    def has(s, p):
        return before.get(s.name, {}).get(p, set()) | set(s.received.get(p, ()))

    def complete(s):
        return all(seqs <= has(s, p) for p, seqs in want.items())

    for name, s in subs.items():
        if not s.wait(lambda: complete(s)):
            lost = want["hist-pub"] - has(s, "hist-pub")
            problems.append(f"hist-{name}: {len(lost)} acknowledged messages of the crash not delivered "
                            f"within {WAIT:.0f} s")
    # The cluster still serves: new publishers on the restarted node and on another one.
    for pname, addr in (("hist-pub2", args.pub2), ("hist-pub3", args.pub3)):
        p = Client(f"{pname}-{RUN}", addr, history=hist).connect()
        p.wait_acked([p.publish_seq(topic, pname, i, 1) for i in range(args.n)])
        want[pname] = set(p.acked.get(pname, ()))
        p.close()
    for name, s in subs.items():
        if not s.wait(lambda: complete(s)):
            for pname in ("hist-pub2", "hist-pub3"):
                lost = want[pname] - has(s, pname)
                if lost:
                    problems.append(f"hist-{name} on {s.addr}: {len(lost)} of {len(want[pname])} acknowledged "
                                    f"messages of {pname} not delivered within {WAIT:.0f} s")
        s.close()
    if problems:
        raise Failed("; ".join(problems))
    print(f"PASS {args.step}: sessions back (session present) on every node; every subscriber got the "
          f"{len(want['hist-pub'])} acknowledged messages of the crash and {args.n} + {args.n} new ones "
          f"published on {args.pub2} and {args.pub3}")


def run_cmd(cmd):
    r = subprocess.run(shlex.split(cmd), capture_output=True, text=True)
    if r.returncode != 0:
        raise Failed(f"`{cmd}` failed ({r.returncode}): {r.stderr.strip()}")


def race_to(addr, cid, until, attempts):
    """Connects `cid` to `addr` again and again (CONNECT, wait for the CONNACK) until one is
    accepted or `until` (monotonic) passes; returns the connected Client or None. Refusals
    and unanswered attempts go to `attempts`."""
    while time.monotonic() < until:
        m = Client(cid, addr, v5=True, clean=False, expiry=600)
        try:
            m.start()
            rc = m.wait_connack(max(0.5, until - time.monotonic()))
        except OSError as e:
            rc = e
        if rc is not None and not isinstance(rc, OSError) and not rc.is_failure:
            return m
        m.close()
        attempts.append(str(rc))
        time.sleep(0.1)
    return None


def cmd_fence(args):
    topic = f"acc/{RUN}/fence"
    cid = f"fenced-{RUN}"
    raced_id = f"raced-{RUN}"
    ttl = args.ttl
    problems = []
    # Two clients on C: `victim` is left alone (C must close it itself, fenced), `raced`'s
    # id connects to A from the moment of the cut on (A must not serve it while C does).
    victim = Client(cid, args.c, v5=True, clean=False, expiry=600).connect()
    victim.subscribe(topic, qos=1)
    raced = Client(raced_id, args.c, v5=True, clean=False, expiry=600).connect()
    raced.subscribe(topic, qos=1)
    probe = Client(f"fence-pub-{RUN}", args.a).connect()
    probe.wait_acked([probe.publish(topic, b"before", qos=1)])
    for c in (victim, raced):
        if not c.wait(lambda: any(p == b"before" for (_, p, _, _, _) in c.messages)):
            raise Failed(f"a publish on {args.a} did not reach {c.id} on {args.c} before the cut")
    cut = False
    race = {"attempts": []}
    racer = None
    try:
        t_cut = time.monotonic()
        run_cmd(args.cut)
        cut = True
        info(f"cut: {args.cut}")

        def run_race():
            race["moved"] = race_to(args.a, raced_id, t_cut + ttl + 20, race["attempts"])

        racer = threading.Thread(target=run_race, daemon=True)
        racer.start()
        if not victim.wait(lambda: victim.disconnected_at is not None, ttl + 10):
            raise Failed(f"the client on {args.c} still connected {ttl + 10:.0f} s after the cut")
        closed_after = victim.disconnected_at - t_cut
        reason = victim.disconnect_reason
        info(f"{cid} on {args.c} disconnected {closed_after:.2f} s after the cut (lease TTL {ttl:.0f} s), "
             f"reason {reason} ({reason.value:#x})")
        if closed_after >= ttl:
            problems.append(f"the client on C was closed {closed_after:.2f} s after the cut, not within "
                            f"the lease TTL ({ttl:.0f} s)")
        if reason.value != USE_ANOTHER_SERVER:
            problems.append(f"DISCONNECT reason {reason.value:#x}, not 0x9c")
        victim.c.loop_stop()

        # While cut, C refuses new clients (v5 0x88, 3.1.1 return code 3).
        for v5 in (True, False):
            other = Client(uid("fence-new" + ("5" if v5 else "3")), args.c, v5=v5)
            t0 = time.monotonic()
            try:
                other.start()
            except OSError as e:
                problems.append(f"a new {'v5' if v5 else '3.1.1'} client could not reach {args.c}: {e}")
                continue
            rc = other.wait_connack(15)
            took = time.monotonic() - t0
            other.close()
            if rc is None:
                problems.append(f"no CONNACK from C while cut ({'v5' if v5 else '3.1.1'}, {took:.1f} s)")
            elif rc.value != SERVER_UNAVAILABLE:
                problems.append(f"C answered a {'v5' if v5 else '3.1.1'} CONNECT while cut with {rc} "
                                f"({rc.value:#x})")
            else:
                info(f"C refused a new {'v5' if v5 else '3.1.1'} client while cut: "
                     f"{'0x88' if v5 else 'return code 3'} after {took:.2f} s")

        # The raced id: served by A, only once its connection on C had closed.
        racer.join(ttl + 25)
        moved_raced = race.get("moved")
        if moved_raced is None:
            problems.append(f"{raced_id} was not served by A within {ttl + 20:.0f} s of the cut "
                            f"(attempts: {race['attempts'][-3:]})")
        else:
            closed = raced.disconnected_at
            info(f"{raced_id}, connecting to {args.a} from the cut on: CONNACK {moved_raced.connack_at - t_cut:.2f} s "
                 f"after the cut ({len(race['attempts'])} attempts refused or unanswered before), session present "
                 f"= {moved_raced.session_present}; its connection on C closed "
                 + (f"{closed - t_cut:.2f} s after the cut, reason {raced.disconnect_reason} "
                    f"({raced.disconnect_reason.value:#x})" if closed is not None else "NOT AT ALL"))
            if closed is None or not closed < moved_raced.connack_at:
                problems.append(f"{raced_id} served by A (CONNACK) while its connection on C was still open")
        raced.c.loop_stop()

        # The fenced client's id on A afterwards.
        moved = Client(cid, args.a, v5=True, clean=False, expiry=600)
        t0 = time.monotonic()
        moved.connect(timeout=ttl + 20)
        info(f"{cid} connected to {args.a} {moved.connack_at - t_cut:.2f} s after the cut "
             f"(CONNECT answered in {moved.connack_at - t0:.2f} s), session present = {moved.session_present}; "
             f"its connection on C had closed {moved.connack_at - victim.disconnected_at:.2f} s before")
        if not victim.disconnected_at < moved.connack_at:
            problems.append(f"A's CONNACK for {cid} came before its connection on C closed")
        # Both work on A: a publish on B reaches them.
        on_a = [moved] + ([moved_raced] if moved_raced else [])
        for m in on_a:
            m.subscribe(topic, qos=1)
        other_pub = Client(f"fence-pub-b-{RUN}", args.b).connect()
        other_pub.wait_acked([other_pub.publish(topic, b"on-a", qos=1)])
        for m in on_a:
            if not m.wait(lambda: any(p == b"on-a" for (_, p, _, _, _) in m.messages)):
                problems.append(f"{m.id} on A did not receive a publish from B")
            else:
                info(f"{m.id} on {args.a} received a publish from {args.b}")
            m.close()
        other_pub.close()
    finally:
        if cut:
            t_heal = time.monotonic()
            run_cmd(args.heal)
            info(f"healed: {args.heal}")
    probe.close()
    # Healed: C serves again, and publishes cross every node again.
    t0 = time.monotonic()
    while True:
        back = Client(uid("fence-back"), args.c, v5=True)
        try:
            back.start()
            rc = back.wait_connack(5)
        except OSError:
            rc = None
        back.close()
        if rc is not None and not rc.is_failure:
            break
        if time.monotonic() - t0 > 30:
            raise Failed(f"C did not accept a client within 30 s of the heal (last answer {rc}); "
                         + "; ".join(problems))
        time.sleep(0.2)
    info(f"C accepts clients again {time.monotonic() - t_heal:.2f} s after the heal")
    ready(named(args.node), 30)
    info(f"publishes cross every node again {time.monotonic() - t_heal:.2f} s after the heal")
    if problems:
        raise Failed("; ".join(problems))
    print(f"PASS {args.step}: C cut from etcd closed its client {closed_after:.2f} s after the cut "
          f"(TTL {ttl:.0f} s, 0x9c) and refused CONNECTs while cut; an id raced to A from the cut on "
          f"was served there only after C closed it; both ids work on A; healed, C serves again")


def cmd_linkcut(args):
    """Promise 3 of docs/CLUSTER.md: node C's links to A and B cut (C still reaches etcd, so
    its lease holds and nobody is fenced), a publisher on A streams numbered QoS 1 messages
    to persistent subscribers on B and C. B gets them at once; no PUBACK comes while the cut
    lasts (every message must reach C too); healed, C gets them all, in order, and every one
    is acknowledged. A round per cut: --cut/--heal (both ways: nothing crosses), then, with
    --half-cut/--half-heal, one where only C's packets are dropped (A's frames reach C, C's
    confirmations do not: A writes them again after the heal and C must not apply them twice;
    the event log's check says whether C delivered any twice). The links' state is read from
    each node's `$SYS/cluster/nodes/<name>` (`up` / `unlinked`: its outgoing link to that
    node), as node names a, b and c."""
    hist = History(args.log)
    topic = f"acc/{RUN}/linkcut"
    n = args.n
    problems = []
    # Each node's view of its outgoing links to the others: (viewer, peer) -> client, topic.
    watch = {}
    watchers = []
    for viewer, addr, peers in (("a", args.a, "c"), ("b", args.b, "c"), ("c", args.c, "ab")):
        w = Client(uid(f"linkcut-sys-{viewer}"), addr).connect()
        w.subscribe([f"$SYS/cluster/nodes/{p}" for p in peers], qos=0)
        watchers.append(w)
        for p in peers:
            watch[(viewer, p)] = (w, f"$SYS/cluster/nodes/{p}")

    def state(view):
        """The view's last value, or None."""
        w, t = watch[view]
        vals = w.got(t)
        return vals[-1][1].decode() if vals else None

    def first(view, value, after):
        """When the view first said `value` after monotonic time `after`, or None."""
        w, t = watch[view]
        return next((when for (_, p, _, _, when) in w.got(t) if when > after and p.decode() == value), None)

    def arrow(view):
        return f"{view[0]}->{view[1]}"

    def views_say(value):
        return all(state(v) == value for v in watch)

    def wait_views(value, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not views_say(value):
            time.sleep(0.05)
        return views_say(value)

    if not wait_views("up", 20):
        raise Failed("the links between the nodes are not all up before the cut: "
                     + ", ".join(f"{arrow(v)} {state(v)}" for v in watch))
    sub_c = Client(f"cut-c-{RUN}", args.c, clean=False, history=hist, name="cut-c").connect()
    sub_c.subscribe(topic, qos=1)
    sub_b = Client(f"cut-b-{RUN}", args.b, clean=False, history=hist, name="cut-b").connect()
    sub_b.subscribe(topic, qos=1)
    pub = Client(f"cut-pub-{RUN}", args.a, history=hist).connect()
    pub.wait_acked([pub.publish(topic, b"warm", qos=1)])
    for s in (sub_b, sub_c):
        if not s.wait(lambda: any(p == b"warm" for (_, p, _, _, _) in s.messages)):
            raise Failed(f"a publish on {args.a} did not reach {s.name} on {s.addr} before the cut")
    info(f"persistent QoS 1 subscribers cut-b on {args.b} and cut-c on {args.c}, publisher on {args.a}: "
         f"links up, a warm-up message acknowledged and received by both")

    def receptions(s, name):
        """[(seq, monotonic time)] of publisher `name`'s numbered messages `s` received."""
        with s.cond:
            out = []
            for (t, p, _, _, when) in s.messages:
                parts = p.split(b" ")
                if t == topic and len(parts) == 2 and parts[0] == name.encode() and parts[1].isdigit():
                    out.append((int(parts[1]), when))
            return out

    def one_round(label, cuts, heals, name):
        """One cut, n publishes, the heal. Returns a summary for the PASS line; adds to
        `problems`."""
        if not wait_views("up", 20):
            problems.append(f"{label}: the links are not all up before the cut: "
                            + ", ".join(f"{arrow(v)} {state(v)}" for v in watch))
            return None
        sent_at = {}  # seq -> monotonic time handed to paho
        mid_of = {}  # seq -> mid
        cut = False
        t_heal = None
        try:
            t_cut = time.monotonic()
            for cmd in cuts:
                run_cmd(cmd)
                cut = True
            info(f"{label}: cut: " + "; ".join(cuts))
            for seq in range(n):
                sent_at[seq] = time.monotonic()
                mid_of[seq] = pub.publish_seq(topic, name, seq, 1).mid
                time.sleep(args.interval)
            info(f"{label}: {n} QoS 1 messages ({name}) published on {args.a} in "
                 f"{time.monotonic() - t_cut:.2f} s from the cut")

            if not sub_b.wait(lambda: set(range(n)) <= {q for q, _ in receptions(sub_b, name)}, 10):
                problems.append(f"{label}: cut-b on {args.b} got {len({q for q, _ in receptions(sub_b, name)})} "
                                f"of {n} within 10 s of the last publish, while C was cut")
            else:
                got_b = {}
                for q, when in receptions(sub_b, name):
                    got_b.setdefault(q, when)
                lat = sorted(got_b[q] - sent_at[q] for q in range(n))
                info(f"{label}: cut-b on {args.b} got all {n} while C was cut, the last "
                     f"{max(got_b.values()) - sent_at[n - 1]:.2f} s after the last publish (publish to "
                     f"delivery: max {lat[-1] * 1000:.0f} ms, median {lat[n // 2] * 1000:.0f} ms)")

            # Held until every node saw its links across the cut lost (the kernel's keep-alive
            # and user timeout), so that the heal goes through a re-dial and the resend of the
            # unconfirmed frames; at most --cut-max seconds.
            down = wait_views("unlinked", max(0.0, t_cut + args.cut_max - time.monotonic()))
            t_due = time.monotonic()
            for view in watch:
                lost = first(view, "unlinked", t_cut)
                info(f"{label}: link {arrow(view)} " + (f"lost {lost - t_cut:.2f} s after the cut" if lost
                                                         else f"still {state(view)} {t_due - t_cut:.2f} s after the cut"))
            if not down:
                info(f"{label}: healed at --cut-max {args.cut_max:.0f} s, links still up in their node's view")
            info(f"{label}: while cut, cut-c received {len({q for q, _ in receptions(sub_c, name)})} of {n}")
            if pub.disconnected_at is not None:
                problems.append(f"{label}: the publisher's connection to {args.a} ended during the cut "
                                f"({pub.disconnect_reason})")
        finally:
            if cut:
                t_heal = time.monotonic()
                errors = []
                for cmd in heals:
                    try:
                        run_cmd(cmd)
                    except Failed as e:
                        errors.append(str(e))
                if errors:
                    raise Failed(f"{label}: could not heal: " + "; ".join(errors))
                info(f"{label}: healed: " + "; ".join(heals))
        # PUBACKs that came before the heal (timed on paho's thread as they arrived).
        with pub.cond:
            early = {q: pub.acked_mids[m] for q, m in mid_of.items()
                     if m in pub.acked_mids and pub.acked_mids[m] < t_heal}
        info(f"{label}: while cut ({t_heal - t_cut:.2f} s), {len(early)} of {n} publishes acknowledged"
             + (f": seq {ranges(early)}, at " + ", ".join(f"{early[q] - t_cut:.2f}" for q in sorted(early)[:10])
                + " s after the cut" if early else ""))
        if early:
            problems.append(f"{label}: {len(early)} publishes acknowledged to the publisher while C, which has a "
                            f"matching subscriber, was cut off: seq {ranges(early)}")

        def c_has_all():
            return set(range(n)) <= {q for q, _ in receptions(sub_c, name)}

        def all_acked():
            return set(mid_of.values()) <= set(pub.acked_mids)

        deadline = t_heal + args.heal_wait
        sub_c.wait(c_has_all, max(0.0, deadline - time.monotonic()))
        pub.wait(all_acked, max(0.0, deadline - time.monotonic()))
        wait_views("up", max(0.5, min(5.0, deadline - time.monotonic())))
        ups = {}
        for view in watch:
            ups[view] = first(view, "up", t_heal)
            info(f"{label}: link {arrow(view)} " + (f"up again {ups[view] - t_heal:.2f} s after the heal" if ups[view]
                                                     else f"{state(view)} {time.monotonic() - t_heal:.2f} s after the heal"))
        got_c = receptions(sub_c, name)
        seqs_c = [q for q, _ in got_c]
        firsts = list(dict.fromkeys(seqs_c))
        after = [when for _, when in got_c if when > t_heal]
        with pub.cond:
            ack_times = [pub.acked_mids[m] for m in mid_of.values() if m in pub.acked_mids]
        info(f"{label}: cut-c on {args.c}: {len(set(seqs_c))} of {n} received ({len(seqs_c) - len(set(seqs_c))} "
             f"duplicates, first receptions in order: {firsts == sorted(firsts)})"
             + (f", {len(after)} after the heal: the first {min(after) - t_heal:.2f} s and the last "
                f"{max(after) - t_heal:.2f} s after it" if after else ""))
        info(f"{label}: publisher: {len(ack_times)} of {n} acknowledged"
             + (f", the last {max(ack_times) - t_heal:.2f} s after the heal" if ack_times else ""))
        ok = True
        if not c_has_all():
            missing = set(range(n)) - set(seqs_c)
            problems.append(f"{label}: cut-c on {args.c}: {len(missing)} of {n} messages not delivered within "
                            f"{args.heal_wait:.0f} s of the heal: {ranges(missing)}")
            ok = False
        if firsts != sorted(firsts):
            problems.append(f"{label}: cut-c on {args.c}: first receptions out of order")
            ok = False
        if not all_acked():
            missing = {q for q, m in mid_of.items() if m not in pub.acked_mids}
            problems.append(f"{label}: {len(missing)} of {n} publishes not acknowledged within "
                            f"{args.heal_wait:.0f} s of the heal: {ranges(missing)}")
            ok = False
        if not ok or early:
            return None
        up = [u - t_heal for u in ups.values() if u is not None]
        return (f"{label}: cut {t_heal - t_cut:.1f} s, none acknowledged while cut, links up "
                + (f"{max(up):.2f} s" if len(up) == len(ups) else "(not all)")
                + f" and all delivered to C in order {max(w for _, w in got_c) - t_heal:.2f} s, acknowledged "
                f"{max(ack_times) - t_heal:.2f} s after the heal")

    rounds = [("both ways", args.cut, args.heal, "cut-pub")]
    if args.half_cut:
        rounds.append(("C's side only", args.half_cut, args.half_heal or [], "cut-pub2"))
    summaries = [one_round(*r) for r in rounds]
    for c in [sub_b, sub_c, pub] + watchers:
        c.close()
    if problems:
        raise Failed("; ".join(problems))
    print(f"PASS {args.step}: C's node links cut (C kept etcd), {n} QoS 1 messages from A each time, B got "
          f"them at once; " + "; ".join(summaries))


def main():
    global RUN, WAIT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=uuid.uuid4().hex[:8], help="run id in client ids and topics")
    ap.add_argument("--wait", type=float, default=WAIT, help="seconds each wait may take (default 20)")
    ap.add_argument("--step", default=None, help="name on the PASS/FAIL line")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("wait-port")
    p.add_argument("addr")
    p.add_argument("--pid", type=int)
    p.add_argument("--timeout", type=float, default=20)
    p.set_defaults(fn=cmd_wait_port)
    p = sub.add_parser("wait-closed")
    p.add_argument("addr")
    p.add_argument("--timeout", type=float, default=10)
    p.set_defaults(fn=cmd_wait_closed)
    p = sub.add_parser("etcd-ready")
    p.add_argument("addr")
    p.add_argument("--timeout", type=float, default=30)
    p.set_defaults(fn=cmd_etcd_ready)
    p = sub.add_parser("ready")
    p.add_argument("--node", action="append", required=True, help="NAME=HOST:PORT, one per node")
    p.add_argument("--timeout", type=float, default=30)
    p.set_defaults(fn=cmd_ready)
    p = sub.add_parser("qos")
    p.add_argument("--pub", required=True)
    p.add_argument("--sub", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("-n", type=int, default=50, help="messages per QoS (50)")
    p.set_defaults(fn=cmd_qos)
    p = sub.add_parser("shared")
    p.add_argument("--pub", required=True)
    p.add_argument("--member", action="append", required=True)
    p.add_argument("-n", type=int, default=90)
    p.set_defaults(fn=cmd_shared)
    p = sub.add_parser("session")
    p.add_argument("--first", required=True)
    p.add_argument("--pub", required=True)
    p.add_argument("--second", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("-n", type=int, default=50)
    p.set_defaults(fn=cmd_session)
    p = sub.add_parser("crash")
    p.add_argument("--pub", required=True, help="the node that gets killed")
    p.add_argument("--sub", action="append", required=True, help="NAME=HOST:PORT")
    p.add_argument("--kill-pid", type=int, required=True)
    p.add_argument("--kill-after", type=int, default=1000, help="acknowledged messages before the kill")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--log", required=True)
    p.set_defaults(fn=cmd_crash)
    p = sub.add_parser("crash-after")
    p.add_argument("--sub", action="append", required=True, help="NAME=HOST:PORT")
    p.add_argument("--pub2", required=True, help="a publisher here after the restart (the restarted node)")
    p.add_argument("--pub3", required=True, help="and one here")
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--log", required=True)
    p.set_defaults(fn=cmd_crash_after)
    p = sub.add_parser("fence")
    p.add_argument("--c", required=True, help="the node that is cut")
    p.add_argument("--a", required=True)
    p.add_argument("--b", required=True)
    p.add_argument("--node", action="append", required=True, help="NAME=HOST:PORT of every node")
    p.add_argument("--ttl", type=float, required=True)
    p.add_argument("--cut", required=True, help="command that cuts C from etcd")
    p.add_argument("--heal", required=True, help="command that undoes it")
    p.set_defaults(fn=cmd_fence)
    p = sub.add_parser("linkcut")
    p.add_argument("--a", required=True, help="node a: the publisher's")
    p.add_argument("--b", required=True, help="node b: a control subscriber's")
    p.add_argument("--c", required=True, help="node c: the node whose links are cut")
    p.add_argument("--cut", action="append", required=True, help="a command of the cut (in order)")
    p.add_argument("--heal", action="append", required=True, help="a command that undoes it (every one is run)")
    p.add_argument("--half-cut", action="append", default=[],
                   help="a command of a second round's cut, one way (C's packets dropped only)")
    p.add_argument("--half-heal", action="append", default=[], help="a command that undoes it")
    p.add_argument("--log", required=True)
    p.add_argument("-n", type=int, default=200, help="messages published during the cut (200)")
    p.add_argument("--interval", type=float, default=0.02, help="seconds between publishes (0.02)")
    p.add_argument("--cut-max", type=float, default=35,
                   help="heal at the latest this many seconds after the cut (35); earlier once every node "
                        "saw its links to the other side lost")
    p.add_argument("--heal-wait", type=float, default=60, help="seconds for delivery after the heal (60)")
    p.set_defaults(fn=cmd_linkcut)
    args = ap.parse_args()
    RUN, WAIT = args.run, args.wait
    if args.step is None:
        args.step = args.cmd
    try:
        sys.exit(args.fn(args) or 0)
    except Failed as e:
        print(f"FAIL {args.step}: {e}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
