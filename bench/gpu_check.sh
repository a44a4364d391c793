#!/usr/bin/env bash
# One prepared call on a GPU machine: every CUDA path once for correctness (bit for bit against the
# CPU path), then short prefill/decode/training benchmarks with the tables on another local node;
# one table; non-zero exit on any mismatch. Without a GPU it runs the CPU half. See bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
make setup >/dev/null
exec timeout 480 .venv/bin/python bench/gpu_check.py "$@"
