#!/usr/bin/env bash
# Keyless TLS 1.3 benchmark, in ONE run, on loopback (see README.md beside this file):
#   1. CPU per full handshake: the keyless edge (workers = 1; master + worker CPU from /proc)
#      vs an asyncio + ssl (OpenSSL) server with the same certificate and its key (and a
#      threaded ssl server), same client load; plus the key server's CPU per signature.
#   2. Full handshakes/s with 32 concurrent clients, the key server behind a 20 ms delay relay
#      (and direct, for reference); edge workers = 2.
#   3. Key server ECDSA P-256 signatures/s and per CPU-second with 256 pipelined requests, vs
#      raw `cryptography` sign() in the same run.
# Prints one table with ratios; raw outputs stay in the results directory it names.
#
#   bench/keyless/run.sh                      # all three parts, about 2 minutes
#   bench/keyless/run.sh --parts 1 --n 4000   # only part 1, 4000 handshakes per server
#   bench/keyless/run.sh --help               # every option (kbench.py run --help)
#
# Options (all passed to kbench.py run): --parts 123, --n 2000, --procs 2, --threads 8,
# --warmup 100, --no-threaded-baseline, --no-h2-row, --log-connections, --seconds 10,
# --concurrency 32, --procs2 4, --workers 2, --delay-ms 20, --delay-both, --inflight 256,
# --sign-seconds 8, --raw-seconds 3, --budget 600, --out DIR (default: a new
# /tmp/blindfold-keyless-bench.XXXXXX).
#
# Loopback only (127.0.0.0/8), ports picked by the kernel; every process it starts is stopped
# by PID at the end (also on Ctrl-C or when the time budget runs out).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
py="$repo/.venv/bin/python"

case "${1:-}" in
    -h|--help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
        echo
        [ -x "$py" ] && exec "$py" "$here/kbench.py" run --help
        exit 0 ;;
esac

[ -x "$py" ] || "$repo/scripts/bootstrap"
"$py" -c 'import blindfold, aioquic' \
    || { echo "the venv lacks blindfold: run scripts/bootstrap" >&2; exit 2; }

out=""
args=()
budget=600
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --budget) budget="$2"; args+=("$1" "$2"); shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
[ -n "$out" ] || out="$(mktemp -d /tmp/blindfold-keyless-bench.XXXXXX)"
mkdir -p "$out"

# kbench.py stops what it started when it gets TERM; timeout is the backstop for a hang
exec timeout --signal=TERM --kill-after=30 "$(( ${budget%.*} + 60 ))" \
    "$py" "$here/kbench.py" run --out "$out" "${args[@]}"
