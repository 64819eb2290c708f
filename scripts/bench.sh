#!/usr/bin/env bash
# ringmq vs Mosquitto vs rumqttd on loopback, with the bundled load generator.
#
#   scripts/bench.sh                 full matrix, 2 rounds, and the overload rows (~70-85 min
#                                    on 2 cores)
#   scripts/bench.sh --quick         ~3 min subset, 1 round (rewrites BENCHMARKS.md)
#   scripts/bench.sh --brokers ringmq,mosquitto
#   scripts/bench.sh --only conn     just some scenarios: fanin, fanout, p2p, sharedsub, conn, ramp,
#                                    overload, or scenario ids (e.g. p2p-q1-64); the report
#                                    goes to the results directory only, unless --out is given
#   scripts/bench.sh --only overload open loop past saturation, MQTT 3.1.1 and 5, every broker
#                                    at its defaults and at equal limits (~25 min)
#   scripts/bench.sh --only tls      transports: p2p QoS 1 over tcp, tls, ws and wss, and TLS
#                                    connects with full handshakes, each broker with the same
#                                    certificate (~8 min)
#
# Every broker is started fresh for every run (so RSS and CPU figures belong to that run
# alone) and stopped afterwards; brokers are run in alternation so that all of them share
# the machine's noise. Raw JSON per run, broker logs and the rendered report are kept in
# target/bench/<timestamp>/. See scripts/bench/README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE="$ROOT/scripts/bench"
ALL_BROKERS="ringmq,ringmq-1core,mosquitto,rumqttd"
# The overload rows also run ringmq and Mosquitto at their defaults (no flags; Mosquitto's
# stock listener). rumqttd has no defaults of its own (it needs a config file): its rows
# use the equal-limits config.
OL_BROKERS="ringmq-default,ringmq,mosquitto-default,mosquitto,rumqttd"
# The same limits the peers' configs set (scripts/bench/*.in): in-flight 1000, queues of
# 100,000 messages without a byte bound (ringmq: and 128 MiB of QoS 0 backlog per
# connection, about what 100,000 queued 1 KiB messages hold), so no broker drops by
# configuration.
RINGMQ_LIMITS="--max-inflight 1000 --max-queued-messages 100000 --max-queued-bytes 1099511627776 --write-buffer 134217728"

MODE=full
BROKERS=$ALL_BROKERS
ONLY=""
ROUNDS=""
DURATION=""
MQTT=5
BUILD=1
OUT=""
RESULTS=""

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; cat <<EOF

Options:
  --quick              quick subset (p2p 100 pairs QoS 0/1, fanin 100->1 QoS 0; 64 B; 10 s)
  --brokers LIST       comma-separated subset of: $ALL_BROKERS (overload rows: of $OL_BROKERS)
  --only LIST          comma-separated scenario families (fanin,fanout,p2p,sharedsub,conn,ramp,overload,tls) or ids
  --rounds N           rounds of the throughput matrix (default: 2 full, 1 quick)
  --duration S         seconds of load per throughput run (default: 20 full, 10 quick)
  --mqtt 3|5           protocol version for every client (default 5; rumqttd gets its v4
                       server for 3 and its v5 server for 5)
  --no-build           skip cargo build --release
  --out FILE           write the report here (default: BENCHMARKS.md for full/quick runs)
  --results DIR        raw results directory (default: target/bench/<timestamp>)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --quick) MODE=quick ;;
        --brokers) BROKERS=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --mqtt) MQTT=$2; shift ;;
        --no-build) BUILD=0 ;;
        --out) OUT=$2; shift ;;
        --results) RESULTS=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$MQTT" in 3|5) ;; *) echo "--mqtt must be 3 or 5" >&2; exit 2 ;; esac
for b in ${BROKERS//,/ }; do
    case ",$ALL_BROKERS,$OL_BROKERS," in *",$b,"*) ;; *) echo "unknown broker: $b" >&2; exit 2 ;; esac
done

if [ "$MODE" = quick ]; then
    : "${ROUNDS:=1}" "${DURATION:=10}"
    DRAIN=5
