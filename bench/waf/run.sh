#!/usr/bin/env bash
# Side-by-side WAF benchmark: blindfold's origin agent vs the reference nginx + ModSecurity 3 +
# OWASP CRS 3.3.4 anchor (../shared/waf), in ONE run, on loopback. See README.md beside this file.
#
# For each paranoia level (default 1 and 2):
#   1. starts the anchor (../shared/waf/anchor/nginx_anchor.sh start PL PORT: nginx WAF on PORT
#      and a stand-in origin on PORT+1000 that always answers 200, one worker pinned to --cpu),
#   2. starts `blindfold origin` (plain HTTP listener, pinned to --cpu with taskset) whose
#      upstream is that same stand-in origin,
#   3. runs run_ftw.py --suite all --pl PL against both (in parallel: it is a correctness test),
#      black-box (blocked = non-2xx/3xx or no response; see README.md for why not --log-file),
#   4. measures GET and form-POST throughput with tools/bench_http.py (wrk, one target at a time,
#      wrk pinned to --wrk-cpu) as requests per CPU-second of the WAF process = req/s per core.
# Then prints one comparison table (plus the cases whose outcome differs and what blindfold's log
# recorded), and keeps every raw output in the results directory.
#
#   bench/waf/run.sh                  # PL1 and PL2, 5 s wrk runs (~4-5 min)
#   bench/waf/run.sh --pl 1 --seconds 10
#   bench/waf/run.sh --setup          # only install what is missing (apt), then exit
#   bench/waf/run.sh --help
#
# Options:
#   --pl "1 2"          paranoia levels to measure (space or comma separated; 1-4)
#   --seconds N         wrk duration per throughput measurement (default 5; a 1 s warm-up precedes)
#   --connections N     wrk connections (default 16)
#   --cpu N             CPU both WAF processes are pinned to (default 0)
#   --wrk-cpu LIST      CPU list for wrk ('' = unpinned; default 1, or '' on a 1-CPU machine)
#   --reps N            throughput runs per target and request, alternated anchor/blindfold
#                       (default 1); the table shows each target's median run by CPU per
#                       request, and a row with every run's CPU per request (the spread)
#   --workers N         blindfold's [origin] workers (default 1: one worker beside nginx's one;
#                       its CPU is the master's plus every worker's, all pinned to --cpu)
#   --suite S           run_ftw.py suite: all | crs | corpora (default all)
#   --skip-ftw          throughput only        --skip-perf   detection only
#   --out DIR           results directory (default: a new /tmp/blindfold-waf-bench.XXXXXX)
#   --setup             install missing packages and exit
# Environment: WAF_KIT (default ../shared/waf next to the repo), BENCH_TIMEOUT (default 900 s:
# time budget of the whole run, checked between steps; each step is bounded itself).
#
# Loopback only; ports are picked free by the script; every process it starts is stopped by PID
# on exit (trap), including on Ctrl-C or a timeout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
kit="${WAF_KIT:-$repo/../shared/waf}"
bf="$repo/.venv/bin/blindfold"
wafcmp() { python3 "$here/wafcmp.py" "$@"; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

pls="1 2"; seconds=5; conns=16; cpu=0; wrk_cpu="__auto__"; suite=all
do_ftw=1; do_perf=1; out=""; setup_only=0; bf_workers=1; reps=1
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --pl) pls="${2//,/ }"; shift 2 ;;
        --seconds) seconds="$2"; shift 2 ;;
        --connections) conns="$2"; shift 2 ;;
        --cpu) cpu="$2"; shift 2 ;;
        --wrk-cpu) wrk_cpu="$2"; shift 2 ;;
        --suite) suite="$2"; shift 2 ;;
        --workers) bf_workers="$2"; shift 2 ;;
        --reps) reps="$2"; shift 2 ;;
        --skip-ftw) do_ftw=0; shift ;;
        --skip-perf) do_perf=0; shift ;;
        --out) out="$2"; shift 2 ;;
        --setup) setup_only=1; shift ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for pl in $pls; do
    [[ "$pl" =~ ^[1-4]$ ]] || { echo "--pl: $pl is not 1-4" >&2; exit 2; }
done
[[ "$seconds" =~ ^[0-9]+$ && "$seconds" -ge 1 && "$seconds" -le 60 ]] \
    || { echo "--seconds: 1-60" >&2; exit 2; }
