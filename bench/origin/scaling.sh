#!/usr/bin/env bash
# Origin workers: CPU per request with [origin] workers = 1 and = 2, in ONE run, PL1 GET (and
# form POST) through the WAF, loopback only. The load generator needs CPU too, so what compares
# is CPU-seconds of the master + workers per request (tools/bench_http.py of the shared WAF kit
# counts the process and its children), not wall req/s. Nothing is pinned.
#
#   bench/origin/scaling.sh [--seconds 5] [--connections 32] [--pl 1]
#
# The application is the WAF kit's stand-in origin (nginx, always 200: anchor/nginx_anchor.sh,
# started here and stopped by PID on exit). Prints one line per run and the ratio W2/W1.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
kit="${WAF_KIT:-$repo/../shared/waf}"
bf="$repo/.venv/bin/blindfold"
seconds=5; conns=32; pl=1
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --connections) conns="$2"; shift 2 ;;
        --pl) pl="$2"; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[[ "$seconds" =~ ^[0-9]+$ && "$seconds" -ge 1 && "$seconds" -le 60 ]] || { echo "--seconds: 1-60" >&2; exit 2; }
out="$(mktemp -d /tmp/blindfold-origin-scaling.XXXXXX)"; chmod 0755 "$out"
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT
read -r aport bport admin < <(python3 "$repo/bench/waf/wafcmp.py" ports)
WAF_RUN_DIR="$out" CPU=0 sh "$kit/anchor/nginx_anchor.sh" start "$pl" "$aport" > "$out/anchor.txt" 2>&1
pids+=("$(cat "$out/nginx-pl$pl/nginx.pid")")
standin=$((aport + 1000))
python3 "$repo/bench/waf/wafcmp.py" wait-http "127.0.0.1:$standin" 15
declare -A us=()
for w in 1 2; do
    cat > "$out/w$w.toml" <<EOT
[origin]
upstream = "http://127.0.0.1:$standin"
listen = []
http_listen = ["127.0.0.1:$bport"]
proxy_protocol = "off"
admin_listen = "127.0.0.1:$admin"
access_log = false
log_path = "$out/w$w.log"
workers = $w
[origin.waf]
paranoia_level = $pl
body_limit_action = "reject"
[origin.decisions]
ban_after_blocks = 1000000
EOT
    "$bf" origin --config "$out/w$w.toml" > "$out/w$w.stdout" 2>&1 &
    pid=$!; pids+=("$pid")
    python3 "$repo/bench/waf/wafcmp.py" wait-ready "$out/w$w.log" "$pid" 60 > /dev/null
    for script in get_page post_form; do
        python3 "$kit/tools/bench_http.py" --target "http://127.0.0.1:$bport" --pid "$pid" \
            --script "$kit/anchor/$script.lua" --seconds 1 --connections "$conns" --wrk-cpu "" \
            --label warmup > /dev/null
        line="$(python3 "$kit/tools/bench_http.py" --target "http://127.0.0.1:$bport" --pid "$pid" \
            --script "$kit/anchor/$script.lua" --seconds "$seconds" --connections "$conns" \
            --wrk-cpu "" --label "workers=$w $script")"
        echo "$line"
        us[$w.$script]="$(echo "$line" | sed -n 's/.*( *\([0-9.]*\) us CPU\/req).*/\1/p')"
    done
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
done
for script in get_page post_form; do
    python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'$script: CPU per request, workers=2 / workers=1: {b/a:.2f}x ({a:.0f} -> {b:.0f} µs)')" \
        "${us[1.$script]}" "${us[2.$script]}"
done
echo "(raw outputs in $out)"