else
    : "${ROUNDS:=2}" "${DURATION:=20}"
    DRAIN=30
fi
if [ -z "$OUT" ] && [ -z "$ONLY" ]; then OUT="$ROOT/BENCHMARKS.md"; fi
STAMP=$(date +%Y%m%d-%H%M%S)
: "${RESULTS:=$ROOT/target/bench/$STAMP}"
mkdir -p "$RESULTS/json" "$RESULTS/logs"
: > "$RESULTS/runs.tsv"
: > "$RESULTS/brokers.tsv"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# ---------------------------------------------------------------- scenarios
# id | loadtest command and its scenario-specific arguments
SCEN=()
add() { SCEN+=("$1|$2"); }
if [ "$MODE" = quick ]; then
    add p2p-q0-64   "p2p -c 100 --qos 0 --size 64 --rate 5000"     # 500k msg/s offered
    add p2p-q1-64   "p2p -c 100 --qos 1 --size 64 --rate 0"
    add p2p-q2-64   "p2p -c 100 --qos 2 --size 64 --rate 0"
    add fanin-q0-64 "fanin -c 100 --qos 0 --size 64 --rate 2000"   # 200k msg/s offered
    add sharedsub-q1-64 "sharedsub -c 100 --subscribers 3 --qos 1 --size 64 --rate 0"
else
    for fam in fanin fanout p2p; do
        # QoS 0: a fixed, high offered rate (per publisher); QoS 1: --rate 0
        case $fam in
            fanin)  a="fanin -c 100"; r0=2000 ;;   # 100 publishers -> 1 subscriber: 200k msg/s
            fanout) a="fanout --publishers 1 --subscribers 500"; r0=1000 ;;  # 500k deliveries/s
            p2p)    a="p2p -c 500"; r0=1000 ;;     # 500 pairs: 500k msg/s
        esac
        for q in 0 1; do
            r=$([ $q = 0 ] && echo $r0 || echo 0)
            add "$fam-q$q-64" "$a --qos $q --size 64 --rate $r"
            add "$fam-q$q-1k" "$a --qos $q --size 1024 --rate $r"
        done
    done
    add p2p-q2-64 "p2p -c 500 --qos 2 --size 64 --rate 0"
    # Shared subscription: 100 publishers -> one group of 3 members.
    add sharedsub-q0-64 "sharedsub -c 100 --subscribers 3 --qos 0 --size 64 --rate 1000"   # 100k msg/s offered
    add sharedsub-q1-64 "sharedsub -c 100 --subscribers 3 --qos 1 --size 64 --rate 0"
fi
# Offered load. QoS 1: as fast as possible (--rate 0), each publisher keeping at most
# --inflight 64 messages unacknowledged. QoS 0: a fixed high rate, the same for every broker;
# QoS 0 at --rate 0 is unbounded open-loop overload (publishers write as fast as the broker
# reads) and measures how a broker collapses, not what it sustains. Only deliveries made
# during the load phase count as throughput.
COMMON="--inflight 64 --duration $DURATION --drain-timeout $DRAIN -V $MQTT"

# 50k idle connections; fewer when the hard open-files limit is lower (without
# CAP_SYS_RESOURCE the limit cannot be raised; the report says so).
CONN_WANTED=50000
# Saturation ramp, p2p QoS 1 500 pairs, per-publisher rates (x500 = offered msg/s).
RAMP_PAIRS=500
RAMP_RATES="20 50 100 200 500 1000 2000 4000 8000 16000"
RAMP_DURATION=10
RAMP_P99_MS=50
RAMP_MIN_RATIO=0.95
RAMP_ARGS="p2p -c $RAMP_PAIRS --qos 1 --size 64 --inflight 64 --duration $RAMP_DURATION --drain-timeout 10 -V $MQTT"

