#!/usr/bin/env bash
# A/B check of a data-path change: the same load generator runs against two ringmq builds
# (or one build with two sets of flags), alternating A and B within each round, and prints
# msg/s delivered during the load per run and the mean difference per scenario.
#
#   scripts/bench/ab.sh [--base REV] [--a-args "FLAGS"] [--b-args "FLAGS"] [--rounds N]
#                       [--only NAME,NAME] [--duration SECS]
#
#   --base REV     A is ringmq built from git revision REV (in a worktree under
#                  target/ab/); without it A is this checkout's build, like B.
#   --a-args/--b-args  extra broker flags for A / B (e.g. --b-args "--data-dir /tmp/d").
#   --rounds N     rounds (default 2); each round runs A and B for every scenario (A first
#                  in odd rounds, B first in even ones).
#   --only         scenarios: p2p-q0-64, p2p-q0-1k, p2p-q1-64, fanout-q1-64, fanin-q1-64
#                  (default all).
#
# B is always this checkout (`cargo build --release`). Equal limits as scripts/bench.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

BASE=""; A_ARGS=""; B_ARGS=""; ROUNDS=2; ONLY=""; DURATION=10
while [ $# -gt 0 ]; do
    case "$1" in
        --base) BASE=$2; shift 2 ;;
        --a-args) A_ARGS=$2; shift 2 ;;
        --b-args) B_ARGS=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

cargo build --release -q   # both binaries: ringmq, ringmq-loadtest
B_BIN=$ROOT/target/release/ringmq
A_BIN=$B_BIN
if [ -n "$BASE" ]; then
    rev=$(git rev-parse --short "$BASE")
    tree=$ROOT/target/ab/src-$rev
    [ -d "$tree" ] || git worktree add -f --detach "$tree" "$rev" >/dev/null
    (cd "$tree" && CARGO_TARGET_DIR=$ROOT/target/ab/build-$rev cargo build --release -q -p ringmq)
    A_BIN=$ROOT/target/ab/build-$rev/release/ringmq
fi
LT=$ROOT/target/release/ringmq-loadtest
LIMITS="--max-inflight 1000 --max-queued-messages 100000 --max-queued-bytes 1099511627776 --write-buffer 134217728"
OUT=$ROOT/target/ab/run-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"

SCENARIOS=(
    "p2p-q0-64|p2p -c 500 --qos 0 --size 64 --rate 1000"
    "p2p-q0-1k|p2p -c 500 --qos 0 --size 1024 --rate 1000"
    "p2p-q1-64|p2p -c 500 --qos 1 --size 64 --rate 0"
    "fanout-q1-64|fanout --publishers 1 --subscribers 500 --qos 1 --size 64 --rate 0"
    "fanin-q1-64|fanin -c 100 --qos 1 --size 64 --rate 0"
)
PORT=19900

wait_port() {
    for _ in $(seq 100); do
        (echo >/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

for round in $(seq "$ROUNDS"); do
    for s in "${SCENARIOS[@]}"; do
        name=${s%%|*}; args=${s#*|}
        if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then continue; fi
        # Odd rounds run A first, even rounds B first: whichever runs second in a pair
        # was measured slower (A against itself: -4%), so the order alternates.
        order="A B"; [ $((round % 2)) -eq 0 ] && order="B A"
        for side in $order; do
            if [ $side = A ]; then bin=$A_BIN; extra=$A_ARGS; else bin=$B_BIN; extra=$B_ARGS; fi
            # A build with a data directory gets a fresh one unless the flags choose.
            if [[ "$extra" != *--data-dir* && "$extra" != *--in-memory* ]] && "$bin" --help | grep -q -- --data-dir; then
                extra="$extra --data-dir $OUT/data-$name-$side-$round"
            fi
            # shellcheck disable=SC2086
            "$bin" --bind 127.0.0.1:$PORT --cores 2 $LIMITS $extra --log-level warn >"$OUT/$name-$side-$round.log" 2>&1 &
            pid=$!
            wait_port || { echo "broker $side did not start" >&2; kill $pid 2>/dev/null; exit 1; }
            # shellcheck disable=SC2086
            "$LT" $args --inflight 64 --duration "$DURATION" --drain-timeout 20 -V 5 -p $PORT --quiet \
                --json "$OUT/$name-$side-$round.json" --broker-pid $pid >/dev/null 2>&1 || true
            kill $pid 2>/dev/null || true
            wait $pid 2>/dev/null || true
            # Preallocated segments: a few runs of data directories fill a disk.
            rm -rf "$OUT/data-$name-$side-$round"
            python3 - "$OUT/$name-$side-$round.json" "$name" "$side" "$round" <<'EOF'
import json, sys
path, name, side, rnd = sys.argv[1:]
try:
    r = json.load(open(path))
except (OSError, ValueError):
    print(f"{name} {side} round {rnd}: no result")
    sys.exit(0)
rate = r.get("received_during_load", 0) / r["load_s"] if r.get("load_s") else 0
p99 = (r.get("latency") or {}).get("p99_ms")
print(f"{name} {side} round {rnd}: {rate:,.0f} msg/s, p99 {p99} ms, lost {r.get('lost', 0)}")
EOF
        done
    done
done

python3 - "$OUT" <<'EOF'
import glob, json, os, sys
from collections import defaultdict
rates = defaultdict(lambda: defaultdict(list))
lost = defaultdict(lambda: defaultdict(int))
for path in glob.glob(os.path.join(sys.argv[1], "*.json")):
    name, side, _ = os.path.basename(path)[:-5].rsplit("-", 2)
    r = json.load(open(path))
    if r.get("load_s"):
        rates[name][side].append(r.get("received_during_load", 0) / r["load_s"])
        lost[name][side] += r.get("lost", 0)
print("\n| scenario | A mean msg/s | B mean msg/s | B vs A | lost A / B |\n|---|---|---|---|---|")
for name in sorted(rates):
    a, b = rates[name]["A"], rates[name]["B"]
    if a and b:
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        print(f"| {name} | {ma:,.0f} | {mb:,.0f} | {100 * (mb - ma) / ma:+.1f}% | {lost[name]['A']:,} / {lost[name]['B']:,} |")
print(f"\nraw JSON: {sys.argv[1]}")
EOF
