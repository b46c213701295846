#!/usr/bin/env bash
# The GPU check of issue 16 (bench/gpu_check.py does the work; see its docstring):
#   bash bench/gpu_check.sh              # one-GPU machine: build (sm_90), CUDA tests, benchmark,
#                                        # compute-sanitizer; <= 8 minutes; JSON in bench/results/
#   bash bench/gpu_check.sh --dry-run    # CPU only (CI): collect the CUDA tests, build the plan
# Every stage has its own timeout and a failing stage does not stop the run.
# PYTHON=/path/to/python picks the interpreter (default: python3 on PATH).
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
