#!/usr/bin/env bash
# Prometheus against ringmq's /metrics: starts the broker with its HTTP endpoint
# (--http-bind) and a real Prometheus scraping it every second, runs `ringmq-loadtest p2p`
# (QoS 1) and checks, with scripts/acceptance/check_prometheus.py, that the target is up,
# the expected series exist, and the median of `sum(rate(ringmq_messages_sent_total[10s]))`
# over the steady middle of the load is within 5% of the delivery rate the load tool
# measured.
#
#   scripts/acceptance/prometheus.sh [--broker target/release/ringmq]
#                                    [--loadtest target/release/ringmq-loadtest]
#                                    [--pairs 20] [--rate 500] [--duration 40] [--keep]
#
# The broker runs as BROKER --bind 127.0.0.1:P --http-bind 127.0.0.1:H --in-memory (free
# loopback ports); --broker may name any program taking those flags. Installs prometheus
# (apt-get) when missing. --keep leaves the work directory (logs, prometheus.yml, the load
# tool's JSON) in place. Builds nothing. Exit status 0 when every check passed.
set -u -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BROKER="$ROOT/target/release/ringmq"
LOADTEST="$ROOT/target/release/ringmq-loadtest"
PAIRS=20
RATE=500
DURATION=40
KEEP=0
PYTHON="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
    case "$1" in
        --broker) BROKER="${2:?--broker needs a value}"; shift 2 ;;
        --loadtest) LOADTEST="${2:?--loadtest needs a value}"; shift 2 ;;
        --pairs) PAIRS="${2:?}"; shift 2 ;;
        --rate) RATE="${2:?}"; shift 2 ;;
        --duration) DURATION="${2:?}"; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "prometheus.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$DURATION" -ge 30 ] 2>/dev/null || { echo "prometheus.sh: --duration must be at least 30" >&2; exit 2; }

PROMETHEUS=$(command -v prometheus || true)
if [ -z "$PROMETHEUS" ]; then
    echo "# installing prometheus (apt-get)"
    # Without recommends: prometheus-node-exporter is not needed.
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 ||
        { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1; }
    PROMETHEUS=$(command -v prometheus || true)
    [ -n "$PROMETHEUS" ] || { echo "FAIL prometheus-install: prometheus could not be installed"; exit 1; }
fi
for bin in "$BROKER" "$LOADTEST"; do
    [ -x "$bin" ] || { echo "FAIL prometheus: no executable $bin (cargo build --release)"; exit 1; }
done

# Three distinct free loopback ports: MQTT, the broker's HTTP endpoint, Prometheus.
read -r PORT HPORT PPORT < <("$PYTHON" -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
for s in socks:
    s.close()') || { echo "prometheus.sh: could not pick free ports" >&2; exit 2; }

WORK=$(mktemp -d -t ringmq-prometheus.XXXXXX)
BROKER_PID=""
PROM_PID=""
HELPER_PID=""
stop() {  # stop PID: SIGTERM, up to 5 s, then SIGKILL
    local pid="$1"
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}
cleanup() {
    stop "$HELPER_PID"
    # The load tool is the helper's child; its pid is left here in case the helper died first.
    [ -f "$WORK/loadtest.pid" ] && stop "$(cat "$WORK/loadtest.pid")"
    stop "$PROM_PID"
    stop "$BROKER_PID"
    if [ "$KEEP" = 1 ]; then echo "# kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
# Once: a timeout's TERM can come twice (to this process, then to its process group).
trap 'trap "" INT TERM; echo "# interrupted"; exit 1' INT TERM

echo "# broker: $BROKER --bind 127.0.0.1:$PORT --http-bind 127.0.0.1:$HPORT --in-memory"
"$BROKER" --bind "127.0.0.1:$PORT" --http-bind "127.0.0.1:$HPORT" --in-memory >"$WORK/broker.log" 2>&1 &
BROKER_PID=$!

cat >"$WORK/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: ringmq
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:$HPORT"]
YAML
echo "# prometheus: $("$PROMETHEUS" --version 2>&1 | head -1), http://127.0.0.1:$PPORT, scraping 127.0.0.1:$HPORT/metrics every 1s"
"$PROMETHEUS" --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$PPORT" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!

# In the background and waited for, so that a TERM or INT reaches the trap at once.
timeout --kill-after=10 $((DURATION + 200)) "$PYTHON" "$ROOT/scripts/acceptance/check_prometheus.py" \
    --metrics-url "http://127.0.0.1:$HPORT/metrics" --prom-url "http://127.0.0.1:$PPORT" \
    --loadtest "$LOADTEST" --port "$PORT" --pairs "$PAIRS" --rate "$RATE" --duration "$DURATION" \
    --window 15 $((DURATION - 5)) --json "$WORK/loadtest.json" --pid-file "$WORK/loadtest.pid" \
    --broker-pid "$BROKER_PID" &
HELPER_PID=$!
wait "$HELPER_PID"
rc=$?
HELPER_PID=""
[ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "FAIL prometheus: check_prometheus.py did not finish in time"

if kill -0 "$BROKER_PID" 2>/dev/null; then
    echo "PASS broker-alive: broker $BROKER_PID still running"
else
    wait "$BROKER_PID"; echo "FAIL broker-alive: the broker exited with status $?"
    BROKER_PID=""
    rc=1
fi
if [ $rc -ne 0 ]; then
    echo "# ---- broker log (last 20 lines) ----"; tail -n 20 "$WORK/broker.log"
    echo "# ---- prometheus log (last 20 lines) ----"; tail -n 20 "$WORK/prometheus.log"
    [ -f "$WORK/loadtest.txt" ] && { echo "# ---- load tool ----"; cat "$WORK/loadtest.txt"; }
    echo "# PROMETHEUS FAILED"
    exit 1
fi
echo "# PROMETHEUS PASSED"
exit 0
