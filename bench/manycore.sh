#!/bin/sh
# The many-core side-by-side comparison (bench/manycore.py; --help for options).
#   PYTHON: the Python with Flask, gunicorn and psutil (default: .venv/bin/python of this tree)
#   WRK:    the wrk binary (default: wrk on PATH); its directory is searched for shared
#           libraries too, so a carried libluajit-5.1.so.2 beside it is found.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ -n "${WRK:-}" ]; then
    WRK=$(cd "$(dirname "$WRK")" && pwd)/$(basename "$WRK")
    export WRK
    LD_LIBRARY_PATH=$(dirname "$WRK")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export LD_LIBRARY_PATH
fi
exec "$PYTHON" bench/manycore.py "$@"
