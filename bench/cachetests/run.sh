#!/usr/bin/env bash
# The keyless edge's shared cache on the public HTTP cache test suite (http-tests/cache-tests),
# nginx's proxy_cache measured in the same run (see README.md beside this file). Prints one
# table: pass / required fail / optional fail / setup fail for both caches.
#
#   bench/cachetests/run.sh                     # about 2-4 minutes
#   CACHE_TESTS_REPO=/path/to/mirror bench/cachetests/run.sh --out /tmp/ct
#   bench/cachetests/run.sh --no-nginx --route-extra 'cache_stale_while_revalidate = false'
#
# The suite is cloned at a pinned commit into the output directory (default: a new
# /tmp/blindfold-cachetests.XXXXXX), never into the repository; needs git, node >= 14, npm
# (the suite's dependencies come from the npm registry) and nginx (scripts/bootstrap).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
py="$repo/.venv/bin/python"
[ -x "$py" ] || py="${BLINDFOLD_PYTHON:-python3}"  # a worktree without its own venv

case "${1:-}" in
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
               exec "$py" "$here/cachetests.py" --help ;;
esac
out=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
[ -n "$out" ] || out="$(mktemp -d /tmp/blindfold-cachetests.XXXXXX)"
cd "$repo"
exec timeout --signal=TERM --kill-after=30 2400 env PYTHONPATH="$repo/src" "$py" "$here/cachetests.py" \
    --out "$out" --repo "${CACHE_TESTS_REPO:-https://github.com/http-tests/cache-tests}" "${args[@]}"
