#!/usr/bin/env bash
# The GPU benchmarks in one command: cuda + bf16, results under benchmarks/results/gpu/.
#
#   bash benchmarks/run_gpu.sh            # PYTHON=/path/to/python to pick an interpreter
#
# 1. MoE layer forward+backward, d 256/768, 4k..64k tokens: LIMoE vs DeepSpeed stock vs dense;
# 2. the same at d 768, 16k tokens with torch.profiler's top CUDA ops per variant;
# 3. training step of limoe-nano / limoe-ti-16 / limoe-b-16 vs dense twins vs open_clip, with MFU.
# Without a CUDA device it says so and exits 0 (nothing to measure).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=benchmarks/results/gpu

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu.sh: torch sees no CUDA device; skipping the GPU benchmarks."
    exit 0
fi
"$PYTHON" -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
mkdir -p "$OUT"
"$PYTHON" benchmarks/moe_layer.py --device cuda --dtype bf16 --reps 50 --out "$OUT/moe_layer.json" \
    | tee "$OUT/moe_layer.txt"
"$PYTHON" benchmarks/moe_layer.py --device cuda --dtype bf16 --d-model 768 --tokens 16384 --reps 50 --profile \
    --out "$OUT/moe_layer_d768_16k_profile.json" | tee "$OUT/moe_layer_d768_16k_profile.txt"
"$PYTHON" benchmarks/train_step.py --device cuda --dtype bf16 --adamw fused --reps 20 --out "$OUT/train_step.json" \
    | tee "$OUT/train_step.txt"
echo "results in $OUT"
