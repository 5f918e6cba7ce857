#!/usr/bin/env bash
# Multi-node LIMoE training under SLURM: one `limoe train --node-rank` launcher per node
# (DeepSpeed's --no_ssh mode), each starting that node's 8 ranks.
#
#   sbatch launch/slurm.sh                                  # launch/configs/l16-multinode.yaml
#   CONFIG=my.yaml NAME=run7 sbatch --nodes=2 launch/slurm.sh --lr 5e-4
#
# Extra arguments are config overrides (as for `limoe train`). The job always passes
# --resume latest, so a requeued or resubmitted job continues from the last checkpoint.
# --signal asks SLURM for SIGTERM 5 minutes before the time limit: every rank then
# finishes its step, writes a checkpoint and exits.
#SBATCH --job-name=limoe
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=logs/slurm-%x-%j.out
set -euo pipefail

CONFIG=${CONFIG:-launch/configs/l16-multinode.yaml}
NAME=${NAME:-limoe-${SLURM_JOB_NAME:-job}}
LOGS=${LOGS:-logs}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
PORT=${PORT:-29500}

mkdir -p "$LOGS/$NAME"
HOSTFILE="$LOGS/$NAME/hostfile"
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$GPUS_PER_NODE/" > "$HOSTFILE"
MASTER=$(head -n 1 "$HOSTFILE" | cut -d' ' -f1)
NUM_NODES=$(wc -l < "$HOSTFILE")

# Once, here: check the config, train the tokenizer if missing, write config.yaml + ds_config.json.
limoe train --config "$CONFIG" --name "$NAME" --logs "$LOGS" --hostfile "$HOSTFILE" \
  --num-nodes "$NUM_NODES" --num-gpus "$GPUS_PER_NODE" --master-addr "$MASTER" --master-port "$PORT" \
  --resume latest --prepare-only "$@"

# Then on every node: that node's ranks (SLURM_NODEID is set per node by srun).
srun --kill-on-bad-exit=1 bash -c \
  "limoe train --config '$LOGS/$NAME/config.yaml' --node-rank \$SLURM_NODEID --resume latest"
