#!/usr/bin/env bash
# The GPU check of issue 20 in one call (at most 8 minutes on one H200): per backend the
# devices seen, then DINO and iBOT+PQCL steps at batch 64 in float32 and mixed_bfloat16
# (images/s, peak GPU memory), and a Markdown table at the end. Exit status 1 when a backend
# sees no GPU or a row failed or was skipped.
#
#   bash benchmarks/gpu_check.sh                                   # GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke --backends jax        # CPU smoke test (CI)
#
# Options: --backends LIST, --cpu-smoke, --batch N, --steps N, --budget-s S (default 450).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python benchmarks/gpu_check.py "$@"
