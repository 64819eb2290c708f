#!/usr/bin/env python3
"""Hostile scenario 9, protocol violations and a lingering close. One broker, the probe
running throughout; each check on its own connection.

(a) an MQTT 5 PUBLISH whose Response Topic property holds a wildcard (a/#) must end the
    connection, with DISCONNECT 0x82 Protocol Error if a DISCONNECT is sent
    (MQTT-3.3.2-14). A PINGREQ follows the PUBLISH: a PINGRESP means it was accepted.
(b) a connection whose first bytes are `PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\\r\\n`, or
    `GET / HTTP/1.1\\r\\n\\r\\n`, must be closed at once (under 0.5 s; not after the 10 s
    connect timeout).
(c) an MQTT 5 PUBLISH from a client carrying a Subscription Identifier property must end
    the connection, with DISCONNECT 0x82 if a DISCONNECT is sent (MQTT-3.3.4-6).
(d) a client publishing to $SYS/x (MQTT 3.1.1 QoS 0 and MQTT 5 QoS 1) must not reach a
    $SYS/# subscriber: after each such PUBLISH the same client publishes a marker to an
    ordinary topic the subscriber also has, and the subscriber must see the marker
    without the $SYS/x message before it (if the broker closes the publisher instead, the
    subscriber must not see $SYS/x within 2 s).
(e) an MQTT 5 client with a minimal socket receive buffer (SO_RCVBUF 1: the
    kernel's minimum, about 2 KiB) sends, in one burst, more QoS 2 PUBLISHes than the Receive Maximum
    of its CONNACK (never a PUBREL) and then reads: it must receive the server's
    DISCONNECT 0x93 Receive Maximum exceeded, and then an orderly end of stream, not a
    connection reset (the server lingers over the unread rest instead of resetting).

Peak RSS under 256 MB, the broker up and the probe served, as everywhere.
"""

import socket
import time

import hostile_common as hc


def violation(out, broker, label, props):
    """(a) and (c): a v5 PUBLISH with `props`, then a PINGREQ."""
    c = hc.Client.connect(broker.port, f"proto-{label}", hc.V5)
    c.send(hc.publish_packet("proto/t", b"x", 0, False, 0, hc.V5, props=props) + hc.PINGREQ_BYTES)
    how, seen = "timeout", []
    deadline = time.monotonic() + 3.0
    while True:
        try:
            pkt = c.read(max(0.0, deadline - time.monotonic()))
        except hc.Closed:
            how = "eof"
            break
        except hc.Reset:
            how = "reset"
            break
        except hc.Timeout:
            break
        seen.append(pkt)
        if pkt.type == hc.PINGRESP:
            how = "open"
            break
        if pkt.type == hc.DISCONNECT:
            rest, more = hc.wait_for_end(c, 3.0)
            how = f"disconnect:0x{hc.parse_disconnect(pkt)[0]:02x}+{rest}"
            seen += more
            break
    c.close()
    names = [p.name for p in seen]
    if "PINGRESP" in names or how == "timeout":
        out.fail(f"({label}) PUBLISH accepted: the connection carried on ({how}, got {names})")
    elif how.startswith("disconnect") and not how.startswith("disconnect:0x82"):
        out.fail(f"({label}) DISCONNECT with the wrong reason ({how}), expected 0x82")
    else:
        out.figure(f"({label}) connection ended ({how})")


def first_bytes(out, broker, label, data):
    """(b): raw non-MQTT bytes first; measures how long until the broker closes."""
    s = socket.create_connection((hc.HOST, broker.port), timeout=5)
    t0 = time.monotonic()
    s.sendall(data)
    r = hc.Reader(s)
    how = "timeout"
    try:
        pkt = r.read(12.0)
        how = f"answered {pkt.name}"
    except hc.Closed:
        how = "closed"
    except hc.Reset:
        how = "reset"
    except hc.Timeout:
        pass
    took = time.monotonic() - t0
    s.close()
    ok = how in ("closed", "reset") and took < 0.5
    out.check(ok, f"(b) {label}: {how} after {took * 1000:.0f}ms",
              f"(b) {label}: {how} after {took * 1000:.0f}ms (expected a close under 500ms)")


