#!/usr/bin/env bash
# Everything GPU-side in one call (for a lent device machine), results under ${OUT:-gpu-out}:
# the CUDA tests (double backward through the LSTM with cuDNN off), and the step-cost
# benchmark at both sizes on CUDA.
#   bash bench/gpu_check.sh
set -euo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python -m pip install -q torch==2.13.0 2>/dev/null || true
python -m pip install -q -e ".[dev]"
nvidia-smi > "$OUT/nvidia-smi.txt" || true
python -m pytest -q -k cuda -p no:nbmake -o addopts="" tests 2>&1 | tee "$OUT/cuda-tests.txt"
dropsplit bench --device cuda --size small --repeats 5 --json "$OUT/step_cost_small_cuda.json" \
    --markdown "$OUT/step_cost_small_cuda.md" 2>&1 | tee "$OUT/bench-small.txt"
dropsplit bench --device cuda --size paper --repeats 3 --json "$OUT/step_cost_paper_cuda.json" \
    --markdown "$OUT/step_cost_paper_cuda.md" 2>&1 | tee "$OUT/bench-paper.txt"
