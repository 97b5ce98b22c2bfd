#!/usr/bin/env bash
# Ban-load benchmark, in ONE run, on loopback (see README.md beside this file): an edge with
# 2 workers and a passthrough route; a probe opens a new TCP + TLS connection through it every
# 5 ms. Phase 1 (baseline): no ban load. Phase 2: a decision stream delivers 1,000,000 bans
# (100,000 per poll; the first 100,000 expire during the phase). Prints p50/p99/max of both
# phases and the p99 difference (target: within 10 ms), when every worker held every ban,
# the master's CPU and peak RSS, and how long SIGTERM took afterwards.
#
#   bench/bans/run.sh                          # about 2 minutes
#   bench/bans/run.sh --n 300000 --load-s 30   # a smaller load
#   bench/bans/run.sh --help                   # every option (bbench.py run --help)
#
# Loopback only (127.0.0.0/8), ports picked by the kernel; every process it starts is stopped
# by PID at the end (also on Ctrl-C or when the time budget, --budget 300 s, runs out).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
py="$repo/.venv/bin/python"

case "${1:-}" in
    -h|--help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
        echo
        [ -x "$py" ] && exec "$py" "$here/bbench.py" run --out /dev/null --help
        exit 0 ;;
esac

[ -x "$py" ] || "$repo/scripts/bootstrap"
"$py" -c 'import blindfold' || { echo "the venv lacks blindfold: run scripts/bootstrap" >&2; exit 2; }

out=""
args=()
budget=300
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --budget) budget="$2"; args+=("$1" "$2"); shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
[ -n "$out" ] || out="$(mktemp -d /tmp/blindfold-bans-bench.XXXXXX)"
mkdir -p "$out"

# bbench.py stops what it started when it gets TERM; timeout is the backstop for a hang
exec timeout --signal=TERM --kill-after=30 "$(( ${budget%.*} + 60 ))" \
    "$py" "$here/bbench.py" run --out "$out" "${args[@]}"
