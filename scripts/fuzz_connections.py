#!/usr/bin/env python3
"""Connection fuzzer for an MQTT broker: many short TCP connections carrying garbage.

Each connection sends either a random byte string (length 0..300) or a mutated valid
frame sequence (a CONNECT v3.1.1 or v5, optionally followed by a PUBLISH / SUBSCRIBE /
PINGREQ / DISCONNECT, then a few bytes flipped, inserted, deleted, overwritten or the
whole thing truncated), reads whatever comes back until the server closes or a short
timeout, then closes.

Every --check-every connections, and at the end, a real client (paho-mqtt) must still be
able to connect, subscribe to fuzz/alive, publish to it and receive its own message.

Exit status: 0 if the broker served throughout; 1 if any connection was refused, a
connect attempt failed, or a liveness check failed. Knows nothing about the broker's
implementation; case i is generated from Random(f"{seed}:{i}") alone, so one case can
be replayed with --replay i (prints the bytes, sends them, prints what came back).

    fuzz_connections.py --host 127.0.0.1 --port 1883 --connections 20000 --concurrency 200 --seed 1
"""

import argparse
import asyncio
import random
import struct
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt

# ---------------------------------------------------------------- encoding


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def mstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def frame(first_byte, body):
    return bytes([first_byte]) + varint(len(body)) + body


