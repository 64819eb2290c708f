#!/usr/bin/env bash
# A ringmq cluster (issue 16) with unmodified third-party clients (paho-mqtt, mosquitto_pub/sub):
# starts a real etcd on free ports in a temporary directory and three nodes a, b, c of the
# release binary (--cores 2, each its own --data-dir, --http-bind none, a short
# --cluster-lease-ttl), c inside a network namespace (a veth pair on a free 10.77.X.0/24;
# etcd listens on a host-side address of its own that c can be cut from with a blackhole
# route while its node links to a and b stay up; the node links run between two more
# addresses, one on each side, that can be cut while c keeps etcd and its clients), and
# checks, one PASS/FAIL line each:
#   1. etcd and the three nodes are up, and a publish on each node reaches a subscriber on each;
#   2. subscriber on b, publishes on a at QoS 0, 1 and 2: each delivered exactly once, in order,
#      at its QoS (an end marker on each topic, at its QoS, says its stream ended);
#   3. a $share group with one member on each node: N messages on a, each to exactly one member;
#   4. a retained message set on a (mosquitto_pub -q 1 -r) is read by a new subscriber on c
#      (mosquitto_sub) at once;
#   5. a persistent session (clean_session=0, QoS 1) subscribed on a, away while messages are
#      published on b, reconnects to c: session present, every queued message delivered;
#   6. b gets SIGKILL while a publisher on b streams QoS 1 messages (numbered) to persistent
#      subscribers on a, b and c; b restarts on its data directory: every subscriber's session
#      is there (session present), every message acknowledged to the publisher reaches every
#      subscriber, and new publishes on b and on a reach them all;
#   7. c cut from etcd (a blackhole route in its netns): a client on c is closed (v5 0x9c)
#      within the lease TTL of the cut; c refuses CONNECT (0x88, 3.1.1 return code 3) while
#      cut; the same client id then connects to a and works; another id on c, connecting to a
#      from the moment of the cut on, gets a's CONNACK only after its connection on c closed
#      (timestamps taken in one process: no id served twice); healed, c serves again;
#   8. scripts/acceptance/history_check.py over the event logs of steps 2, 5 and 6 (every
#      acknowledged message received by every subscriber, first receptions in order; step 2
#      also exactly once and nothing lost);
#   9. c's node links cut (blackhole routes for the link addresses; c still reaches etcd and
#      its clients, so its lease holds), twice: both ways, then c's packets only (a's frames
#      reach c, c's confirmations do not, so a writes them again after the heal). Each time a
#      publisher on a streams numbered QoS 1 messages to persistent subscribers on b and c;
#      b gets them all at once, none is acknowledged while the cut lasts (until every node saw
#      its links across the cut lost, ~20 s, at most 35 s); healed, c gets them all and all
#      are acknowledged within 60 s; then history_check.py over its event log (exactly once:
#      nothing applied twice; in order, nothing lost);
# and that the nodes ran to the end, stop cleanly on SIGTERM and logged no panic.
# The client side is scripts/acceptance/cluster_checks.py. Needs root (ip netns). Builds nothing.
#
#   scripts/acceptance/cluster.sh [--ringmq target/release/ringmq] [--ttl 4] [--keep]
#
# Options:
#   --ringmq PATH   broker binary (default target/release/ringmq, from the repository root)
#   --ttl S         the nodes' --cluster-lease-ttl (default 4, at least 2)
#   --keep          keep the work directory (node and etcd logs, event logs) even on success
#
# Installs etcd-server, mosquitto-clients (apt-get) and paho-mqtt (pip) when missing. Exit
# status 0 when every check passed, 1 otherwise (2 on a usage error). The work directory is
# kept, and printed, on failure.
set -u -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/scripts/acceptance"
RINGMQ="$ROOT/target/release/ringmq"
TTL=4
KEEP=0
PYTHON="${PYTHON:-python3}"

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --ringmq) RINGMQ="${2:?--ringmq needs a path}"; shift 2 ;;
        --ttl) TTL="${2:?--ttl needs seconds}"; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "cluster.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
