#!/usr/bin/env python3
"""Render BENCHMARKS.md and an SVG bar chart from a scripts/bench.sh results directory.

report.py RESULTS_DIR REPORT.md CHART.svg

Reads RESULTS_DIR/{runs.tsv,brokers.tsv,params.env,limits.txt,mosquitto.conf,rumqttd.toml}
and the per-run JSON files written by `ringmq-loadtest --json`. Standard library only.
"""
import datetime
import html
import json
import math
import os
import platform
import re
import subprocess
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import summary  # noqa: E402

RES, REPORT, SVG = sys.argv[1:4]
ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
COLORS = {"ringmq": "#d9480f", "ringmq-1core": "#f59f00", "mosquitto": "#1c7ed6", "rumqttd": "#2b8a3e"}
FAMILY = {
    "fanin": "fan-in: 100 publishers → 1 subscriber (`lt/fanin/+`)",
    "fanout": "fan-out: 1 publisher → 500 subscribers",
    "p2p": "point-to-point: {n} publisher/subscriber pairs",
    "sharedsub": "shared subscription: {n} publishers → 1 group of 3 members (`$share/lt/lt/shared/+`)",
}


def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


params = dict(l.split("=", 1) for l in read(os.path.join(RES, "params.env")).splitlines() if "=" in l)
MODE = params.get("MODE", "full")
brokers = []  # (name, port, cmd, version)
for l in read(os.path.join(RES, "brokers.tsv")).splitlines():
    name, port, cmd, ver = (l.split("\t") + ["", "", "", ""])[:4]
    brokers.append((name, port, cmd, ver))
# The throughput matrix's brokers; the overload rows add brokers at their defaults.
BROKERS = [b[0] for b in brokers if not b[0].endswith("-default")]
OL_ORDER = ["ringmq-default", "ringmq", "mosquitto-default", "mosquitto", "rumqttd"]
OL_BROKERS = sorted((b[0] for b in brokers), key=lambda b: OL_ORDER.index(b) if b in OL_ORDER else 99)

runs = {}  # (id, broker) -> list of dicts
order = []  # scenario ids in run order
for l in read(os.path.join(RES, "runs.tsv")).splitlines():
    sid, broker, rnd, path, status, cmd = (l.split("\t") + [""] * 6)[:6]
    if sid not in order:
        order.append(sid)
    r = summary.load(path)
    runs.setdefault((sid, broker), []).append(
        {"round": int(rnd), "json": r, "status": status, "cmd": cmd, "path": path})


def tidy(cmd):
    """Make a command line readable: paths relative, per-run values as variables."""
    cmd = cmd.replace(ROOT + "/", "")
    cmd = cmd.replace(os.path.relpath(RES, ROOT), "$RESULTS") if RES.startswith(ROOT) else cmd.replace(RES, "$RESULTS")
    cmd = re.sub(r"--json \S+", "--json $RESULTS/json/….json", cmd)
    cmd = re.sub(r"--broker-pid \d+", "--broker-pid $BROKER_PID", cmd)
    cmd = re.sub(r" -p \d+", " -p $PORT", cmd)
    return cmd


def rate(r):
    return summary.during_load_rate(r) if r else 0.0


def fmt_rate(x):
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.0f}"


def fmt_ms(x):
    if x is None:
        return "–"
    if x >= 1000:
        return f"{x / 1000:.2f} s"
    if x >= 10:
        return f"{x:.0f}"
    return f"{x:.2f}"


def ratio(a, b):
    if not a or not b:
        return "–"
    return f"{a / b:.2f}×"


def best(sid, broker):
    """The round with the most deliveries during load, and the other rounds' rates."""
    rs = [x for x in runs.get((sid, broker), [])]
    if not rs:
        return None, []
    rs.sort(key=lambda x: rate(x["json"]), reverse=True)
    return rs[0], [rate(x["json"]) for x in rs[1:]]


