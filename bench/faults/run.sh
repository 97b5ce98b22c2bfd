#!/usr/bin/env bash
# Faults: the whole deployment of bench/soak on loopback, visitors coming all the time, and one
# fault after another (see README.md beside this file): kill -9 of the key server, the origin
# agent, Redis, one edge worker and the edge master (each restarted as systemd would: 2 s after
# it died; the edge once its draining workers are gone), a full disk under the blind cache (a
# tmpfs of its own), a corrupted cache file (with and without a new mtime), a truncated audit
# log, and a reload with a bad file (edge, origin, key server). Prints per fault what visitors
# saw, the time until they were served again, and what was checked (audit log verifies, no ban
# forgotten, cache files whole).
#
#   bench/faults/run.sh                          # every fault (~8 minutes)
#   bench/faults/run.sh --only origin,master     # some of them
#   bench/faults/run.sh --out DIR                # DIR keeps logs and results.json
#
# Run as root for the full-disk fault (mount -t tmpfs); without root it is skipped and says so.
# Loopback only (127.0.0.0/8); every process it starts is stopped by its PID at the end (also on
# Ctrl-C; timeout(1) ends the driver if it overruns 30 minutes).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
py="$repo/.venv/bin/python"

case "${1:-}" in
    -h|--help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
        echo
        [ -x "$py" ] && exec "$py" "$here/faults.py" --out /dev/null --help
        exit 0 ;;
esac

[ -x "$py" ] || "$repo/scripts/bootstrap" --venv
"$py" -c 'import blindfold' || { echo "the venv lacks blindfold: run scripts/bootstrap" >&2; exit 2; }
command -v redis-server >/dev/null || { echo "redis-server is not installed" >&2; exit 2; }

out=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
[ -n "$out" ] || out="$(mktemp -d /tmp/blindfold-faults.XXXXXX)"
mkdir -p "$out"

exec timeout --signal=TERM --kill-after=60 1800 "$py" "$here/faults.py" --out "$out" "${args[@]}"
