#!/usr/bin/env bash
# Soak: the whole deployment on loopback under mixed traffic for N minutes (see README.md beside
# this file): an application, the origin agent (WAF on, decision journal, Redis publishing), the
# key server (audit log), Redis, and one edge (2 workers) with a passthrough, a keyless and a
# blind route. Visitors: page views, uploads, keyless handshakes, blind fetches (verified), and
# SQL injections from fresh addresses that get banned. Samples every process's RSS, descriptors
# and CPU every 5 s; prints a table per process and the verdict (RSS growth < 20% after warm-up,
# flat descriptors, no unexpected error, no traceback).
#
#   bench/soak/run.sh --minutes 30              # the issue's run (~31 minutes)
#   bench/soak/run.sh --minutes 5 --out DIR     # a short one; DIR keeps logs and results.json
#   bench/soak/run.sh --help                    # every option (rates per kind, ban duration...)
#
# Loopback only (127.0.0.0/8, visitors from many 127.x.y.z source addresses); ports picked by
# the kernel; every process it starts is stopped by its PID at the end (also on Ctrl-C, and
# timeout(1) ends the driver if it overruns its budget by more than 5 minutes).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
py="$repo/.venv/bin/python"

case "${1:-}" in
    -h|--help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
        echo
        [ -x "$py" ] && exec "$py" "$here/soak.py" --out /dev/null --help
        exit 0 ;;
esac

[ -x "$py" ] || "$repo/scripts/bootstrap" --venv
"$py" -c 'import blindfold' || { echo "the venv lacks blindfold: run scripts/bootstrap" >&2; exit 2; }
command -v redis-server >/dev/null || { echo "redis-server is not installed" >&2; exit 2; }

out=""
minutes=30
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --minutes) minutes="$2"; args+=("$1" "$2"); shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
[ -n "$out" ] || out="$(mktemp -d /tmp/blindfold-soak.XXXXXX)"
mkdir -p "$out"
budget=$(python3 -c "print(int(float('$minutes') * 60 + 300))")

exec timeout --signal=TERM --kill-after=60 "$budget" \
    "$py" "$here/soak.py" --out "$out" "${args[@]}"