def notes_of(x):
    r, notes = x["json"], []
    if r is None:
        return ["no result (" + x["status"] + ")"]
    if "alive=no" in x["status"]:
        notes.append("broker died")
    if x["status"].startswith("rc=") and not x["status"].startswith("rc=0"):
        notes.append("load generator " + x["status"].split()[0])
    if not r.get("setup_complete", True) or r.get("up_after_setup", 0) < r.get("connections_planned", 0):
        notes.append(f"set-up: {r.get('up_after_setup', 0)}/{r.get('connections_planned', 0)} up")
    if r.get("closed_by_broker"):
        notes.append(f"{r['closed_by_broker']} closed by broker")
    if r.get("protocol_errors"):
        notes.append(f"{r['protocol_errors']} protocol errors")
    if r.get("command") != "conn" and not r.get("drain_complete", True):
        notes.append("drain incomplete")
    if r.get("lost") and r.get("qos", 0) >= 1 and not granted_qos0(r):
        notes.append("**messages lost at QoS 1**")
    if r.get("duplicates"):
        notes.append(f"{r['duplicates']} dup")
    return notes


def offered(r):
    """Offered deliveries per second, or None for --rate 0."""
    if not r or not r.get("rate_per_publisher"):
        return None
    fan = r.get("subscribers", 1) if r.get("command") == "fanout" else 1
    return r["rate_per_publisher"] * r.get("publishers", 1) * fan


def offered_txt(r):
    o = offered(r)
    if o is not None:
        return fmt_rate(o)
    return f"max (QoS {r.get('qos', 0)}, window {r.get('inflight', '?')})" if r else "–"


def granted_qos0(r):
    return bool(r and r.get("qos", 0) >= 1 and (r.get("granted_qos") or [0])[0] > 0)


def scen_title(sid):
    fam, q, size = sid.split("-")
    n = "500"
    cmd = next((x["cmd"] for k, v in runs.items() if k[0] == sid for x in v), "")
    m = re.search(r" -c (\d+)", cmd)
    if m:
        n = m.group(1)
    t = FAMILY.get(fam, fam).format(n=n)
    return f"{t}, QoS {q[1:]}, {'1 KiB' if size == '1k' else size + ' B'} payload"


