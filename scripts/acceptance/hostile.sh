#!/usr/bin/env bash
# Hostile-client acceptance run: each scripts/acceptance/hostile/h*.py starts its own
# ringmq (free port on 127.0.0.1, --cores 2, a fresh temporary --data-dir, default flags
# plus at most one named extra flag), runs one attack over raw sockets, stops the broker
# and prints one line: PASS <scenario>: <figures> or FAIL <scenario>: <why>. Builds nothing.
#
#   scripts/acceptance/hostile.sh                          # every scenario, target/release/ringmq
#   scripts/acceptance/hostile.sh --only h03               # one scenario (name or its prefix)
#   scripts/acceptance/hostile.sh --broker path/to/ringmq
#
# Options:
#   --broker PATH    broker binary (default: target/release/ringmq)
#   --only NAME      run only the scenarios whose file name starts with NAME (repeatable)
#   --keep           keep data directories and broker logs (the scripts print where)
#   --verbose        show each scenario's detail lines (stderr) as it runs
#
# Each scenario's details go to a log file, printed on failure. Exit status: 0 when every
# scenario passed, 1 otherwise (2 on a usage error).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="$ROOT/scripts/acceptance/hostile"
BROKER="$ROOT/target/release/ringmq"
ONLY=()
KEEP=()
VERBOSE=0
PYTHON="${PYTHON:-python3}"
LIMIT=240   # seconds per scenario, a backstop: each bounds its own loops

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --broker) BROKER="${2:?--broker needs a value}"; shift 2 ;;
        --only) ONLY+=("${2:?--only needs a value}"); shift 2 ;;
        --keep) KEEP=(--keep); shift ;;
        --verbose) VERBOSE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "hostile.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$BROKER" in /*) ;; *) BROKER="$PWD/$BROKER" ;; esac
if [ ! -x "$BROKER" ]; then
    echo "hostile.sh: no broker binary at $BROKER (cargo build --release -p ringmq)" >&2
    exit 2
fi

SCRIPTS=()
for f in "$DIR"/h[0-9][0-9]_*.py; do
    name="$(basename "$f" .py)"
    if [ ${#ONLY[@]} -gt 0 ]; then
        keep=0
        for o in "${ONLY[@]}"; do
            case "$name" in "${o%.py}"*) keep=1 ;; esac
        done
        [ "$keep" = 1 ] || continue
    fi
    SCRIPTS+=("$f")
done
if [ ${#SCRIPTS[@]} -eq 0 ]; then
    echo "hostile.sh: no scenario matches ${ONLY[*]}" >&2
    exit 2
fi

LOGDIR="$(mktemp -d -t hostile-logs.XXXXXX)"
FAILED=()
echo "# broker: $BROKER"
echo "# logs:   $LOGDIR"
for f in "${SCRIPTS[@]}"; do
    name="$(basename "$f" .py)"
    log="$LOGDIR/$name.log"
    start=$(date +%s)
    if [ "$VERBOSE" = 1 ]; then
        line="$(timeout --kill-after=10 "$LIMIT" "$PYTHON" "$f" --broker "$BROKER" "${KEEP[@]}" 2> >(tee "$log" >&2))"
    else
        line="$(timeout --kill-after=10 "$LIMIT" "$PYTHON" "$f" --broker "$BROKER" "${KEEP[@]}" 2>"$log")"
    fi
    rc=$?
    took=$(( $(date +%s) - start ))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        line="FAIL $name: did not finish within ${LIMIT}s"
    elif [ -z "$line" ]; then
        line="FAIL $name: printed no summary line (exit $rc)"
    elif [ $rc -ne 0 ] && [ "${line#FAIL}" = "$line" ]; then
        line="FAIL $name: exit $rc after: $line"
    fi
    echo "$line"
    echo "#   ($name took ${took}s; details: $log)"
    case "$line" in FAIL*) FAILED+=("$name") ;; esac
done

total=${#SCRIPTS[@]}
failed=${#FAILED[@]}
echo "$((total - failed)) passed, $failed failed"
if [ "$failed" -ne 0 ]; then
    echo "# HOSTILE FAILED: ${FAILED[*]}"
    exit 1
fi
[ ${#KEEP[@]} -gt 0 ] || rm -rf "$LOGDIR"
echo "# HOSTILE PASSED"
exit 0
