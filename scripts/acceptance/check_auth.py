#!/usr/bin/env python3
"""Authentication and ACLs against the release binary, with unmodified clients.

1. A password file made by Debian's `mosquitto_passwd` (alice, bob), one more user added by
   `ringmq passwd -b` (carol); an ACL in Mosquitto's acl_file syntax.
2. paho-mqtt, MQTT 3.1.1 and 5: the right password connects; a wrong one is refused with
   CONNACK 4 / 0x86; no credentials with 5 / 0x87 (a password file is set: anonymous is off).
3. mosquitto_pub with -u/-P publishes (a Mosquitto user and carol, the argon2id one); with a
   wrong password it fails with "bad user name or password".
4. The ACL: a v5 SUBSCRIBE to a denied filter gets 0x87 (mosquitto_sub says so); a v5 PUBLISH
   to a topic the client may not write gets PUBACK 0x87 and is not delivered; a wildcard
   subscriber over a denied topic receives only what it may read.
5. SIGHUP after a rule was added: a live connection's next PUBLISH is allowed; the log names
   the reload.

Exit status 0 when all holds. Usage:
  check_auth.py --broker target/release/ringmq
"""

import argparse
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import paho.mqtt.client as mqtt

from check_durability import Failed, Waiter
from check_listeners import free_ports, read_connack, wait_log

ACL = """\
# anonymous: nothing
user alice
topic readwrite sensors/#
topic deny sensors/secret
user bob
topic write sensors/#
topic read cmd/bob
user carol
topic readwrite carol/#
"""


def connect_v311(client_id, user, password):
    """A clean 3.1.1 CONNECT with optional username and password."""
    def field(b):
        return struct.pack(">H", len(b)) + b
    flags = 0x02 | (0x80 if user is not None else 0) | (0x40 if password is not None else 0)
    payload = field(client_id) + (field(user) if user is not None else b"") + (field(password) if password is not None else b"")
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + b"\x00\x3c" + payload
    return bytes([0x10, len(body)]) + body


def paho(client_id, protocol, user, password):
    w = Waiter()
    w.connack = None
    w.acks = {}
    w.subacks = {}
    w.messages = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                    reconnect_on_failure=False)
    if user is not None:
        c.username_pw_set(user, password)

    def on_connect(cl, ud, flags, rc, props):
        with w.cond:
            w.connack = rc
            w.cond.notify_all()

    def on_publish(cl, ud, mid, rc, props):
        with w.cond:
            w.acks[mid] = rc
            w.cond.notify_all()

    def on_subscribe(cl, ud, mid, rcs, props):
        with w.cond:
            w.subacks[mid] = rcs
            w.cond.notify_all()

    def on_message(cl, ud, msg):
        with w.cond:
            w.messages.append((msg.topic, msg.payload.decode()))
            w.cond.notify_all()

    c.on_connect, c.on_publish, c.on_subscribe, c.on_message = on_connect, on_publish, on_subscribe, on_message
    return c, w


def connack(port, protocol, user, password, client_id="auth-check"):
    c, w = paho(client_id, protocol, user, password)
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    try:
        if not w.wait(lambda: w.connack is not None, 15):
            raise Failed(f"no CONNACK for {user!r}")
        return w.connack.value
    finally:
        c.disconnect()
        c.loop_stop()


def connected(port, protocol, user, password, client_id):
    c, w = paho(client_id, protocol, user, password)
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    if not w.wait(lambda: w.connack is not None, 15) or w.connack.is_failure:
        raise Failed(f"{user} not connected: {w.connack}")
    return c, w


