#!/usr/bin/env bash
# The GPU smoke run in one command (within 8 minutes on one H100/H200): the CUDA-only
# tests, 50 bf16 training steps of limoe-b-16 through the launcher, the MoE layer against
# DeepSpeed's stock layer, and the training step against its dense twin and open_clip;
# one JSON with MFU, memory and the ratios: benchmarks/results/gpu/smoke.json.
#
#   bash benchmarks/run_gpu.sh                  # PYTHON=/path/to/python to pick an interpreter
#   bash benchmarks/run_gpu.sh --dry-run        # everything but the device (CI runs this)
#   bash benchmarks/run_gpu.sh --full           # then also the full grids below (beyond the 8 minutes)
#
# Other options go to benchmarks/gpu_smoke.py (--out DIR, --batch-size N, --skip PHASE...;
# see --help). --full adds: the MoE layer grid at d 256/768, 4k..64k tokens; d 768 / 16k
# tokens with torch.profiler's top CUDA ops per variant; the training step of limoe-nano,
# limoe-ti-16 and limoe-b-16 vs dense twins vs open_clip, with MFU.
# Without a CUDA device (and without --dry-run) it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=benchmarks/results/gpu

full=0
smoke_args=()
for arg in "$@"; do
    if [[ $arg == --full ]]; then full=1; else smoke_args+=("$arg"); fi
done

"$PYTHON" benchmarks/gpu_smoke.py "${smoke_args[@]}"

if [[ $full == 1 && " ${smoke_args[*]} " != *" --dry-run "* ]]; then
    if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        exit 0
    fi
    mkdir -p "$OUT"
    "$PYTHON" benchmarks/moe_layer.py --device cuda --dtype bf16 --reps 50 --out "$OUT/moe_layer.json" \
        | tee "$OUT/moe_layer.txt"
    "$PYTHON" benchmarks/moe_layer.py --device cuda --dtype bf16 --d-model 768 --tokens 16384 --reps 50 --profile \
        --out "$OUT/moe_layer_d768_16k_profile.json" | tee "$OUT/moe_layer_d768_16k_profile.txt"
    "$PYTHON" benchmarks/train_step.py --device cuda --dtype bf16 --adamw fused --reps 20 --out "$OUT/train_step.json" \
        | tee "$OUT/train_step.txt"
    echo "results in $OUT"
fi
