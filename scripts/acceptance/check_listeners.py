#!/usr/bin/env python3
"""Listeners and the configuration file, against the release binary.

1. `--check-config` on a file with a tcp listener and a `proxy_protocol` one prints the
   effective settings (a flag on the command line wins over the file); a file with an
   unknown key, or a value of the wrong type, exits 1 naming file:line:column.
2. The broker runs on that file: paho-mqtt (3.1.1 and 5) connects, subscribes and publishes
   on the plain listener; raw sockets send a PROXY v1 and a v2 header, then CONNECT, on
   the proxy listener, and get CONNACK; a CONNECT without the header there is closed.
3. The broker's log names the address from each header (not 127.0.0.1) and the listener.
4. Two TLS listeners (certificates made with openssl): mosquitto_sub/mosquitto_pub with
   --cafile exchange a message on the one without client certificates; on the one that
   requires them, with --cert/--key they do, and without a certificate mosquitto_pub fails.
5. SIGHUP after the server certificate was renewed: a new TLS connection (openssl s_client)
   sees the new certificate, and a mosquitto_sub connected before still receives.
6. WebSocket: paho-mqtt (transport="websockets") over ws and wss, MQTT 3.1.1 and 5, a
   70 kB message each way; MQTT.js (Node, $RINGMQ_NODE_MODULES) over ws and wss; a wrong
   path is answered 404.

Exit status 0 when all holds. Usage:
  check_listeners.py --broker target/release/ringmq [--port FIRST_OF_SIX]
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

from check_durability import Failed, client, connect


def connect_packet(client_id):
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack(">H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body


def read_connack(sock):
    sock.settimeout(10)
    data = b""
    while len(data) < 4:
        try:
            chunk = sock.recv(4 - len(data))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def proxy_v2(ip, port, dst_port):
    sig = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])
    block = socket.inet_aton(ip) + socket.inet_aton("127.0.0.1") + struct.pack(">HH", port, dst_port)
    return sig + bytes([0x21, 0x11]) + struct.pack(">H", len(block)) + block


def free_ports(n):
    """n ports free now (the kernel's choice): a fixed range may hold another socket."""
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def make_pki(d):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate (v3)."""
    def run(*cmd):
        subprocess.run(cmd, check=True, capture_output=True, cwd=d, timeout=60)
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    with open(os.path.join(d, "client.ext"), "w") as f:
        f.write("extendedKeyUsage=clientAuth\n")
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=ringmq acceptance CA")
    for name in ("server", "client"):
        run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={'localhost' if name == 'server' else 'device-1'}")
        run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")


def check_tls(d, tls, tls_req):
    ca = ["--cafile", os.path.join(d, "ca.pem")]
    cert = ["--cert", os.path.join(d, "client.pem"), "--key", os.path.join(d, "client.key")]
    for port, extra, name in [(tls, [], "tls"), (tls_req, cert, "tls with a required client certificate")]:
        sub = subprocess.Popen(["mosquitto_sub", "-h", "localhost", "-p", str(port), "-t", "tls/#", "-C", "1",
                                "-q", "1", "-v", "-W", "20", "-i", f"tls-sub-{port}"] + ca + extra,
                               stdout=subprocess.PIPE, text=True)
        # Publish until the subscriber (connecting meanwhile) has it.
        deadline = time.monotonic() + 20
        while sub.poll() is None and time.monotonic() < deadline:
            r = subprocess.run(["mosquitto_pub", "-h", "localhost", "-p", str(port), "-t", "tls/x", "-m",
                                "over-tls", "-q", "1"] + ca + extra, capture_output=True, text=True, timeout=20)
            if r.returncode != 0:
                raise Failed(f"{name}: mosquitto_pub failed: {r.stderr}")
            time.sleep(0.2)
        out, _ = sub.communicate(timeout=20)
        if out.strip() != "tls/x over-tls":
            raise Failed(f"{name}: mosquitto_sub got {out!r}")
    r = subprocess.run(["mosquitto_pub", "-h", "localhost", "-p", str(tls_req), "-t", "tls/x", "-m", "no-cert",
                        "-q", "1"] + ca, capture_output=True, text=True, timeout=20)
    if r.returncode == 0:
        raise Failed("a client without a certificate was accepted where one is required")
    print("PASS tls: mosquitto_pub/sub over TLS (--cafile; --cert/--key where required), "
          "a client without a certificate refused where one is required")


def wait_log(log_path, text, count=1, timeout=20):
    deadline = time.monotonic() + timeout
    while open(log_path).read().count(text) < count:
        if time.monotonic() > deadline:
            raise Failed(f"the log never said {text!r} ({count}x)")
        time.sleep(0.05)


def served_subject(port):
    hello = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost"],
                           input="", capture_output=True, text=True, timeout=20)
    cert = subprocess.run(["openssl", "x509", "-noout", "-subject"], input=hello.stdout, capture_output=True,
                          text=True, timeout=20)
    return cert.stdout.strip()


def check_reload(d, proc, log_path, tls):
    ca = ["--cafile", os.path.join(d, "ca.pem")]
    if "localhost" not in served_subject(tls):
        raise Failed(f"before the reload the server certificate is {served_subject(tls)!r}")
    sub = subprocess.Popen(["mosquitto_sub", "-h", "localhost", "-p", str(tls), "-t", "reload/#", "-C", "1", "-q",
                            "1", "-v", "-W", "30", "-i", "reload-sub"] + ca, stdout=subprocess.PIPE, text=True)
    wait_log(log_path, "client_id=reload-sub")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
                    "server.csr", "-subj", "/CN=renewed"], check=True, capture_output=True, cwd=d, timeout=60)
    subprocess.run(["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                    "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext"],
                   check=True, capture_output=True, cwd=d, timeout=60)
    proc.send_signal(signal.SIGHUP)
    wait_log(log_path, "TLS certificate reloaded", count=3)
    subject = served_subject(tls)
    if "renewed" not in subject:
        raise Failed(f"after SIGHUP a new connection sees {subject!r}, not the renewed certificate")
    r = subprocess.run(["mosquitto_pub", "-h", "localhost", "-p", str(tls), "-t", "reload/x", "-m", "after",
                        "-q", "1"] + ca, capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise Failed(f"mosquitto_pub after the reload failed: {r.stderr}")
    out, _ = sub.communicate(timeout=30)
    if out.strip() != "reload/x after":
        raise Failed(f"the connection made before the reload got {out!r}")
    print("PASS tls-reload: after SIGHUP a new connection sees the new certificate; one made before still receives")


def paho_ws(port, tls_ca, version, name):
    def mk(cid):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, transport="websockets", protocol=version)
        c.ws_set_options(path="/mqtt")
        if tls_ca:
            c.tls_set(ca_certs=tls_ca)
        return c
    got = []
    cond = __import__("threading").Condition()
    payload = bytes(range(256)) * 280

    def on_message(c, u, m):
        with cond:
            got.append(bytes(m.payload))
            cond.notify_all()

    acked = []

    def on_subscribe(c, u, mid, reasons, props):
        with cond:
            acked.append(mid)
            cond.notify_all()

    sub = mk(f"ws-sub-{name}")
    sub.on_message = on_message
    sub.on_subscribe = on_subscribe
    sub.connect("localhost", port)
    sub.loop_start()
    _, mid = sub.subscribe("ws/#", qos=1)
    with cond:
        if not cond.wait_for(lambda: mid in acked, 20):
            raise Failed(f"paho {name}: no SUBACK over WebSocket")
    pub = mk(f"ws-pub-{name}")
    pub.connect("localhost", port)
    pub.loop_start()
    pub.publish("ws/a", payload, qos=1).wait_for_publish(20)
    with cond:
        if not cond.wait_for(lambda: payload in got, 20):
            raise Failed(f"paho {name}: the 70 kB message did not arrive over WebSocket")
    for c in (sub, pub):
        c.disconnect()
        c.loop_stop()


MQTTJS = """
const mqtt = require(process.env.RINGMQ_NODE_MODULES + '/mqtt');
const [url, version] = process.argv.slice(1);
const c = mqtt.connect(url, { protocolVersion: Number(version), rejectUnauthorized: false, reconnectPeriod: 0 });
const t = setTimeout(() => { console.log('timeout'); process.exit(1); }, 15000);
c.on('connect', () => c.subscribe('js/#', { qos: 1 }, () => c.publish('js/a', 'round trip', { qos: 1 })));
c.on('message', (topic, msg) => { console.log(topic + ' ' + msg); clearTimeout(t); c.end(); });
c.on('error', (e) => { console.log('error ' + e.message); process.exit(1); });
"""


def check_ws(d, ws, wss):
    ca = os.path.join(d, "ca.pem")
    for port, tls_ca, kind in [(ws, None, "ws"), (wss, ca, "wss")]:
        for version, v in [(mqtt.MQTTv311, "3.1.1"), (mqtt.MQTTv5, "5")]:
            paho_ws(port, tls_ca, version, f"{kind}-{v}")
    print("PASS websocket-paho: paho-mqtt over ws and wss, MQTT 3.1.1 and 5, a 70 kB message delivered")
    modules = os.environ.get("RINGMQ_NODE_MODULES", "")
    if not os.path.exists(os.path.join(modules, "mqtt", "package.json")):
        raise Failed("MQTT.js is not installed (RINGMQ_NODE_MODULES); run through scripts/acceptance.sh")
    for url, version in [(f"ws://127.0.0.1:{ws}/mqtt", "4"), (f"ws://127.0.0.1:{ws}/mqtt", "5"),
                         (f"wss://localhost:{wss}/mqtt", "4")]:
        r = subprocess.run(["node", "-e", MQTTJS, url, version], capture_output=True, text=True, timeout=30)
        if r.stdout.strip() != "js/a round trip":
            raise Failed(f"MQTT.js {url} v{version}: {r.stdout.strip()} {r.stderr.strip()}")
    print("PASS websocket-mqttjs: MQTT.js from Node over ws (3.1.1, 5) and wss")
    s = socket.create_connection(("127.0.0.1", ws))
    s.sendall(b"GET /not-mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    status = s.recv(64).split(b"\r\n")[0]
    if status != b"HTTP/1.1 404 Not Found":
        raise Failed(f"a wrong WebSocket path got {status!r}")
    print("PASS websocket-path: a wrong path is answered 404")


def check_config(args, path, plain, proxied):
    out = subprocess.run([args.broker, "--config", path, "--check-config", "--max-inflight", "7"],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise Failed(f"--check-config failed: {out.stderr}")
    for want in ["max_inflight = 7  # command line", "max_queued_messages = 2000  # file",
                 f'bind = "127.0.0.1:{plain}"  # file', "[[listeners]]", f'bind = "127.0.0.1:{proxied}"',
                 "proxy_protocol = true"]:
        if want not in out.stdout:
            raise Failed(f"--check-config output lacks {want!r}:\n{out.stdout}")
    print("PASS check-config: effective settings printed, the command line wins over the file")
    d = tempfile.mkdtemp(prefix="ringmq-badconf-")
    for text, where, what in [("max_inflight = 10\n  no_such_key = 1\n", ":2:3:", "unknown key"),
                              ('max_inflight = "ten"\n', ":1:16:", "must be an integer"),
                              ('[[listeners]]\nkind = "tcp"\nbind = "127.0.0.1:1"\nproxy = 1\n', ":4:1:",
                               "unknown listener key")]:
        bad = os.path.join(d, "bad.toml")
        with open(bad, "w") as f:
            f.write(text)
        r = subprocess.run([args.broker, "--config", bad, "--check-config"], capture_output=True, text=True,
                           timeout=30)
        if r.returncode != 1 or f"{bad}{where}" not in r.stderr or what not in r.stderr:
            raise Failed(f"bad file {text!r}: exit {r.returncode}, stderr {r.stderr!r}")
    print("PASS config-errors: unknown key, wrong type and unknown listener key exit 1 at file:line:column")


def run(args):
    plain, proxied, tls, tls_req, ws, wss = free_ports(6) if args.port == 0 else (args.port + i for i in range(6))
    d = tempfile.mkdtemp(prefix="ringmq-listeners-")
    make_pki(d)
    path = os.path.join(d, "ringmq.toml")
    with open(path, "w") as f:
        f.write(f'bind = "127.0.0.1:{plain}"\nmax_queued_messages = 2000\ncores = 2\nin_memory = true\n\n'
                f'[[listeners]]\nkind = "tcp"\nbind = "127.0.0.1:{proxied}"\nproxy_protocol = true\n'
                "max_connections = 100\n\n"
                f'[[listeners]]\nkind = "tls"\nbind = "127.0.0.1:{tls}"\ncert = "{d}/server.pem"\n'
                f'key = "{d}/server.key"\n\n'
                f'[[listeners]]\nkind = "tls"\nbind = "127.0.0.1:{tls_req}"\ncert = "{d}/server.pem"\n'
                f'key = "{d}/server.key"\nca = "{d}/ca.pem"\nrequire_client_cert = true\n\n'
                f'[[listeners]]\nkind = "ws"\nbind = "127.0.0.1:{ws}"\n\n'
                f'[[listeners]]\nkind = "wss"\nbind = "127.0.0.1:{wss}"\ncert = "{d}/server.pem"\n'
                f'key = "{d}/server.key"\n')
    check_config(args, path, plain, proxied)

    log_path = os.path.join(d, "broker.log")
    log = open(log_path, "w")
    proc = subprocess.Popen([args.broker, "--config", path], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", proxied), timeout=0.2).close()
                socket.create_connection(("127.0.0.1", plain), timeout=0.2).close()
                socket.create_connection(("127.0.0.1", wss), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise Failed("broker did not listen on every listener: " + open(log_path).read()[-600:])
                time.sleep(0.05)

        for version, name in [(mqtt.MQTTv311, "3.1.1"), (mqtt.MQTTv5, "5")]:
            sub, sw = client(f"lst-sub-{name}", version)
            connect(sub, sw, plain, version)
            _, mid = sub.subscribe("listeners/t", qos=1)
            if not sw.wait(lambda: mid in sw.subacks):
                raise Failed(f"paho {name}: no SUBACK")
            pub, pw = client(f"lst-pub-{name}", version)
            connect(pub, pw, plain, version)
            info = pub.publish("listeners/t", b"hello", qos=1)
            if not sw.wait(lambda: any(m[1] == b"hello" for m in sw.messages)):
                raise Failed(f"paho {name}: message not delivered")
            info.wait_for_publish(10)
            for c in (sub, pub):
                c.disconnect()
                c.loop_stop()
        print("PASS plain-listener: paho 3.1.1 and 5 subscribe, publish and receive")

        v1 = socket.create_connection(("127.0.0.1", proxied))
        v1.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 1883\r\n" + connect_packet("proxied-v1"))
        v2 = socket.create_connection(("127.0.0.1", proxied))
        v2.sendall(proxy_v2("198.51.100.9", 40000, proxied) + connect_packet("proxied-v2"))
        for s, name in [(v1, "v1"), (v2, "v2")]:
            if read_connack(s) != b"\x20\x02\x00\x00":
                raise Failed(f"PROXY {name}: no CONNACK")
        bare = socket.create_connection(("127.0.0.1", proxied))
        bare.sendall(connect_packet("no-header"))
        if read_connack(bare) is not None:
            raise Failed("a CONNECT without a PROXY header was accepted on the proxy listener")
        print("PASS proxy-listener: v1 and v2 headers accepted, a bare CONNECT closed")

        # One log line per client naming the header's address and the listener (any order).
        want = [[f"peer=192.0.2.7:56324", f"listener=tcp:127.0.0.1:{proxied}", "client_id=proxied-v1"],
                [f"peer=198.51.100.9:40000", f"listener=tcp:127.0.0.1:{proxied}", "client_id=proxied-v2"]]
        deadline = time.monotonic() + 10
        while True:
            lines = open(log_path).read().splitlines()
            if all(any(all(t in line for t in tokens) for line in lines) for tokens in want):
                break
            if time.monotonic() > deadline:
                raise Failed(f"the log does not name the header's addresses: wanted {want}")
            time.sleep(0.05)
        print("PASS proxy-address: the log names the client address from each header and the listener")
        check_tls(d, tls, tls_req)
        check_ws(d, ws, wss)
        check_reload(d, proc, log_path, tls)
        for s in (v1, v2, bare):
            s.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default="target/release/ringmq")
    p.add_argument("--port", type=int, default=0, help="first of six consecutive ports (default: free ones)")
    args = p.parse_args()
    try:
        run(args)
    except Failed as e:
        print(f"FAIL check_listeners: {e}")
        return 1
    print("PASS check_listeners")
    return 0


if __name__ == "__main__":
    sys.exit(main())
