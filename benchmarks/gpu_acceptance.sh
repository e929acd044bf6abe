#!/usr/bin/env bash
# GPU acceptance (see benchmarks/gpu_acceptance.py): one command, under 8 minutes on one H100/H200, no network.
#   bash benchmarks/gpu_acceptance.sh                 # every part; without CUDA it says so and exits 0
#   bash benchmarks/gpu_acceptance.sh --smoke         # toy sizes on the CPU
# PYTHON selects the interpreter (default: python from PATH, e.g. the activated venv).
set -euo pipefail
export HF_HUB_OFFLINE=1
exec "${PYTHON:-python}" "$(dirname "${BASH_SOURCE[0]}")/gpu_acceptance.py" "$@"
