#!/usr/bin/env bash
# Cross-node rows: the same QoS 1 loads against one ringmq node and across a 3-node ringmq
# cluster (etcd + nodes a, b, c), all on this machine.
#
#   scripts/bench/cluster.sh [--rounds N] [--duration SECS] [--pairs N] [--subscribers N]
#                            [--cores N] [--no-build]
#
# Rows, each a fresh etcd and fresh brokers (new data directories), QoS 1, 64 B, --rate 0,
# in flight 64, MQTT 5:
#   p2p    N pairs:  single node | cluster, every client on a | publishers on a, subscribers on b
#   fanout 1 -> M:   single node | cluster, every client on a | publisher on a, subscribers on b and c
# Every node runs --cores N (default 2, like the single node). etcd, the three nodes and the
# load generator share this machine's cores: the cross-node figures measure the forwarding
# path and its latency, not what three machines would do. Prints one line per run and a
# markdown table; raw JSON and logs go to target/bench/cluster-<timestamp>/ (the data
# directories are removed after each run).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
ROUNDS=1; DURATION=10; PAIRS=100; SUBSCRIBERS=100; CORES=2; BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --pairs) PAIRS=$2; shift 2 ;;
        --subscribers) SUBSCRIBERS=$2; shift 2 ;;
        --cores) CORES=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ "$BUILD" = 1 ] && cargo build --release -q   # both binaries: ringmq, ringmq-loadtest
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
RINGMQ=$BIN/ringmq
LT=$BIN/ringmq-loadtest
ETCD=$(command -v etcd || true)
[ -x "$RINGMQ" ] && [ -x "$LT" ] || { echo "missing $RINGMQ or $LT" >&2; exit 1; }
[ -n "$ETCD" ] || { echo "etcd is not installed (apt-get install etcd-server)" >&2; exit 1; }
OUT=$ROOT/target/bench/cluster-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"

# The same limits as scripts/bench.sh, so the single-node row compares with BENCHMARKS.md.
LIMITS="--max-inflight 1000 --max-queued-messages 100000 --max-queued-bytes 1099511627776 --write-buffer 134217728"
ETCD_PORT=23799; ETCD_PEER=23899
NODES=(a:21983:27983 b:21984:27984 c:21985:27985)   # name:MQTT port:link port
SINGLE_PORT=21986
HOSTS=127.0.0.1:21983,127.0.0.1:21984,127.0.0.1:21985
COMMON="--qos 1 --size 64 --rate 0 --inflight 64 --duration $DURATION --drain-timeout 30 -V 5"
# id | layout | load generator arguments (without the endpoints)
ROWS=(
    "p2p-single|single|p2p -c $PAIRS $COMMON"
    "p2p-cluster-a|cluster|p2p -c $PAIRS $COMMON --pub-nodes 0 --sub-nodes 0"
    "p2p-a-to-b|cluster|p2p -c $PAIRS $COMMON --pub-nodes 0 --sub-nodes 1"
    "fanout-single|single|fanout --publishers 1 --subscribers $SUBSCRIBERS $COMMON"
    "fanout-cluster-a|cluster|fanout --publishers 1 --subscribers $SUBSCRIBERS $COMMON --pub-nodes 0 --sub-nodes 0"
    "fanout-a-to-bc|cluster|fanout --publishers 1 --subscribers $SUBSCRIBERS $COMMON --pub-nodes 0 --sub-nodes 1,2"
)

# Keep these ports out of the ephemeral range (as scripts/bench.sh does for its own), so
# that no client or port-0 listener of other work takes one between two runs.
RESERVE="21983-21986,23799,23899,27983-27985"
if [ -w /proc/sys/net/ipv4/ip_local_reserved_ports ]; then
    reserved=$(cat /proc/sys/net/ipv4/ip_local_reserved_ports)
    case ",$reserved," in *",$RESERVE,"*) ;; *)
        echo "${reserved:+$reserved,}$RESERVE" > /proc/sys/net/ipv4/ip_local_reserved_ports || true ;;
    esac
fi

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
SHARE="etcd, 3 ringmq nodes (--cores $CORES each) and the load generator share this machine's $(nproc) cores"

PIDS=()   # pid:name of what this script started and still has to stop
stop_all() { # brokers first (a node deregisters from etcd as it stops), then etcd
    local p
    for p in "${PIDS[@]}"; do [ "${p#*:}" = etcd ] || stop_one "$p"; done
    for p in "${PIDS[@]}"; do [ "${p#*:}" != etcd ] || stop_one "$p"; done
    PIDS=()
}
stop_one() { # PID:NAME: SIGTERM, then SIGKILL after 10 s (said on the output)
    local pid=${1%%:*} t0=$SECONDS
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "${1#*:} (pid $pid) still running 10 s after SIGTERM: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    elif [ $(( SECONDS - t0 )) -ge 3 ]; then
        log "${1#*:} (pid $pid) took $(( SECONDS - t0 )) s to stop after SIGTERM"
    fi
    wait "$pid" 2>/dev/null || true
}
trap stop_all EXIT
trap 'stop_all; exit 130' INT TERM

