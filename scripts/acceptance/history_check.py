#!/usr/bin/env python3
"""Checks a recorded history of publishes and deliveries (JSON lines) for lost and
reordered messages: reusable by any acceptance script whose clients log what they did.

Each line is one event, written when it happened (a client's events in the order it saw them):
  {"client": "pub-1", "kind": "sent",     "seq": 7}                     handed to the client library
  {"client": "pub-1", "kind": "acked",    "seq": 7}                     acknowledged to the publisher
                                                                        (PUBACK / PUBCOMP: paho on_publish)
  {"client": "sub-a", "kind": "received", "seq": 7, "publisher": "pub-1"}   delivered to a subscriber
Other keys (time, topic, qos, ...) are kept for the report; other kinds are ignored. A
"received" event without "publisher" counts as the only publisher's.

For every subscriber (a client with "received" events, or named by --subscribers) and every
publisher (a client with "sent" or "acked" events), it checks:
  - every message acknowledged to the publisher was received at least once;
  - in order: ignoring duplicates, the first occurrences of the publisher's sequence
    numbers are increasing;
  - nothing the publisher never sent was received (when the publisher logs "sent" events);
  - with --exactly-once: no sequence number received twice;
  - with --lossless: every message sent (not only acknowledged) was received (QoS 0 on a
    run without failures).

  history_check.py HISTORY.jsonl [--subscribers a,b] [--publishers p] [--exactly-once] [--lossless]
                   [--name NAME]

Prints one line per subscriber and publisher, then PASS or FAIL. Exit status 0 when every
check held, 1 otherwise (an unreadable file included).
"""

import argparse
import json
import sys
from collections import defaultdict


def load(path):
    events = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
                if not isinstance(event, dict) or not isinstance(event.get("client"), str):
                    raise ValueError("not an object with a client")
                if event.get("kind") in ("sent", "acked", "received"):
                    event["seq"] = int(event["seq"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: unreadable event ({e}): {line[:200]}") from None
            events.append(event)
    return events


def ranges(seqs, limit=8):
    """A short text for a set of integers: 3-7,9,12-15 (at most `limit` pieces)."""
    out = []
    seqs = sorted(seqs)
    i = 0
    while i < len(seqs) and len(out) < limit:
        j = i
        while j + 1 < len(seqs) and seqs[j + 1] == seqs[j] + 1:
            j += 1
        out.append(str(seqs[i]) if i == j else f"{seqs[i]}-{seqs[j]}")
        i = j + 1
    return ",".join(out) + (",..." if i < len(seqs) else "")


def check(events, subscribers=None, publishers=None, exactly_once=False, lossless=False):
    """Returns (lines, problems): the report and the list of what failed."""
    sent = defaultdict(set)
    acked = defaultdict(set)
    logs_sent = set()
    received = defaultdict(lambda: defaultdict(list))  # subscriber -> publisher -> [seq...]
    seen_subscribers = []
    for e in events:
        kind, client = e.get("kind"), e["client"]
        if kind == "sent":
            sent[client].add(e["seq"])
            logs_sent.add(client)
        elif kind == "acked":
            acked[client].add(e["seq"])
        elif kind == "received":
            if client not in seen_subscribers:
                seen_subscribers.append(client)
            received[client][e.get("publisher")].append(e["seq"])
    pubs = publishers or sorted(set(sent) | set(acked))
    subs = subscribers or seen_subscribers
    lines, problems = [], []
    if not pubs:
        problems.append("no publisher in the history")
    if not subs:
        problems.append("no subscriber in the history")
    # A lone publisher owns the receptions that name none.
    for sub in subs:
        if None in received[sub]:
            if len(pubs) == 1:
                received[sub][pubs[0]].extend(received[sub].pop(None))
            else:
                problems.append(f"{sub}: received events without a publisher among {len(pubs)} publishers")
    for pub in pubs:
        lines.append(f"# publisher {pub}: {len(sent[pub]) if pub in logs_sent else '?'} sent, "
                     f"{len(acked[pub])} acknowledged")
        if pub in logs_sent and not acked[pub] <= sent[pub]:
            problems.append(f"{pub}: acknowledged but never sent: {ranges(acked[pub] - sent[pub])}")
    for sub in subs:
        for pub in pubs:
            got = received[sub].get(pub, [])
            distinct = set(got)
            firsts, seen, disorder = [], set(), []
            for seq in got:
                if seq in seen:
                    continue
                seen.add(seq)
                if firsts and seq < firsts[-1]:
                    disorder.append((firsts[-1], seq))
                firsts.append(seq)
            duplicates = len(got) - len(distinct)
            lost = acked[pub] - distinct
            unsent_lost = (sent[pub] - distinct) if lossless else set()
            phantom = (distinct - sent[pub] - acked[pub]) if pub in logs_sent else set()
            lines.append(f"# {sub} <- {pub}: {len(got)} received, {len(distinct)} distinct, "
                         f"{duplicates} duplicates, {len(lost)} acknowledged lost, "
                         f"{len(disorder)} out of order")
            if lost:
                problems.append(f"{sub} <- {pub}: {len(lost)} acknowledged messages never received: {ranges(lost)}")
            if unsent_lost - lost:
                problems.append(f"{sub} <- {pub}: {len(unsent_lost - lost)} sent messages never received "
                                f"(--lossless): {ranges(unsent_lost - lost)}")
            if disorder:
                shown = ", ".join(f"{b} after {a}" for a, b in disorder[:5])
                problems.append(f"{sub} <- {pub}: {len(disorder)} first receptions out of order: {shown}")
            if phantom:
                problems.append(f"{sub} <- {pub}: received messages never sent: {ranges(phantom)}")
            if exactly_once and duplicates:
                dup = sorted({s for s in got if got.count(s) > 1})
                problems.append(f"{sub} <- {pub}: {duplicates} duplicates (--exactly-once): {ranges(dup)}")
    return lines, problems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("history", help="JSON-lines event log")
    ap.add_argument("--subscribers", help="comma-separated: these must be checked (default: every receiver)")
    ap.add_argument("--publishers", help="comma-separated: only these (default: every sender)")
    ap.add_argument("--exactly-once", action="store_true", help="duplicates fail too")
    ap.add_argument("--lossless", action="store_true", help="every sent message must arrive, acknowledged or not")
    ap.add_argument("--name", default="history", help="name on the PASS/FAIL line")
    args = ap.parse_args()
    try:
        events = load(args.history)
    except (OSError, ValueError) as e:
        print(f"FAIL {args.name}: {e}")
        sys.exit(1)
    lines, problems = check(
        events,
        subscribers=[x for x in (args.subscribers or "").split(",") if x] or None,
        publishers=[x for x in (args.publishers or "").split(",") if x] or None,
        exactly_once=args.exactly_once,
        lossless=args.lossless,
    )
    for line in lines:
        print(line)
    if problems:
        for p in problems:
            print(f"#   problem: {p}")
        print(f"FAIL {args.name}: {len(problems)} problems in {args.history} ({len(events)} events)")
        sys.exit(1)
    flags = "".join([", exactly once" if args.exactly_once else "", ", lossless" if args.lossless else ""])
    print(f"PASS {args.name}: {len(events)} events in {args.history}: every acknowledged message received "
          f"by every subscriber, first receptions in order{flags}")


if __name__ == "__main__":
    main()
