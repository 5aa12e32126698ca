#!/usr/bin/env bash
# The long robustness run (by hand or nightly; CI runs the small versions in tests/):
#   1. scripts/fuzz-long.py: FUZZ_INPUTS (default 20000) random mutations of every seed image
#   2. the hypothesis fuzz and fault-injection tests with FUZZ_EXAMPLES (default 1000) examples each
#   3. crash safety at every qcow2 kill point for CRASH_SEEDS (default 6) workloads
#   4. the 16-client NBD load test for LOAD_SECONDS (default 60) per round
# Usage: scripts/fuzz-long.sh [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
seed="${1:-$RANDOM}"
python3 scripts/fuzz-long.py --inputs "${FUZZ_INPUTS:-20000}" --seed "$seed"
FUZZ_EXAMPLES="${FUZZ_EXAMPLES:-1000}" FAULT_EXAMPLES="${FAULT_EXAMPLES:-200}" FAULT_RANDOM=1 python3 -m pytest -n 2 -q tests/test_fuzz_formats.py tests/test_fault_injection.py
CRASH_POINTS=all CRASH_SEEDS="${CRASH_SEEDS:-6}" python3 -m pytest -n 2 -q tests/test_crash_safety.py
LOAD_SECONDS="${LOAD_SECONDS:-60}" python3 -m pytest -q -s tests/test_nbd_load.py
