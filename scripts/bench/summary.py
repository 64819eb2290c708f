#!/usr/bin/env python3
"""Helpers for scripts/bench.sh, reading one ringmq-loadtest --json file.

summary.py line JSON ID BROKER ROUND [notes...]   one concise progress line
summary.py judge JSON OFFERED P99_MS MIN_RATIO    "pass ..." or "fail: reason" (ramp step)
"""
import json
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def during_load_rate(r):
    load_s = r.get("load_s") or 0
    return r.get("received_during_load", 0) / load_s if load_s > 0 else 0.0


def line(args):
    path, sid, broker, rnd = args[:4]
    notes = " ".join(a for a in args[4:] if a not in ("rc=0", "alive=yes"))
    r = load(path)
    head = f"  {sid:<14} {broker:<13} r{rnd}"
    if r is None:
        print(f"{head}  NO RESULT {notes}")
        return
    b = r.get("broker") or {}
    if r.get("command") == "conn":
        per = b.get("rss_per_connection_bytes")
        print(f"{head}  {r.get('up_after_setup', 0)}/{r.get('connections_planned', 0)} up, "
              f"{r.get('connect_rate_per_s', 0):.0f} conn/s, "
              f"{(per or 0) / 1024:.1f} KiB/conn {notes}")
        return
    lat = r.get("latency") or {}
    lg = 100 * r.get("loadgen_cpu_s", 0) / max(r.get("loadgen_wall_s", 1), 1e-9)
    print(f"{head}  {during_load_rate(r):>11,.0f} msg/s  p50 {lat.get('p50_ms', 0):.2f} "
          f"p99 {lat.get('p99_ms', 0):.2f} ms  drain {r.get('drain_s', 0):.1f}s  "
          f"lost {r.get('lost', 0)}  brokerCPU {b.get('cpu_s', 0):.1f}s  loadgen {lg:.0f}% {notes}")


def judge(args):
    path, offered, p99_limit, min_ratio = args[0], float(args[1]), float(args[2]), float(args[3])
    r = load(path)
    if r is None:
        print("fail: no result")
        return
    if not r.get("setup_complete") or r.get("up_after_setup", 0) < r.get("connections_planned", 1):
        print("fail: set-up incomplete")
        return
    got = during_load_rate(r)
    p99 = (r.get("latency") or {}).get("p99_ms", float("inf"))
    why = []
    if p99 > p99_limit:
        why.append(f"p99 {p99:.1f} ms > {p99_limit:g} ms")
    if got < min_ratio * offered:
        why.append(f"delivered {got:,.0f}/s during load < {min_ratio:g} x {offered:,.0f}")
    if r.get("lost", 0) > 0:
        why.append(f"lost {r['lost']}")
    if r.get("closed_by_broker", 0) > 0:
        why.append(f"{r['closed_by_broker']} connections closed by the broker")
    if why:
        print("fail: " + "; ".join(why))
    else:
        print(f"pass: {got:,.0f} msg/s delivered during load, p99 {p99:.2f} ms")


if __name__ == "__main__":
    {"line": line, "judge": judge}[sys.argv[1]](sys.argv[2:])
