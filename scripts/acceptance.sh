#!/usr/bin/env bash
# Third-party-client acceptance run: starts a broker on a free port, runs
# scripts/acceptance/check_qos0.py, scripts/acceptance/check_delivery.py,
# scripts/acceptance/check_mqtt5.py and scripts/fuzz_connections.py against it, checks the
# broker survived, stops it; for ringmq, then runs scripts/acceptance/check_durability.py
# (SIGKILL mid-stream and restart on the same data directory),
# scripts/acceptance/check_offline_queue.py (50,000 acknowledged messages for an offline
# persistent session at default flags, SIGKILL, restart: all delivered in order),
# scripts/acceptance/check_listeners.py (config file, PROXY protocol, TLS with mosquitto),
# scripts/acceptance/check_auth.py (password files, ACLs, SIGHUP reload),
# scripts/acceptance/hostile.sh (attacks by hostile clients),
# scripts/acceptance/prometheus.sh (a real Prometheus scraping /metrics under load) and
# scripts/acceptance/dashboard.sh (headless Chromium on the dashboard: live rates, kick) and
# scripts/acceptance/cluster.sh (etcd and three nodes: cross-node delivery, shared groups,
# retained sets, session takeover, a node killed, a node cut from etcd in a netns).
# Builds nothing.
#
#   scripts/acceptance.sh                                   # target/release/ringmq --bind 127.0.0.1:{port} --cores 2
#   scripts/acceptance.sh --broker-cmd "mosquitto -p {port}"
#
# Options:
#   --broker-cmd CMD        broker command line; {port} is replaced by the chosen port
#   --seed N                fuzz seed (default: random, printed)
#   --fuzz-connections N    default 20000
#   --fuzz-concurrency N    default 200
#   --skip-fuzz             run only check_qos0.py, check_delivery.py and check_mqtt5.py
#   --skip-hostile          leave out scripts/acceptance/hostile.sh (ringmq only; it starts
#                           its own brokers, one per attack)
#   --keep-log              keep the broker log file even on success
#
# Exit status: 0 when every step passed, 1 otherwise (2 on a usage error).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BROKER_CMD="target/release/ringmq --bind 127.0.0.1:{port} --cores 2 --in-memory"
SEED=""
FUZZ_CONNECTIONS=20000
FUZZ_CONCURRENCY=200
SKIP_FUZZ=0
SKIP_HOSTILE=0
KEEP_LOG=0
HOST=127.0.0.1
PYTHON="${PYTHON:-python3}"

usage() { sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --broker-cmd) BROKER_CMD="${2:?--broker-cmd needs a value}"; shift 2 ;;
        --seed) SEED="${2:?--seed needs a value}"; shift 2 ;;
        --fuzz-connections) FUZZ_CONNECTIONS="${2:?}"; shift 2 ;;
        --fuzz-concurrency) FUZZ_CONCURRENCY="${2:?}"; shift 2 ;;
        --skip-fuzz) SKIP_FUZZ=1; shift ;;
        --skip-hostile) SKIP_HOSTILE=1; shift ;;
        --keep-log) KEEP_LOG=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "acceptance.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$BROKER_CMD" in
    *"{port}"*) ;;
    *) echo "acceptance.sh: --broker-cmd must contain {port}" >&2; exit 2 ;;
esac
[ -n "$SEED" ] || SEED=$(( (RANDOM << 15) | RANDOM ))

cd "$ROOT" || exit 2

# The checks speak MQTT through paho-mqtt (PyPI) and Mosquitto's clients (Debian):
# installed here when missing, so a fresh machine runs them as they are.
if ! command -v mosquitto_sub >/dev/null; then
    echo "# installing mosquitto-clients (apt-get)"
    apt-get install -y mosquitto-clients >/dev/null 2>&1 ||
        { apt-get update >/dev/null 2>&1 && apt-get install -y mosquitto-clients >/dev/null 2>&1; } ||
        echo "acceptance.sh: could not install mosquitto-clients; the mosquitto-cli checks will fail" >&2
fi
if ! "$PYTHON" -c 'import paho.mqtt.client' 2>/dev/null; then
    echo "# installing paho-mqtt (pip)"
    "$PYTHON" -m pip install --quiet paho-mqtt 2>/dev/null ||
        "$PYTHON" -m pip install --quiet --break-system-packages paho-mqtt ||
        { echo "acceptance.sh: paho-mqtt is needed (pip install paho-mqtt)" >&2; exit 1; }
fi

# MQTT.js (npm `mqtt`) for the WebSocket checks, in target/acceptance-node.
NODE_DIR="$ROOT/target/acceptance-node"
if command -v node >/dev/null && [ ! -f "$NODE_DIR/node_modules/mqtt/package.json" ]; then
    echo "# installing MQTT.js (npm mqtt@5)"
    mkdir -p "$NODE_DIR"
    (cd "$NODE_DIR" && npm install --silent --no-audit --no-fund mqtt@5 >/dev/null 2>&1) ||
        echo "acceptance.sh: could not install MQTT.js; the MQTT.js check will fail" >&2
fi
export RINGMQ_NODE_MODULES="$NODE_DIR/node_modules"

PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')" || {
    echo "acceptance.sh: could not pick a free port" >&2; exit 2; }
