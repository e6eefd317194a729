#!/usr/bin/env bash
# Distil the student on several GPU nodes under SLURM: one torchrun per node, one process per GPU.
#
#   sbatch scripts/slurm_distil.sh                      # 2 nodes x 8 GPUs, configs/cluster-torchrun.yaml
#   sbatch --nodes=4 scripts/slurm_distil.sh            # more nodes: nothing else changes
#   PARAMS=params.yaml GPUS_PER_NODE=4 sbatch scripts/slurm_distil.sh
#
# The working copy (data/labels, data/prepared, models/student) must be on a filesystem every
# node sees: every rank reads the labels and the checkpoint; rank 0 alone writes the student,
# its checkpoint and the training summary. Resubmitting the job resumes from the checkpoint
# (same settings and the same number of processes; otherwise it trains afresh).
# See docs/distributed.md.
#SBATCH --job-name=d2llm-distil
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

PARAMS=${PARAMS:-configs/cluster-torchrun.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
VENV=${VENV:-.venv}
# The first node of the allocation hosts the rendezvous.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

# srun starts one torchrun per node; each starts GPUS_PER_NODE ranks and they meet at HEAD_NODE.
srun --kill-on-bad-exit=1 "$VENV/bin/python" -m torch.distributed.run \
  --nnodes="$SLURM_JOB_NUM_NODES" \
  --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_id="$SLURM_JOB_ID" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$HEAD_NODE:29500" \
  --max-restarts=2 \
  -m d2llm.cli --params "$PARAMS" train \
  --labels-dir data/labels --prepared-dir data/prepared --out-dir models/student \
  --metrics reports/train_metrics.json --plots-dir reports/plots
