#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md: training cost (with and without distillation, and at a larger batch) and inference
# on CUDA, one after the other on an otherwise idle GPU. MODEL and DATA may point to local copies of
# all-MiniLM-L6-v2 and of the Rotten Tomatoes csv where the asset packages are not installed (default: the packaged
# assets).
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
args=(--device cuda ${MODEL:+--model "$MODEL"} ${DATA:+--data "$DATA"})
"$python" benchmarks/training_cost.py "${args[@]}"
"$python" benchmarks/training_cost.py --distillation "${args[@]}"
"$python" benchmarks/training_cost.py --batch 256 --max-length 128 "${args[@]}"  # the regime bound by arithmetic
"$python" benchmarks/inference.py --batches 1,32,256 "${args[@]}"
