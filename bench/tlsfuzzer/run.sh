#!/usr/bin/env bash
# tlsfuzzer (tlslite-ng's TLS test suite) against blindfold's keyless TLS 1.3 edge and, with the
# same certificate, key and arguments, a Python `ssl` (OpenSSL) TLS 1.3 baseline. Loopback only.
# See README.md beside this file.
#
#   bench/tlsfuzzer/run.sh --tlsfuzzer DIR     # every script of the list (about 5 minutes)
#   bench/tlsfuzzer/run.sh --tlsfuzzer DIR --only 'keyupdate|ccs' --out /tmp/tf
#   bench/tlsfuzzer/run.sh --help
#
# Options:
#   --out DIR        results directory (default: a new /tmp/blindfold-tlsfuzzer.XXXXXX)
#   --only REGEX     run only the scripts whose file name matches
#   --timeout S      per script run (default 240)
#   --budget S       all scripts together (default 1500); scripts past it are skipped
#   --workers N      edge worker processes (default 1: tickets are per worker)
#   --no-sni         do not add SNI to tlsfuzzer's ClientHellos (keyless then cannot sign)
#   --setup          only prepare the tlsfuzzer checkout and its Python, then exit
#   --tlsfuzzer DIR  a tlsfuzzer checkout (scripts/ and tlsfuzzer/); tlsfuzzer is not on PyPI:
#                    git clone https://github.com/tlsfuzzer/tlsfuzzer DIR
# Environment:
#   TLSFUZZER_DIR     the same as --tlsfuzzer (the option wins)
#   TLSFUZZER_MIRROR  instead, a bare git clone of tlsfuzzer: its HEAD's scripts/ and
#                     tlsfuzzer/ are extracted into $TLSFUZZER_CACHE/src-<commit>
#   TLSFUZZER_PYTHON  a Python with tlslite-ng and ecdsa. Default: a venv made in
#                     $TLSFUZZER_CACHE/venv with pip (tlslite-ng==0.9.0b2, as tlsfuzzer's
#                     requirements.txt pins, and ecdsa); the project's .venv is left alone.
#   TLSFUZZER_CACHE   default ${XDG_CACHE_HOME:-$HOME/.cache}/blindfold-tlsfuzzer
#
# Every process it starts (key server, origin agents, edges, baselines, tlsfuzzer scripts) is
# stopped by its PID; a script past its timeout is killed by its PID.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

out=""; only=""; timeout_s=240; budget=1500; workers=1; no_sni=0; setup_only=0
tf="${TLSFUZZER_DIR:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --out) out="$2"; shift 2 ;;
        --only) only="$2"; shift 2 ;;
        --timeout) timeout_s="$2"; shift 2 ;;
        --budget) budget="$2"; shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        --no-sni) no_sni=1; shift ;;
        --setup) setup_only=1; shift ;;
        --tlsfuzzer) tf="$2"; shift 2 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

venv_py="$repo/.venv/bin/python"
if [ ! -x "$venv_py" ]; then
    echo "no $venv_py: run scripts/bootstrap first" >&2; exit 1
fi
cache="${TLSFUZZER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/blindfold-tlsfuzzer}"
mkdir -p "$cache"

# ------------------------------------------------------------------------------ tlsfuzzer
if [ -z "$tf" ]; then
    mirror="${TLSFUZZER_MIRROR:-}"
    if [ -z "$mirror" ] || [ ! -d "$mirror" ]; then
        echo "tlsfuzzer is not on PyPI: git clone https://github.com/tlsfuzzer/tlsfuzzer DIR," \
             "then pass --tlsfuzzer DIR (or TLSFUZZER_DIR=DIR, or TLSFUZZER_MIRROR=a bare clone)" >&2
        exit 2
    fi
    rev="$(git --git-dir="$mirror" rev-parse HEAD)"
    tf="$cache/src-${rev:0:12}"
    if [ ! -f "$tf/.complete" ]; then
        rm -rf "$tf"; mkdir -p "$tf"
        # only what the scripts need: some large test data files of the mirror are absent
        # (git names them on stderr even when they are not archived)
        git --git-dir="$mirror" archive "$rev" tlsfuzzer scripts 2>"$cache/archive.err" \
            | tar -x -C "$tf"
        echo "$rev" > "$tf/.complete"
    fi
fi
[ -d "$tf/scripts" ] && [ -d "$tf/tlsfuzzer" ] \
    || { echo "$tf is not a tlsfuzzer checkout (no scripts/ or tlsfuzzer/)" >&2; exit 1; }

# ------------------------------------------------------------------------------ its Python
py="${TLSFUZZER_PYTHON:-}"
if [ -z "$py" ]; then
    venv="$cache/venv"
    py="$venv/bin/python"
    if ! "$py" -c 'import tlslite, ecdsa' 2>/dev/null; then
        base="$(command -v python3 || true)"
        [ -n "$base" ] || base="$venv_py"
        "$base" -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check --pre \
            "tlslite-ng==0.9.0b2" "ecdsa>=0.15"
    fi
fi
"$py" -c 'import tlslite, ecdsa' \
    || { echo "$py lacks tlslite-ng or ecdsa" >&2; exit 1; }
echo "tlsfuzzer: $tf ($(cat "$tf/.complete" 2>/dev/null || echo "given checkout"))"
echo "tlslite-ng: $("$py" -c 'import tlslite; print(tlslite.__version__)')  python: $py"
[ "$setup_only" = 1 ] && exit 0

[ -n "$out" ] || out="$(mktemp -d /tmp/blindfold-tlsfuzzer.XXXXXX)"
mkdir -p "$out"
extra=()
[ "$no_sni" = 1 ] && extra+=(--no-sni)
cd "$repo"
# run.py is our child: on Ctrl-C/TERM it is signalled by PID and stops every server by PID.
"$venv_py" "$here/run.py" --tlsfuzzer "$tf" --python "$py" --out "$out" --only "$only" \
    --timeout "$timeout_s" --budget "$budget" --workers "$workers" ${extra[@]+"${extra[@]}"} &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' INT TERM
rc=0
wait "$child" || rc=$?
if kill -0 "$child" 2>/dev/null; then  # interrupted: let it stop its servers
    wait "$child" || rc=$?
fi
exit "$rc"
