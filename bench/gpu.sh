#!/usr/bin/env bash
# The GPU benchmark from a clean checkout (see docs/PERFORMANCE.md, "GPU"): creates .venv with
# `make install`, starts PostgreSQL and Redis if they are down (`make services`), then runs
# `python -m bench.gpu` with any arguments given here (--quick, --cases N, --database, --redis-url).
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory install services
exec .venv/bin/python -m bench.gpu "$@"