def rand_text(rng, lo=0, hi=12, alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-"):
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def rand_topic(rng):
    """A valid topic name (no wildcards, not empty)."""
    if rng.random() < 0.15:
        # all under fz or $fz: retained messages here must not leak into other checks' topics
        return rng.choice(["fz", "fz//b", "fz/", "fz/\u00e9\u4e2d", "fz/ /x", "$fz/x"])
    return "fz/" + "/".join(rand_text(rng, 0, 6) for _ in range(rng.randint(1, 4)))


def rand_filter(rng):
    """A valid topic filter (wildcards only where allowed)."""
    if rng.random() < 0.3:
        return rng.choice(["fz/#", "fz/+/x", "#", "+", "+/+", "$fz/#", "fz/+", "fz//b", "/"])
    levels = [rng.choice(["+", rand_text(rng, 1, 6)]) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.3:
        levels.append("#")
    return "fz/" + "/".join(levels)


def v5_props(rng, kinds):
    """A property block made of a few valid properties of the given kinds."""
    body = bytearray()
    # each property at most once, except User Property which may repeat
    chosen = rng.sample(kinds, rng.randint(0, min(3, len(kinds))))
    if "user" in kinds and rng.random() < 0.2:
        chosen.append("user")
    for k in chosen:
        if k == "session_expiry":
            body += b"\x11" + struct.pack("!I", rng.choice([0, 1, 60, 0xFFFFFFFF]))
        elif k == "receive_max":
            body += b"\x21" + struct.pack("!H", rng.choice([1, 10, 65535]))
        elif k == "max_packet":
            body += b"\x27" + struct.pack("!I", rng.choice([128, 1024, 1 << 20]))
        elif k == "topic_alias_max":
            body += b"\x22" + struct.pack("!H", rng.choice([0, 5, 65535]))
        elif k == "user":
            body += b"\x26" + mstr(rand_text(rng)) + mstr(rand_text(rng))
        elif k == "payload_format":
            body += b"\x01\x00"  # unspecified bytes (1 would demand UTF-8 payloads)
        elif k == "message_expiry":
            body += b"\x02" + struct.pack("!I", rng.choice([0, 5, 3600]))
        elif k == "topic_alias":
            body += b"\x23" + struct.pack("!H", rng.choice([1, 2, 10]))
        elif k == "content_type":
            body += b"\x03" + mstr(rand_text(rng))
        elif k == "sub_id":
            body += b"\x0b" + varint(rng.choice([1, 127, 128, 268435455]))
        elif k == "will_delay":
            body += b"\x18" + struct.pack("!I", rng.choice([0, 10]))
    return varint(len(body)) + bytes(body)


def connect_frame(rng, v5):
    flags = 0
    if rng.random() < 0.8:
        flags |= 0x02  # clean session / clean start
    will = rng.random() < 0.3
    user = rng.random() < 0.3
    password = user and rng.random() < 0.7
    if will:
        flags |= 0x04 | (rng.randint(0, 2) << 3) | (0x20 if rng.random() < 0.3 else 0)
    if user:
        flags |= 0x80
    if password:
        flags |= 0x40
    body = mstr("MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack("!H", rng.choice([0, 5, 30, 60, 65535]))
    if v5:
        body += v5_props(rng, ["session_expiry", "receive_max", "max_packet", "topic_alias_max", "user"])
    # empty client id only with clean session, as v3.1.1 requires
    body += mstr("fz-" + rand_text(rng, 0, 20) if (rng.random() < 0.9 or not flags & 0x02) else "")
    if will:
        if v5:
            body += v5_props(rng, ["will_delay", "payload_format", "message_expiry", "content_type", "user"])
        body += mstr(rand_topic(rng)) + mstr(rng.randbytes(rng.randint(0, 20)))
    if user:
        body += mstr(rand_text(rng))
    if password:
        body += mstr(rng.randbytes(rng.randint(0, 10)))
    return frame(0x10, body)


def publish_frame(rng, v5):
    qos = rng.choice([0, 0, 1, 2])
    first = 0x30 | (qos << 1) | (1 if rng.random() < 0.2 else 0)
    body = mstr(rand_topic(rng))
    if qos:
        body += struct.pack("!H", rng.randint(1, 65535))
    if v5:
        body += v5_props(rng, ["payload_format", "message_expiry", "topic_alias", "content_type", "user"])
    body += rng.randbytes(rng.randint(0, 64))
    return frame(first, body)


def subscribe_frame(rng, v5):
    body = struct.pack("!H", rng.randint(1, 65535))
    if v5:
        body += v5_props(rng, ["sub_id", "user"])
    for _ in range(rng.randint(1, 3)):
        opts = rng.randint(0, 2)
        if v5:
            opts |= rng.choice([0, 0x04, 0x08, 0x10, 0x20])
        body += mstr(rand_filter(rng)) + bytes([opts])
    return frame(0x82, body)


def valid_sequence(rng):
    v5 = rng.random() < 0.5
    out = connect_frame(rng, v5)
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        kind = rng.random()
        if kind < 0.45:
            out += publish_frame(rng, v5)
        elif kind < 0.85:
            out += subscribe_frame(rng, v5)
        elif kind < 0.95:
            out += b"\xc0\x00"  # PINGREQ
        else:
            out += b"\xe0\x00"  # DISCONNECT
    return out


INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0xFF, 0xFE, 0x10, 0x20, 0x30, 0x82, 0xC0, 0xE0, 0xF0]


def mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if not data:
            data.append(rng.randrange(256))
            continue
        pos = rng.randrange(len(data))
        if op < 0.3:  # flip one bit
            data[pos] ^= 1 << rng.randrange(8)
        elif op < 0.45:  # overwrite with an interesting byte
            data[pos] = rng.choice(INTERESTING)
        elif op < 0.6:  # overwrite with a random byte
            data[pos] = rng.randrange(256)
        elif op < 0.75:  # insert random bytes
            data[pos:pos] = rng.randbytes(rng.randint(1, 4))
        elif op < 0.9:  # delete bytes
            del data[pos:pos + rng.randint(1, 4)]
        else:  # truncate
            del data[pos:]
    return bytes(data)


def make_case(seed, i):
    rng = random.Random(f"{seed}:{i}")
    if rng.random() < 0.3:
        return "random", rng.randbytes(rng.randint(0, 300))
    return "mutated", mutate(rng, valid_sequence(rng))


# ---------------------------------------------------------------- fuzzing


class Stats:
    def __init__(self):
        self.attempted = 0
        self.made = 0
        self.refused = 0
        self.connect_failed = 0  # connect timeout or other connect error
        self.closed_by_server = 0  # EOF seen before the read timeout
        self.reset_by_server = 0  # ECONNRESET / EPIPE while writing or reading
        self.timed_out = 0  # still open when we gave up reading
        self.responded = 0  # server sent at least one byte
        self.bytes_received = 0
        self.by_kind = {"random": 0, "mutated": 0}
        self.connect_errors = {}
        self.liveness_checks = 0
        self.liveness_failures = []

    def summary(self):
        return (
            f"connections attempted={self.attempted} made={self.made} refused={self.refused} "
            f"connect_failed={self.connect_failed} closed_by_server={self.closed_by_server} "
            f"reset_by_server={self.reset_by_server} timed_out={self.timed_out} "
            f"server_responded={self.responded} bytes_received={self.bytes_received} "
            f"random={self.by_kind['random']} mutated={self.by_kind['mutated']} "
            f"liveness_checks={self.liveness_checks} liveness_failures={len(self.liveness_failures)}"
        )


async def one_connection(host, port, payload, read_timeout, connect_timeout, stats):
    stats.attempted += 1
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), connect_timeout)
    except ConnectionRefusedError:
        stats.refused += 1
        return
    except (asyncio.TimeoutError, OSError) as e:
        stats.connect_failed += 1
        key = type(e).__name__
        stats.connect_errors[key] = stats.connect_errors.get(key, 0) + 1
        return
    stats.made += 1
    got = 0
    outcome = "timeout"
    try:
        if payload:
            writer.write(payload)
            await asyncio.wait_for(writer.drain(), read_timeout)
        deadline = time.monotonic() + read_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            chunk = await asyncio.wait_for(reader.read(65536), left)
            if not chunk:
                outcome = "eof"
                break
            got += len(chunk)
    except asyncio.TimeoutError:
        outcome = "timeout"
    except (ConnectionResetError, BrokenPipeError):
        outcome = "reset"
    except OSError:
        outcome = "reset"
    finally:
        stats.bytes_received += got
        if got:
            stats.responded += 1
        if outcome == "eof":
            stats.closed_by_server += 1
        elif outcome == "reset":
            stats.reset_by_server += 1
        else:
            stats.timed_out += 1
        writer.transport.abort()  # close without waiting; we are done with this socket


