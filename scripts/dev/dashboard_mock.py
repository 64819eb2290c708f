#!/usr/bin/env python3
"""A stand-in for ringmq's HTTP endpoint, for working on src/http/dashboard.html without a
broker: serves the page at / (read from disk on every request, so an edit shows on reload)
and fake JSON shaped like the /api/v1 contract (stats, clients, retained), with counters
that grow over time, a client list where DELETE removes (or, for a persistent session,
disconnects) the client (which "reconnects" 15 s later, so a test can run again), and retained messages that DELETE removes. Client ids and topics
include hostile strings (markup, URL metacharacters, non-ASCII) to check the page's escaping.

    scripts/dev/dashboard_mock.py [--port 18083] [--token SECRET [--writes-only]] [--csp] [--page PATH]

--token makes every /api call need `Authorization: Bearer SECRET` (to try the token box);
with --writes-only only DELETE and POST do, as on the broker's loopback bind. --csp serves
the page with a strict Content-Security-Policy (its inline <script> and <style> by hash).
Not a test of the broker: scripts/acceptance/dashboard.sh --mock-url http://127.0.0.1:PORT/
runs the headless-browser flow against it.
"""

import argparse
import base64
import hashlib
import json
import math
import os
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCK = threading.Lock()
START = time.monotonic()
CORES = 4


def topic_matches(flt, topic):
    f, t = flt.split('/'), topic.split('/')
    if t[0].startswith('$') and f[0] in ('#', '+'):
        return False
    for i, part in enumerate(f):
        if part == '#':
            return True
        if i >= len(t) or (part != '+' and part != t[i]):
            return False
    return len(f) == len(t)


def valid_filter(flt):
    parts = flt.split('/')
    return flt != '' and all(
        (p in ('#', '+') or ('#' not in p and '+' not in p)) and (p != '#' or i == len(parts) - 1)
        for i, p in enumerate(parts))


def make_client(cid, connected=True, proto='5.0', expiry=0, username=None, core=0):
    return {"client_id": cid, "username": username, "connected": connected,
            "address": f"127.0.0.1:{random.randint(30000, 60000)}" if connected else None,
            "listener": "tcp:127.0.0.1:1883" if connected else None,
            "protocol": proto if connected else None, "core": core,
            "subscriptions": random.randint(0, 3), "inflight": 0, "queued": 0 if connected else random.randint(0, 40),
            "_expiry": expiry}


CLIENTS = {}
RECONNECT_AFTER = 15.0  # seconds after which a kicked client is back (as one that reconnects)
KICKED = {}  # client id -> (time kicked, its entry)
for i in range(120):
    c = make_client(f"lt-4242-p{i}", core=i % CORES)
    CLIENTS[c["client_id"]] = c
for cid, kw in [("dash-victim", {}), ("dash-other", {"proto": "3.1.1"}),
                ("sensor/7 ?&#=%2F+", {"username": "<b>bold</b>"}),
                ('<img src=x onerror="document.body.dataset.pwned=1">', {"core": 1}),
                ("ünïcødé-☃", {"core": 2}), ("parked-offline", {"connected": False, "expiry": 3600})]:
    CLIENTS[cid] = make_client(cid, **kw)


def retained_entry(topic, payload, qos=0):
    text = None
    try:
        text = payload.decode('utf-8')
    except UnicodeDecodeError:
        pass
    return {"topic": topic, "qos": qos, "payload": base64.b64encode(payload).decode(),
            "payload_size": len(payload), "payload_text": text}


RETAINED = {}
for i in range(70):
    RETAINED[f"sensors/{i:03d}/temp"] = retained_entry(f"sensors/{i:03d}/temp", f"{20 + i % 7}.{i % 10}".encode(), i % 3)
for topic, payload in [("status/broker", b'{"online": true}'), ("bin/blob", bytes(range(256)) * 4),
                       ("ctl/chars", bytes(range(32)) + b"\x7f end"),
                       ("<script>document.body.dataset.pwned=2</script>/x", b"<i>not markup</i>"),
                       ("long/text", ("lorem ipsum " * 80).encode()), ("empty", b"")]:
    RETAINED[topic] = retained_entry(topic, payload, 1)


def counters():
    t = time.monotonic() - START
    received = int(1200 * t + 300 * math.sin(t / 7) + 300)
    return {"received": received, "sent": int(received * 0.97), "dropped": int(max(0, t - 20) * 3)}