# Open loop past saturation (the overload rows): --rate 0 for QoS 0 too (publishers write
# as fast as the broker reads) and QoS 1 paced only by a window of 100, 8 s, MQTT 3.1.1 and
# 5. What counts: lossless throughput (a run that lost messages is marked lossy and its ratio
# is no win), deliveries within the load window, lost, p50/p99/p99.9.
OL_SCEN=()
for fam in fanin fanout p2p; do
    case $fam in
        fanin)  a="fanin -c 10" ;;                               # 10 publishers -> 1 subscriber
        fanout) a="fanout --publishers 1 --subscribers 100" ;;   # 1 -> 100
        p2p)    a="p2p -c 50" ;;                                 # 50 pairs
    esac
    for q in 0 1; do OL_SCEN+=("ol-$fam-q$q|$a --qos $q --size 64 --rate 0 --inflight 100"); done
done
OL_DURATION=8
OL_DRAIN=20

# Transports (the tls rows): the same p2p QoS 1 over each transport a broker serves, and a
# burst of connections over TLS, every one a full handshake (no session resumption), offered
# faster than any broker here completes them so the rate is each broker's ceiling. MQTT
# 3.1.1: rumqttd serves WebSocket with its v4 server only. One server certificate for every
# broker (RSA 2048, made with openssl below). Equal limits as the matrix.
TR_P2P="p2p -c 50 --qos 1 --size 64 --rate 0 --inflight 100 --duration 8 --drain-timeout 20 -V 3"
TR_SCEN=("tcp-p2p-q1|tcp|$TR_P2P" "tls-p2p-q1|tls|$TR_P2P" "ws-p2p-q1|ws|$TR_P2P" "wss-p2p-q1|wss|$TR_P2P"
    "tls-conn|tls|conn -c 3000 --connect-rate 5000 --connect-timeout 30 --duration 4 --drain-timeout 5 -V 3")
TR_DURATION=8
TR_DRAIN=20

want() { # want FAMILY ID
    [ -z "$ONLY" ] && { [ "$MODE" = full ] || [ "$1" != conn -a "$1" != ramp -a "$1" != overload -a "$1" != tls ]; } && return 0
    case ",$ONLY," in *",$1,"*|*",$2,"*) return 0 ;; esac
    return 1
}

# ---------------------------------------------------------------- build and peers
cd "$ROOT"
if [ "$BUILD" = 1 ]; then
    log "cargo build --release"
    cargo build --release --quiet
fi
RINGMQ="$ROOT/target/release/ringmq"
LT="$ROOT/target/release/ringmq-loadtest"
[ -x "$RINGMQ" ] && [ -x "$LT" ] || { echo "missing $RINGMQ or $LT" >&2; exit 1; }

need() { case ",$BROKERS," in *",$1,"*|*",$1-default,"*) return 0 ;; esac; return 1; }
# Brokers of the throughput matrix, idle connections and ramp: those of --brokers in ALL_BROKERS.
MATRIX_BROKERS=""
for b in ${BROKERS//,/ }; do
    case ",$ALL_BROKERS," in *",$b,"*) MATRIX_BROKERS="$MATRIX_BROKERS $b" ;; esac
done
# Brokers of the overload rows: those of --brokers, or all of OL_BROKERS without it.
OL_RUN=""
for b in ${OL_BROKERS//,/ }; do
    case ",$BROKERS," in *",$b,"*|*",${b%-default},"*) OL_RUN="$OL_RUN $b" ;; esac
done
ol_wanted=0
for s in "${OL_SCEN[@]}"; do
    for v in 3 5; do want overload "${s%%|*}" || want overload "${s%%|*}-v$v" && ol_wanted=1; done
done
[ "$ol_wanted" = 1 ] || OL_RUN=""
export PATH="$PATH:/usr/sbin:$HOME/.cargo/bin"
if need mosquitto && ! command -v mosquitto >/dev/null; then
    log "installing mosquitto (apt-get)"
    (apt-get install -y mosquitto >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y mosquitto >/dev/null; })
fi
if need rumqttd && ! command -v rumqttd >/dev/null; then
    # not --locked: rumqttd's own lock file does not build on current toolchains
    log "installing rumqttd (cargo install rumqttd, a few minutes)"
    cargo install rumqttd >"$RESULTS/logs/rumqttd-install.log" 2>&1