def shell(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def machine():
    cpu = shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-").strip()
    mem = shell("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo")
    return [
        ("CPUs (`nproc`)", shell("nproc")),
        ("CPU model", cpu),
        ("kernel", platform.release()),
        ("memory", mem),
        ("OS", shell(". /etc/os-release && echo $PRETTY_NAME")),
        ("rustc", shell("rustc --version")),
    ]


TRANSPORT_IDS = ("tcp-p2p-q1", "tls-p2p-q1", "ws-p2p-q1", "wss-p2p-q1", "tls-conn")
throughput = [s for s in order if not s.startswith(("conn", "ramp-", "ol-")) and s not in TRANSPORT_IDS]
transports = [s for s in order if s in TRANSPORT_IDS]
overload = [s for s in order if s.startswith("ol-")]
out = []
w = out.append
now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
svg_rel = os.path.relpath(SVG, os.path.dirname(os.path.abspath(REPORT)))

w("# ringmq benchmarks\n")
if MODE == "quick":
    w("> **Quick run** (`scripts/bench.sh --quick`): a small subset, one round, "
      f"{params.get('DURATION')} s per run. Use it for day-to-day regressions; the full matrix "
      "(`scripts/bench.sh`) is the one to quote.\n")
elif params.get("ONLY"):
    w(f"> **Partial run** (`--only {params.get('ONLY')}`).\n")
w(f"Generated {now} by `scripts/bench.sh` in {int(params.get('ELAPSED_S', '0')) // 60} min. "
  f"Raw JSON per run: `{os.path.relpath(RES, ROOT) if RES.startswith(ROOT) else RES}` "
  "(not committed). All traffic is loopback (127.0.0.1); the load generator "
  "(`ringmq-loadtest`) runs on the same cores as the broker, the same for every broker.\n")

# ------------------------------------------------------------------ summary matrix
if throughput:
    w("## Summary: messages delivered per second during the load\n")
    peers = [b for b in BROKERS if b != "ringmq"]
    hdr = "| scenario | offered | " + " | ".join(BROKERS) + "".join(
        f" | ringmq ÷ {p}" for p in peers if "ringmq" in BROKERS) + " |"
    w(hdr)
    w("|" + " --- |" * (hdr.count("|") - 1))
    foot = lossy = False
    for sid in throughput:
        cells, vals = [], {}
        for b in BROKERS:
            x, _ = best(sid, b)
            r = x["json"] if x else None
            vals[b] = rate(r)
            mark = ""
            if granted_qos0(r):
                mark, foot = " †", True
            if x and notes_of(x):
                mark += " ‡"
            cells.append((fmt_rate(vals[b]) if r else "–") + mark)
        ratios = [ratio(vals.get("ringmq"), vals.get(p)) for p in peers] if "ringmq" in BROKERS else []
        rx_, _ = best(sid, "ringmq")
        if rx_ and rx_["json"] and rx_["json"].get("lost"):
            ratios = [c + " ⚠" for c in ratios]
            lossy = True
        anyr = next((x["json"] for b in BROKERS for x in runs.get((sid, b), []) if x["json"]), None)
        w(f"| `{sid}` | {offered_txt(anyr)} | " + " | ".join(cells + ratios) + " |")
    w("")
    if foot:
        w("† ringmq currently grants QoS 0 on every subscription (QoS 1/2 delivery is being built), "
          "so in its QoS 1 rows only the publisher side is QoS 1: deliveries to the subscriber are "
          "QoS 0 (no PUBACK round trip), which is not the same work as the peers do.  ")
    if lossy:
        w("⚠ ringmq lost messages in this scenario (see *lost*): its msg/s are not the same "
          "delivery guarantee as a peer's lossless figure, so read the ratio with care.  ")
    w("‡ see the notes column in the scenario's table below.\n")
    w(f"![msg/s per scenario and broker]({svg_rel})\n")

# ------------------------------------------------------------------ open loop past saturation
OL_FAMILY = {"fanin": "fan-in 10 → 1", "fanout": "fan-out 1 → 100", "p2p": "p2p 50 pairs"}
OL_CONFIG = {
    "ringmq-default": "no flags (`--data-dir` only)",
    "ringmq": "equal limits",
    "mosquitto-default": "stock (listener only)",
    "mosquitto": "equal limits",
    "rumqttd": "equal limits (it has no defaults)",
}


def ol_lossy(r):
    return bool(r and (r.get("lost") or r.get("duplicates") or not r.get("drain_complete", True)))


def ol_lossless(r):
    """Deliveries per second during the load, if the run lost nothing; else None."""
    return None if not r or ol_lossy(r) else rate(r)


if overload:
    w("## Past saturation: open loop, default flags and equal limits\n")
    w(f"Publishers as fast as the broker lets them (`--rate 0`; QoS 1 paced only by a window of "
      f"100 per publisher), {params.get('OL_DURATION')} s, then up to {params.get('OL_DRAIN')} s "
      "of drain; one fresh broker per run, brokers in alternation. Each broker runs at its "
      "defaults and at the equal limits of the matrix. **lossless msg/s**: deliveries during the "
      "load per second, shown only when the run lost nothing (*lossy* otherwise: lost, "
      "duplicated, or still undelivered at the end of the drain); ratios are taken on it, so a "
      "lossy run is never a win. **in window**: deliveries during the load per second, lossy or "
      "not. **lost**: for QoS 1, messages acknowledged to their publisher and never delivered. "
      "Latency over every delivered message.\n")
    for v in ("v3", "v5"):
        ids = [s for s in overload if s.endswith("-" + v)]
        if not ids:
            continue
        w(f"### MQTT {'3.1.1' if v == 'v3' else '5'}\n")
        w("| scenario | broker | config | lossless msg/s | in window msg/s | sent msg/s | lost "
          "| p50 ms | p99 ms | p99.9 ms | ringmq (defaults) ÷ this | notes |")
        w("|" + " --- |" * 12)
        for sid in ids:
            _, fam, q, _ = sid.split("-")
            ref, _ = best(sid, "ringmq-default")
            ref_r = ref["json"] if ref else None
            for b in OL_BROKERS:
                x, _ = best(sid, b)
                if not x:
                    continue
                r = x["json"]
                title = f"{OL_FAMILY.get(fam, fam)}, QoS {q[1:]}"
                if r is None:
                    w(f"| {title} | {b} | {OL_CONFIG.get(b, '')} | – | – | – | – | – | – | – | – | "
                      f"{'; '.join(notes_of(x))} |")
                    continue
                lat = r.get("latency") or {}
                lossless = ol_lossless(r)
                if b == "ringmq-default":
                    vs = "–"
                elif ol_lossless(ref_r) is None:
                    vs = "no win (ringmq lossy)"
                elif lossless is None:
                    vs = "– (this lossy)"
                else:
                    vs = ratio(ol_lossless(ref_r), lossless)
                w(f"| {title} | {b} | {OL_CONFIG.get(b, '')} "
                  f"| {fmt_rate(lossless) if lossless is not None else '**lossy**'} "
                  f"| {fmt_rate(rate(r))} | {fmt_rate(r.get('publish_rate_per_s', 0))} "
                  f"| {r.get('lost', 0):,} | {fmt_ms(lat.get('p50_ms'))} | {fmt_ms(lat.get('p99_ms'))} "
                  f"| {fmt_ms(lat.get('p99.9_ms'))} | {vs} | {'; '.join(notes_of(x))} |")
        w("")

# ------------------------------------------------------------------ transports
if transports:
    tr_cmds = {}
    for l in read(os.path.join(RES, "transports.tsv")).splitlines():
        sid, b, cmd = (l.split("\t") + ["", "", ""])[:3]
        tr_cmds.setdefault(b, {})[sid] = cmd
    tr_brokers = [b for b in BROKERS if any((s, b) in runs for s in transports)]
    w("## Transports: TLS and WebSocket\n")
    w("Each broker with one listener of the transport on its port and the same server certificate "
      "(RSA 2048, made by the script with openssl), equal limits as the matrix, MQTT 3.1.1 (rumqttd "
      "serves WebSocket with its v4 server only). **p2p QoS 1**: 50 publisher/subscriber pairs, "
      "64 B, `--rate 0 --inflight 100`, msg/s delivered during the load, p99 in brackets. **TLS "
      "connects**: connections offered faster than any broker here completes them, every one a "
      "full TLS handshake (no resumption); the rate is set-up's, memory per connection as in the "
      "idle-connections table. One fresh broker per run.\n")
    w("| broker | p2p over tcp | over tls | over ws | over wss | TLS costs | ringmq ÷ this over tls "
      "| TLS connects up | TLS connects/s | CONNACK p99 ms | memory per TLS connection | notes |")
    w("|" + " --- |" * 12)
    ref_tls = rate((best("tls-p2p-q1", "ringmq")[0] or {}).get("json"))
    for b in tr_brokers:
        cells, notes = [], []
        for sid in ("tcp-p2p-q1", "tls-p2p-q1", "ws-p2p-q1", "wss-p2p-q1"):
            x, _ = best(sid, b)
            if not x:
                cells.append("–")
            elif x["json"] is None:
                cells.append("did not run")
                notes.append(f"{sid.split('-')[0]}: " + "; ".join(notes_of(x)))
            else:
                lat = (x["json"].get("latency") or {}).get("p99_ms")
                cells.append(f"{fmt_rate(rate(x['json']))} ({fmt_ms(lat)} ms)")
                notes += [f"{sid.split('-')[0]}: {n}" for n in notes_of(x)]
        tcp = rate((best("tcp-p2p-q1", b)[0] or {}).get("json"))
        tls = rate((best("tls-p2p-q1", b)[0] or {}).get("json"))
        cost = f"{(tls / tcp - 1) * 100:+.0f}%" if tcp and tls else "–"
        x, _ = best("tls-conn", b)
        r = x["json"] if x else None
        if r:
            per = (r.get("broker") or {}).get("rss_per_connection_bytes")
            conn = (f"{r.get('up_after_setup', 0):,}/{r.get('connections_planned', 0):,} "
                    f"| {r.get('connect_rate_per_s', 0):,.0f}/s "
                    f"| {fmt_ms((r.get('connect_latency') or {}).get('p99_ms'))} "
                    f"| {f'{per / 1024:.1f} KiB' if per is not None else '–'}")
            notes += [f"connects: {n}" for n in notes_of(x)]
        else:
            conn = "– | – | – | –"
            if x:
                notes.append("connects: " + "; ".join(notes_of(x)))
        vs = "–" if b == "ringmq" else ratio(ref_tls, tls)
        w(f"| {b} | {' | '.join(cells)} | {cost} | {vs} | {conn} | {'; '.join(notes)} |")
    w("")
    w("<details><summary>broker command per transport</summary>\n")
    for b in tr_brokers:
        for sid, cmd in tr_cmds.get(b, {}).items():
            w(f"- `{sid}` {b}: `{tidy(cmd)}`")
    w("\n</details>\n")

# ------------------------------------------------------------------ method
w("## Method\n")
w(f"- Brokers, each on its own loopback port, started fresh for every run and stopped after it: "
  + ", ".join(f"**{b}** (port {p})" for b, p, _, _ in brokers) + ".")
w(f"- Every throughput run: {params.get('DURATION')} s of load after all clients are connected "
  f"and subscribed, then at most {params.get('DRAIN')} s of drain. Every broker gets exactly "
  f"the same load generator command; MQTT {params.get('MQTT')} for every client.")
w("- Offered load. **QoS 1**: as fast as possible (`--rate 0`): each publisher keeps at most 64 "
  "PUBLISHes unacknowledged (`--inflight 64`), so the broker's PUBACKs pace it. **QoS 0**: a "
  "fixed high rate per publisher (the *offered* column), the same for every broker, chosen "
  "near what the fastest brokers sustain on this machine. QoS 0 at `--rate 0` is open-loop "
  "overload (publishers write as fast as the broker reads, whatever it can deliver) and "
  "measures how a broker collapses rather than what it sustains. A broker that keeps up "
  "delivers the offered rate with a short drain; the interesting figures are then latency "
  "and CPU per message.")
w("- **msg/s** counts only messages *delivered to subscribers while the publishers were "
  "running* (`received_during_load / load_s`); what arrives in the drain is not throughput "
  "(a broker that buffers and delivers later shows a long **drain**). For fan-out every copy "
  "to every subscriber counts.")
w("- **p50/p99**: end-to-end latency publisher → subscriber over every message (load and "
  "drain), from a CLOCK_MONOTONIC stamp in the payload.")
w("- **broker CPU s/M**: broker user+system CPU seconds over the whole run (set-up, load, "
  "drain) per million deliveries, from `/proc/PID/stat`. **loadgen CPU**: the load "
  "generator's own CPU (getrusage) as % of one core over its wall time; it has 2 worker "
  "threads on 2 cores, so a figure well below 200% means it was not the bottleneck.")
w("- **lost**: expected minus distinct deliveries at the end of the drain window: dropped, or "
  "still not delivered when the drain timed out (*drain incomplete*).")
rounds = int(params.get("ROUNDS", "1"))
if rounds > 1:
    w(f"- {rounds} rounds: the whole matrix runs once with every broker in alternation "
      "(ringmq, ringmq-1core, mosquitto, rumqttd per scenario), then again in the same order. "
      "Each table shows **the better round** (more msg/s during load), all figures from that "
      "same run; the other round's msg/s is in the *other round* column.")
else:
    w("- One round, brokers in alternation per scenario (ringmq, ringmq-1core, mosquitto, rumqttd).")
w("- Ratios are ringmq (all cores) divided by the other broker: msg/s above 1× means ringmq "
  "delivered more; CPU per message below 1× means ringmq spent less CPU per delivery.\n")

# ------------------------------------------------------------------ per-scenario tables
if throughput:
    w("## Throughput scenarios\n")
for sid in throughput:
    w(f"### `{sid}`: {scen_title(sid)}\n")
    anyr = next((x["json"] for b in BROKERS for x in runs.get((sid, b), []) if x["json"]), None)
    w(f"Offered: {offered_txt(anyr)} msg/s deliveries.\n" if offered(anyr) else
      "Offered: as fast as the publishers' QoS 1 windows (64 each) allow.\n")
    w("| broker | msg/s during load | sent msg/s | p50 ms | p99 ms | broker CPU s/M | drain s | lost "
      "| loadgen CPU | ringmq ÷ this msg/s | ringmq ÷ this CPU/msg | other round | notes |")
    w("|" + " --- |" * 13)
    rx, _ = best(sid, "ringmq")
    rr = rx["json"] if rx else None
    r_cpu = ((rr or {}).get("broker") or {}).get("cpu_s_per_million_delivered")
    for b in BROKERS:
        x, others = best(sid, b)
        if not x:
            continue
        r = x["json"]
        notes = notes_of(x)
        if r is None:
            w(f"| {b} | – | – | – | – | – | – | – | – | – | – | – | {'; '.join(notes)} |")
            continue
        lat = r.get("latency") or {}
        cpu = (r.get("broker") or {}).get("cpu_s_per_million_delivered")
        lg = 100 * r.get("loadgen_cpu_s", 0) / max(r.get("loadgen_wall_s", 1), 1e-9)
        name = b + (" †" if granted_qos0(r) else "")
        is_ref = b == "ringmq"
        w(f"| {name} | {fmt_rate(rate(r))} | {fmt_rate(r.get('publish_rate_per_s', 0))} "
          f"| {fmt_ms(lat.get('p50_ms'))} | {fmt_ms(lat.get('p99_ms'))} "
          f"| {cpu:.2f} | {r.get('drain_s', 0):.2f} | {r.get('lost', 0)} | {lg:.0f}% "
          f"| {'–' if is_ref else ratio(rate(rr), rate(r))} "
          f"| {'–' if is_ref or not cpu else ratio(r_cpu, cpu)} "
          f"| {', '.join(fmt_rate(o) for o in others) or '–'} | {'; '.join(notes)} |"
          if cpu is not None else
          f"| {name} | {fmt_rate(rate(r))} | – | – | – | – | – | – | – | – | – | – | {'; '.join(notes)} |")
    w("")

# ------------------------------------------------------------------ idle connections
conn = {b: best("conn", b)[0] for b in BROKERS if ("conn", b) in runs}
if conn:
    w("## Idle connections: memory per connection\n")
    cmd0 = next(iter(conn.values()))["cmd"]
    n = re.search(r" -c (\d+)", cmd0)
    if int(params.get("CONN_WANTED", "0")) > int(n.group(1) if n else 0):
        w(f"> The brief asks for {int(params['CONN_WANTED']):,} connections, but the open-files hard "
          f"limit here is {params.get('NOFILE')} and cannot be raised (no CAP_SYS_RESOURCE), so "
          f"this run uses {int(n.group(1)):,}. On a machine where `ulimit -n 200000` works the "
          "script uses the full count.\n")
    w(f"{int(n.group(1)) if n else '?':,} MQTT connections opened at the `--connect-rate` below and held idle for 10 s. "
      "Memory per connection = (broker RSS after set-up − RSS before connecting) / connections, "
      "from `/proc/PID/status`.\n")
    w("| broker | up after set-up | failed / refused | connect rate | CONNACK p99 ms | RSS before "
      "| RSS connected | peak RSS | bytes per connection | ringmq ÷ this (above 1×: ringmq uses more) | notes |")
    w("|" + " --- |" * 11)
    ref = ((conn.get("ringmq") or {}).get("json") or {}).get("broker", {}).get("rss_per_connection_bytes")
    for b, x in conn.items():
        r = x["json"]
        if r is None:
            w(f"| {b} | – | – | – | – | – | – | – | – | – | {'; '.join(notes_of(x))} |")
            continue
        br = r.get("broker") or {}
        per = br.get("rss_per_connection_bytes")
        mib = lambda k: f"{br.get(k, 0) / 1024:.1f} MiB"  # noqa: E731
        w(f"| {b} | {r.get('up_after_setup', 0)}/{r.get('connections_planned', 0)} "
          f"| {r.get('connect_failed', 0)} / {r.get('connect_refused', 0)} "
          f"| {r.get('connect_rate_per_s', 0):,.0f}/s | {fmt_ms((r.get('connect_latency') or {}).get('p99_ms'))} "
          f"| {mib('rss_before_kib')} | {mib('rss_connected_kib')} | {mib('peak_rss_kib')} "
          f"| {per:,.0f} ({per / 1024:.1f} KiB) | {'–' if b == 'ringmq' else ratio(ref, per)} "
          f"| {'; '.join(notes_of(x))} |" if per is not None else
          f"| {b} | {r.get('up_after_setup', 0)}/{r.get('connections_planned', 0)} | – | – | – | – | – | – | – | – | no broker sample |")
    w("")

# ------------------------------------------------------------------ ramp
ramp_ids = sorted({s for s in order if s.startswith("ramp-")}, key=lambda s: int(s.split("-")[1]))
if ramp_ids:
    pairs = int(params.get("RAMP_PAIRS", "500"))
    p99_lim = float(params.get("RAMP_P99_MS", "50"))
    min_ratio = float(params.get("RAMP_MIN_RATIO", "0.95"))
    w("## Saturation ramp: p2p QoS 1\n")
    w(f"{pairs} publisher/subscriber pairs, QoS 1, 64 B, `--inflight 64`, "
      f"{params.get('RAMP_ARGS', '').split('--duration ')[-1].split()[0]} s per step. The offered "
      f"per-publisher `--rate` rises step by step ({', '.join(s.split('-')[1] for s in ramp_ids)} …); "
      f"a step **passes** when p99 latency ≤ {p99_lim:g} ms, deliveries during the load ≥ "
      f"{min_ratio:g} × the offered rate, nothing is lost and no connection is closed. A broker "
      "leaves the ramp at its first failing step; brokers alternate within each step. One pass.\n")
    w("| broker | highest sustained rate | offered msg/s | delivered msg/s | p99 ms at that step | broker CPU s/M | first failing step |")
    w("|" + " --- |" * 7)
    steps = {}
    for b in BROKERS:
        best_ok, fail = None, None
        for sid in ramp_ids:
            rr = runs.get((sid, b))
            if not rr:
                continue
            x = rr[0]
            r_ = int(sid.split("-")[1])
            if x["json"] is None:
                verdict = "fail: no result"
            else:
                import io
                import contextlib
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    summary.judge([x["path"], str(r_ * pairs), str(p99_lim), str(min_ratio)])
                verdict = buf.getvalue().strip()
            steps[(sid, b)] = (verdict, x["json"])
            if verdict.startswith("pass"):
                best_ok = (r_, x["json"])
            elif fail is None:
                fail = (r_, verdict)
        if best_ok is None and fail is None:
            continue
        if best_ok:
            r_, j = best_ok
            cpu = ((j.get("broker") or {}).get("cpu_s_per_million_delivered")) or 0
            mark = " †" if granted_qos0(j) else ""
            w(f"| {b}{mark} | **{r_:,}/s per publisher** | {r_ * pairs:,} | {fmt_rate(rate(j))} "
              f"| {fmt_ms((j.get('latency') or {}).get('p99_ms'))} | {cpu:.2f} "
              f"| {f'{fail[0]:,}/s: ' + fail[1][6:] if fail else 'none (top of the ramp)'} |")
        else:
            w(f"| {b} | none | – | – | – | – | {fail[0]:,}/s: {fail[1][6:]} |")
    w("")
    w("<details><summary>every step</summary>\n")
    w("| rate per publisher | offered msg/s | " + " | ".join(BROKERS) + " |")
    w("|" + " --- |" * (len(BROKERS) + 2))
    for sid in ramp_ids:
        r_ = int(sid.split("-")[1])
        cells = []
        for b in BROKERS:
            if (sid, b) not in steps:
                cells.append("")
                continue
            verdict, j = steps[(sid, b)]
            if j is None:
                cells.append("✗ no result")
                continue
            ok = "✓" if verdict.startswith("pass") else "✗"
            cells.append(f"{ok} {fmt_rate(rate(j))}/s, p99 {fmt_ms((j.get('latency') or {}).get('p99_ms'))} ms")
        w(f"| {r_:,} | {r_ * pairs:,} | " + " | ".join(cells) + " |")
    w("\n</details>\n")
    if any(granted_qos0(j) for (_, j) in steps.values()):
        w("† subscriber side granted QoS 0 (see above).\n")

# ------------------------------------------------------------------ hand-kept sections
# Kept by hand, each with the commands that made it: how memory per connection got here,
# flow control at overload, transports, where ringmq's time goes (perf), durability (fsync
# modes, recovery), across cluster nodes, and before/after checks of data-path changes.
for name in ("connections.md", "overload.md", "transports.md", "profile.md", "durability.md", "cluster-bench.md", "ab-checks.md"):
    section = read(os.path.join(ROOT, "docs", name)).strip()
    if section:
        w(section + "\n")

# ------------------------------------------------------------------ environment
w("## Machine and versions\n")
w("| | |\n| --- | --- |")
for k, v in machine():
    w(f"| {k} | {v} |")
for b, p, cmd, ver in brokers:
    w(f"| {b} | {ver} |")
w(f"| load generator | ringmq-loadtest @ {shell(f'git -C {ROOT} rev-parse --short HEAD')} (same checkout) |")
w("")
w("System limits set by the script (the 50k-connection scenario needs more file descriptors "
  "and ephemeral ports than the defaults):\n")
w("```\n" + read(os.path.join(RES, "limits.txt")).strip() + "\n```\n")

# ------------------------------------------------------------------ commands
w("## Exact commands\n")
w("Broker command lines (`$RESULTS` is the results directory):\n")
w("```sh")
for b, p, cmd, ver in brokers:
    w(f"# {b}\n{tidy(cmd)}")
w("```\n")
w("Every broker runs with limits raised so that nothing is refused or dropped by "
  "configuration (templates in `scripts/bench/`): in-flight 1000 and queues of 100,000 "
  "messages per client for all three, and for ringmq 128 MiB of QoS 0 backlog per "
  "connection (`--write-buffer`, its default is 1 MiB); its other settings are its "
  "defaults.\n")
for name in ("mosquitto.conf", "mosquitto-default.conf", "rumqttd-v4.toml", "rumqttd-v5.toml"):
    text = read(os.path.join(RES, name))
    if text and any(b[0] == name.split(".")[0].replace("-v4", "").replace("-v5", "") for b in brokers):
        w(f"<details><summary>{name}</summary>\n\n```\n{text.strip()}\n```\n</details>\n")
w("Load generator command per scenario (identical for every broker apart from the port and "
  "the broker's pid):\n")
w("```sh")
seen = set()
for sid in order:
    fam = re.sub(r"-\d+$", "", sid) if sid.startswith("ramp") else sid
    cmds = {tidy(x["cmd"]) for k, v in runs.items() if k[0] == sid for x in v}
    for c in sorted(cmds):
        if sid.startswith("ramp"):
            c = re.sub(r"--rate \d+", "--rate $RATE", c)
        if c not in seen:
            seen.add(c)
            w(f"# {fam}\n{c}")
w("```\n")
w("Re-run: `scripts/bench.sh` (full), `scripts/bench.sh --quick`, "
  "`scripts/bench.sh --brokers ringmq,mosquitto --only p2p,ramp`; `--help` for the rest.\n")

with open(REPORT, "w") as f:
    f.write("\n".join(out))

# ------------------------------------------------------------------ SVG
rows = []  # (label, [(broker, value, marked)])
for sid in throughput:
    bars = []
    for b in BROKERS:
        x, _ = best(sid, b)
        r = x["json"] if x else None
        bars.append((b, rate(r), granted_qos0(r)))
    rows.append((sid, bars))

bar_h, gap, left, right, top = 11, 14, 120, 110, 64
n_b = max(1, len(BROKERS))
height = top + sum(n_b * bar_h + gap for _ in rows) + 40
width = 860
vals = [v for _, bars in rows for _, v, _ in bars if v > 0] or [1]
lo = 10 ** math.floor(math.log10(min(vals)))
hi = 10 ** math.ceil(math.log10(max(vals)))
if hi <= lo:
    hi = lo * 10
plot_w = width - left - right


def xpos(v):
    if v <= 0:
        return left
    return left + plot_w * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))


