#!/usr/bin/env bash
# The HTTP dashboard in a real browser: starts ringmq with its HTTP endpoint, a p2p load
# (ringmq-loadtest) and an MQTT 5 client "dash-victim" (paho-mqtt), opens the dashboard in
# headless Chromium (puppeteer-core) and checks, each wait polled against a deadline:
#   - the page's msg/s in and out go above 0 and the message chart draws its lines (and the
#     per-core busy chart draws one); a screenshot goes to target/acceptance/dashboard.png;
#   - typing dash-victim in the client search shows its row; Kick, Confirm? removes the row;
#   - the victim was disconnected with reason code 0x98 (Administrative action);
#   - no uncaught exception in the page.
#
#   scripts/acceptance/dashboard.sh [--broker target/release/ringmq] [--loadtest target/release/ringmq-loadtest]
#   scripts/acceptance/dashboard.sh --with-token         # the broker wants a bearer token (typed into the page)
#   scripts/acceptance/dashboard.sh --mock-url http://127.0.0.1:18083/   # only the page, against
#                                        # scripts/dev/dashboard_mock.py; no broker, no 0x98 check
#
# Options:
#   --broker PATH      broker binary (default target/release/ringmq)
#   --loadtest PATH    load generator (default: ringmq-loadtest next to the broker)
#   --port N           MQTT port (default: a free one)     --http-port N   HTTP port (default: a free one)
#   --with-token       start the broker with --http-token-file (a random token); the driver types
#                      the token into the page's token box when the page asks for one
#   --token TOKEN      the same with this token (with --mock-url: the mock's --token)
#   --mock-url URL     drive the page at URL instead of starting a broker (see scripts/dev/dashboard_mock.py)
#   --wait S           seconds each step may take (default 30)
#   --keep             keep the work directory (logs, victim's result)
#
# Installs chromium (apt-get), puppeteer-core (npm, in target/acceptance-node) and paho-mqtt
# (pip) when missing. Builds nothing. Exit status 0 when every check passed, 1 otherwise
# (2 on a usage error).
set -u -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/scripts/acceptance"
BROKER="$ROOT/target/release/ringmq"
LOADTEST=""
PORT=""
HPORT=""
MOCK_URL=""
WITH_TOKEN=0
TOKEN=""
WAIT_S=30
KEEP=0
VICTIM=dash-victim
PYTHON="${PYTHON:-python3}"

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --broker) BROKER="${2:?--broker needs a path}"; shift 2 ;;
        --loadtest) LOADTEST="${2:?--loadtest needs a path}"; shift 2 ;;
        --port) PORT="${2:?}"; shift 2 ;;
        --http-port) HPORT="${2:?}"; shift 2 ;;
        --mock-url) MOCK_URL="${2:?--mock-url needs a URL}"; shift 2 ;;
        --with-token) WITH_TOKEN=1; shift ;;
        --token) TOKEN="${2:?--token needs a value}"; WITH_TOKEN=1; shift 2 ;;
        --wait) WAIT_S="${2:?}"; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "dashboard.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
[ -n "$LOADTEST" ] || LOADTEST="$(dirname "$BROKER")/ringmq-loadtest"

FAILED=0
pass() { echo "PASS $1: $2"; }
fail() { echo "FAIL $1: $2"; FAILED=1; }

# ---- tools ----
# shellcheck source=chromium.sh
source "$ROOT/scripts/acceptance/chromium.sh" dashboard
NODE_DIR="$ROOT/target/acceptance-node"
if [ ! -f "$NODE_DIR/node_modules/puppeteer-core/package.json" ]; then
    echo "# installing puppeteer-core (npm, in $NODE_DIR)"
    mkdir -p "$NODE_DIR" &&
        (cd "$NODE_DIR" && npm install --silent --no-audit --no-fund puppeteer-core@22 >/dev/null 2>&1)
