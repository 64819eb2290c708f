"""Shared code of the hostile-client acceptance scenarios (scripts/acceptance/hostile/h*.py).

Each scenario starts its own ringmq (fresh temporary data directory, free port on
127.0.0.1, default flags plus at most one named extra flag), runs one attack over raw
sockets, and checks the broker's promises:

1. the broker process stays up and serves new connections afterwards;
2. its peak RSS (VmHWM from /proc/PID/status, plus VmRSS samples) stays under 256 MB;
3. unrelated clients keep being served: a QoS 0 probe (see `Probe`) publishing one message
   every 100 ms gets each one delivered within 1 s.

It prints one line on stdout, `PASS <scenario>: <figures>` or `FAIL <scenario>: <why>`,
and exits 0 or 1. Details go to stderr as `# ...` lines.

Nothing here sleeps in place of a condition: waits poll a condition with a deadline (the
probe's 100 ms publishing pace is the only pacing sleep).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DEFAULT_BROKER = os.path.join(ROOT, "target", "release", "ringmq")
HOST = "127.0.0.1"
RSS_LIMIT_MB = 256.0
PROBE_LATENCY_LIMIT = 1.0  # seconds
MIB = 1024 * 1024
# The broker's default Maximum Packet Size is 1 MiB (whole packet); attack packets stay
# a little under it.
PACKET_BUDGET = MIB - 1024

V311 = 4
V5 = 5

# Packet types.
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15
TYPE_NAMES = {
    1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL", 7: "PUBCOMP",
    8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK", 12: "PINGREQ", 13: "PINGRESP",
    14: "DISCONNECT", 15: "AUTH",
}


def log(*parts):
    """A detail line on stderr (the summary line alone goes to stdout)."""
    print("#", *parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------

def varint(n: int) -> bytes:
    if n < 0 or n > 268_435_455:
        raise ValueError(f"variable byte integer out of range: {n}")
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def utf8(text) -> bytes:
    data = text.encode() if isinstance(text, str) else bytes(text)
    return struct.pack("!H", len(data)) + data


def binary(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


# MQTT 5 property identifiers and their value types.
P_PAYLOAD_FORMAT = 0x01
P_MESSAGE_EXPIRY = 0x02
P_CONTENT_TYPE = 0x03
P_RESPONSE_TOPIC = 0x08
P_CORRELATION_DATA = 0x09
P_SUBSCRIPTION_ID = 0x0B
P_SESSION_EXPIRY = 0x11
P_ASSIGNED_CLIENT_ID = 0x12
P_SERVER_KEEP_ALIVE = 0x13
P_REQUEST_PROBLEM_INFO = 0x17
P_REASON_STRING = 0x1F
P_RECEIVE_MAXIMUM = 0x21
P_TOPIC_ALIAS_MAXIMUM = 0x22
P_TOPIC_ALIAS = 0x23
P_MAXIMUM_QOS = 0x24
P_RETAIN_AVAILABLE = 0x25
P_USER_PROPERTY = 0x26
P_MAXIMUM_PACKET_SIZE = 0x27

_BYTE = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
_U16 = {0x13, 0x21, 0x22, 0x23}
_U32 = {0x02, 0x11, 0x18, 0x27}
_VARINT = {0x0B}
_STRING = {0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F}
_BINARY = {0x09, 0x16}


def encode_property(pid: int, value) -> bytes:
    if pid in _BYTE:
        return bytes([pid, value])
    if pid in _U16:
        return bytes([pid]) + struct.pack("!H", value)
    if pid in _U32:
        return bytes([pid]) + struct.pack("!I", value)
    if pid in _VARINT:
        return bytes([pid]) + varint(value)
    if pid in _STRING:
        return bytes([pid]) + utf8(value)
    if pid in _BINARY:
        return bytes([pid]) + binary(value)
    if pid == P_USER_PROPERTY:
        key, val = value
        return bytes([pid]) + utf8(key) + utf8(val)
    raise ValueError(f"unknown property 0x{pid:02x}")


def properties(props=None, raw: bytes = b"") -> bytes:
    """A v5 property block: `props` is a list of (id, value); `raw` is appended as is
    (pre-encoded properties, e.g. 140,000 user properties)."""
    body = b"".join(encode_property(pid, value) for pid, value in (props or [])) + raw
    return varint(len(body)) + body


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + varint(len(body)) + body


def connect_packet(client_id: str, version: int = V311, clean: bool = True, keep_alive: int = 0,
                   props=None) -> bytes:
    flags = 0x02 if clean else 0x00
    variable = utf8("MQTT") + bytes([version, flags]) + struct.pack("!H", keep_alive)
    if version == V5:
        variable += properties(props)
    return packet(0x10, variable + utf8(client_id))


def subscribe_packet(packet_id: int, filters, version: int = V311, props=None) -> bytes:
    """`filters`: list of (filter, options byte) or of filter strings (QoS 0)."""
    parts = [struct.pack("!H", packet_id)]
    if version == V5:
        parts.append(properties(props))
    for item in filters:
        flt, opts = (item, 0) if isinstance(item, (str, bytes)) else item
        parts.append(utf8(flt))
        parts.append(bytes([opts]))
    return packet(0x82, b"".join(parts))


def unsubscribe_packet(packet_id: int, filters, version: int = V311) -> bytes:
    body = struct.pack("!H", packet_id) + (properties() if version == V5 else b"")
    return packet(0xA2, body + b"".join(utf8(f) for f in filters))


def publish_packet(topic, payload: bytes = b"", qos: int = 0, retain: bool = False, packet_id: int = 0,
                   version: int = V311, props=None, raw_props: bytes = b"", dup: bool = False) -> bytes:
    first = 0x30 | (qos << 1) | (0x01 if retain else 0) | (0x08 if dup else 0)
    body = utf8(topic)
    if qos:
        body += struct.pack("!H", packet_id)
    if version == V5:
        body += properties(props, raw_props)
    return packet(first, body + payload)


def ack_packet(kind: int, packet_id: int, version: int = V311, reason: int = 0) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP."""
    first = (kind << 4) | (0x02 if kind == PUBREL else 0)
    body = struct.pack("!H", packet_id)
    if version == V5 and reason:
        body += bytes([reason])
    return packet(first, body)