[ "$TTL" -ge 2 ] 2>/dev/null || { echo "cluster.sh: --ttl must be a whole number of seconds, at least 2" >&2; exit 2; }
case "$RINGMQ" in /*) ;; *) RINGMQ="$ROOT/$RINGMQ" ;; esac
[ -x "$RINGMQ" ] || { echo "FAIL cluster: no executable $RINGMQ (cargo build --release)"; exit 1; }
[ "$(id -u)" = 0 ] || { echo "FAIL cluster: needs root (ip netns, veth, routes)"; exit 1; }
command -v ip >/dev/null || { echo "FAIL cluster: needs ip (iproute2)"; exit 1; }

# ---- tools ----
export DEBIAN_FRONTEND=noninteractive
apt_install() {  # apt_install PACKAGE
    apt-get install -y --no-install-recommends "$1" >/dev/null 2>&1 ||
        { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends "$1" >/dev/null 2>&1; }
}
ETCD="$(command -v etcd || true)"
[ -n "$ETCD" ] || [ ! -x /usr/bin/etcd ] || ETCD=/usr/bin/etcd
if [ -z "$ETCD" ]; then
    echo "# installing etcd-server (apt-get)"
    apt_install etcd-server
    ETCD="$(command -v etcd || true)"
    [ -n "$ETCD" ] || { echo "FAIL cluster: etcd could not be installed"; exit 1; }
fi
if ! command -v mosquitto_sub >/dev/null; then
    echo "# installing mosquitto-clients (apt-get)"
    apt_install mosquitto-clients || { echo "FAIL cluster: mosquitto-clients could not be installed"; exit 1; }
fi
if ! "$PYTHON" -c 'import paho.mqtt.client; from paho.mqtt.enums import CallbackAPIVersion' 2>/dev/null; then
    echo "# installing paho-mqtt 2.x (pip)"
    "$PYTHON" -m pip install --quiet 'paho-mqtt>=2' 2>/dev/null ||
        "$PYTHON" -m pip install --quiet --break-system-packages 'paho-mqtt>=2' ||
        { echo "FAIL cluster: paho-mqtt is needed (pip install paho-mqtt)"; exit 1; }
fi

START=$EPOCHREALTIME
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }  # seconds since $1
RUN="$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
WORK="$(mktemp -d -t ringmq-cluster.XXXXXX)"
CHECKS=("$PYTHON" "$HERE/cluster_checks.py" --run "$RUN")
FAILED=()

# ---- the network namespace of node c ----
NS="ringmq-acc-$$"
VH="rmq$$h"          # host side (interface names: at most 15 characters)
VN="rmq$$n"          # c's side
NET=""
for x in $(seq 0 255); do  # a 10.77.X.0/24 no interface here uses
    ip -o -4 addr show | grep -q "inet 10\.77\.$x\." || { NET="10.77.$x"; break; }
done
[ -n "$NET" ] || { echo "FAIL cluster: no free 10.77.X.0/24"; exit 1; }
HOST_IP="$NET.1"     # the host side's first address: the source of its clients' connections to c
C_IP="$NET.2"        # c: MQTT (and its etcd client)
ETCD_IP="$NET.3"     # etcd's client address, the one c is cut from in step 7
LINK_IP="$NET.4"     # a's and b's node links
C_LINK_IP="$NET.5"   # c's node links
# The node links run between LINK_IP and C_LINK_IP only (routes with those source addresses,
# whoever dials): step 9 cuts them with blackhole routes, one on each side, for these two.
LINK_ROUTE=""        # the host-side route to C_LINK_IP, once added (cleanup deletes it)

declare -A PID MQTT LINK
ETCD_PID=""

stop_pid() {  # stop_pid PID: SIGTERM, up to 5 s, then SIGKILL
    local pid="$1"
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
}
cleanup() {
    local n
    # The check running now (timeout passes the TERM on to it).
    [ -z "$STEP_PID" ] || { kill -TERM "$STEP_PID" 2>/dev/null; wait "$STEP_PID" 2>/dev/null; }
    for n in a b c; do stop_pid "${PID[$n]:-}"; done
    stop_pid "$ETCD_PID"
    ip netns del "$NS" 2>/dev/null
    ip link del "$VH" 2>/dev/null
    # Only a blackhole (step 9 interrupted) outlives the interface.
    [ -z "$LINK_ROUTE" ] || ip route del "$C_LINK_IP/32" 2>/dev/null
    if [ "$KEEP" = 1 ] || [ ${#FAILED[@]} -ne 0 ]; then
        echo "# work directory (node, etcd and event logs): $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
# Once: a timeout's TERM can come twice (to this process, then to its process group).
trap 'trap "" INT TERM; FAILED+=(interrupted); echo "# interrupted"; exit 1' INT TERM

fail() { echo "FAIL $1: $2"; FAILED+=("$1"); }

# Runs a check; it prints its own PASS/FAIL line (one is written here if it died without).
# In the background and waited for, so that a TERM or INT reaches the trap at once.
STEP_PID=""
step() {  # step NAME TIMEOUT_SECONDS CMD...
    local name="$1" limit="$2"; shift 2
    local out="$WORK/$name.out" rc
    if declare -F "$1" >/dev/null; then  # a function here bounds its own waits
        "$@" >"$out" 2>&1
        rc=$?
    else
        timeout --kill-after=5 "$limit" "$@" >"$out" 2>&1 &
        STEP_PID=$!
        wait "$STEP_PID"
        rc=$?
        STEP_PID=""
    fi
    cat "$out"
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name")
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            echo "FAIL $name: did not finish within ${limit}s"
        elif ! grep -q '^FAIL ' "$out"; then
            echo "FAIL $name: exited with status $rc"
        fi
    fi
    return "$rc"
}

start_node() {  # start_node NAME: in the background, its log appended to $WORK/node-NAME.log
    local n="$1"
    local cmd=("$RINGMQ" --bind "${MQTT[$n]}" --cores 2 --data-dir "$WORK/data-$n" --http-bind none
        --cluster "etcd://$ETCD_IP:$ETCD_PORT" --cluster-name "acc-$RUN" --node-name "$n"
        --node-bind "${LINK[$n]}" --cluster-lease-ttl "$TTL")
    [ "$n" = c ] && cmd=(ip netns exec "$NS" "${cmd[@]}")
    echo "# node $n: ${cmd[*]}"
    echo "==== $(date '+%F %T.%N') start: ${cmd[*]}" >>"$WORK/node-$n.log"
    # ip netns exec execs the command: $! is the broker in both cases.
    "${cmd[@]}" >>"$WORK/node-$n.log" 2>&1 &
    PID[$n]=$!
}
wait_node() {  # wait_node NAME STEP: until it accepts TCP connections on its MQTT address
    "${CHECKS[@]}" --step "$2" wait-port "${MQTT[$1]}" --pid "${PID[$1]}" --timeout 30
}
node_args() { echo --node "a=${MQTT[a]}" --node "b=${MQTT[b]}" --node "c=${MQTT[c]}"; }

echo "# ringmq cluster acceptance: run $RUN, work directory $WORK"
echo "# binary: $RINGMQ; lease TTL ${TTL}s; etcd: $("$ETCD" --version | head -1)"

# ---- 1. etcd and three nodes ----
if ! { ip netns add "$NS" &&
    ip link add "$VH" type veth peer name "$VN" &&
    ip link set "$VN" netns "$NS" &&
    ip addr add "$HOST_IP/24" dev "$VH" &&
    ip addr add "$ETCD_IP/24" dev "$VH" &&
    ip addr add "$LINK_IP/24" dev "$VH" &&
    ip link set "$VH" up &&
    ip -n "$NS" addr add "$C_IP/24" dev "$VN" &&
    ip -n "$NS" addr add "$C_LINK_IP/24" dev "$VN" &&
    ip -n "$NS" link set "$VN" up &&
    ip -n "$NS" link set lo up &&
    ip route add "$C_LINK_IP/32" dev "$VH" src "$LINK_IP" && LINK_ROUTE=1 &&
    ip -n "$NS" route add "$LINK_IP/32" dev "$VN" src "$C_LINK_IP"; } 2>"$WORK/netns.err"; then
    fail step1-cluster "could not set up the network namespace: $(cat "$WORK/netns.err")"
    exit 1
fi
echo "# netns $NS: c on $C_IP (MQTT) and $C_LINK_IP (node links); host side $HOST_IP, $LINK_IP (a's and b's node links) and $ETCD_IP (etcd)"

# Free ports (bound on every address at once, so free on the ones used here).
read -r ETCD_PORT PEER_PORT PA PB NA NB PC NC < <("$PYTHON" -c '
import socket
socks = [socket.socket() for _ in range(8)]
for s in socks:
    s.bind(("", 0))
print(*[s.getsockname()[1] for s in socks])') || { fail step1-cluster "could not pick free ports"; exit 1; }
MQTT=([a]="127.0.0.1:$PA" [b]="127.0.0.1:$PB" [c]="$C_IP:$PC")
LINK=([a]="$LINK_IP:$NA" [b]="$LINK_IP:$NB" [c]="$C_LINK_IP:$NC")

"$ETCD" --name acc --data-dir "$WORK/etcd" \
    --listen-client-urls "http://$ETCD_IP:$ETCD_PORT" --advertise-client-urls "http://$ETCD_IP:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
    --initial-cluster "acc=http://127.0.0.1:$PEER_PORT" >"$WORK/etcd.log" 2>&1 &
ETCD_PID=$!
if ! "${CHECKS[@]}" --step step1-cluster etcd-ready "$ETCD_IP:$ETCD_PORT" --timeout 30; then
    FAILED+=(step1-cluster); tail -n 20 "$WORK/etcd.log"; exit 1
fi
echo "# etcd on $ETCD_IP:$ETCD_PORT (pid $ETCD_PID)"
for n in a b c; do start_node "$n"; done
for n in a b c; do
    wait_node "$n" step1-cluster || { FAILED+=(step1-cluster); tail -n 20 "$WORK/node-$n.log"; exit 1; }
done
echo "# nodes listening: a ${MQTT[a]}, b ${MQTT[b]}, c ${MQTT[c]} (netns)"
# shellcheck disable=SC2046
step step1-cluster 60 "${CHECKS[@]}" --step step1-cluster ready $(node_args) || exit 1

# ---- 2. QoS 0, 1, 2 across nodes ----
step step2-qos 60 "${CHECKS[@]}" --step step2-qos qos --pub "${MQTT[a]}" --sub "${MQTT[b]}" \
    --log "$WORK/history-qos.jsonl"

# ---- 3. a shared group over three nodes ----
step step3-shared 60 "${CHECKS[@]}" --step step3-shared shared --pub "${MQTT[a]}" \
    --member "${MQTT[a]}" --member "${MQTT[b]}" --member "${MQTT[c]}"

# ---- 4. retained: set on a (mosquitto_pub), read on c (mosquitto_sub) ----
retained() {
    local topic="acc/$RUN/retained" value="kept-$RUN" out rc
    local a_host="${MQTT[a]%:*}" a_port="${MQTT[a]##*:}"
    # QoS 1: mosquitto_pub exits after the PUBACK, which waits until every node stored it.
    if ! timeout 20 mosquitto_pub -h "$a_host" -p "$a_port" -i "ret-pub-$RUN" -q 1 -r -t "$topic" -m "$value"; then
        echo "FAIL step4-retained: mosquitto_pub -q 1 -r on a failed"; return 1
    fi
    out=$(timeout 20 mosquitto_sub -h "$C_IP" -p "$PC" -i "ret-sub-$RUN" -q 1 -t "$topic" -C 1 -W 10 -F '%r %t %p')
    rc=$?
    if [ "$out" != "1 $topic $value" ]; then
        echo "FAIL step4-retained: a new subscriber on c read '${out}' (mosquitto_sub status $rc), expected '1 $topic $value'"
        return 1
    fi
    echo "PASS step4-retained: retained message set on a (mosquitto_pub -q 1 -r) read by a new subscriber on c (retain flag set)"
}
step step4-retained 60 retained

# ---- 5. a persistent session moves from a to c ----
step step5-session 60 "${CHECKS[@]}" --step step5-session session --first "${MQTT[a]}" --pub "${MQTT[b]}" \
    --second "${MQTT[c]}" --log "$WORK/history-session.jsonl"

# ---- 6. SIGKILL b mid-stream, restart it ----
SUBS=(--sub "a=${MQTT[a]}" --sub "b=${MQTT[b]}" --sub "c=${MQTT[c]}")
step step6-crash 90 "${CHECKS[@]}" --step step6-crash crash --pub "${MQTT[b]}" "${SUBS[@]}" \
    --kill-pid "${PID[b]}" --kill-after 1000 --log "$WORK/history-crash.jsonl" 2>/dev/null  # not the shell's "Killed"
if kill -0 "${PID[b]}" 2>/dev/null; then
    echo "# node b still running after the crash step: SIGKILL"
    kill -KILL "${PID[b]}"
fi
wait "${PID[b]}"; rc=$?
echo "# node b (pid ${PID[b]}) ended with status $rc"
[ "$rc" -eq 137 ] || fail step6-crash "node b ended with status $rc, not by SIGKILL (137)"
PID[b]=""
t0=$EPOCHREALTIME
if "${CHECKS[@]}" --step step6-restart wait-closed "${MQTT[b]}" --timeout 10 && start_node b &&
    wait_node b step6-restart; then
    echo "PASS step6-restart: node b restarted on its data directory, listening after $(since "$t0") s"
    # At once (no wait for the cluster to form again: b serves once it is back in it).
    step step6-after 90 "${CHECKS[@]}" --step step6-after crash-after "${SUBS[@]}" \
        --pub2 "${MQTT[b]}" --pub3 "${MQTT[a]}" --log "$WORK/history-crash.jsonl"
    # shellcheck disable=SC2046
    step step6-ready 60 "${CHECKS[@]}" --step step6-ready ready $(node_args)
else
    FAILED+=(step6-restart)  # the line is printed above
fi

# ---- 7. c cut from etcd ----
# shellcheck disable=SC2046
step step7-fence 120 "${CHECKS[@]}" --step step7-fence fence --c "${MQTT[c]}" --a "${MQTT[a]}" --b "${MQTT[b]}" \
    $(node_args) --ttl "$TTL" \
    --cut "ip -n $NS route add blackhole $ETCD_IP/32" --heal "ip -n $NS route del blackhole $ETCD_IP/32"

# ---- 8. the histories ----
step step8-history-qos 30 "$PYTHON" "$HERE/history_check.py" "$WORK/history-qos.jsonl" --name step8-history-qos \
    --subscribers qos-sub --exactly-once --lossless
step step8-history-session 30 "$PYTHON" "$HERE/history_check.py" "$WORK/history-session.jsonl" \
    --name step8-history-session --subscribers roamer
step step8-history-crash 30 "$PYTHON" "$HERE/history_check.py" "$WORK/history-crash.jsonl" \
    --name step8-history-crash --subscribers hist-a,hist-b,hist-c

# ---- 9. c's node links cut, c still on etcd ----
# A blackhole in c's netns drops c's packets to LINK_IP (its dialled links and its replies on
# the links a and b dialled); one on the host drops a's and b's to C_LINK_IP. MQTT
# (C_IP <-> HOST_IP) and etcd (C_IP <-> ETCD_IP) go on. First both, then c's alone.
CUT_C=(--cut "ip -n $NS route replace blackhole $LINK_IP/32" --heal "ip -n $NS route replace $LINK_IP/32 dev $VN src $C_LINK_IP")
CUT_HOST=(--cut "ip route replace blackhole $C_LINK_IP/32" --heal "ip route replace $C_LINK_IP/32 dev $VH src $LINK_IP")
step step9-linkcut 150 "${CHECKS[@]}" --step step9-linkcut linkcut --a "${MQTT[a]}" --b "${MQTT[b]}" --c "${MQTT[c]}" \
    "${CUT_C[@]}" "${CUT_HOST[@]}" --half-cut "${CUT_C[1]}" --half-heal "${CUT_C[3]}" --log "$WORK/history-linkcut.jsonl"
step step9-history-linkcut 30 "$PYTHON" "$HERE/history_check.py" "$WORK/history-linkcut.jsonl" \
    --name step9-history-linkcut --subscribers cut-b,cut-c --exactly-once --lossless

# ---- the nodes survived, and stop cleanly ----
for n in a b c; do
    if [ -z "${PID[$n]}" ] || ! kill -0 "${PID[$n]}" 2>/dev/null; then
        fail nodes-alive "node $n is not running"
    fi
done
stopped=()
for n in a b c; do
    [ -n "${PID[$n]}" ] || continue
    kill -TERM "${PID[$n]}" 2>/dev/null
done
for n in a b c; do
    [ -n "${PID[$n]}" ] || continue
    for _ in $(seq 100); do kill -0 "${PID[$n]}" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "${PID[$n]}" 2>/dev/null; then
        fail nodes-stop "node $n still running 10 s after SIGTERM"
    else
        wait "${PID[$n]}"; rc=$?
        [ "$rc" -eq 0 ] && stopped+=("$n") || fail nodes-stop "node $n exited with status $rc after SIGTERM"
        PID[$n]=""
    fi
done
[ ${#stopped[@]} -eq 3 ] && echo "PASS nodes-stop: a, b and c ran to the end and stopped cleanly on SIGTERM"
if grep -n 'panicked' "$WORK"/node-?.log; then
    fail nodes-log "a node panicked (lines above)"
else
    echo "PASS nodes-log: no panic in the node logs"
fi

ELAPSED=$(since "$START")
if [ ${#FAILED[@]} -ne 0 ]; then
    for n in a b c; do
        echo "# ---- node $n log (last 15 lines of $WORK/node-$n.log) ----"
        tail -n 15 "$WORK/node-$n.log"
    done
    echo "# CLUSTER ACCEPTANCE FAILED in ${ELAPSED}s: ${FAILED[*]} (run $RUN)"
    exit 1
fi
echo "# CLUSTER ACCEPTANCE PASSED in ${ELAPSED}s (run $RUN)"
exit 0