[[ "$cpu" =~ ^[0-9]+$ ]] || { echo "--cpu: a CPU number" >&2; exit 2; }
[[ "$reps" =~ ^[0-9]+$ && "$reps" -ge 1 && "$reps" -le 9 ]] || { echo "--reps: 1-9" >&2; exit 2; }
[[ "$bf_workers" =~ ^[0-9]+$ && "$bf_workers" -ge 1 && "$bf_workers" -le 64 ]] \
    || { echo "--workers: 1-64" >&2; exit 2; }

# ------------------------------------------------------------------------------ setup
modsec_module=/usr/lib/nginx/modules/ngx_http_modsecurity_module.so
missing_pkgs() {
    local m=()
    command -v nginx >/dev/null || m+=(nginx-light)
    [ -f "$modsec_module" ] || m+=(libnginx-mod-http-modsecurity)
    ldconfig -p 2>/dev/null | grep -c 'libmodsecurity\.so\.3' >/dev/null || m+=(libmodsecurity3)
    [ -d /usr/share/modsecurity-crs/rules ] && [ -f /etc/modsecurity/crs/crs-setup.conf ] \
        || m+=(modsecurity-crs)
    command -v wrk >/dev/null || m+=(wrk)
    command -v taskset >/dev/null || m+=(util-linux)
    python3 -c 'import yaml' 2>/dev/null || m+=(python3-yaml)
    # the origin workers' allocator ([origin] worker_allocator = "auto")
    ldconfig -p 2>/dev/null | grep -c 'libmimalloc\.so\.2' >/dev/null || m+=(libmimalloc2.0)
    echo "${m[@]}"
}
setup() {
    local m
    m="$(missing_pkgs)"
    if [ -n "$m" ]; then
        echo "setup: apt-get install $m" >&2
        export DEBIAN_FRONTEND=noninteractive
        local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq || true
        # another half-configured package on the machine can make apt exit non-zero although
        # ours installed: judge by what is there afterwards
        $sudo apt-get install -y -qq --no-install-recommends $m >/dev/null || true
        m="$(missing_pkgs)"
        [ -z "$m" ] || { echo "setup: still missing: $m" >&2; exit 2; }
    fi
    # blindfold itself, and /etc/modsecurity/unicode.mapping, come from scripts/bootstrap
    if [ ! -x "$bf" ] || [ ! -f /etc/modsecurity/unicode.mapping ]; then
        "$repo/scripts/bootstrap"
    fi
}
setup
[ "$setup_only" -eq 1 ] && exit 0
for f in "$kit/run_ftw.py" "$kit/tools/bench_http.py" "$kit/anchor/nginx_anchor.sh" \
         "$kit/anchor/get_page.lua" "$kit/anchor/post_form.lua"; do
    [ -f "$f" ] || { echo "missing $f (set WAF_KIT to the shared/waf kit)" >&2; exit 2; }
done
ncpu="$(nproc)"
[ "$cpu" -lt "$ncpu" ] || { echo "--cpu $cpu: this machine has $ncpu CPUs" >&2; exit 2; }
if [ "$wrk_cpu" = "__auto__" ]; then
    if [ "$ncpu" -ge 2 ]; then wrk_cpu=$(( cpu == 1 ? 0 : 1 )); else wrk_cpu=""; fi
fi

# ------------------------------------------------------------------------------ processes
if [ -z "$out" ]; then out="$(mktemp -d /tmp/blindfold-waf-bench.XXXXXX)"; fi
mkdir -p "$out"; out="$(cd "$out" && pwd)"
chmod 0755 "$out"
# nginx's worker runs as an unprivileged user (nobody) and writes request bodies under the
# anchor's run dir: every directory above it must be searchable by others, or large bodies get 500
anchor_root="$out/anchor"
d="$out"
while [ "$d" != / ]; do
    if [ "$(( 0$(stat -c %a "$d") & 01 ))" -eq 0 ]; then
        anchor_root="$(mktemp -d /tmp/blindfold-waf-anchor.XXXXXX)"; chmod 0755 "$anchor_root"
        echo "note: $out is not searchable by nginx's worker; anchor run dir: $anchor_root" >&2
        break
    fi
    d="$(dirname "$d")"
done
pids=()          # every process this script started, stopped by PID on exit
declare -A started=()
deadline=$(( $(date +%s) + ${BENCH_TIMEOUT:-900} ))