fi
[ -f "$NODE_DIR/node_modules/puppeteer-core/package.json" ] || { echo "FAIL dashboard: puppeteer-core missing"; exit 1; }
if [ -z "$MOCK_URL" ]; then
    if ! "$PYTHON" -c 'import paho.mqtt.client; from paho.mqtt.enums import CallbackAPIVersion' 2>/dev/null; then
        echo "# installing paho-mqtt 2.x (pip)"
        "$PYTHON" -m pip install --quiet 'paho-mqtt>=2' 2>/dev/null ||
            "$PYTHON" -m pip install --quiet --break-system-packages 'paho-mqtt>=2' ||
            { echo "FAIL dashboard: paho-mqtt 2.x is needed (pip install 'paho-mqtt>=2')"; exit 1; }
    fi
    [ -x "$BROKER" ] || { echo "FAIL dashboard: no broker at $BROKER (cargo build --release)"; exit 1; }
    [ -x "$LOADTEST" ] || { echo "FAIL dashboard: no load generator at $LOADTEST (cargo build --release)"; exit 1; }
fi

WORK=$(mktemp -d -t ringmq-dashboard.XXXXXX)
OUT="$ROOT/target/acceptance"
mkdir -p "$OUT"
SHOT="$OUT/dashboard.png"
rm -f "$SHOT"

# ---- cleanup: every process started here, by pid ----
PIDS=()
stop_pid() {  # TERM, up to 5 s, then KILL
    local pid="$1"
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}
cleanup() {
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[$i]}"; done
    if [ "$KEEP" = 1 ]; then echo "# work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'echo "# interrupted"; exit 1' INT TERM

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
http_status() {  # http_status URL -> prints the status code (000 when nothing answers)
    "$PYTHON" - "$1" <<'PY' 2>/dev/null || echo 000
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=2).status)
except urllib.error.HTTPError as e:
    print(e.code)
PY
}
wait_for() {  # wait_for SECONDS CMD...: polls CMD every 0.1 s until it succeeds; false at the deadline
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.1
    done
}

if [ -n "$MOCK_URL" ]; then
    URL="$MOCK_URL"
    echo "# mock mode: driving $URL (no broker, no load, no victim)"