def sys_publish(out, broker, label, version, qos, sub):
    """(d): one $SYS/x publish followed by a marker from the same client."""
    tag = f"{label}-{time.monotonic_ns() % 10 ** 9}"
    sys_topic = f"$SYS/x/{tag}"
    marker = f"sysmark/{tag}"
    c = hc.Client.connect(broker.port, f"sys-pub-{label}", version)
    # The $SYS publish, the marker, a PINGREQ: the PINGRESP says the broker handled both
    # publishes; a close says it refused the first (then no marker is expected).
    c.send(hc.publish_packet(sys_topic, b"forged", qos, False, 1 if qos else 0, version)
           + hc.publish_packet(marker, b"mark", 0, False, 0, version) + hc.PINGREQ_BYTES)
    outcome = []
    marked = False
    try:
        while True:
            pkt = c.read(5.0)
            if pkt.type == hc.PUBACK:
                outcome.append(f"PUBACK 0x{hc.parse_ack(pkt)[1]:02x}")
            elif pkt.type == hc.DISCONNECT:
                outcome.append(f"DISCONNECT 0x{hc.parse_disconnect(pkt)[0]:02x}")
            elif pkt.type == hc.PINGRESP:
                marked = True
                break
    except (hc.Closed, hc.Reset, hc.Timeout, OSError) as err:
        outcome.append(f"connection ended ({type(err).__name__})")
    outcome = ", ".join(outcome)
    c.close()
    # The subscriber: the marker arrives after anything the same client published before
    # it; no marker (publisher closed) means waiting the full 2 s.
    got_sys = False
    deadline = time.monotonic() + (5.0 if marked else 2.0)
    saw_marker = False
    while time.monotonic() < deadline:
        try:
            pkt = sub.read(max(0.0, deadline - time.monotonic()))
        except hc.Timeout:
            break
        if pkt.type != hc.PUBLISH:
            continue
        topic = hc.parse_publish(pkt, hc.V311)[0]
        if topic == sys_topic:
            got_sys = True
        if topic == marker:
            saw_marker = True
            break
    if marked and not saw_marker:
        out.fail(f"(d) {label}: the marker after the $SYS publish never arrived")
    out.check(not got_sys, f"(d) {label}: $SYS/x publish not delivered ({outcome or 'accepted silently'})",
              f"(d) {label}: a client's publish to $SYS/x reached the $SYS/# subscriber")


def receive_maximum(out, broker):
    """(e): more QoS 2 PUBLISHes than the Receive Maximum, in one burst, then read."""
    # The smallest receive buffer the kernel allows (about 2 KiB): the server's answers
    # to the burst (1,024 PUBRECs) cannot all be in flight to us while we are still
    # sending, so its DISCONNECT is still in its send queue when it gives up on the
    # connection. Closing then, with the burst's rest unread, resets the connection and
    # the DISCONNECT is lost; a lingering close drains and discards our input until its
    # answers are read.
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    s.settimeout(10)
    s.connect((hc.HOST, broker.port))
    c = hc.Client(s, hc.V5, "proto-recvmax")
    s.sendall(hc.connect_packet("proto-recvmax", hc.V5))
    pkt = c.read(10)
    if pkt.type != hc.CONNACK or hc.parse_connack(pkt, hc.V5)[1] != 0:
        raise RuntimeError(f"(e) no CONNACK 0: {pkt!r}")
    rmax = hc.parse_connack(pkt, hc.V5)[2].get(hc.P_RECEIVE_MAXIMUM, 65535)
    count = rmax * 2
    burst = b"".join(hc.publish_packet("proto/qos2", b"p" * 32, 2, False, i + 1, hc.V5) for i in range(count))
    c.sock.settimeout(10)
    try:
        c.sock.sendall(burst)
    except OSError as err:
        out.figure(f"(e) burst send ended early: {err!r}")
    how, seen = hc.wait_for_end(c, 10.0)
    c.close()
    pubrecs = sum(1 for p in seen if p.type == hc.PUBREC)
    text = f"(e) Receive Maximum {rmax}, sent {count} QoS 2 PUBLISHes: {pubrecs} PUBRECs, then {how}"
    out.check(how == "disconnect:0x93+eof", text, text + " (expected disconnect:0x93 then an orderly EOF)")


def main():
    args = hc.parse_args(__doc__).parse_args()

    def body(out, args):
        with hc.Broker(args.broker, keep=args.keep) as broker:
            sampler = hc.RssSampler(broker)
            probe = hc.Probe(broker).start()
            violation(out, broker, "a", [(hc.P_RESPONSE_TOPIC, "a/#")])
            first_bytes(out, broker, "PROXY header", b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\n")
            first_bytes(out, broker, "HTTP GET", b"GET / HTTP/1.1\r\n\r\n")
            violation(out, broker, "c", [(hc.P_SUBSCRIPTION_ID, 7)])
            sub = hc.Client.connect(broker.port, "sys-sub", hc.V311)
            codes = sub.subscribe([("$SYS/#", 0), ("sysmark/#", 0)])
            if any(x >= 0x80 for x in codes):
                raise RuntimeError(f"$SYS/# subscriber refused: {codes.hex()}")
            sys_publish(out, broker, "v3-qos0", hc.V311, 0, sub)
            sys_publish(out, broker, "v5-qos1", hc.V5, 1, sub)
            sub.disconnect()
            receive_maximum(out, broker)
            hc.check_promises(out, broker, sampler, probe)

    hc.run("h09_protocol", body, args)


if __name__ == "__main__":
    main()
