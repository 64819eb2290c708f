#!/usr/bin/env python3
"""Hostile scenario 7, locking a shard out of sessions.

Broker flags: --max-sessions 2000 --max-session-expiry 5 (an unknown flag is reported as a
FAIL: the broker refuses to start).

1,000 throwaway persistent sessions (MQTT 3.1.1, clean_session=0), their identifiers all
owned by shard 0 (chosen with --owner-of), each connected and disconnected. Then:

1. a legitimate client whose identifier is also owned by shard 0 must still connect
   (CONNACK 0), while the throwaway sessions still exist: a per-shard share of
   --max-sessions (1,000 each) must not lock shard 0 out;
2. once the throwaway sessions have expired (--max-session-expiry 5 caps even a
   3.1.1 persistent session), sessions can be created again up to the cap: new
   persistent sessions owned by shard 0 are accepted until, counting the probe's 4
   connected sessions, the total is within 5% of 2,000 and never above it; the next
   one is refused (3.1.1 return code 3).

The probe runs throughout; peak RSS under 256 MB; the broker stays up.

--skip-expiry-flag runs the lockout part (1) without --max-session-expiry, to show the
behaviour of a broker that lacks the flag; it never PASSes.
"""

import socket
import time

import hostile_common as hc

MAX_SESSIONS = 2000
EXPIRY = 5
THROWAWAYS = 1000
PROBE_SESSIONS = 4
BATCH = 100


def connect_many(port, ids, clean=False):
    """Connects and disconnects each id, BATCH sockets at a time. Returns the CONNACK code
    per id (None when the connection failed without one)."""
    codes = {}
    for i in range(0, len(ids), BATCH):
        socks = []
        for cid in ids[i:i + BATCH]:
            s = socket.create_connection((hc.HOST, port), timeout=10)
            s.sendall(hc.connect_packet(cid, hc.V311, clean=clean))
            socks.append((cid, s))
        for cid, s in socks:
            r = hc.Reader(s)
            try:
                pkt = r.read(10)
                codes[cid] = hc.parse_connack(pkt, hc.V311)[1] if pkt.type == hc.CONNACK else None
                if codes[cid] == 0:
                    s.sendall(hc.disconnect_packet())
            except (hc.Closed, hc.Reset, hc.Timeout, OSError):
                codes[cid] = None
            s.close()
    return codes


def session_present_v5(port, cid):
    """Whether `cid` still has a session: an MQTT 5 CONNECT with Clean Start 0 and Session
    Expiry 0 (the session ends with this connection, so the poll leaves nothing behind)."""
    c = hc.Client.connect(port, cid, hc.V5, clean=False, props=[(hc.P_SESSION_EXPIRY, 0)])
    present = c.session_present
    c.disconnect()
    return present


def main():
    parser = hc.parse_args(__doc__)
    parser.add_argument("--skip-expiry-flag", action="store_true",
                        help="run part 1 without --max-session-expiry (for a broker lacking it)")
    args = parser.parse_args()

    def body(out, args):
        extra = ["--max-sessions", str(MAX_SESSIONS)]
        if not args.skip_expiry_flag:
            extra += ["--max-session-expiry", str(EXPIRY)]
        else:
            out.fail("run with --skip-expiry-flag: part 2 (expiry) not checked")
        broker = hc.Broker(args.broker, extra_args=extra, keep=args.keep)
        try:
            try:
                broker.start()
            except hc.StartFailed as err:
                out.fail(f"broker did not start with {' '.join(extra)}: {err}")
                return
            sampler = hc.RssSampler(broker)
            tag = f"{int(time.time()) % 100000}"
            ids = hc.ids_on_shard(args.broker, f"throwaway-{tag}-", 0, THROWAWAYS)
            legit = hc.ids_on_shard(args.broker, f"legit-{tag}-", 0, 1)[0]
            later = hc.ids_on_shard(args.broker, f"later-{tag}-", 0, MAX_SESSIONS + 50)
            probe = hc.Probe(broker).start()

            t0 = time.monotonic()
            codes = connect_many(broker.port, ids)
            made = sum(1 for x in codes.values() if x == 0)
            t_made = time.monotonic()
            out.figure(f"{made}/{THROWAWAYS} throwaway shard-0 sessions made in {t_made - t0:.1f}s"
                       + ("" if made == THROWAWAYS else
                          f" (refusals: { {str(k): v for k, v in count(codes.values()).items() if k != 0} })"))

            # 1. The legitimate shard-0 client, while the throwaways still exist.
            try:
                c = hc.Client.connect(broker.port, legit, hc.V311, clean=True, accept_refusal=True)
                code = c.refused or 0
                c.disconnect()
            except (OSError, hc.Closed, hc.Reset, hc.Timeout) as err:
                code = f"no CONNACK ({type(err).__name__})"
            held = time.monotonic() - t0
            out.check(code == 0, f"legitimate shard-0 client connected (CONNACK 0) {held:.1f}s after the flood began",
                      f"legitimate shard-0 client refused: CONNACK {code} {held:.1f}s after the flood began")
            if held > EXPIRY and not args.skip_expiry_flag:
                out.fail(f"the check came {held:.1f}s after the flood began: throwaways may have expired already")

            if not args.skip_expiry_flag:
                # 2. Wait for the expiry: poll the last-made throwaways, newest first.
                made_ids = [cid for cid in ids if codes.get(cid) == 0]
                deadline = time.monotonic() + EXPIRY + 15
                expired_at = None
                while made_ids and time.monotonic() < deadline:
                    cid = made_ids.pop()
                    if not session_present_v5(broker.port, cid):
                        expired_at = time.monotonic() - t_made
                        break
                    time.sleep(0.2)  # poll interval of a condition wait
                if expired_at is None:
                    out.fail(f"throwaway sessions still present {EXPIRY + 15}s after they were made "
                             f"(--max-session-expiry {EXPIRY})")
                else:
                    out.figure(f"throwaways expired {expired_at:.1f}s after they were made")
                    accepted, refusal = fill_to_cap(broker.port, later)
                    total = accepted + PROBE_SESSIONS
                    out.figure(f"after expiry: {accepted} new shard-0 sessions accepted (+{PROBE_SESSIONS} probe "
                               f"= {total}), then refused with {refusal}")
                    if total > MAX_SESSIONS:
                        out.fail(f"{total} sessions held, above --max-sessions {MAX_SESSIONS}")
                    elif total < MAX_SESSIONS * 0.95:
                        out.fail(f"only {total} sessions could be made after expiry, cap {MAX_SESSIONS}")
                    if refusal != 3:
                        out.fail(f"the session past the cap got {refusal}, expected CONNACK 3")
                    # Give the sessions back (a clean session replaces each, and ends with its
                    # connection), so that the final check can connect a new client.
                    connect_many(broker.port, later[:accepted + BATCH], clean=True)
            hc.check_promises(out, broker, sampler, probe)
        finally:
            broker.stop()
            broker.cleanup()

    hc.run("h07_session_lockout", body, args)


def fill_to_cap(port, ids):
    """Creates persistent sessions from `ids` in order until one is refused; returns
    (accepted, the refusal's code or None)."""
    accepted = 0
    for i in range(0, len(ids), BATCH):
        chunk = ids[i:i + BATCH]
        codes = connect_many(port, chunk)
        for cid in chunk:
            if codes[cid] != 0:
                # Anything accepted after the first refusal in this batch counts too.
                accepted += sum(1 for c in chunk if codes[c] == 0)
                return accepted, codes[cid]
        accepted += len(chunk)
    return accepted, None


def count(values):
    out = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


if __name__ == "__main__":
    main()