def stats():
    t = time.monotonic() - START
    with LOCK:
        connected = sum(c["connected"] for c in CLIENTS.values())
        offline = len(CLIENTS) - connected
    msgs = counters()
    cores = []
    for i in range(CORES):
        cores.append({"core": i, "connections": connected // CORES, "busy_ratio": round(
            min(1.0, max(0.0, 0.35 + 0.25 * math.sin(t / 9 + i) + random.uniform(-0.05, 0.05))), 3),
            "tasks_run": int(t * 5000), "messages_received": msgs["received"] // CORES,
            "messages_sent": msgs["sent"] // CORES})
    return {"uptime_seconds": int(t), "connections": connected,
            "sessions": {"connected": connected, "offline": offline},
            "subscriptions": {"total": 2 * connected, "shared": 2}, "messages": msgs,
            "bytes": {"received": msgs["received"] * 80, "sent": msgs["sent"] * 80},
            "retained": {"count": len(RETAINED), "bytes": sum(r["payload_size"] for r in RETAINED.values())},
            "queued": {"messages": 40, "bytes": 4000}, "inflight": 7, "cores": cores}


def csp_for(html):
    """A strict Content-Security-Policy for the page: its inline <script> and <style> by hash."""
    def hashes(tag):
        return " ".join("'sha256-%s'" % base64.b64encode(hashlib.sha256(m).digest()).decode()
                        for m in re.findall(rb"^<%s>(.*?)</%s>" % (tag, tag), html, re.S | re.M))
    return (f"default-src 'none'; script-src {hashes(b'script')}; style-src {hashes(b'style')}; "
            "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class Handler(BaseHTTPRequestHandler):
    token = None
    writes_only = False
    csp = False
    page = None

    def log_message(self, fmt, *args):
        if os.environ.get("MOCK_LOG"):
            super().log_message(fmt, *args)

    def send(self, status, obj=None, ctype="application/json", extra=()):
        body = b"" if obj is None else obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(status)
        for k, v in extra:
            self.send_header(k, v)
        if status != 204:
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if status != 204:
            self.wfile.write(body)

    def error(self, status, code, message, extra=()):
        self.send(status, {"error": code, "message": message}, extra=extra)

    def paged(self, items, q):
        try:
            page = int(q.get("page", ["1"])[0])
            limit = int(q.get("limit", ["50"])[0])
        except ValueError:
            return self.error(400, "bad_request", "page and limit are numbers")
        if page < 1 or not 1 <= limit <= 1000:
            return self.error(400, "bad_request", "page >= 1, limit 1..1000")
        chunk = items[(page - 1) * limit:page * limit]
        self.send(200, {"data": chunk, "meta": {"page": page, "limit": limit, "count": len(items),
                                                 "hasnext": page * limit < len(items)}})

    def route(self, method):
        url = urlsplit(self.path)
        path, q = url.path, parse_qs(url.query, keep_blank_values=True)
        if path == "/" and method == "GET":
            with open(self.page, "rb") as f:
                html = f.read()
            extra = [("Content-Security-Policy", csp_for(html))] if self.csp else []
            return self.send(200, html, "text/html; charset=utf-8", extra=extra)
        if path == "/healthz":
            return self.send(200, {"status": "ok"})
        if not path.startswith("/api/"):
            return self.error(404, "not_found", "no such route")
        if (self.token and (method != "GET" or not self.writes_only)
                and self.headers.get("Authorization") != "Bearer " + self.token):
            return self.error(401, "unauthorized", "a bearer token is needed",
                              extra=[("WWW-Authenticate", "Bearer")])
        if path == "/api/v1/stats" and method == "GET":
            return self.send(200, stats())
        if path == "/api/v1/clients" and method == "GET":
            prefix = q.get("prefix", [""])[0]
            with LOCK:
                for cid, (at, c) in list(KICKED.items()):
                    if time.monotonic() - at > RECONNECT_AFTER and cid not in CLIENTS:
                        CLIENTS[cid] = dict(c, connected=True, address=f"127.0.0.1:{random.randint(30000, 60000)}")
                        del KICKED[cid]
                items = [{k: v for k, v in c.items() if not k.startswith("_")}
                         for cid, c in sorted(CLIENTS.items()) if cid.startswith(prefix)]
            return self.paged(items, q)
        if path.startswith("/api/v1/clients/"):
            cid = unquote(path[len("/api/v1/clients/"):])
            with LOCK:
                c = CLIENTS.get(cid)
                if c is None:
                    return self.error(404, "not_found", "no such client")
                if method == "GET":
                    return self.send(200, {k: v for k, v in c.items() if not k.startswith("_")})
                if method == "DELETE":
                    if c["_expiry"] and q.get("session", [""])[0] != "discard":
                        c.update(connected=False, address=None, listener=None, protocol=None)
                    else:
                        KICKED[cid] = (time.monotonic(), CLIENTS.pop(cid))
                    return self.send(204)
            return self.error(405, "method_not_allowed", "GET or DELETE")
        if path == "/api/v1/retained" and method == "GET":
            flt = q.get("filter", ["#"])[0] or "#"
            if not valid_filter(flt):
                return self.error(400, "bad_request", "not a valid topic filter")
            with LOCK:
                items = [r for t, r in sorted(RETAINED.items()) if topic_matches(flt, t)]
            return self.paged(items, q)
        if path.startswith("/api/v1/retained/"):
            topic = unquote(path[len("/api/v1/retained/"):])
            if method != "DELETE":
                return self.error(405, "method_not_allowed", "DELETE")
            with LOCK:
                if RETAINED.pop(topic, None) is None:
                    return self.error(404, "not_found", "no retained message on this topic")
            return self.send(204)
        return self.error(404, "not_found", "no such route")

    def do_GET(self):
        self.route("GET")

    def do_DELETE(self):
        self.route("DELETE")

    def do_POST(self):
        self.route("POST")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18083)
    ap.add_argument("--token", help="require this bearer token on /api calls")
    ap.add_argument("--writes-only", action="store_true",
                    help="--token only for DELETE/POST (as the broker on a loopback bind)")
    ap.add_argument("--csp", action="store_true",
                    help="serve the page with a strict Content-Security-Policy (inline code by hash)")
    ap.add_argument("--page", default=os.path.join(ROOT, "src/http/dashboard.html"))
    args = ap.parse_args()
    Handler.token, Handler.writes_only, Handler.csp, Handler.page = args.token, args.writes_only, args.csp, args.page
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"dashboard mock on http://{args.host}:{server.server_address[1]}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
