#!/usr/bin/env bash
# Is a change slower? The MoE layer and training-step benchmarks on an earlier commit and on this
# working tree, alternating before / after twice (so a busy machine hurts both sides alike),
# 1 thread each. Compare the ratios to the dense baselines inside each run, then the times.
#
#   bash benchmarks/before_after.sh a9ce7d4 /tmp/before-after     # BEFORE-COMMIT OUT-DIR
set -euo pipefail
before_rev=${1:?usage: before_after.sh BEFORE-COMMIT OUT-DIR}
out=$(realpath -m "${2:?usage: before_after.sh BEFORE-COMMIT OUT-DIR}")
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
before="$out/before-tree"
[ -d "$before" ] || git -C "$here" worktree add --detach "$before" "$before_rev"
export OMP_WAIT_POLICY=PASSIVE
for round in 1 2; do
  for side in before after; do
    tree=$([ "$side" = before ] && echo "$before" || echo "$here")
    (cd "$tree" && PYTHONPATH="$tree" python benchmarks/moe_layer.py --tokens 8192 --d-model 256 --reps 20 \
        --threads 1 --out "$out/moe_layer_${side}_$round.json" > "$out/moe_layer_${side}_$round.txt" 2>&1)
    (cd "$tree" && PYTHONPATH="$tree" python benchmarks/train_step.py --models limoe-nano limoe-ti-16 --reps 10 \
        --threads 1 --out "$out/train_step_${side}_$round.json" > "$out/train_step_${side}_$round.txt" 2>&1)
    echo "$side, round $round: done $(date -u +%T), load average $(cut -d' ' -f1 /proc/loadavg)"
  done
done
git -C "$here" worktree remove --force "$before"
echo "results in $out (*_before_*.json, *_after_*.json)"