def liveness_check(host, port, proto, timeout=10.0):
    """A real client connects, subscribes to fuzz/alive, publishes to it and receives its own message.

    Returns None on success or a string describing the failure."""
    token = uuid.uuid4().hex
    events = {"connack": threading.Event(), "suback": threading.Event(), "msg": threading.Event()}
    state = {}

    def on_connect(client, userdata, flags, reason_code, properties):
        state["connack"] = reason_code
        events["connack"].set()

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        state["suback"] = list(reason_codes)
        events["suback"].set()

    def on_message(client, userdata, msg):
        if msg.topic == "fuzz/alive" and msg.payload == token.encode():
            events["msg"].set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fuzz-alive-{token[:12]}", protocol=proto)
    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    started = False
    try:
        try:
            c.connect(host, port, keepalive=30)
        except Exception as e:
            return f"connect failed: {type(e).__name__}: {e}"
        c.loop_start()
        started = True
        if not events["connack"].wait(timeout):
            return f"no CONNACK within {timeout}s"
        if state["connack"].is_failure:
            return f"CONNACK refused: {state['connack']}"
        c.subscribe("fuzz/alive", qos=0)
        if not events["suback"].wait(timeout):
            return f"no SUBACK within {timeout}s"
        if any(rc.is_failure for rc in state["suback"]):
            return f"SUBACK refused: {state['suback']}"
        c.publish("fuzz/alive", token, qos=0)
        if not events["msg"].wait(timeout):
            return f"own message on fuzz/alive not received within {timeout}s"
        return None
    finally:
        try:
            c.disconnect()
        except Exception:
            pass
        if started:
            c.loop_stop()


