#!/bin/bash
# SLURM template: leantrain on NODES nodes x GPUS GPUs, one torchrun per node, c10d rendezvous on the
# first node. Submit with `sbatch scripts/slurm.sh CONFIG.toml RUN_DIR [--section.field=value ...]`.
# The run directory must be on a filesystem every node sees: rank 0 writes it, every rank reads the
# checkpoints when resuming. Resubmitting the same command resumes from the newest checkpoint.
#SBATCH --job-name=leantrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch scripts/slurm.sh CONFIG.toml RUN_DIR [overrides...]}
RUN_DIR=${2:?usage: sbatch scripts/slurm.sh CONFIG.toml RUN_DIR [overrides...]}
shift 2

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${LEANTRAIN_PORT:-29500}

srun torchrun \
  --nnodes "$SLURM_NNODES" \
  --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-id "$SLURM_JOB_ID" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$HEAD_NODE:$PORT" \
  -m leantrain.cli train "$CONFIG" --run-dir "$RUN_DIR" "$@"