fi

# ---------------------------------------------------------------- system limits
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
CONN_CLIENTS=$CONN_WANTED
if [ "$NOFILE" != unlimited ] && [ $(( NOFILE - 1000 )) -lt "$CONN_CLIENTS" ]; then
    CONN_CLIENTS=$(( NOFILE - 1000 ))
    log "open files limited to $NOFILE (hard limit): conn scenario uses $CONN_CLIENTS connections instead of $CONN_WANTED"
fi
CONN_ARGS="conn -c $CONN_CLIENTS --connect-rate 2000 --connect-timeout 30 --duration 10 --drain-timeout 5 -V $MQTT"
# 50k client sockets to one loopback port need more than the default 28k ephemeral ports;
# keep the brokers' ports out of the ephemeral range.
if [ -w /proc/sys/net/ipv4/ip_local_port_range ]; then
    echo "1024 65535" > /proc/sys/net/ipv4/ip_local_port_range || true
    echo "21883-21888" > /proc/sys/net/ipv4/ip_local_reserved_ports || true
fi
[ -w /proc/sys/net/core/somaxconn ] && [ "$(cat /proc/sys/net/core/somaxconn)" -lt 4096 ] &&
    echo 4096 > /proc/sys/net/core/somaxconn || true
{
    echo "ulimit -n: $(ulimit -n)"
    echo "net.ipv4.ip_local_port_range: $(cat /proc/sys/net/ipv4/ip_local_port_range | tr '\t' ' ')"
    echo "net.ipv4.ip_local_reserved_ports: $(cat /proc/sys/net/ipv4/ip_local_reserved_ports)"
    echo "net.core.somaxconn: $(cat /proc/sys/net/core/somaxconn)"
    echo "net.ipv4.tcp_tw_reuse: $(cat /proc/sys/net/ipv4/tcp_tw_reuse)"
} > "$RESULTS/limits.txt"

# ---------------------------------------------------------------- brokers
port_of() {
    case $1 in
        ringmq) echo 21883 ;; ringmq-1core) echo 21884 ;; mosquitto) echo 21885 ;; rumqttd) echo 21886 ;;
        ringmq-default) echo 21887 ;; mosquitto-default) echo 21888 ;;
    esac
}
RUMQTT_SERVER=$([ "$MQTT" = 3 ] && echo 4 || echo 5)
sed "s/@PORT@/$(port_of mosquitto)/g" "$HERE/mosquitto.conf.in" > "$RESULTS/mosquitto.conf"
for v in 4 5; do
    sed "s/@PORT@/$(port_of rumqttd)/g; s/@MQTT@/$v/g" "$HERE/rumqttd.toml.in" > "$RESULTS/rumqttd-v$v.toml"
done
RUMQTT_CONF=$RESULTS/rumqttd-v$RUMQTT_SERVER.toml
# Mosquitto as installed: a listener, anonymous clients (Mosquitto 2 refuses them otherwise),
# nothing else set.
cat > "$RESULTS/mosquitto-default.conf" <<EOF
listener $(port_of mosquitto-default) 127.0.0.1
allow_anonymous true
log_dest stderr
log_type error
log_type warning
EOF

