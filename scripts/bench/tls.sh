#!/usr/bin/env bash
# MQTT over TLS, side by side: ringmq, Mosquitto and rumqttd each with one TLS listener
# (the same certificate, made here with openssl), the load generator with --tls:
#   tls-p2p-q1   ringmq-loadtest p2p -c 50 --qos 1 --size 64 --rate 0 --inflight 100 --duration 8
#   tls-conn     ringmq-loadtest conn -c 2000 --connect-rate 1000 --duration 4 (every connect a full handshake)
# and the same p2p over plain TCP for each broker, for the cost of TLS. Equal limits as
# scripts/bench.sh. Prints one summary line per run (scripts/bench/summary.py).
#
#   [BROKERS="ringmq mosquitto rumqttd"] scripts/bench/tls.sh [--rounds N]
#                                         (needs target/release/{ringmq,ringmq-loadtest})
set -u -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROUNDS=1
[ "${1:-}" = "--rounds" ] && ROUNDS=$2
RINGMQ=$ROOT/target/release/ringmq
LT=$ROOT/target/release/ringmq-loadtest
RUMQTTD=${RUMQTTD:-$(command -v rumqttd || echo "$HOME/.cargo/bin/rumqttd")}
MOSQUITTO=${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}
OUT=$ROOT/target/bench/tls-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT/json"
cd "$OUT" || exit 1

# One CA and a server certificate for localhost (v3, with SAN).
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > server.ext
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj "/CN=bench CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 \
    -extfile server.ext 2>/dev/null
# Mosquitto started as root drops to its own user: it must be able to read them.
chmod 644 server.key server.pem ca.pem

LIMITS="--max-inflight 1000 --max-queued-messages 100000 --max-queued-bytes 1099511627776 --write-buffer 134217728"
mosq_conf() { # PORT TLS?
    sed -e "s/@PORT@/$1/" "$ROOT/scripts/bench/mosquitto.conf.in" | grep -v '^#' > "mosquitto-$1.conf"
    [ "$2" = tls ] && printf 'cafile %s/ca.pem\ncertfile %s/server.pem\nkeyfile %s/server.key\n' "$OUT" "$OUT" "$OUT" >> "mosquitto-$1.conf"
}
rumq_conf() { # PORT TLS?
    sed -e "s/@PORT@/$1/; s/@MQTT@/4/g" "$ROOT/scripts/bench/rumqttd.toml.in" > "rumqttd-$1.toml"
    if [ "$2" = tls ]; then
        python3 - "rumqttd-$1.toml" "$OUT" <<'PY'
import sys
p, d = sys.argv[1], sys.argv[2]
s = open(p).read()
s = s.replace("    [v4.1.connections]", f'    [v4.1.tls]\n    certpath = "{d}/server.pem"\n    keypath = "{d}/server.key"\n    [v4.1.connections]', 1)
open(p, "w").write(s)
PY
    fi
}
start() { # BROKER PORT TLS? -> BPID
    local b=$1 port=$2 tls=$3
    case $b in
        ringmq)
            if [ "$tls" = tls ]; then
                "$RINGMQ" --bind 127.0.0.1:0 --tls-bind "127.0.0.1:$port" --tls-cert server.pem --tls-key server.key \
                    --cores 2 --in-memory --log-level warn $LIMITS > "broker-$b-$port.log" 2>&1 &
            else
                "$RINGMQ" --bind "127.0.0.1:$port" --cores 2 --in-memory --log-level warn $LIMITS > "broker-$b-$port.log" 2>&1 &
            fi ;;
        mosquitto) mosq_conf "$port" "$tls"; "$MOSQUITTO" -c "mosquitto-$port.conf" > "broker-$b-$port.log" 2>&1 & ;;
        rumqttd) rumq_conf "$port" "$tls"; "$RUMQTTD" -c "rumqttd-$port.toml" > "broker-$b-$port.log" 2>&1 & ;;
    esac
    BPID=$!
    for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0; sleep 0.1; done
    echo "broker $b did not listen on $port" >&2
    return 1
}
run() { # ID BROKER TLS? ARGS...
    local id=$1 b=$2 tls=$3; shift 3
    local port=$((19810 + RANDOM % 100))
    start "$b" "$port" "$tls" || return 0
    local extra=()
    [ "$tls" = tls ] && extra=(--tls --ca ca.pem)
    timeout 120 "$LT" "$@" -p "$port" -H localhost "${extra[@]}" --quiet --json "json/$id.$b.json" --broker-pid "$BPID" \
        > "json/$id.$b.txt" 2>&1
    kill "$BPID" 2>/dev/null; wait "$BPID" 2>/dev/null
    python3 "$ROOT/scripts/bench/summary.py" line "json/$id.$b.json" "$id" "$b" 1 || true
    sleep 1
}
for _ in $(seq "$ROUNDS"); do
    for b in ${BROKERS:-ringmq mosquitto rumqttd}; do
        run tls-p2p-q1 "$b" tls p2p -c 50 --qos 1 --size 64 --rate 0 --inflight 100 --duration 8 --drain-timeout 20 -V 3
        run tcp-p2p-q1 "$b" plain p2p -c 50 --qos 1 --size 64 --rate 0 --inflight 100 --duration 8 --drain-timeout 20 -V 3
        run tls-conn "$b" tls conn -c 2000 --connect-rate 1000 --duration 4 -V 3
    done
done
echo "results in $OUT"