listening() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q LISTEN; }
free_port() { # PORT: waits a little for the previous run's process to let go
    for _ in $(seq 50); do listening "$1" || return 0; sleep 0.1; done
    echo "port $1 is taken by another process" >&2
    return 1
}
wait_for() { # SECONDS WHAT COMMAND...: polls COMMAND every 0.1 s
    local deadline=$(( $(date +%s) + $1 )) what=$2; shift 2
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "timed out waiting for $what" >&2; return 1; }
        sleep 0.1
    done
}
links_up() { [ "$(grep -c 'cluster: link up' "$1")" -ge $(( ${#NODES[@]} - 1 )) ]; }
# CPU seconds (user + system) the processes used so far.
cpu_s() { local t=0 pid; for pid in "$@"; do t=$(( t + $(awk '{print $14 + $15}' "/proc/$pid/stat") )); done
    awk -v t="$t" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'; }
# CPU seconds so far of the processes' node bridge threads and of their shard threads
# (glommio names an executor's threads `<name>-<id>`: ringmq-0, ringmq-1, ...): "BRIDGE
# SHARDS" (where a cross-node message's work is done: the multiplexed link's one thread per
# node, or the cores).
thread_cpu() { local pid task
    for pid in "$@"; do for task in /proc/"$pid"/task/*; do cat "$task/stat" 2>/dev/null; done; done |
        awk -v hz="$(getconf CLK_TCK)" '{ match($0, /\(([^)]*)\)/); name = substr($0, RSTART + 1, RLENGTH - 2)
            n = split(substr($0, RSTART + RLENGTH + 1), f, " "); t = f[12] + f[13]
            if (name == "ringmq-bridge") b += t; else if (name ~ /^ringmq-[0-9]+$/) s += t }
            END { printf "%.2f %.2f", b / hz, s / hz }'; }

# start_single RUN -> BROKERS (pids), ENDPOINTS
start_single() {
    free_port $SINGLE_PORT
    "$RINGMQ" --bind 127.0.0.1:$SINGLE_PORT --cores "$CORES" $LIMITS --data-dir "$OUT/data-$1-single" \
        --http-bind none --log-level warn > "$OUT/$1.single.log" 2>&1 &
    PIDS+=("$!:single"); BROKERS=$!
    wait_for 10 "the single node" listening $SINGLE_PORT
    ENDPOINTS=127.0.0.1:$SINGLE_PORT
}

# start_cluster RUN -> BROKERS (pids of the nodes), ENDPOINTS
start_cluster() {
    local run=$1 n name port link
    free_port $ETCD_PORT; free_port $ETCD_PEER
    "$ETCD" --data-dir "$OUT/etcd-$run" --listen-client-urls http://127.0.0.1:$ETCD_PORT \
        --advertise-client-urls http://127.0.0.1:$ETCD_PORT --listen-peer-urls http://127.0.0.1:$ETCD_PEER \
        --initial-advertise-peer-urls http://127.0.0.1:$ETCD_PEER --initial-cluster default=http://127.0.0.1:$ETCD_PEER \
        > "$OUT/$run.etcd.log" 2>&1 &
    PIDS+=("$!:etcd")
    wait_for 20 etcd curl -sf http://127.0.0.1:$ETCD_PORT/health -o /dev/null
    BROKERS=""
    for n in "${NODES[@]}"; do
        IFS=: read -r name port link <<< "$n"
        free_port "$port"; free_port "$link"
        "$RINGMQ" --bind 127.0.0.1:"$port" --cores "$CORES" $LIMITS --data-dir "$OUT/data-$run-$name" \
            --http-bind none --log-level info --cluster etcd://127.0.0.1:$ETCD_PORT --cluster-name bench \
            --node-name "$name" --node-bind 127.0.0.1:"$link" > "$OUT/$run.$name.log" 2>&1 &
        PIDS+=("$!:node $name"); BROKERS="$BROKERS $!"
    done
    for n in "${NODES[@]}"; do
        IFS=: read -r name port link <<< "$n"
        wait_for 20 "node $name" listening "$port"
        wait_for 20 "node $name's links to the other nodes" links_up "$OUT/$run.$name.log"
    done
    ENDPOINTS=$HOSTS
}

log "results in $OUT"
log "$SHARE"
: > "$OUT/runs.tsv"
for round in $(seq "$ROUNDS"); do
    for row in "${ROWS[@]}"; do
        IFS='|' read -r id layout args <<< "$row"
        run=$id.r$round
        "start_$layout" "$run"
        # shellcheck disable=SC2206
        cmd=("$LT" $args -H "$ENDPOINTS" --quiet --json "$OUT/$run.json")
        # shellcheck disable=SC2086
        before=$(cpu_s $BROKERS)
        # shellcheck disable=SC2086
        threads_before=$(thread_cpu $BROKERS)
        rc=0
        timeout -k 5 $(( DURATION + 120 )) "${cmd[@]}" > "$OUT/$run.txt" 2>&1 || rc=$?
        alive=yes
        for pid in $BROKERS; do kill -0 "$pid" 2>/dev/null || alive=no; done
        # shellcheck disable=SC2086
        after=$(cpu_s $BROKERS 2>/dev/null || echo "$before")
        # shellcheck disable=SC2086
        threads_after=$(thread_cpu $BROKERS 2>/dev/null || echo "$threads_before")
        stop_all
        rm -rf "$OUT/data-$run-"* "$OUT/etcd-$run"   # preallocated logs: 64 MiB a segment
        cpu=$(awk -v a="$after" -v b="$before" 'BEGIN { printf "%.2f", a - b }')
        threads=$(awk -v a="$threads_after" -v b="$threads_before" \
            'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.2f/%.2f", x[1] - y[1], x[2] - y[2] }')
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$round" "$layout" "$OUT/$run.json" "rc=$rc alive=$alive" \
            "$cpu" "$threads" "${cmd[*]/#$ROOT\//}" >> "$OUT/runs.tsv"
        python3 - "$OUT/$run.json" "$id" "$round" "$cpu $threads" "rc=$rc" "alive=$alive" <<'EOF'
import json, sys
path, sid, rnd, cpu, *notes = sys.argv[1:]
notes = " ".join(n for n in notes if n not in ("rc=0", "alive=yes"))
try:
    r = json.load(open(path))
except (OSError, ValueError):
    print(f"  {sid:<18} r{rnd}  NO RESULT {notes}"); sys.exit(0)
rate = r["received_during_load"] / r["load_s"] if r.get("load_s") else 0
lat = r.get("latency") or {}
print(f"  {sid:<18} r{rnd}  {rate:>10,.0f} msg/s  p50 {lat.get('p50_ms', 0):.2f}  p99 {lat.get('p99_ms', 0):.2f} ms  "
      f"lost {r.get('lost', 0)}  dup {r.get('duplicates', 0)}  broker CPU {cpu} s {notes}")
EOF
        sleep 1
    done
done

NAMES="127.0.0.1:$SINGLE_PORT=single"
for n in "${NODES[@]}"; do IFS=: read -r name port link <<< "$n"; NAMES="$NAMES,127.0.0.1:$port=$name"; done
python3 - "$OUT" "$SHARE" "$NAMES" <<'EOF'
import json, sys
out, share, names = sys.argv[1:]
names = dict(n.split("=") for n in names.split(","))
print(f"\n{share}.\n")
print("| row | msg/s delivered during load | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | lost / dup | broker CPU s (all nodes) | bridge / shard threads CPU s | bridge µs per message | placement |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
commands = []
for line in open(f"{out}/runs.tsv"):
    sid, rnd, layout, path, status, cpu, threads, cmd = line.rstrip("\n").split("\t")
    commands.append(cmd)
    try:
        r = json.load(open(path))
    except (OSError, ValueError):
        print(f"| {sid} r{rnd} | no result ({status}) | | | | | | | {cpu} | {threads} | | |")
        continue
    rate = r["received_during_load"] / r["load_s"] if r.get("load_s") else 0
    lat = r.get("latency") or {}
    place = "; ".join(f"{g} " + ", ".join(f"{e['clients']} on {names.get(e['endpoint'], e['endpoint'])}" for e in used)
                      for g, used in (r.get("placement") or {}).items())
    flag = "" if status == "rc=0 alive=yes" else f" ({status})"
    bridge = float(threads.split("/")[0])
    received = r.get("received") or r.get("received_during_load") or 0
    per = f"{bridge * 1e6 / received:.2f}" if bridge > 0 and received else ""
    print(f"| {sid} r{rnd}{flag} | {rate:,.0f} | {lat.get('p50_ms', 0):.2f} | {lat.get('p90_ms', 0):.2f} | "
          f"{lat.get('p99_ms', 0):.2f} | {lat.get('p99.9_ms', 0):.2f} | {lat.get('max_ms', 0):.2f} | "
          f"{r.get('lost', 0)} / {r.get('duplicates', 0)} | {cpu} | {threads} | {per} | {place} |")
print("\nCommands (" + ", ".join(f"{e}: {n}" for e, n in names.items()) + "):")
for c in dict.fromkeys(commands):
    print(f"    {c}")
print(f"\nraw JSON and logs: {out}")
EOF