# The transport rows (TRANSPORT=tls|ws|wss) put the broker's only listener of that kind on
# its port; ringmq's plain listener then goes to an ephemeral port nobody uses.
TRANSPORT=tcp
TLSDIR=$RESULTS/tls
ringmq_listener() { # PORT
    case $TRANSPORT in
        tcp) echo "--bind 127.0.0.1:$1" ;;
        tls) echo "--bind 127.0.0.1:0 --tls-bind 127.0.0.1:$1 --tls-cert $TLSDIR/server.pem --tls-key $TLSDIR/server.key" ;;
        ws)  echo "--bind 127.0.0.1:0 --ws-bind 127.0.0.1:$1" ;;
        wss) echo "--bind 127.0.0.1:0 --wss-bind 127.0.0.1:$1 --tls-cert $TLSDIR/server.pem --tls-key $TLSDIR/server.key" ;;
    esac
}
broker_cmd() {
    local p; p=$(port_of "$1")
    if [ "$TRANSPORT" != tcp ]; then
        case $1 in
            ringmq) echo "$RINGMQ $(ringmq_listener "$p") $RINGMQ_LIMITS --data-dir $RESULTS/data-$1 --log-level warn" ;;
            mosquitto) echo "$(command -v mosquitto) -c $TLSDIR/mosquitto-$TRANSPORT.conf" ;;
            rumqttd) echo "$(command -v rumqttd) -q -c $TLSDIR/rumqttd-$TRANSPORT.toml" ;;
        esac
        return
    fi
    case $1 in
        # With its data directory, as deployed (clean sessions write nothing to it); a
        # fresh one for every start.
        ringmq)       echo "$RINGMQ --bind 127.0.0.1:$p $RINGMQ_LIMITS --data-dir $RESULTS/data-$1 --log-level warn" ;;
        ringmq-1core) echo "$RINGMQ --bind 127.0.0.1:$p --cores 1 $RINGMQ_LIMITS --data-dir $RESULTS/data-$1 --log-level warn" ;;
        ringmq-default) echo "$RINGMQ --bind 127.0.0.1:$p --data-dir $RESULTS/data-$1 --log-level warn" ;;
        mosquitto)    echo "$(command -v mosquitto) -c $RESULTS/mosquitto.conf" ;;
        mosquitto-default) echo "$(command -v mosquitto) -c $RESULTS/mosquitto-default.conf" ;;
        rumqttd)      echo "$(command -v rumqttd) -q -c $RUMQTT_CONF" ;;
    esac
}
broker_version() {
    case $1 in
        ringmq|ringmq-1core|ringmq-default)
            echo "ringmq $("$RINGMQ" --version | awk '{print $2}') @ $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo '+uncommitted src changes')" ;;
        mosquitto|mosquitto-default) mosquitto -h 2>&1 | head -1 || true ;;
        rumqttd) rumqttd --version 2>&1 | head -1 ;;
    esac
}
for b in $(printf '%s\n' ${BROKERS//,/ } $OL_RUN | awk '!seen[$0]++'); do
    printf '%s\t%s\t%s\t%s\n' "$b" "$(port_of "$b")" "$(broker_cmd "$b")" "$(broker_version "$b")" >> "$RESULTS/brokers.tsv"
done

BPID=""
stop_broker() {
    [ -n "$BPID" ] || return 0
    if kill -0 "$BPID" 2>/dev/null; then
        kill -TERM "$BPID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$BPID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$BPID" 2>/dev/null || true
    fi
    wait "$BPID" 2>/dev/null || true
    BPID=""
}
trap 'stop_broker' EXIT
trap 'stop_broker; exit 130' INT TERM

listening() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q LISTEN; }
start_broker() { # start_broker NAME -> BPID
    local b=$1 p; p=$(port_of "$b")
    for _ in $(seq 100); do listening "$p" || break; sleep 0.1; done
    if listening "$p"; then echo "port $p is taken by another process" >&2; return 1; fi
    echo "=== $(date +%T) start" >> "$RESULTS/logs/$b.log"
    rm -rf "$RESULTS/data-$b"
    # shellcheck disable=SC2046
    $(broker_cmd "$b") >> "$RESULTS/logs/$b.log" 2>&1 &
    BPID=$!
    for _ in $(seq 100); do
        listening "$p" && return 0
        kill -0 "$BPID" 2>/dev/null || break
        sleep 0.1
    done
    echo "$b did not start listening on $p; see $RESULTS/logs/$b.log" >&2
    tail -5 "$RESULTS/logs/$b.log" >&2
    stop_broker
    return 1
}

# run_one ID BROKER ROUND ARGS... : one load generator run against a fresh broker
run_one() {
    local id=$1 b=$2 round=$3; shift 3
    local p json rc=0 alive=yes
    p=$(port_of "$b")
    json="$RESULTS/json/$id.$b.r$round.json"
    rm -f "$json"
    if ! start_broker "$b"; then
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$b" "$round" "$json" \
            "start-failed: $(grep -i 'error' "$RESULTS/logs/$b.log" | tail -1 | tr '\t' ' ' | cut -c1-160)" \
            "$LT $* -p $p" >> "$RESULTS/runs.tsv"
        return 0
    fi
    local cmd=("$LT" "$@" -p "$p" --quiet --json "$json" --broker-pid "$BPID")
    timeout -k 5 "$(( DURATION + DRAIN + 180 ))" "${cmd[@]}" > "$RESULTS/logs/$id.$b.r$round.txt" 2>&1 || rc=$?
    kill -0 "$BPID" 2>/dev/null || alive=no
    stop_broker
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$b" "$round" "$json" "rc=$rc alive=$alive" "${cmd[*]}" >> "$RESULTS/runs.tsv"
    python3 "$HERE/summary.py" line "$json" "$id" "$b" "$round" "rc=$rc" "alive=$alive" || true
    sleep 1
}

log "results in $RESULTS; brokers: $BROKERS; mode $MODE, $ROUNDS round(s), MQTT $MQTT"
T0=$(date +%s)

# ---------------------------------------------------------------- throughput matrix
for round in $(seq "$ROUNDS"); do
    for s in "${SCEN[@]}"; do
        id=${s%%|*}; args=${s#*|}
        want "${id%%-*}" "$id" || continue
        for b in $MATRIX_BROKERS; do
            # shellcheck disable=SC2086
            run_one "$id" "$b" "$round" $args $COMMON
        done
    done
done

# ---------------------------------------------------------------- open loop past saturation
for v in 3 5; do
    RUMQTT_CONF=$RESULTS/rumqttd-v$([ $v = 3 ] && echo 4 || echo 5).toml
    for s in "${OL_SCEN[@]}"; do
        id=${s%%|*}; args=${s#*|}
        want overload "$id" || want overload "$id-v$v" || continue
        for b in $OL_RUN; do
            # shellcheck disable=SC2086
            DURATION=$OL_DURATION DRAIN=$OL_DRAIN run_one "$id-v$v" "$b" 1 $args \
                --duration $OL_DURATION --drain-timeout $OL_DRAIN -V $v
        done
    done
done
RUMQTT_CONF=$RESULTS/rumqttd-v$RUMQTT_SERVER.toml

# ---------------------------------------------------------------- transports: tls, ws, wss
tr_wanted=0
for s in "${TR_SCEN[@]}"; do want tls "${s%%|*}" && tr_wanted=1; done
if [ "$tr_wanted" = 1 ]; then
    mkdir -p "$TLSDIR"
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$TLSDIR/server.ext"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$TLSDIR/ca.key" -out "$TLSDIR/ca.pem" -days 2 \
        -subj "/CN=bench CA" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout "$TLSDIR/server.key" -out "$TLSDIR/server.csr" \
        -subj "/CN=localhost" 2>/dev/null
    openssl x509 -req -in "$TLSDIR/server.csr" -CA "$TLSDIR/ca.pem" -CAkey "$TLSDIR/ca.key" -CAcreateserial \
        -out "$TLSDIR/server.pem" -days 2 -extfile "$TLSDIR/server.ext" 2>/dev/null
    # Mosquitto started as root drops to its own user: it must be able to read them.
    chmod 755 "$TLSDIR"; chmod 644 "$TLSDIR"/*
    for t in tls ws wss; do
        { grep -v '^#' "$RESULTS/mosquitto.conf"
          case $t in ws|wss) echo "protocol websockets" ;; esac
          case $t in tls|wss) printf 'cafile %s/ca.pem\ncertfile %s/server.pem\nkeyfile %s/server.key\n' "$TLSDIR" "$TLSDIR" "$TLSDIR" ;; esac
        } > "$TLSDIR/mosquitto-$t.conf"
        # rumqttd: its v4 server with a [tls] table, or the same settings as its ws server.
        python3 "$HERE/rumqttd_transport.py" "$RESULTS/rumqttd-v4.toml" "$TLSDIR/rumqttd-$t.toml" "$t" "$TLSDIR"
    done
    # MQTT 3.1.1 rows: rumqttd's v4 server (its plain-TCP row too).
    RUMQTT_CONF=$RESULTS/rumqttd-v4.toml
    for s in "${TR_SCEN[@]}"; do
        id=${s%%|*}; rest=${s#*|}; TRANSPORT=${rest%%|*}; args=${rest#*|}
        want tls "$id" || continue
        extra=""
        case $TRANSPORT in
            tls) extra="--tls --ca $TLSDIR/ca.pem -H localhost" ;;
            ws)  extra="--ws" ;;
            wss) extra="--ws --tls --ca $TLSDIR/ca.pem -H localhost" ;;
        esac
        for b in $MATRIX_BROKERS; do
            [ "$b" = ringmq-1core ] && continue
            printf '%s\t%s\t%s\n' "$id" "$b" "$(broker_cmd "$b")" >> "$RESULTS/transports.tsv"
            # shellcheck disable=SC2086
            DURATION=$TR_DURATION DRAIN=$TR_DRAIN run_one "$id" "$b" 1 $args $extra
        done
    done
    TRANSPORT=tcp
    RUMQTT_CONF=$RESULTS/rumqttd-v$RUMQTT_SERVER.toml
fi

# ---------------------------------------------------------------- 50k idle connections
if want conn conn; then
    for b in $MATRIX_BROKERS; do
        # shellcheck disable=SC2086
        DURATION=10 run_one conn "$b" 1 $CONN_ARGS
    done
fi

# ---------------------------------------------------------------- saturation ramp
if want ramp ramp; then
    alive_brokers=" $MATRIX_BROKERS "
    for r in $RAMP_RATES; do
        [ -n "${alive_brokers// /}" ] || break
        log "ramp: $r msg/s per publisher x $RAMP_PAIRS = $(( r * RAMP_PAIRS )) msg/s offered"
        for b in $alive_brokers; do
            # shellcheck disable=SC2086
            DURATION=$RAMP_DURATION run_one "ramp-$r" "$b" 1 $RAMP_ARGS --rate "$r"
            verdict=$(python3 "$HERE/summary.py" judge "$RESULTS/json/ramp-$r.$b.r1.json" \
                "$(( r * RAMP_PAIRS ))" "$RAMP_P99_MS" "$RAMP_MIN_RATIO" || echo "fail: no result")
            log "  $b: $verdict"
            case $verdict in pass*) ;; *) alive_brokers=${alive_brokers/ $b / } ;; esac
        done
    done
fi

# ---------------------------------------------------------------- report
cat > "$RESULTS/params.env" <<EOF
MODE=$MODE
ROUNDS=$ROUNDS
DURATION=$DURATION
DRAIN=$DRAIN
MQTT=$MQTT
ONLY=$ONLY
BROKERS=$BROKERS
COMMON=$COMMON
CONN_ARGS=$CONN_ARGS
CONN_WANTED=$CONN_WANTED
NOFILE=$NOFILE
RAMP_ARGS=$RAMP_ARGS
RAMP_RATES=$RAMP_RATES
RAMP_PAIRS=$RAMP_PAIRS
RAMP_P99_MS=$RAMP_P99_MS
RAMP_MIN_RATIO=$RAMP_MIN_RATIO
OL_DURATION=$OL_DURATION
OL_DRAIN=$OL_DRAIN
OL_RUN=$OL_RUN
ELAPSED_S=$(( $(date +%s) - T0 ))
EOF
REPORT=${OUT:-$RESULTS/BENCHMARKS.md}
if [ -n "$OUT" ]; then SVG="$ROOT/docs/benchmarks.svg"; else SVG="$RESULTS/benchmarks.svg"; fi
python3 "$HERE/report.py" "$RESULTS" "$REPORT" "$SVG"
log "done in $(( $(date +%s) - T0 )) s: $REPORT, $SVG"
