#!/usr/bin/env bash
# QoS 1 to persistent sessions: ringmq with each --fsync mode (and in memory) beside
# Mosquitto with persistence on, the same load generator command for each, alternating,
# N rounds. Subscribers keep persistent sessions (--session-expiry), so every message is
# written to ringmq's session log before its PUBACK.
#
#   scripts/bench/durable.sh [--rounds N] [--duration SECS] [--pairs N]
#
# Prints msg/s delivered during the load per run and a summary table (markdown).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
ROUNDS=2; DURATION=10; PAIRS=100
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --pairs) PAIRS=$2; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
cargo build --release -q   # both binaries: ringmq, ringmq-loadtest
command -v mosquitto >/dev/null || PATH=$PATH:/usr/sbin
OUT=$ROOT/target/bench/durable-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
PORT=19960
LIMITS="--max-inflight 1000 --max-queued-messages 100000 --max-queued-bytes 1099511627776 --write-buffer 134217728"
RINGMQ=$ROOT/target/release/ringmq
LT=$ROOT/target/release/ringmq-loadtest

broker_cmd() { # NAME DATA_DIR
    case $1 in
        ringmq-in-memory) echo "$RINGMQ --bind 127.0.0.1:$PORT --cores 2 $LIMITS --in-memory --log-level warn" ;;
        ringmq-fsync-*) echo "$RINGMQ --bind 127.0.0.1:$PORT --cores 2 $LIMITS --data-dir $2 --fsync ${1#ringmq-fsync-} --log-level warn" ;;
        mosquitto-persistence)
            cat >"$OUT/mosquitto.conf" <<EOF
listener $PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $2/
autosave_interval 1
max_inflight_messages 1000
max_queued_messages 100000
max_queued_bytes 0
EOF
            # Mosquitto started as root runs as user mosquitto: let it write there.
            mkdir -p "$2" && chmod 777 "$2"
            echo "$(command -v mosquitto) -c $OUT/mosquitto.conf" ;;
    esac
}

wait_port() {
    for _ in $(seq 200); do
        (echo >/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

BROKERS=(ringmq-in-memory ringmq-fsync-never ringmq-fsync-interval:1000 ringmq-fsync-always mosquitto-persistence)
for round in $(seq "$ROUNDS"); do
    for b in "${BROKERS[@]}"; do
        tag=${b//:/-}
        data=$OUT/data-$tag-$round
        rm -rf "$data"
        # shellcheck disable=SC2046
        $(broker_cmd "$b" "$data") >"$OUT/$tag-$round.log" 2>&1 &
        pid=$!
        wait_port || { echo "$b did not start" >&2; kill $pid 2>/dev/null; continue; }
        "$LT" p2p -c "$PAIRS" --qos 1 --size 64 --rate 0 --inflight 64 --session-expiry 3600 \
            --duration "$DURATION" --drain-timeout 30 -V 5 -p $PORT --quiet \
            --json "$OUT/$tag-$round.json" --broker-pid $pid >/dev/null 2>&1 || true
        kill $pid 2>/dev/null || true
        wait $pid 2>/dev/null || true
        if [ -d "$data" ]; then echo "  $b data directory after the run: $(du -sh "$data" | cut -f1)"; fi
        python3 - "$OUT/$tag-$round.json" "$b" "$round" <<'EOF'
import json, sys
path, b, rnd = sys.argv[1:]
try:
    r = json.load(open(path))
except (OSError, ValueError):
    print(f"{b} round {rnd}: no result"); sys.exit(0)
rate = r.get("received_during_load", 0) / r["load_s"] if r.get("load_s") else 0
lat = r.get("latency") or {}
print(f"{b} round {rnd}: {rate:,.0f} msg/s, p50 {lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms, lost {r.get('lost', 0)}")
EOF
    done
done

python3 - "$OUT" <<'EOF'
import glob, json, os, sys
from collections import defaultdict
runs = defaultdict(list)
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    name = os.path.basename(path)[:-5].rsplit("-", 1)[0]
    r = json.load(open(path))
    if r.get("load_s"):
        runs[name].append((r.get("received_during_load", 0) / r["load_s"], (r.get("latency") or {}).get("p99_ms"),
                           (r.get("broker") or {}).get("cpu_s_per_million_msgs")))
print("\n| broker | msg/s during load (each round) | best | p99 ms (best round) |\n|---|---|---|---|")
for name, rs in runs.items():
    best = max(rs, key=lambda x: x[0])
    each = ", ".join(f"{x[0]:,.0f}" for x in rs)
    p99 = f"{best[1]:.1f}" if isinstance(best[1], (int, float)) else "-"
    print(f"| {name} | {each} | {best[0]:,.0f} | {p99} |")
print(f"\nraw JSON: {sys.argv[1]}")
EOF