else
    [ -n "$PORT" ] || PORT=$(free_port)
    [ -n "$HPORT" ] || HPORT=$(free_port)
    URL="http://127.0.0.1:$HPORT/"
    EXTRA=()
    if [ "$WITH_TOKEN" = 1 ]; then
        [ -n "$TOKEN" ] || TOKEN="dash-$RANDOM$RANDOM$RANDOM"
        printf '%s\n' "$TOKEN" > "$WORK/token"
        EXTRA=(--http-token-file "$WORK/token")
    fi
    echo "# broker: $BROKER --bind 127.0.0.1:$PORT --http-bind 127.0.0.1:$HPORT --in-memory --cores 2 ${EXTRA[*]}"
    "$BROKER" --bind "127.0.0.1:$PORT" --http-bind "127.0.0.1:$HPORT" --in-memory --cores 2 "${EXTRA[@]}" \
        > "$WORK/broker.log" 2>&1 &
    BROKER_PID=$!
    PIDS+=("$BROKER_PID")
    up_or_gone() { ! kill -0 "$BROKER_PID" 2>/dev/null || [ "$(http_status "${URL}healthz")" = 200 ]; }
    mqtt_up() { (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
    wait_for 20 up_or_gone
    if ! kill -0 "$BROKER_PID" 2>/dev/null; then
        wait "$BROKER_PID"
        fail dashboard-broker "the broker exited with status $? at start"
        tail -n 20 "$WORK/broker.log"
        exit 1
    elif [ "$(http_status "${URL}healthz")" != 200 ] || ! wait_for 5 mqtt_up; then
        fail dashboard-broker "not answering on ${URL}healthz and 127.0.0.1:$PORT within 20 s"
        tail -n 20 "$WORK/broker.log"
        exit 1
    fi
    pass dashboard-broker "MQTT on 127.0.0.1:$PORT, HTTP on $URL (pid $BROKER_PID)"

    "$PYTHON" "$HERE/dashboard_victim.py" --port "$PORT" --client-id "$VICTIM" \
        --out "$WORK/victim.reason" --ready "$WORK/victim.ready" --timeout 300 > "$WORK/victim.log" 2>&1 &
    VICTIM_PID=$!
    PIDS+=("$VICTIM_PID")
    if wait_for 15 test -e "$WORK/victim.ready"; then
        pass dashboard-victim "$VICTIM connected (MQTT 5, paho-mqtt)"
    else
        fail dashboard-victim "$VICTIM not connected within 15 s: $(cat "$WORK/victim.reason" "$WORK/victim.log" 2>/dev/null | head -3)"
        exit 1
    fi

    # 4 publisher/subscriber pairs at 250 msg/s each for 40 s, in the background.
    "$LOADTEST" p2p --port "$PORT" --clients 4 --rate 250 --duration 40 --workers 1 \
        --client-prefix dash-lt- --quiet > "$WORK/loadtest.log" 2>&1 &
    PIDS+=("$!")
    echo "# load: ringmq-loadtest p2p, 4 pairs x 250 msg/s for 40 s (pid $!)"
fi

# ---- the browser ----
NODE_DIR="$NODE_DIR" CHROMIUM="$CHROMIUM" URL="$URL" SHOT="$SHOT" VICTIM="$VICTIM" TOKEN="$TOKEN" WAIT_S="$WAIT_S" \
    timeout --kill-after=10 $((WAIT_S * 6 + 60)) node "$HERE/dashboard_drive.js" 2>&1 |
    tee "$WORK/drive.out" | grep --line-buffered -E '^(PASS|FAIL) '
DRIVE_RC=${PIPESTATUS[0]}
if [ $DRIVE_RC -ne 0 ]; then
    FAILED=1
    grep -qE '^FAIL ' "$WORK/drive.out" || { echo "FAIL dashboard-driver: exit status $DRIVE_RC"; tail -n 20 "$WORK/drive.out"; }
fi

# ---- what the kicked client got ----
if [ -n "$MOCK_URL" ]; then
    echo "SKIP dashboard-kick-reason: mock mode (no MQTT client to kick)"
elif ! grep -q '^PASS dashboard-kick:' "$WORK/drive.out"; then
    fail dashboard-kick-reason "not checked: the kick did not go through"
else
    if wait_for 10 test -s "$WORK/victim.reason"; then
        REASON=$(head -n 1 "$WORK/victim.reason")
        case "$REASON" in
            "152 "*"[DISCONNECT from the broker]"*) pass dashboard-kick-reason "$VICTIM got DISCONNECT 0x98: $REASON" ;;
            *) fail dashboard-kick-reason "$VICTIM expected DISCONNECT 0x98 (152 Administrative action), got: $REASON" ;;
        esac
    else
        fail dashboard-kick-reason "$VICTIM still connected 10 s after its row went from the page"
    fi
fi

if [ -z "$MOCK_URL" ]; then
    if kill -0 "$BROKER_PID" 2>/dev/null; then
        pass dashboard-broker-alive "broker $BROKER_PID still running"
    else
        fail dashboard-broker-alive "the broker exited during the run"
    fi
fi
if [ "$FAILED" != 0 ]; then
    if [ -z "$MOCK_URL" ]; then
        echo "# ---- broker log (last 20 lines) ----"; tail -n 20 "$WORK/broker.log"
        echo "# ---- load generator (last 10 lines) ----"; tail -n 10 "$WORK/loadtest.log" 2>/dev/null
        echo "# ---- victim ----"; cat "$WORK/victim.reason" "$WORK/victim.log" 2>/dev/null
    fi
    echo "# ---- driver output (last 20 lines) ----"; tail -n 20 "$WORK/drive.out"
    exit 1
fi
exit 0