s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
     f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
     f'<rect width="{width}" height="{height}" fill="white"/>',
     f'<text x="{left}" y="18" font-size="14" font-weight="bold">Messages delivered per second during '
     f'load ({"quick run" if MODE == "quick" else "full run"}, log scale; higher is better)</text>']
lx = left
for b in BROKERS:
    s.append(f'<rect x="{lx}" y="30" width="12" height="12" fill="{COLORS.get(b, "#888")}"/>')
    s.append(f'<text x="{lx + 16}" y="40">{html.escape(b)}</text>')
    lx += 30 + 7 * len(b)
s.append(f'<text x="{lx}" y="40" fill="#555">† subscriber granted QoS 0</text>')
y_end = height - 40
e = int(math.log10(lo))
while 10 ** e <= hi:
    for m in (1, 2, 5):
        v = m * 10 ** e
        if v < lo or v > hi:
            continue
        x = xpos(v)
        s.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{y_end}" '
                 f'stroke="{"#bbb" if m == 1 else "#e5e5e5"}"/>')
        s.append(f'<text x="{x:.1f}" y="{y_end + 14}" text-anchor="middle" fill="#444">{fmt_rate(v)}</text>')
    e += 1
y = top
for sid, bars in rows:
    s.append(f'<text x="{left - 8}" y="{y + n_b * bar_h / 2 + 4:.1f}" text-anchor="end">{html.escape(sid)}</text>')
    for b, v, marked in bars:
        x1 = xpos(v)
        s.append(f'<rect x="{left}" y="{y}" width="{max(0.0, x1 - left):.1f}" height="{bar_h - 2}" '
                 f'fill="{COLORS.get(b, "#888")}"><title>{html.escape(b)} {sid}: {v:,.0f} msg/s</title></rect>')
        label = (fmt_rate(v) if v > 0 else "no result") + (" †" if marked else "")
        s.append(f'<text x="{x1 + 4:.1f}" y="{y + bar_h - 3}" font-size="9" fill="#333">{label}</text>')
        y += bar_h
    y += gap
s.append(f'<text x="{left}" y="{height - 8}" fill="#555">{html.escape(shell("nproc"))} CPUs, '
         f'loopback, load generator on the same cores; scripts/bench.sh, {now}</text>')
s.append("</svg>")
os.makedirs(os.path.dirname(os.path.abspath(SVG)), exist_ok=True)
with open(SVG, "w") as f:
    f.write("\n".join(s) + "\n")