PINGREQ_BYTES = b"\xc0\x00"


def disconnect_packet(version: int = V311, reason: int = 0, props=None) -> bytes:
    if version == V5 and (reason or props):
        return packet(0xE0, bytes([reason]) + properties(props))
    return b"\xe0\x00"


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------

class Closed(Exception):
    """The broker ended the connection (orderly EOF)."""


class Reset(Exception):
    """The connection was reset (ECONNRESET / EPIPE)."""


class Timeout(Exception):
    """No complete packet within the deadline."""


class Packet:
    __slots__ = ("type", "flags", "body")

    def __init__(self, ptype, flags, body):
        self.type, self.flags, self.body = ptype, flags, body

    @property
    def name(self):
        return TYPE_NAMES.get(self.type, f"type{self.type}")

    def __repr__(self):
        return f"<{self.name} flags={self.flags:#x} len={len(self.body)}>"


def parse_varint(data, pos):
    value, mult = 0, 1
    for i in range(4):
        if pos + i >= len(data):
            return None, pos
        byte = data[pos + i]
        value += (byte & 0x7F) * mult
        if not byte & 0x80:
            return value, pos + i + 1
        mult *= 128
    raise ValueError("malformed variable byte integer")


class Reader:
    """Reads whole packets from a socket: fixed header decoded, body returned raw."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.pos = 0
        self.bytes_read = 0

    def _take(self):
        data = self.buf
        if len(data) - self.pos < 2:
            return None
        length, start = parse_varint(data, self.pos + 1)
        if length is None or len(data) - start < length:
            return None
        first = data[self.pos]
        body = bytes(data[start:start + length])
        self.pos = start + length
        if self.pos > 1 << 20:
            del self.buf[:self.pos]
            self.pos = 0
        return Packet(first >> 4, first & 0x0F, body)

    def read(self, timeout: float) -> Packet:
        """The next packet; raises Closed, Reset or Timeout."""
        deadline = time.monotonic() + timeout
        while True:
            pkt = self._take()
            if pkt is not None:
                return pkt
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout()
            self.sock.settimeout(min(left, 1.0))
            try:
                chunk = self.sock.recv(1 << 18)
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError) as err:
                raise Reset(str(err)) from None
            except OSError as err:
                raise Reset(str(err)) from None
            if not chunk:
                raise Closed()
            self.bytes_read += len(chunk)
            self.buf += chunk

    def poll(self):
        """A packet if one is complete in what arrived so far (never blocks), else None.
        Raises Closed / Reset when the connection ended."""
        pkt = self._take()
        if pkt is not None:
            return pkt
        self.sock.settimeout(0)
        try:
            chunk = self.sock.recv(1 << 18)
        except (BlockingIOError, socket.timeout):
            return None
        except OSError as err:
            raise Reset(str(err)) from None
        if not chunk:
            raise Closed()
        self.bytes_read += len(chunk)
        self.buf += chunk
        return self._take()


def parse_properties(body: bytes, pos: int):
    """(list of (id, value), position after the block)."""
    length, pos = parse_varint(body, pos)
    end = pos + length
    out = []
    while pos < end:
        pid = body[pos]
        pos += 1
        if pid in _BYTE:
            out.append((pid, body[pos])); pos += 1
        elif pid in _U16:
            out.append((pid, struct.unpack_from("!H", body, pos)[0])); pos += 2
        elif pid in _U32:
            out.append((pid, struct.unpack_from("!I", body, pos)[0])); pos += 4
        elif pid in _VARINT:
            value, pos = parse_varint(body, pos); out.append((pid, value))
        elif pid in _STRING or pid in _BINARY:
            n = struct.unpack_from("!H", body, pos)[0]
            raw = body[pos + 2:pos + 2 + n]
            out.append((pid, raw.decode(errors="replace") if pid in _STRING else raw)); pos += 2 + n
        elif pid == P_USER_PROPERTY:
            n = struct.unpack_from("!H", body, pos)[0]
            key = body[pos + 2:pos + 2 + n]; pos += 2 + n
            m = struct.unpack_from("!H", body, pos)[0]
            val = body[pos + 2:pos + 2 + m]; pos += 2 + m
            out.append((pid, (key.decode(errors="replace"), val.decode(errors="replace"))))
        else:
            raise ValueError(f"unknown property 0x{pid:02x}")
    return out, end


def parse_connack(pkt: Packet, version: int):
    """(session_present, return/reason code, properties dict)."""
    session_present = bool(pkt.body[0] & 1)
    code = pkt.body[1]
    props = {}
    if version == V5 and len(pkt.body) > 2:
        props = dict(parse_properties(pkt.body, 2)[0])
    return session_present, code, props


def parse_suback(pkt: Packet, version: int):
    """(packet id, list of return/reason codes)."""
    packet_id = struct.unpack_from("!H", pkt.body, 0)[0]
    pos = 2
    if version == V5:
        _, pos = parse_properties(pkt.body, pos)
    return packet_id, pkt.body[pos:]


def parse_publish(pkt: Packet, version: int, with_props: bool = False):
    """(topic, payload, qos, retain, packet id or None[, properties])."""
    qos = (pkt.flags >> 1) & 3
    n = struct.unpack_from("!H", pkt.body, 0)[0]
    topic = pkt.body[2:2 + n].decode(errors="replace")
    pos = 2 + n
    packet_id = None
    if qos:
        packet_id = struct.unpack_from("!H", pkt.body, pos)[0]
        pos += 2
    props = []
    if version == V5:
        if with_props:
            props, pos = parse_properties(pkt.body, pos)
        else:
            length, pos = parse_varint(pkt.body, pos)
            pos += length
    payload = pkt.body[pos:]
    if with_props:
        return topic, payload, qos, bool(pkt.flags & 1), packet_id, props
    return topic, payload, qos, bool(pkt.flags & 1), packet_id


def parse_ack(pkt: Packet):
    """(packet id, reason code) of PUBACK/PUBREC/PUBREL/PUBCOMP (v3: reason 0)."""
    packet_id = struct.unpack_from("!H", pkt.body, 0)[0]
    reason = pkt.body[2] if len(pkt.body) > 2 else 0
    return packet_id, reason


def parse_disconnect(pkt: Packet):
    """(reason code, reason string or None)."""
    if not pkt.body:
        return 0, None
    reason = pkt.body[0]
    why = None
    if len(pkt.body) > 1:
        try:
            props, _ = parse_properties(pkt.body, 1)
            why = dict(props).get(P_REASON_STRING)
        except (ValueError, struct.error, TypeError):
            pass
    return reason, why


# ---------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------

class ConnectRefused(Exception):
    def __init__(self, code, props=None):
        super().__init__(f"CONNACK code 0x{code:02x}")
        self.code = code
        self.props = props or {}


class Client:
    """One raw MQTT connection: a socket plus a packet reader."""

    def __init__(self, sock, version, client_id, connack=None):
        self.sock = sock
        self.version = version
        self.client_id = client_id
        self.reader = Reader(sock)
        self.session_present = False
        self.connack_props = {}
        self.next_id = 1

    @classmethod
    def connect(cls, port, client_id, version=V311, clean=True, keep_alive=0, props=None, timeout=10.0,
                accept_refusal=False):
        """Connects and reads CONNACK. Raises ConnectRefused on a non-zero code unless
        `accept_refusal` (then `.refused` holds the code)."""
        sock = socket.create_connection((HOST, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = cls(sock, version, client_id)
        client.refused = None
        sock.sendall(connect_packet(client_id, version, clean, keep_alive, props))
        pkt = client.reader.read(timeout)
        if pkt.type != CONNACK:
            sock.close()
            raise RuntimeError(f"{client_id}: expected CONNACK, got {pkt!r}")
        client.session_present, code, client.connack_props = parse_connack(pkt, version)
        if code != 0:
            if not accept_refusal:
                sock.close()
                raise ConnectRefused(code, client.connack_props)
            client.refused = code
        return client

    def packet_id(self):
        pid = self.next_id
        self.next_id = self.next_id % 65535 + 1
        return pid

    def send(self, data: bytes):
        self.sock.settimeout(30)
        self.sock.sendall(data)

    def read(self, timeout=10.0) -> Packet:
        return self.reader.read(timeout)

    def read_until(self, ptype, timeout=10.0, on_other=None):
        """Reads until a packet of `ptype`; others go to `on_other` (or are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            pkt = self.reader.read(max(0.0, deadline - time.monotonic()))
            if pkt.type == ptype:
                return pkt
            if on_other is not None:
                on_other(pkt)

    def subscribe(self, filters, timeout=10.0, props=None):
        """Sends one SUBSCRIBE and returns its SUBACK's codes."""
        pid = self.packet_id()
        self.send(subscribe_packet(pid, filters, self.version, props))
        pkt = self.read_until(SUBACK, timeout)
        got, codes = parse_suback(pkt, self.version)
        if got != pid:
            raise RuntimeError(f"SUBACK for {got}, expected {pid}")
        return codes

    def publish_qos1(self, topic, payload, retain=False, timeout=10.0, props=None):
        """Publishes at QoS 1 and waits for its PUBACK; returns the reason code."""
        pid = self.packet_id()
        self.send(publish_packet(topic, payload, 1, retain, pid, self.version, props))
        while True:
            pkt = self.read_until(PUBACK, timeout)
            got, reason = parse_ack(pkt)
            if got == pid:
                return reason

    def disconnect(self):
        try:
            self.sock.settimeout(2)
            self.sock.sendall(disconnect_packet(self.version))
        except OSError:
            pass
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def wait_for_end(client: Client, timeout: float):
    """Reads until the connection ends. Returns (how, packets seen) with how one of
    'disconnect:0xNN', 'eof', 'reset', 'timeout'. A DISCONNECT is followed by reading on
    until EOF/reset so its tail is known too: how = 'disconnect:0x82+eof' etc."""
    seen = []
    deadline = time.monotonic() + timeout
    disconnect = None
    while True:
        left = deadline - time.monotonic()
        try:
            pkt = client.reader.read(max(0.0, left))
        except Closed:
            return (f"{disconnect}+eof" if disconnect else "eof"), seen
        except Reset:
            return (f"{disconnect}+reset" if disconnect else "reset"), seen
        except Timeout:
            return (f"{disconnect}+open" if disconnect else "timeout"), seen
        seen.append(pkt)
        if pkt.type == DISCONNECT:
            disconnect = f"disconnect:0x{parse_disconnect(pkt)[0]:02x}"


# ---------------------------------------------------------------------------------------
# Broker process
# ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _die_with_parent():
    """In the broker's child process before exec: SIGKILL it if this script dies (a
    scenario killed by its runner's timeout leaves no broker behind)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Interrupted(Exception):
    """SIGTERM or SIGINT: the scenario stops, its finally blocks stop the broker."""


class StartFailed(Exception):
    pass


BROKER_DEATHS = []  # brokers found dead when stopped: reported when a scenario errs


class Broker:
    """One ringmq process on 127.0.0.1 with --cores 2 and its own data directory."""

    def __init__(self, binary, extra_args=(), data_dir=None, port=None, keep=False):
        self.binary = binary
        self.extra_args = list(extra_args)
        self.own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="ringmq-hostile-")
        self.port = port or free_port()
        self.keep = keep
        self.proc = None
        self.log_path = None
        self.starts = 0
        self.exit_code = None
        self.died = None

    def command(self):
        return [self.binary, "--bind", f"{HOST}:{self.port}", "--cores", "2", "--data-dir", self.data_dir,
                *self.extra_args]

    def spawn(self):
        """Starts the process without waiting for it to serve."""
        self.starts += 1
        self.log_path = f"{self.data_dir}.broker-{self.starts}.log"
        self.logfile = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self.logfile, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.exit_code = None
        return self.proc

    def start(self, timeout=30.0):
        """Starts the process and waits until an MQTT CONNECT is answered."""
        self.spawn()
        self.wait_serving(timeout)
        return self

    def __enter__(self):
        """`with Broker(...) as broker:` starts it, and stops it and cleans up at the end."""
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        self.cleanup()
        return False

    def wait_serving(self, timeout=30.0):
        """Waits until a client owned by shard 0 and one owned by shard 1 both get a
        CONNACK."""
        deadline = time.monotonic() + timeout
        tag = f"{os.getpid()}-{random.getrandbits(32):08x}"
        self.ready_ids = [ids_on_shard(self.binary, f"ready-{tag}-s{s}-", s, 1)[0] for s in (0, 1)]
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail(8)
                if "unexpected argument" in tail:
                    bad = tail[tail.index("unexpected argument"):].split("|")[0].strip()
                    raise StartFailed(f"this broker does not know a flag it was given ({bad}); "
                                      f"exit status {self.proc.returncode}")
                raise StartFailed(f"broker exited with status {self.proc.returncode} at start: {tail}")
            try:
                # One client owned by each shard: both must answer.
                while self.ready_ids:
                    c = Client.connect(self.port, self.ready_ids[0], timeout=2)
                    c.disconnect()
                    self.ready_ids.pop(0)
                self.ready_ids = None
                return
            except (OSError, Closed, Reset, Timeout, RuntimeError, ConnectRefused) as err:
                last = err
            time.sleep(0.02)  # poll interval of a condition wait
        raise StartFailed(f"broker not serving within {timeout:.0f}s ({last!r}): {self.log_tail(5)}")

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def status(self):
        """'running' or a description of how it ended."""
        if self.proc is None:
            return "not started"
        rc = self.proc.poll()
        if rc is None:
            return "running"
        if rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exited with status {rc}"

    def serves(self, timeout=5.0):
        """Whether a new client can connect and round-trip a QoS 1 publish to itself."""
        if not self.alive():
            return False
        try:
            cid = f"alive-{random.getrandbits(40):010x}"
            c = Client.connect(self.port, cid, timeout=timeout)
            topic = f"alive/{cid}"
            c.subscribe([(topic, 1)], timeout=timeout)
            c.send(publish_packet(topic, b"ping", 1, False, 1))
            got_ack = got_msg = False
            deadline = time.monotonic() + timeout
            while not (got_ack and got_msg):
                pkt = c.read(max(0.0, deadline - time.monotonic()))
                if pkt.type == PUBACK:
                    got_ack = True
                elif pkt.type == PUBLISH and parse_publish(pkt, V311)[0] == topic:
                    got_msg = True
                    _, _, qos, _, pid = parse_publish(pkt, V311)
                    if qos:
                        c.send(ack_packet(PUBACK, pid))
            c.disconnect()
            return True
        except (OSError, Closed, Reset, Timeout, RuntimeError, ConnectRefused, struct.error):
            return False

    def stop(self):
        """SIGTERM, then SIGKILL after 5 s. Returns how it ended."""
        if self.proc is None:
            return "not started"
        if self.exit_code is not None:
            return f"already stopped ({self.exit_code})"
        if self.proc.poll() is not None:
            # Dead before we stopped it: kept for the report of a scenario that failed.
            self.died = f"broker {self.proc.pid} {self.status()}: {self.log_tail(3)}"
            BROKER_DEATHS.append(self.died)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                log(f"broker {self.proc.pid} still running 5s after SIGTERM: SIGKILL")
                self.proc.kill()
                self.proc.wait()
                self.exit_code = "sigkill"
                self.logfile.close()
                return "needed SIGKILL"
        self.exit_code = self.proc.returncode
        self.logfile.close()
        return f"exit {self.proc.returncode}"

    def log_tail(self, lines=20):
        try:
            with open(self.log_path, "rb") as f:
                text = f.read()[-20000:].decode(errors="replace")
            return " | ".join(text.strip().splitlines()[-lines:])
        except OSError:
            return ""

    def cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        for i in range(1, self.starts + 1):
            try:
                with open(f"{self.data_dir}.broker-{i}.log", "rb") as f:
                    lines = f.read()[-6000:].decode(errors="replace").strip().splitlines()[-12:]
                log(f"broker log (run {i}), last lines:")
                for line in lines:
                    log("   ", line)
            except OSError:
                pass
        if self.keep:
            log(f"kept data dir {self.data_dir} and logs {self.data_dir}.broker-*.log")
            return
        if self.own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        for i in range(1, self.starts + 1):
            try:
                os.unlink(f"{self.data_dir}.broker-{i}.log")
            except OSError:
                pass

    # /proc figures

    def proc_status(self):
        """(VmRSS MB, VmHWM MB) or None when the process is gone."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                text = f.read()
        except OSError:
            return None
        vals = {}
        for line in text.splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, rest = line.split(":", 1)
                vals[key] = int(rest.split()[0]) / 1024.0
        return vals.get("VmRSS", 0.0), vals.get("VmHWM", 0.0)

    def cpu_seconds(self):
        """utime + stime of the process in seconds, or None when it is gone."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                text = f.read()
        except OSError:
            return None
        fields = text[text.rindex(")") + 2:].split()
        ticks = int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")


def owner_of(binary, names, shards=2):
    """The shard owning each client identifier / retained topic, from the broker's hidden
    --owner-of (the same stable hash the broker places clients and topics with)."""
    out = []
    names = list(names)
    batch = 50000  # the argument list stays well under ARG_MAX
    for i in range(0, len(names), batch):
        chunk = names[i:i + batch]
        res = subprocess.run([binary, "--cores", str(shards), "--owner-of", *chunk], capture_output=True,
                             text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"--owner-of failed: {res.stderr.strip()[:300]}")
        got = [int(x) for x in res.stdout.split()]
        if len(got) != len(chunk):
            raise RuntimeError(f"--owner-of printed {len(got)} owners for {len(chunk)} names")
        out.extend(got)
    return out


def ids_on_shard(binary, prefix, shard, count, shards=2):
    """`count` names `prefix<i>` owned by `shard`."""
    found = []
    start = 0
    while len(found) < count:
        n = max(64, (count - len(found)) * shards + 64)
        names = [f"{prefix}{i}" for i in range(start, start + n)]
        for name, owner in zip(names, owner_of(binary, names, shards)):
            if owner == shard and len(found) < count:
                found.append(name)
        start += n
    return found


class RssSampler:
    """Samples the broker's VmRSS every 50 ms in a thread; `peak()` is the larger of the
    highest sample and VmHWM (the kernel's own peak), read at the end."""

    def __init__(self, broker: Broker, interval=0.05):
        self.broker = broker
        self.interval = interval
        self.max_rss = 0.0
        self.hwm = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self):
        st = self.broker.proc_status()
        if st is not None:
            rss, hwm = st
            self.max_rss = max(self.max_rss, rss)
            self.hwm = max(self.hwm, hwm)
            self.samples += 1

    def stop(self):
        """Stops sampling (reading VmHWM one last time); returns the peak in MB."""
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak()

    def peak(self):
        return max(self.max_rss, self.hwm)


# ---------------------------------------------------------------------------------------
# The unrelated-client probe
# ---------------------------------------------------------------------------------------

def _probe_main(port, sub_ids, pub_ids, topic, interval, count, stop_event, ready_event, results):
    """Runs in its own process (its own GIL: the attacker's Python work cannot delay it).
    Two QoS 0 subscribers (one per shard) on `topic`; two publishers (one per shard) that
    take turns, one message every `interval` seconds in total, payload = sequence number.
    Each message's latency is its arrival time minus the time just before it was sent."""
    sent = {}
    lock = threading.Lock()
    recv = [dict() for _ in sub_ids]
    errors = []
    subs = []
    pubs = []
    try:
        for cid in sub_ids:
            c = Client.connect(port, cid, V311, clean=True, keep_alive=0, timeout=10)
            codes = c.subscribe([(topic, 0)], timeout=10)
            if codes[0] >= 0x80:
                raise RuntimeError(f"probe subscription refused: 0x{codes[0]:02x}")
            subs.append(c)
        for cid in pub_ids:
            pubs.append(Client.connect(port, cid, V311, clean=True, keep_alive=0, timeout=10))
    except Exception as err:  # noqa: BLE001 - reported to the parent
        results.put({"error": f"probe could not start: {err!r}"})
        ready_event.set()
        return
    ready_event.set()

    def reader(idx, client):
        r = recv[idx]
        while True:
            try:
                pkt = client.reader.read(0.5)
            except Timeout:
                if stop_event.is_set() and finished.is_set():
                    return
                continue
            except (Closed, Reset) as err:
                if not finished.is_set():
                    with lock:
                        errors.append(f"subscriber {idx} connection ended: {type(err).__name__}")
                return
            now = time.monotonic()
            if pkt.type != PUBLISH:
                continue
            t, payload, *_ = parse_publish(pkt, V311)
            if t != topic:
                continue
            try:
                seq = int(payload)
            except ValueError:
                continue
            with lock:
                if seq in sent and seq not in r:
                    r[seq] = now - sent[seq]

    finished = threading.Event()
    threads = [threading.Thread(target=reader, args=(i, c), daemon=True) for i, c in enumerate(subs)]
    for t in threads:
        t.start()

    start = time.monotonic()
    seq = 0
    while not stop_event.is_set() and (count is None or seq < count):
        target = start + seq * interval
        delay = target - time.monotonic()
        if delay > 0:
            if stop_event.wait(delay):  # the publishing pace
                break
        pub = pubs[seq % len(pubs)]
        data = publish_packet(topic, str(seq).encode())
        with lock:
            sent[seq] = time.monotonic()
        try:
            pub.sock.settimeout(5)
            pub.sock.sendall(data)
        except OSError as err:
            with lock:
                errors.append(f"publisher {seq % len(pubs)} send failed at message {seq}: {err!r}")
                del sent[seq]
            break
        seq += 1
    # Every sent message gets up to the latency limit (plus a margin) to arrive.
    deadline = time.monotonic() + PROBE_LATENCY_LIMIT + 0.5
    while time.monotonic() < deadline:
        with lock:
            if all(len(r) >= len(sent) for r in recv):
                break
        time.sleep(0.02)  # poll interval of a condition wait
    finished.set()
    for c in subs + pubs:
        c.close()
    with lock:
        nsent = len(sent)
        lat = [v for r in recv for v in r.values()]
        missing = [nsent - len(r) for r in recv]
        late = sum(1 for v in lat if v > PROBE_LATENCY_LIMIT)
        lat.sort()
        res = {
            "sent": nsent,
            "received": [len(r) for r in recv],
            "missing": missing,
            "late": late,
            "max": lat[-1] if lat else None,
            "p50": lat[len(lat) // 2] if lat else None,
            "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
            "errors": errors[:5],
            "duration": time.monotonic() - start,
        }
    results.put(res)


class Probe:
    """The unrelated clients of promise 3, run in a child process: QoS 0 subscribers on
    both shards and publishers on both shards (taking turns, one message every 100 ms
    overall) on an unrelated topic. `stop()` returns (ok, summary)."""

    def __init__(self, broker: Broker, count=None, interval=0.1, tag=None):
        self.broker = broker
        tag = tag or f"{random.getrandbits(32):08x}"
        self.topic = f"probe/{tag}/t"
        self.sub_ids = [ids_on_shard(broker.binary, f"probe-sub-{tag}-s{s}-", s, 1)[0] for s in (0, 1)]
        self.pub_ids = [ids_on_shard(broker.binary, f"probe-pub-{tag}-s{s}-", s, 1)[0] for s in (0, 1)]
        self.count = count
        self.interval = interval
        ctx = multiprocessing.get_context("spawn")
        self.stop_event = ctx.Event()
        self.ready = ctx.Event()
        self.results = ctx.Queue()
        self.proc = ctx.Process(target=_probe_main, args=(broker.port, self.sub_ids, self.pub_ids, self.topic,
                                                          interval, count, self.stop_event, self.ready,
                                                          self.results), daemon=True)
        self.result = None

    def start(self, timeout=30.0):
        self.proc.start()
        if not self.ready.wait(timeout):
            raise RuntimeError("probe clients did not connect in time")
        return self

    def wait_done(self, timeout):
        """For a probe with a message count: waits until it has published them all."""
        self.proc.join(timeout)

    def stop(self, timeout=30.0):
        """Stops publishing, waits for the stragglers, returns (ok, text)."""
        if self.result is None:
            self.stop_event.set()
            try:
                self.result = self.results.get(timeout=timeout)
            except Exception:  # noqa: BLE001 - queue.Empty
                self.result = {"error": "probe process gave no result"}
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
        return self.verdict()

    def verdict(self):
        r = self.result
        if "error" in r:
            return False, r["error"]
        ms = lambda v: "n/a" if v is None else f"{v * 1000:.0f}ms"  # noqa: E731
        text = (f"probe {r['sent']} msgs x{len(r['received'])} subs, max latency {ms(r['max'])} "
                f"(p50 {ms(r['p50'])}, p99 {ms(r['p99'])})")
        problems = []
        if r["sent"] == 0:
            problems.append("probe published nothing")
        if any(r["missing"]):
            problems.append(f"missing {r['missing']} of {r['sent']}")
        if r["late"]:
            problems.append(f"{r['late']} deliveries later than {PROBE_LATENCY_LIMIT:.0f}s")
        if r["errors"]:
            problems.append("; ".join(r["errors"]))
        if problems:
            return False, text + ": " + ", ".join(problems)
        return True, text


# ---------------------------------------------------------------------------------------
# Scenario scaffolding
# ---------------------------------------------------------------------------------------

class Outcome:
    """Collects figures and failures of one scenario; `finish()` prints the summary line."""

    def __init__(self, name):
        self.name = name
        self.figures = []
        self.failures = []

    def figure(self, text):
        self.figures.append(text)
        log(text)

    def fail(self, text):
        self.failures.append(text)
        log("FAILED CHECK:", text)

    def check(self, cond, text_ok, text_fail):
        if cond:
            self.figure(text_ok)
        else:
            self.fail(text_fail)
        return cond

    def finish(self):
        if self.failures:
            line = f"FAIL {self.name}: " + "; ".join(self.failures)
            if self.figures:
                line += " [" + "; ".join(self.figures) + "]"
            print(line, flush=True)
            return 1
        print(f"PASS {self.name}: " + "; ".join(self.figures), flush=True)
        return 0


def check_promises(out: Outcome, broker: Broker, sampler: RssSampler, probe: Probe | None, label=""):
    """Promises 1-3 at the end of an attack: process up and serving, peak RSS under the
    limit, the probe served. Stops the sampler and the probe."""
    prefix = f"{label}: " if label else ""
    if probe is not None:
        ok, text = probe.stop()
        out.check(ok, prefix + text, prefix + text)
    peak = sampler.stop()
    alive = broker.alive()
    if alive:
        out.check(broker.serves(), prefix + "broker up and serving",
                  prefix + "broker process up but a new client could not round-trip a QoS 1 message")
    else:
        out.fail(prefix + f"broker died ({broker.status()}): {broker.log_tail(3)}")
    out.check(peak < RSS_LIMIT_MB, prefix + f"peak RSS {peak:.0f}MB",
              prefix + f"peak RSS {peak:.0f}MB >= {RSS_LIMIT_MB:.0f}MB")
    return alive


def parse_args(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--broker", default=DEFAULT_BROKER, help="ringmq binary (default: target/release/ringmq)")
    parser.add_argument("--keep", action="store_true", help="keep data directories and broker logs")
    return parser


def run(name, body, args):
    """Runs `body(out, args)`, turning exceptions into a FAIL line; exits 0/1."""
    out = Outcome(name)

    def interrupted(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    if not os.access(args.broker, os.X_OK):
        out.fail(f"no broker binary at {args.broker}")
        sys.exit(out.finish())
    try:
        body(out, args)
    except Exception as err:  # noqa: BLE001 - a scenario error is a failure, with its reason
        log(traceback.format_exc())
        why = f"{type(err).__name__}: {err}"
        if BROKER_DEATHS:
            why += " (" + "; ".join(BROKER_DEATHS) + ")"
        out.fail(why)
    sys.exit(out.finish())


def send_nonblocking(sock, data: bytes, stall_limit: float, deadline: float):
    """Sends `data` without ever hanging: returns (bytes sent, how it stopped) with how one
    of 'done', 'stalled' (no progress for `stall_limit` s), 'deadline', 'closed'."""
    view = memoryview(data)
    sent = 0
    last_progress = time.monotonic()
    sock.settimeout(0.2)
    while sent < len(view):
        now = time.monotonic()
        if now >= deadline:
            return sent, "deadline"
        if now - last_progress > stall_limit:
            return sent, "stalled"
        try:
            n = sock.send(view[sent:sent + (1 << 20)])
        except socket.timeout:
            continue
        except BlockingIOError:
            continue
        except OSError:
            return sent, "closed"
        if n:
            sent += n
            last_progress = time.monotonic()
    return sent, "done"
