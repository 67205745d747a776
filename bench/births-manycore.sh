#!/usr/bin/env bash
# Births on a many-core machine, in under 4 minutes: 6 workers per server, nothing pinned.
#
#   bench/births-manycore.sh [PYTHON] [WORKERS] [ROUNDS] [SECONDS]
#
# PYTHON: a venv's python with edgesync-wsgi[test] installed (default .venv/bin/python);
# wrk must be on PATH (a carried binary: PATH=/path/to/dir:$PATH). Nothing is installed.
# Prints: each birth's boot CPU (worker import / --preload / mold / mold + --preload);
# oneshot (mold) and oneshot (before: no mold, gunicorn's spawn sleep) against per_worker;
# recycling (wall clock 4 s) / steady, without and with the mold, without and with --preload.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
W=${2:-6}
R=${3:-3}
S=${4:-6}
command -v wrk >/dev/null || { echo "wrk is not on PATH" >&2; exit 2; }
echo "== $(nproc) cores, $W workers per server, $R rounds of ${S}s; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" bench/births.py boot --workers "$W" --births 12 --no-pin
"$PY" bench/births.py oneshot --workers "$W" --rounds "$R" --seconds "$S" --connections 64 --no-pin
"$PY" bench/births.py recycling --workers "$W" --rounds "$R" --seconds "$S" --connections 64 --no-pin
