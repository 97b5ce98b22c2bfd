#!/usr/bin/env bash
# Coverage-guided fuzzing (atheris/libFuzzer) of blindfold's parsers. See fuzz/README.md.
#
#   fuzz/run.sh TARGET SECONDS       # one target, e.g. fuzz/run.sh clienthello 60
#   fuzz/run.sh all SECONDS          # every target in turn, SECONDS each, then a table
#   fuzz/run.sh list                 # the targets
#
# Environment:
#   FUZZ_OUT   where the work corpora, logs and crashes go (default fuzz/out, not committed)
#   FUZZ_JOBS  unused: one process at a time (the machine's cores are shared)
#
# Inputs come from fuzz/corpus/TARGET (the seeds, committed) and FUZZ_OUT/TARGET/corpus (what
# the fuzzer found, kept between runs). A failing input is written to FUZZ_OUT/TARGET/crashes/
# and fuzzing goes on with the time left (each crash restarts the fuzzer once; at most 20).
# Copy a crash to fuzz/crashes/TARGET/ to make it a regression input for
# tests/unit/test_fuzz_targets.py, and write a test naming the documented error beside the
# parser's tests. Exit status: 1 if any target crashed or its fuzzer could not run, else 0.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
py="$repo/.venv/bin/python"
[ -x "$py" ] || { echo "no $py: run scripts/bootstrap first" >&2; exit 1; }
"$py" -c 'import atheris' 2>/dev/null \
    || { echo "atheris is missing: it comes from requirements.lock (scripts/bootstrap --venv)" >&2; exit 1; }
targets="$("$py" -c 'import sys; sys.path.insert(0, sys.argv[1]); from fuzz.targets import TARGETS; print(" ".join(TARGETS))' "$repo")"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
[ $# -ge 1 ] || { usage; exit 2; }
if [ "$1" = "list" ]; then echo "$targets" | tr ' ' '\n'; exit 0; fi
[ $# -eq 2 ] && [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -gt 0 ] || { usage; exit 2; }
what="$1"; seconds="$2"
if [ "$what" = "all" ]; then
    run_list="$targets"
elif [[ " $targets " == *" $what "* ]]; then
    run_list="$what"
else
    echo "unknown target $what; targets: $targets" >&2; exit 2
fi
out="${FUZZ_OUT:-$here/out}"
mkdir -p "$out"
summary="$out/summary.tsv"
printf 'target\truns\tcoverage\tfeatures\tcrashes\tseconds\tstatus\n' > "$summary"

fuzz_one() {
    local target="$1" budget="$2"
    local dir="$out/$target"
    mkdir -p "$dir/corpus" "$dir/crashes"
    local log="$dir/fuzz.log" runs=0 cov=0 ft=0 start end left restarts=0 status=ok
    : > "$log"
    start=$(date +%s)
    end=$((start + budget))
    while :; do
        left=$((end - $(date +%s)))
        [ "$left" -gt 0 ] || break
        # -timeout: one input taking longer than 10 s is a hang and is recorded like a crash
        local before
        before=$(find "$dir/crashes" -type f | wc -l)
        local dict=()
        [ -f "$here/dict/$target.dict" ] && dict=(-dict="$here/dict/$target.dict")
        set +e
        "$py" "$here/fuzz.py" "$target" -max_total_time="$left" -timeout=10 -rss_limit_mb=2048 \
            -max_len=65536 -print_final_stats=1 -artifact_prefix="$dir/crashes/" \
            ${dict[@]+"${dict[@]}"} "$dir/corpus" "$here/corpus/$target" >>"$log" 2>&1
        local rc=$?
        set -e
        local r c f
        r=$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$log" | tail -1 | grep -oE '[0-9]+$' || echo 0)
        runs=$((runs + ${r:-0}))
        c=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || echo 0)
        f=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || echo 0)
        [ "${c:-0}" -gt "$cov" ] && cov=$c
        [ "${f:-0}" -gt "$ft" ] && ft=$f
        [ "$rc" -eq 0 ] && break               # the budget ran out without a failure
        if [ "$(find "$dir/crashes" -type f | wc -l)" -eq "$before" ]; then
            status=error                       # it failed without recording an input
            echo "$target: the fuzzer failed without a crash input (exit $rc); see $log" >&2
            break
        fi
        restarts=$((restarts + 1))
        [ "$restarts" -lt 20 ] || break
    done
    local crashes
    crashes=$(find "$dir/crashes" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$runs" "$cov" "$ft" "$crashes" \
        "$(($(date +%s) - start))" "$status" >> "$summary"
    echo "$target: $runs runs, coverage $cov, $crashes crash file(s) in $dir/crashes (log: $log)" >&2
}

for t in $run_list; do
    fuzz_one "$t" "$seconds"
done
echo
column -t -s $'\t' "$summary"
if awk -F'\t' 'NR > 1 && ($5 > 0 || $7 != "ok") { bad = 1 } END { exit !bad }' "$summary"; then
    exit 1
fi
