#!/usr/bin/env bash
# Blind delivery benchmark, in ONE run, on loopback (see README.md beside this file):
#   1. Serving sealed blobs over TLS: the blindfold edge (blind route, warm cache) vs nginx
#      serving the same blobs/ directory statically at the same /b/<id> URLs, same worker
#      count, same certificate, same client load; small-file and large-file rows.
#      req/s, MB/s, server CPU-seconds per GB, p50/p99, edge hit ratio, ratio edge/nginx.
#   2. Sealing: blindfold.blind.sealer.seal_tree MB/s on the same tree (first seal, and a
#      re-seal where nothing changed).
#   3. Decrypt in Python: ece.open_all and streaming ece.Opener on a 50 MB blob vs raw
#      AES-128-GCM (cryptography's AESGCM, 64 KiB records).
# Prints one table with ratios; raw outputs stay in the results directory it names.
#
#   bench/blind/run.sh                              # everything, about 3-4 minutes
#   bench/blind/run.sh --parts 12 --rounds 1        # no decrypt part, one load round
#   bench/blind/run.sh --small 500:16K-256K --large 0:1-1 --clients 16
#   bench/blind/run.sh --profile-seconds 10         # + a py-spy summary of an edge worker
#   bench/blind/run.sh --help                       # every option (bbench.py run --help)
#
# Options (all passed to bbench.py run): --parts 123, --small 200:64K-1M, --large 3:10M-50M,
# --seed 1, --record-size 65536, --workers 2, --clients 8, --client-procs 2, --seconds 15,
# --rounds 2, --max-requests 100000, --memory-cache-bytes 256M, --memory-max-object-bytes 8M,
# --pin-servers CPUS, --pin-clients CPUS, --decrypt-mb 50, --decrypt-repeat 3,
# --profile-seconds 0, --budget 600, --out DIR (default: a new
# /tmp/blindfold-blind-bench.XXXXXX).
#
# Needs the project's .venv (scripts/bootstrap) and Debian's nginx (/usr/sbin/nginx); installs
# nothing. Loopback only (127.0.0.0/8), ports picked by the kernel; every process it starts is
# stopped by PID at the end (also on Ctrl-C or when the time budget runs out).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
py="$repo/.venv/bin/python"

case "${1:-}" in
    -h|--help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
        echo
        [ -x "$py" ] && exec "$py" "$here/bbench.py" run --out /nonexistent --help
        exit 0 ;;
esac

if [ ! -x "$py" ]; then
    echo "no $py: create the venv first (scripts/bootstrap); this benchmark installs nothing" >&2
    exit 2
fi
"$py" -c 'import blindfold.blind.sealer, blindfold.core.ece, cryptography' 2>/dev/null \
    || { echo "the venv at $repo/.venv lacks blindfold: run scripts/bootstrap" >&2; exit 2; }
[ -x /usr/sbin/nginx ] \
    || { echo "/usr/sbin/nginx not found: install Debian's nginx (not done here)" >&2; exit 2; }

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
[ -n "$out" ] || out="$(mktemp -d /tmp/blindfold-blind-bench.XXXXXX)"
mkdir -p "$out"

# bbench.py stops what it started when it gets TERM/INT; timeout is the backstop for a hang
exec timeout --signal=TERM --kill-after=30 "$(( ${budget%.*} + 60 ))" \
    "$py" "$here/bbench.py" run --out "$out" "${args[@]}"
