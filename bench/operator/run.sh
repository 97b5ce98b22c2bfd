#!/bin/sh
# bench/operator: time until every edge applied an operator's purge (and, as the baseline, a
# ban) with two edges, the origin's HTTPS stream and Redis. See README.md.
set -eu
cd "$(dirname "$0")/../.."
exec .venv/bin/python bench/operator/obench.py "$@"
