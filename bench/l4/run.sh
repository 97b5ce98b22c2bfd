#!/usr/bin/env bash
# Run the shared layer-4 harness (../shared/bench/l4) with blindfold's edge beside HAProxy and a
# direct connection. Extra arguments go to the harness, e.g. --reps 5 or --metrics conn,lat_new.
#
#   bench/l4/run.sh                       # direct haproxy haproxy_full blindfold, all metrics
#   bench/l4/run.sh --metrics conn --reps 2
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
harness="${BLINDFOLD_L4_HARNESS:-$repo/../shared/bench/l4}"
[ -x "$harness/run.sh" ] || { echo "no harness at $harness (set BLINDFOLD_L4_HARNESS)" >&2; exit 2; }
py="$repo/.venv/bin/python"
[ -x "$py" ] || { echo "run scripts/bootstrap first" >&2; exit 2; }
command -v wrk >/dev/null || "$harness/run.sh" --setup
targets=(direct haproxy haproxy_full)
exec "$harness/run.sh" "${targets[@]}" \
    --proxy "blindfold=cp $here/blocklist.txt {DIR}/blocklist.txt && exec $py -m blindfold edge --config {DIR}/edge.toml.tmpl" \
    --conf "blindfold=$here/edge.toml.tmpl" "$@"
