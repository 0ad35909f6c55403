#!/usr/bin/env bash
# Everything GPU-side in one call (for a lent device machine), results under ${OUT:-gpu-out}:
# the CUDA tests (double backward through the LSTM with cuDNN off), the step-cost benchmark at
# both sizes on CUDA, and a short time-to-quality comparison (report in $OUT/time-report).
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
# time to quality on CUDA (issue 18): the character-level suite's Dropout_1 against the analytic
# replacement and its cheaper variants, one seed, up to 150 epochs each, one run at a time, then
# the report's time-to-quality section with this GPU's step costs (a few minutes in all)
dropsplit bench --device cuda --size char --repeats 5 --no-memory --only NoDropout \
    "Analytic(sampled, implicit) HVP" "Analytic(sampled) HVP" "Analytic(implicit only) HVP" \
    --json "$OUT/step_cost_char_cuda.json" 2>&1 | tee "$OUT/bench-char.txt"
dropsplit reproduce --suite configs/paper/suite-char-time.toml --out "$OUT/time" --seeds 1 \
    --no-measure --set 'train.device="cuda"' --set train.epochs=150 \
    --only dropout-1 analytic analytic-lazy2 analytic-lazy2-noise4 explicit-lazy2 \
    2>&1 | tee "$OUT/time.txt"
dropsplit report "$OUT"/time/*/seed0 --out "$OUT/time-report" \
    --suite configs/paper/suite-char-time.toml --seeds 1 \
    --step-costs "$OUT/step_cost_char_cuda.json" | tee -a "$OUT/time.txt"