track() {        # remember a PID we started, with its start time (guards against PID reuse)
    pids+=("$1")
    started[$1]="$(start_time "$1")"
}
start_time() { sed 's/.*) //' /proc/"$1"/stat 2>/dev/null | awk '{print $20}'; }
stop_pid() {     # TERM, wait up to 15 s, then KILL; only while it is still the process we started
    local pid="$1" i
    [ -n "${started[$pid]:-}" ] && [ "$(start_time "$pid")" = "${started[$pid]}" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || return 0
        [ "$(sed 's/.*) //' /proc/"$pid"/stat 2>/dev/null | awk '{print $1}')" != Z ] || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do stop_pid "$pid"; done
    wait 2>/dev/null || true
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

remaining() { echo $(( deadline - $(date +%s) )); }
check_time() { [ "$(remaining)" -gt 20 ] || { echo "time budget (BENCH_TIMEOUT) exhausted" >&2; exit 3; }; }

start_anchor() {     # PL PORT -> sets anchor_pid (nginx master)
    local pl="$1" port="$2" run="$anchor_root"
    WAF_RUN_DIR="$run" CPU="$cpu" sh "$kit/anchor/nginx_anchor.sh" start "$pl" "$port" \
        > "$out/pl$pl/anchor-start.txt" 2>&1 || { cat "$out/pl$pl/anchor-start.txt" >&2; exit 1; }
    anchor_pid="$(cat "$run/nginx-pl$pl/nginx.pid")"
    track "$anchor_pid"
    anchor_log="$run/nginx-pl$pl/error.log"
    wafcmp wait-http "127.0.0.1:$port" 15 && wafcmp wait-http "127.0.0.1:$((port + 1000))" 15 \
        || { echo "anchor PL$pl did not answer" >&2; exit 1; }
}

start_blindfold() {  # PL PORT ADMIN_PORT STANDIN_PORT -> sets bf_pid
    local pl="$1" port="$2" admin="$3" standin="$4" dir="$out/pl$1"
    cat > "$dir/origin.toml" <<EOF
# written by bench/waf/run.sh
[origin]
upstream = "http://127.0.0.1:$standin"
listen = []
http_listen = ["127.0.0.1:$port"]
proxy_protocol = "off"
admin_listen = "127.0.0.1:$admin"
access_log = false
log_path = "$dir/origin.log"
workers = $bf_workers

[origin.waf]
paranoia_level = $pl
mode = "block"
body_limit_action = "reject"

[origin.decisions]
ban_after_blocks = 1000000
EOF
    : > "$dir/origin.log"
    taskset -c "$cpu" "$bf" origin --config "$dir/origin.toml" > "$dir/origin.stdout" 2>&1 &
    bf_pid=$!
    track "$bf_pid"
    local ready_pid
    if ! ready_pid="$(wafcmp wait-ready "$dir/origin.log" "$bf_pid" 60)"; then
        echo "blindfold origin PL$pl did not become ready; its output:" >&2
        tail -n 30 "$dir/origin.stdout" "$dir/origin.log" >&2
        exit 1
    fi
    # the PID we measure must be the origin agent itself (taskset and the venv script exec)
    [ "$ready_pid" = "$bf_pid" ] || { echo "origin_ready pid $ready_pid != started pid $bf_pid" >&2; exit 1; }
}

describe_affinity() {  # PID... -> "pid:cpus" list (the process and its children)
    local p c out_=""
    for p in "$@"; do
        for c in "$p" $(cat /proc/"$p"/task/*/children 2>/dev/null); do
            out_+="$c:$(taskset -pc "$c" 2>/dev/null | sed 's/.*: //') "
        done
    done
    echo "$out_"
}

run_ftw_both() {     # PL APORT BPORT
    local pl="$1" dir="$out/pl$1" t=$(( $(remaining) - 60 ))
    [ "$t" -gt 600 ] && t=600
    echo "  ftw: run_ftw.py --suite $suite --pl $pl against both (in parallel, <= ${t}s)" >&2
    timeout "$t" python3 "$kit/run_ftw.py" --target "http://127.0.0.1:$2" --suite "$suite" \
        --pl "$pl" --json-out "$dir/anchor.ftw.json" > "$dir/anchor.ftw.txt" 2>&1 &
    local a=$!; track "$a"
    timeout "$t" python3 "$kit/run_ftw.py" --target "http://127.0.0.1:$3" --suite "$suite" \
        --pl "$pl" --json-out "$dir/blindfold.ftw.json" > "$dir/blindfold.ftw.txt" 2>&1 &
    local b=$!; track "$b"
    local rc=0
    wait "$a" || { rc=$?; echo "  run_ftw against the anchor failed ($rc)" >&2; }
    wait "$b" || { rc=$?; echo "  run_ftw against blindfold failed ($rc)" >&2; }
    tail -n 1 "$dir/anchor.ftw.txt" "$dir/blindfold.ftw.txt" | sed 's/^/    /' >&2
}

bench_one() {        # PL NAME PORT PID SCRIPT REP [STANDIN_PID]
    local pl="$1" name="$2" port="$3" pid="$4" script="$5" rep="$6" standin="${7:-}" dir="$out/pl$1"
    check_time
    # warm-up (pools, caches), not recorded
    python3 "$kit/tools/bench_http.py" --target "http://127.0.0.1:$port" --pid "$pid" \
        --script "$kit/anchor/$script.lua" --seconds 1 --connections "$conns" \
        --wrk-cpu "$wrk_cpu" --label warmup > /dev/null
    local c0=""
    [ -n "$standin" ] && c0="$(wafcmp cpu "$standin")"
    python3 "$kit/tools/bench_http.py" --target "http://127.0.0.1:$port" --pid "$pid" \
        --script "$kit/anchor/$script.lua" --seconds "$seconds" --connections "$conns" \
        --wrk-cpu "$wrk_cpu" --label "PL$pl $name $script" | tee "$dir/$name.$script.bench.rep$rep.txt" \
        | sed 's/^/    /' >&2
    if [ -n "$standin" ]; then   # CPU the nginx stand-in origin spent serving this run
        echo "$c0 $(wafcmp cpu "$standin")" > "$dir/standin.$script.rep$rep.cpu"
    fi
}

# ------------------------------------------------------------------------------ run
{
    echo "results: $out"
    echo "kit: $kit"
    echo "WAF CPU: $cpu, wrk CPU: ${wrk_cpu:-unpinned}, CPUs: $ncpu, wrk: ${seconds}s x $conns connections"
    nginx -v 2>&1
    dpkg-query -W -f='${Package} ${Version}\n' libmodsecurity3 modsecurity-crs \
        libnginx-mod-http-modsecurity 2>/dev/null || true
    echo "$("$bf" --version 2>&1) at $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$repo" diff --quiet HEAD -- src 2>/dev/null || echo ' + uncommitted changes in src/')"
} | tee "$out/env.txt" >&2
git -C "$repo" diff HEAD -- src > "$out/src.diff" 2>/dev/null || true

for pl in $pls; do
    check_time
    mkdir -p "$out/pl$pl"
    read -r aport bport admin < <(wafcmp ports)
    echo "PL$pl: anchor 127.0.0.1:$aport (stand-in origin :$((aport + 1000))), blindfold 127.0.0.1:$bport" >&2
    start_anchor "$pl" "$aport"
    start_blindfold "$pl" "$bport" "$admin" "$((aport + 1000))"
    echo "  affinity (pid:cpus): anchor $(describe_affinity "$anchor_pid")| blindfold $(describe_affinity "$bf_pid")" \
        | tee "$out/pl$pl/affinity.txt" >&2
    echo "anchor_pid=$anchor_pid bf_pid=$bf_pid aport=$aport bport=$bport" > "$out/pl$pl/pids.txt"
    if [ "$do_ftw" -eq 1 ]; then run_ftw_both "$pl" "$aport" "$bport"; fi
    if [ "$do_perf" -eq 1 ]; then
        echo "  throughput: ${seconds}s per run, one target at a time" >&2
        for rep in $(seq "$reps"); do
            for script in get_page post_form; do
                bench_one "$pl" anchor "$aport" "$anchor_pid" "$script" "$rep"
                bench_one "$pl" blindfold "$bport" "$bf_pid" "$script" "$rep" "$anchor_pid"
            done
        done
        wafcmp pick-median "$out/pl$pl"   # each target's median run -> *.bench.txt
    fi
    # stop this level's processes before the next one (the trap covers early exits)
    stop_pid "$bf_pid"; stop_pid "$anchor_pid"
    echo "$anchor_log" > "$out/pl$pl/anchor-log-path.txt"
    if [ -s "$out/pl$pl/origin.stdout" ]; then
        echo "  blindfold printed $(wc -l < "$out/pl$pl/origin.stdout") lines on stdout/stderr" >&2
    fi
done

wafcmp report --kit "$kit" "$out" $pls | tee "$out/report.txt"
echo "(raw outputs in $out)"