CMD="${BROKER_CMD//\{port\}/$PORT}"
LOG="$(mktemp -t acceptance-broker.XXXXXX.log)"
BROKER_PID=""
FAILED=()

stop_broker() {
    [ -n "$BROKER_PID" ] || return 0
    if kill -0 "$BROKER_PID" 2>/dev/null; then
        kill -TERM "$BROKER_PID" 2>/dev/null
        for _ in $(seq 1 50); do               # up to 5 s for a clean stop
            kill -0 "$BROKER_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$BROKER_PID" 2>/dev/null; then
            echo "# broker did not stop within 5s of SIGTERM; sending SIGKILL"
            kill -KILL "$BROKER_PID" 2>/dev/null
        fi
    fi
    wait "$BROKER_PID" 2>/dev/null
    BROKER_PID=""
}
trap 'stop_broker' EXIT
trap 'echo "# interrupted"; exit 1' INT TERM

echo "# broker: $CMD"
echo "# log:    $LOG"
# exec: $! is the broker itself, not a wrapping shell, so the signals below reach it
bash -c "exec $CMD" >"$LOG" 2>&1 &
BROKER_PID=$!

# Wait (at most 20 s) until the port accepts TCP connections.
ready=0
for _ in $(seq 1 200); do
    if ! kill -0 "$BROKER_PID" 2>/dev/null; then
        break
    fi
    if "$PYTHON" -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()' \
        "$HOST" "$PORT" 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.1
done
if [ "$ready" != 1 ]; then
    if kill -0 "$BROKER_PID" 2>/dev/null; then
        echo "FAIL broker-start: port $PORT not accepting connections after 20s"
    else
        wait "$BROKER_PID"; rc=$?
        BROKER_PID=""
        echo "FAIL broker-start: broker exited with status $rc before accepting connections"
    fi
    echo "# ---- broker log (last 40 lines) ----"; tail -n 40 "$LOG"
    exit 1
fi
echo "PASS broker-start: listening on $HOST:$PORT (pid $BROKER_PID)"

run_step() {  # run_step NAME TIMEOUT_SECONDS CMD...
    local name="$1" limit="$2"; shift 2
    echo "# ---- $name: $* ----"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "FAIL $name: did not finish within ${limit}s"
    fi
    if [ $rc -ne 0 ]; then
        FAILED+=("$name")
    fi
    return 0
}

run_step check_qos0 300 "$PYTHON" scripts/acceptance/check_qos0.py --host "$HOST" --port "$PORT"
run_step check_delivery 300 "$PYTHON" scripts/acceptance/check_delivery.py --host "$HOST" --port "$PORT"
run_step check_mqtt5 300 "$PYTHON" scripts/acceptance/check_mqtt5.py --host "$HOST" --port "$PORT"

if [ "$SKIP_FUZZ" = 0 ]; then
    run_step fuzz_connections 1200 "$PYTHON" scripts/fuzz_connections.py --host "$HOST" --port "$PORT" \
        --connections "$FUZZ_CONNECTIONS" --concurrency "$FUZZ_CONCURRENCY" --seed "$SEED"
fi

if kill -0 "$BROKER_PID" 2>/dev/null; then
    echo "PASS broker-alive: broker process $BROKER_PID still running after the checks"
else
    wait "$BROKER_PID"; rc=$?
    BROKER_PID=""
    echo "FAIL broker-alive: broker process exited with status $rc during the checks"
    FAILED+=("broker-alive")
fi

stop_broker

case "$BROKER_CMD" in
    target/release/ringmq*)
        run_step check_durability 300 "$PYTHON" scripts/acceptance/check_durability.py \
            --broker-cmd "target/release/ringmq --cores 2" --port "$PORT"
        run_step check_offline_queue 900 "$PYTHON" scripts/acceptance/check_offline_queue.py \
            --broker-cmd "target/release/ringmq --cores 2" --port "$PORT"
        run_step check_listeners 300 "$PYTHON" scripts/acceptance/check_listeners.py \
            --broker target/release/ringmq
        run_step check_auth 300 "$PYTHON" scripts/acceptance/check_auth.py \
            --broker target/release/ringmq
        if [ "$SKIP_HOSTILE" = 0 ]; then
            run_step hostile 1800 scripts/acceptance/hostile.sh --broker target/release/ringmq
        fi
        run_step prometheus 600 scripts/acceptance/prometheus.sh --broker target/release/ringmq \
            --loadtest target/release/ringmq-loadtest
        run_step dashboard 600 scripts/acceptance/dashboard.sh --broker target/release/ringmq \
            --loadtest target/release/ringmq-loadtest
        run_step cluster 300 scripts/acceptance/cluster.sh --ringmq target/release/ringmq ;;
esac

if [ ${#FAILED[@]} -ne 0 ]; then
    echo "# ---- broker log (last 40 lines of $LOG) ----"; tail -n 40 "$LOG"
    echo "# ACCEPTANCE FAILED: ${FAILED[*]} (fuzz seed $SEED, broker: $CMD)"
    exit 1
fi
[ "$KEEP_LOG" = 1 ] || rm -f "$LOG"
echo "# ACCEPTANCE PASSED (fuzz seed $SEED, broker: $CMD)"
exit 0
