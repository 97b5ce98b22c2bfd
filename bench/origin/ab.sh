#!/usr/bin/env bash
# A/B of the origin agent's CPU per request through the WAF, in ONE run, loopback only:
# each SRC is a source tree (its src/ goes first on PYTHONPATH), started in turn with
# `workers = 1` pinned to --cpu, load from tools/bench_http.py (wrk pinned to --wrk-cpu),
# alternated --reps times. Prints µs CPU per request (master + worker) per tree and script.
#
#   bench/origin/ab.sh [--reps 3] [--seconds 4] [--pl 1] SRC_A SRC_B ...
# SRC may end in ::LIB to start that tree with LD_PRELOAD=LIB (an allocator, e.g.
# /usr/lib/x86_64-linux-gnu/libmimalloc.so.2), or ::VAR=VALUE to set one environment variable.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
kit="${WAF_KIT:-$repo/../shared/waf}"
py="$repo/.venv/bin/python"
reps=3; seconds=4; pl=1; conns=16; cpu=0; wrk_cpu=1; scripts="get_page post_form"
while [ $# -gt 0 ]; do
    case "$1" in
        --reps) reps="$2"; shift 2 ;;
        --seconds) seconds="$2"; shift 2 ;;
        --pl) pl="$2"; shift 2 ;;
        --scripts) scripts="$2"; shift 2 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || { echo "usage: $0 [options] SRC..." >&2; exit 2; }
out="$(mktemp -d /tmp/blindfold-origin-ab.XXXXXX)"; chmod 0755 "$out"
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT
read -r aport bport admin < <(python3 "$repo/bench/waf/wafcmp.py" ports)
WAF_RUN_DIR="$out" CPU=1 sh "$kit/anchor/nginx_anchor.sh" start "$pl" "$aport" > "$out/anchor.txt" 2>&1
pids+=("$(cat "$out/nginx-pl$pl/nginx.pid")")
standin=$((aport + 1000))
python3 "$repo/bench/waf/wafcmp.py" wait-http "127.0.0.1:$standin" 15
cat > "$out/origin.toml" <<EOT
[origin]
upstream = "http://127.0.0.1:$standin"
listen = []
http_listen = ["127.0.0.1:$bport"]
proxy_protocol = "off"
admin_listen = "127.0.0.1:$admin"
access_log = false
log_path = "$out/origin.log"
workers = 1
[origin.waf]
paranoia_level = $pl
body_limit_action = "reject"
[origin.decisions]
ban_after_blocks = 1000000
EOT
for r in $(seq "$reps"); do
    i=0
    for src in "$@"; do
        i=$((i + 1))
        : > "$out/origin.log"
        env_=()
        case "$src" in
            *::*=*) env_=("${src#*::}"); src="${src%%::*}" ;;
            *::*) env_=("LD_PRELOAD=${src#*::}"); src="${src%%::*}" ;;
        esac
        env "${env_[@]}" PYTHONPATH="$src/src" taskset -c "$cpu" "$py" -m blindfold origin --config "$out/origin.toml" \
            > "$out/origin.$i.stdout" 2>&1 &
        pid=$!; pids+=("$pid")
        python3 "$repo/bench/waf/wafcmp.py" wait-ready "$out/origin.log" "$pid" 60 > /dev/null
        for script in $scripts; do
            python3 "$kit/tools/bench_http.py" --target "http://127.0.0.1:$bport" --pid "$pid" \
                --script "$kit/anchor/$script.lua" --seconds 1 --connections "$conns" \
                --wrk-cpu "$wrk_cpu" --label warmup > /dev/null
            line="$(python3 "$kit/tools/bench_http.py" --target "http://127.0.0.1:$bport" --pid "$pid" \
                --script "$kit/anchor/$script.lua" --seconds "$seconds" --connections "$conns" \
                --wrk-cpu "$wrk_cpu" --label "$script")"
            echo "rep $r src $i ($src ${env_[*]}) $line"
        done
        kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    done
done
echo "(raw outputs in $out)"