def run_tool(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def check(args):
    d = tempfile.mkdtemp(prefix="ringmq-auth-")
    passwords, acl, log_path = (os.path.join(d, n) for n in ("passwords", "acl", "broker.log"))
    for flags, user, password in ((["-c"], "alice", "s3cret"), ([], "bob", "hunter2")):
        subprocess.run(["mosquitto_passwd", *flags, "-b", passwords, user, password], check=True, timeout=30)
    subprocess.run([args.broker, "passwd", "-b", passwords, "carol", "argon-pass"], check=True, timeout=30)
    with open(passwords) as f:
        lines = f.read().splitlines()
    if not (lines[0].startswith("alice:$7$") and lines[2].startswith("carol:$argon2id$")):
        raise Failed(f"unexpected password file: {lines}")
    print("ok 1: mosquitto_passwd file plus an argon2id user from ringmq passwd")
    with open(acl, "w") as f:
        f.write(ACL)
    port, = free_ports(1)
    log = open(log_path, "w")
    broker = subprocess.Popen([args.broker, "--bind", f"127.0.0.1:{port}", "--in-memory", "--cores", "2",
                               "--password-file", passwords, "--acl-file", acl], stdout=log, stderr=log)
    try:
        wait_log(log_path, "listening")
        for protocol, name in ((mqtt.MQTTv311, "3.1.1"), (mqtt.MQTTv5, "5")):
            v5 = protocol == mqtt.MQTTv5
            got = [connack(port, protocol, "alice", "s3cret"), connack(port, protocol, "carol", "argon-pass"),
                   connack(port, protocol, "alice", "wrong"), connack(port, protocol, None, None)]
            # paho reports 3.1.1 return codes 4 and 5 as MQTT 5's 0x86 and 0x87.
            want = [0, 0, 0x86, 0x87]
            if got != want:
                raise Failed(f"MQTT {name} CONNACKs {got}, expected {want}")
            print(f"ok 2: paho MQTT {name}: right password 0, argon2id user 0, wrong 0x86, anonymous 0x87")
        # On the wire, 3.1.1's return codes themselves.
        for user, password, want in ((b"alice", b"wrong", 4), (None, None, 5), (b"alice", b"s3cret", 0)):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(connect_v311(b"raw-auth", user, password))
                ack = read_connack(sock)
            if ack is None or ack[3] != want:
                raise Failed(f"3.1.1 CONNACK for {user!r}: {ack!r}, expected return code {want}")
        print("ok 2: raw 3.1.1 CONNACK return codes 4 (bad user name or password) and 5 (not authorized)")
        for user, password in (("bob", "hunter2"), ("carol", "argon-pass")):
            topic = "sensors/x" if user == "bob" else "carol/x"
            r = run_tool("mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-u", user, "-P", password,
                         "-t", topic, "-m", "hi", "-q", "1")
            if r.returncode != 0:
                raise Failed(f"mosquitto_pub as {user}: {r.returncode} {r.stderr}")
        r = run_tool("mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-u", "bob", "-P", "nope",
                     "-t", "sensors/x", "-m", "hi")
        if r.returncode == 0 or "bad user name or password" not in (r.stderr + r.stdout).lower():
            raise Failed(f"mosquitto_pub with a wrong password: {r.returncode} {r.stderr!r}")
        print("ok 3: mosquitto_pub -u/-P (Mosquitto and argon2id users); wrong password refused")

        r = run_tool("mosquitto_sub", "-V", "5", "-h", "127.0.0.1", "-p", str(port), "-u", "bob", "-P", "hunter2",
                     "-t", "sensors/#", "-C", "1", "-W", "5")
        if "denied" not in (r.stderr + r.stdout).lower():
            raise Failed(f"mosquitto_sub to a denied filter: {r.returncode} {r.stdout!r} {r.stderr!r}")
        alice, aw = connected(port, mqtt.MQTTv5, "alice", "s3cret", "auth-alice")
        mid = alice.subscribe("sensors/+", qos=1)[1]
        if not aw.wait(lambda: mid in aw.subacks, 15) or aw.subacks[mid][0].value != 1:
            raise Failed(f"alice's SUBACK: {aw.subacks}")
        bob, bw = connected(port, mqtt.MQTTv5, "bob", "hunter2", "auth-bob")
        mids = [bob.publish(t, p, qos=1).mid for t, p in (("sensors/secret", "s"), ("other/x", "o"), ("sensors/ok", "k"))]
        if not bw.wait(lambda: set(mids) <= set(bw.acks), 15):
            raise Failed("bob's PUBACKs missing")
        codes = [bw.acks[m].value for m in mids]
        if codes[1] != 0x87 or codes[0] not in (0, 0x10) or codes[2] not in (0, 0x10):
            raise Failed(f"bob's PUBACK reasons {codes}, expected other/x 0x87")
        if not aw.wait(lambda: ("sensors/ok", "k") in aw.messages, 15):
            raise Failed(f"alice did not get sensors/ok: {aw.messages}")
        if ("sensors/secret", "s") in aw.messages or any(t == "other/x" for t, _ in aw.messages):
            raise Failed(f"alice got what the ACL denies: {aw.messages}")
        print("ok 4: SUBSCRIBE denied 0x87 (mosquitto_sub), PUBLISH denied 0x87 and not delivered, wildcard filtered")

        with open(acl, "a") as f:
            f.write("user bob\ntopic write alerts/#\n")
        mid = bob.publish("alerts/fire", "a", qos=1).mid
        bw.wait(lambda: mid in bw.acks, 15)
        if bw.acks.get(mid) is None or bw.acks[mid].value != 0x87:
            raise Failed(f"before the reload alerts/fire should be refused: {bw.acks.get(mid)}")
        broker.send_signal(signal.SIGHUP)
        wait_log(log_path, "authentication files reloaded")
        mid = bob.publish("alerts/fire", "b", qos=1).mid
        if not bw.wait(lambda: mid in bw.acks, 15) or bw.acks[mid].value not in (0, 0x10):
            raise Failed(f"after SIGHUP alerts/fire should be allowed: {bw.acks.get(mid)}")
        print("ok 5: SIGHUP reload: a rule added applies to a live connection")
        for c in (alice, bob):
            c.disconnect()
            c.loop_stop()
        with open(log_path) as f:
            text = f.read()
        if "username=\"alice\"" not in text and "username=alice" not in text:
            raise Failed("the connected line does not name the username")
    finally:
        broker.terminate()
        broker.wait(timeout=30)
        log.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", default="target/release/ringmq")
    args = parser.parse_args()
    try:
        check(args)
    except Failed as err:
        print(f"FAIL: {err}")
        sys.exit(1)
    print("check_auth: all passed")


if __name__ == "__main__":
    main()
