#!/usr/bin/env bash
# Cached responses on the keyless edge vs nginx proxy_cache, in ONE run, on loopback (see
# README.md beside this file): server CPU-seconds per 1,000 cache hits for five loads
# (keep-alive HTTP/1.1 2 KB and 100 KB, keep-alive HTTP/2 2 KB, new connections resumed and
# full handshakes), both fronts pinned to CPU 0, the load on CPU 1. Prints the table.
#
#   bench/edgecache/run.sh                                   # this tree's src, ~2 minutes
#   bench/edgecache/run.sh --edge main=../main/src --edge branch=src --repeat 3
#   bench/edgecache/run.sh --loads h1-2k,h2-2k --seconds 10
#   bench/edgecache/run.sh --help                            # every option
#
# Installs what it needs with apt when missing (wrk; h2load from nghttp2-client; nginx; curl).
# Loopback only (127.0.0.0/8), ports picked by the kernel; every process it starts is stopped
# by PID at the end (also on Ctrl-C or when the time budget runs out). Raw outputs stay in the
# results directory it names (default: a new /tmp/blindfold-edgecache.XXXXXX).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
py="$repo/.venv/bin/python"
[ -x "$py" ] || py="${BLINDFOLD_PYTHON:-}"  # a worktree without its own venv
[ -n "$py" ] && [ -x "$py" ] || { echo "no venv: run scripts/bootstrap or set BLINDFOLD_PYTHON" >&2; exit 2; }

case "${1:-}" in
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
               exec "$py" "$here/ebench.py" run --help ;;
esac

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v nginx >/dev/null || missing+=(nginx)
command -v curl >/dev/null || missing+=(curl)
command -v taskset >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (apt)" >&2
    if [ "$(id -u)" = 0 ]; then apt_get=(apt-get); else apt_get=(sudo apt-get); fi
    "${apt_get[@]}" update -qq
    DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -qq "${missing[@]}" >/dev/null
fi
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs (server on 0, load on 1)" >&2; exit 2; }

out=""
args=()
budget=900
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --budget) budget="$2"; args+=("$1" "$2"); shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
[ -n "$out" ] || out="$(mktemp -d /tmp/blindfold-edgecache.XXXXXX)"
mkdir -p "$out"
# nginx's workers (an unprivileged user) must reach the cache and the files under it
chmod 0755 "$out"
cd "$repo"
exec timeout --signal=TERM --kill-after=30 "$(( ${budget%.*} + 60 ))" \
    env PYTHONPATH="$repo/src" "$py" "$here/ebench.py" run --out "$out" "${args[@]}"