async def run(args):
    stats = Stats()
    sem = asyncio.Semaphore(args.concurrency)
    t0 = time.monotonic()
    protos = [mqtt.MQTTv311, mqtt.MQTTv5]

    async def guarded(i):
        async with sem:
            kind, payload = make_case(args.seed, i)
            stats.by_kind[kind] += 1
            await one_connection(args.host, args.port, payload, args.read_timeout, args.connect_timeout, stats)

    async def check(label):
        stats.liveness_checks += 1
        proto = protos[stats.liveness_checks % 2]
        err = await asyncio.to_thread(liveness_check, args.host, args.port, proto)
        name = "v5" if proto == mqtt.MQTTv5 else "v311"
        if err:
            stats.liveness_failures.append(f"{label}: {err}")
            print(f"FAIL liveness after {label} ({name}): {err}", flush=True)
        else:
            print(f"ok   liveness after {label} ({name}) [{time.monotonic() - t0:.1f}s] {stats.summary()}", flush=True)
        return err is None

    if not await check("0 connections"):
        return stats
    start = 0
    while start < args.connections:
        end = min(args.connections, start + args.check_every)
        await asyncio.gather(*(guarded(i) for i in range(start, end)))
        start = end
        if stats.refused and args.stop_on_refused:
            print(f"FAIL connection refused after {stats.attempted} connections", flush=True)
            break
        if not await check(f"{end} connections"):
            break
    return stats


async def replay(args):
    kind, payload = make_case(args.seed, args.replay)
    print(f"case {args.replay} (seed {args.seed}): {kind}, {len(payload)} bytes: {payload.hex()}")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(args.host, args.port), args.connect_timeout)
    except Exception as e:
        print(f"connect failed: {type(e).__name__}: {e}")
        return 1
    received = b""
    outcome = "timeout"
    try:
        writer.write(payload)
        await writer.drain()
        deadline = time.monotonic() + args.read_timeout
        while time.monotonic() < deadline:
            chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            if not chunk:
                outcome = "eof"
                break
            received += chunk
    except asyncio.TimeoutError:
        pass
    except OSError as e:
        outcome = f"{type(e).__name__}"
    writer.transport.abort()
    print(f"outcome: {outcome}; received {len(received)} bytes: {received.hex()}")
    err = liveness_check(args.host, args.port, mqtt.MQTTv311)
    print("liveness: " + ("ok" if err is None else f"FAIL {err}"))
    return 0 if err is None else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--connections", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None, help="default: random, printed")
    ap.add_argument("--check-every", type=int, default=2000, help="liveness check interval in connections")
    ap.add_argument("--read-timeout", type=float, default=2.0, help="seconds to read replies per connection")
    ap.add_argument("--connect-timeout", type=float, default=5.0)
    ap.add_argument("--stop-on-refused", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--replay", type=int, default=None, help="send only case N and show the exchange")
    args = ap.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    if args.connections < 0 or args.concurrency < 1 or args.check_every < 1:
        ap.error("--connections >= 0, --concurrency >= 1, --check-every >= 1")

    if args.replay is not None:
        sys.exit(asyncio.run(replay(args)))

    print(f"# fuzz_connections {args.host}:{args.port} connections={args.connections} "
          f"concurrency={args.concurrency} seed={args.seed} read_timeout={args.read_timeout}s", flush=True)
    t0 = time.monotonic()
    stats = asyncio.run(run(args))
    elapsed = time.monotonic() - t0
    print(f"# summary after {elapsed:.1f}s: {stats.summary()}", flush=True)
    if stats.connect_errors:
        print(f"# connect errors: {stats.connect_errors}", flush=True)
    problems = []
    if stats.refused:
        problems.append(f"{stats.refused} connections refused")
    if stats.connect_failed:
        problems.append(f"{stats.connect_failed} connect attempts failed")
    if stats.liveness_failures:
        problems.append("liveness failed: " + "; ".join(stats.liveness_failures))
    if stats.attempted < args.connections and not problems:
        problems.append(f"only {stats.attempted}/{args.connections} connections attempted")
    if problems:
        print(f"FAIL fuzz_connections (seed {args.seed}): " + "; ".join(problems), flush=True)
        sys.exit(1)
    print(f"PASS fuzz_connections (seed {args.seed}): broker served a real client after all {stats.made} connections",
          flush=True)


if __name__ == "__main__":
    main()
