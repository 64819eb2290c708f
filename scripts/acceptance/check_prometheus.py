#!/usr/bin/env python3
"""Prometheus scrapes ringmq's /metrics, and the rate it computes is the rate a load tool
measured. Called by scripts/acceptance/prometheus.sh once the broker (--http-bind) and
a Prometheus scraping it every second (job "ringmq") are started:

1. The broker's /metrics answers 200 in the Prometheus text format.
2. Prometheus has the target up: `up{job="ringmq"}` is 1.
3. `ringmq-loadtest p2p` runs (QoS 1, --clients pairs at --rate msg/s each, --duration s).
   While its load is in its steady middle (--window, seconds after the tool started),
   `sum(rate(ringmq_messages_sent_total[10s]))` is asked of Prometheus's HTTP API
   --samples times; `up` stays 1 and the series ringmq_messages_sent_total,
   ringmq_messages_received_total and ringmq_connections exist (the connections gauge
   counting at least the tool's 2 x pairs).
4. The median of those rates is within --tolerance of the tool's own delivery rate
   (`receive_rate_per_s` of its --json: deliveries during the load phase / the load
   phase's length, set-up and drain excluded). Each sample's 10 s range must lie inside
   the load phase (checked against the tool's `setup_s` and `load_s`).

Standard library only. Prints PASS/FAIL lines; exit status 0 when all hold.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

RATE_QUERY = "sum(rate(ringmq_messages_sent_total[10s]))"
RATE_RANGE_S = 10.0
SERIES = ("ringmq_messages_sent_total", "ringmq_messages_received_total", "ringmq_connections")

FAILED = []


def report(name, ok, text):
    print(f"{'PASS' if ok else 'FAIL'} {name}: {text}", flush=True)
    if not ok:
        FAILED.append(name)
    return ok


def http_get(url, timeout=2.0):
    """(status, body text); status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def poll(fn, timeout, interval=0.2):
    """Calls fn until it returns something truthy or `timeout` seconds pass; returns the
    last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def query(prom, expr):
    """The result vector of an instant query, as [(labels, float)]; None on any error."""
    status, body = http_get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    if status != 200:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if doc.get("status") != "success" or doc["data"]["resultType"] != "vector":
        return None
    return [(r["metric"], float(r["value"][1])) for r in doc["data"]["result"]]


def scalar(prom, expr):
    """The single value of an instant query, or None (no result, or an error)."""
    result = query(prom, expr)
    return result[0][1] if result and len(result) == 1 else None


def target_error(prom, job):
    status, body = http_get(f"{prom}/api/v1/targets")
    if status != 200:
        return f"/api/v1/targets answered {status}"
    try:
        for t in json.loads(body)["data"]["activeTargets"]:
            if t.get("labels", {}).get("job") == job:
                return f"health {t.get('health')}, last error {t.get('lastError')!r}, url {t.get('scrapeUrl')}"
    except (ValueError, KeyError):
        pass
    return f"no active target of job {job}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metrics-url", required=True, help="the broker's /metrics URL")
    ap.add_argument("--prom-url", required=True, help="Prometheus base URL (http://127.0.0.1:PORT)")
    ap.add_argument("--job", default="ringmq")
    ap.add_argument("--loadtest", required=True, help="ringmq-loadtest binary")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True, help="the broker's MQTT port")
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--rate", type=int, default=500, help="msg/s per publisher")
    ap.add_argument("--duration", type=int, default=40)
    ap.add_argument("--window", type=float, nargs=2, default=(15.0, 35.0), metavar=("FROM", "TO"))
    ap.add_argument("--samples", type=int, default=11)
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--json", required=True, help="where the load tool writes its --json")
    ap.add_argument("--out", help="where the load tool's summary table goes (default: beside --json)")
    ap.add_argument("--broker-pid", type=int, help="stop waiting for /metrics once this process is gone")
    ap.add_argument("--pid-file", help="the load tool's pid is written here (for the caller's cleanup)")
    args = ap.parse_args()
    if not (RATE_RANGE_S <= args.window[0] < args.window[1] <= args.duration) or args.samples < 2:
        ap.error("need 10 <= window FROM < TO <= --duration and --samples >= 2")
    # A TERM (timeout, the caller's trap) unwinds through the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    # 1. The endpoint itself.
    def broker_gone():
        if args.broker_pid is None:
            return False
        try:
            os.kill(args.broker_pid, 0)
            return False
        except ProcessLookupError:
            return True

    def metrics():
        answer = http_get(args.metrics_url)
        return answer if answer[0] == 200 or broker_gone() else None

    status, body = poll(metrics, 20) or http_get(args.metrics_url)
    if status == 200:
        text = f"{len(body.splitlines())} lines" + ("" if "ringmq_" in body else ", no ringmq_ series")
    else:
        text = body.strip()[:200] + (" (the broker exited)" if broker_gone() else "")
    if not report("metrics-endpoint", status == 200 and "ringmq_" in body,
                  f"GET {args.metrics_url} -> {status}: {text}"):
        return 1

    # 2. Prometheus up and scraping.
    ready = poll(lambda: http_get(f"{args.prom_url}/-/ready")[0] == 200, 60)
    if not report("prometheus-ready", ready, f"{args.prom_url}/-/ready"):
        return 1
    up_expr = f'up{{job="{args.job}"}}'
    up = poll(lambda: scalar(args.prom_url, up_expr) == 1.0, 30)
    if not report("prometheus-target-up", up,
                  f"{up_expr} == 1" if up else f"{up_expr} is {scalar(args.prom_url, up_expr)}; "
                  + target_error(args.prom_url, args.job)):
        return 1

    # 3. The load, and Prometheus asked during its steady middle.
    out_path = args.out or os.path.splitext(args.json)[0] + ".txt"
    cmd = [args.loadtest, "p2p", "--host", args.host, "--port", str(args.port),
           "--clients", str(args.pairs), "--qos", "1", "--rate", str(args.rate),
           "--duration", str(args.duration), "--drain-timeout", "10",
           "--quiet", "--json", args.json]
    print("# load: " + " ".join(cmd), flush=True)
    rates, ups, series_seen, conns_seen, times = [], [], {}, [], []
    with open(out_path, "w") as out:
        t0 = time.monotonic()
        lt = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    if args.pid_file:
        with open(args.pid_file, "w") as f:
            f.write(f"{lt.pid}\n")
    try:
        step = (args.window[1] - args.window[0]) / (args.samples - 1)
        for i in range(args.samples):
            wait = t0 + args.window[0] + i * step - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if lt.poll() is not None:
                break
            t = time.monotonic() - t0
            value = scalar(args.prom_url, RATE_QUERY)
            times.append(t)
            rates.append(value)
            ups.append(scalar(args.prom_url, up_expr))
            if i == args.samples // 2:
                for name in SERIES:
                    series_seen[name] = len(query(args.prom_url, name) or [])
                conns_seen.append(scalar(args.prom_url, "sum(ringmq_connections)"))
            print(f"#   t={t:5.1f} s  {RATE_QUERY} = {value}", flush=True)
        try:
            rc = lt.wait(timeout=args.duration + 120)
        except subprocess.TimeoutExpired:
            rc = None
    finally:
        if lt.poll() is None:
            lt.kill()
            lt.wait()
        if args.pid_file and os.path.exists(args.pid_file):
            os.remove(args.pid_file)  # reaped: the pid may be reused

    if not report("loadtest", rc == 0, f"exit status {rc}" + ("" if rc is not None else " (killed: no end)")):
        print(open(out_path).read(), end="")
        return 1
    with open(args.json) as f:
        res = json.load(f)
    lt_rate = res["receive_rate_per_s"]
    ok = res["connected"] == 2 * args.pairs and res["setup_complete"] and res["lost"] == 0
    report("loadtest-clean", ok,
           f"{res['connected']}/{2 * args.pairs} connected in {res['setup_s']:.2f} s, sent {res['sent']}, "
           f"received {res['received']} ({res['received_during_load']} in {res['load_s']:.2f} s of load"
           f" = {lt_rate:.1f} msg/s), lost {res['lost']}, duplicates {res['duplicates']}")

    # 4. The comparison.
    got = [r for r in rates if r is not None]
    report("prometheus-up-during-load", len(ups) == args.samples and all(u == 1.0 for u in ups),
           f"{up_expr} at {len(ups)}/{args.samples} samples: {sorted(set(ups), key=str)}")
    missing = [name for name in SERIES if not series_seen.get(name)]
    report("series-present", not missing,
           ", ".join(f"{name}: {series_seen.get(name, 0)} series" for name in SERIES))
    conns = conns_seen[0] if conns_seen else None
    report("connections-gauge", conns is not None and conns >= 2 * args.pairs,
           f"sum(ringmq_connections) = {conns} during the load (the tool holds {2 * args.pairs})")
    lo, hi = res["setup_s"] + RATE_RANGE_S, res["setup_s"] + res["load_s"]
    inside = [lo <= t <= hi for t in times]
    report("sample-window", times and all(inside),
           f"samples at {times[0] if times else 0:.1f}..{times[-1] if times else 0:.1f} s; "
           f"a 10 s rate inside the load needs {lo:.1f}..{hi:.1f} s")
    if len(got) < max(3, args.samples // 2):
        report("rate-match", False, f"only {len(got)} of {args.samples} rate samples answered: {rates}")
    else:
        median = statistics.median(got)
        err = abs(median - lt_rate) / lt_rate if lt_rate > 0 else float("inf")
        report("rate-match", err <= args.tolerance,
               f"Prometheus median {median:.1f} msg/s (of {len(got)}: {min(got):.1f}..{max(got):.1f}) "
               f"vs load tool {lt_rate:.1f} msg/s: {100 * err:.2f}% apart (limit {100 * args.tolerance:g}%)")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
