#!/bin/bash
# DP fine-tuning on 2 nodes x 8 GPUs with DeepSpeed ZeRO-3 (accelerate_configs/multi_node_zero3.yaml).
#   sbatch docs/slurm_multinode.sh train/configs/demo_smollm2.yaml privacy.target_epsilon=8 output_dir=runs/multinode
# One `accelerate launch` per node (srun --ntasks-per-node=1); each starts 8 local processes.
# Re-submitting with the same output_dir resumes from output_dir/checkpoints/latest.
#SBATCH --job-name=dpnotes-zero3
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch docs/slurm_multinode.sh CONFIG.yaml [key=value ...]}
shift
export MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_PORT=${MAIN_PORT:-29500}
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export NNODES=$SLURM_NNODES
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
# A rank that hits an NCCL error or timeout aborts its communicators instead of hanging the job
# (torch >= 2.2 reads this name; the one without the TORCH_ prefix is deprecated).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# The privacy seed must NOT be in the config for a real run: rank 0 draws secret keys and
# broadcasts them (the sampling and noise streams derive from them; they are kept only in checkpoints).
srun --kill-on-bad-exit=1 bash -c '
  .venv/bin/accelerate launch \
    --config_file accelerate_configs/multi_node_zero3.yaml \
    --num_machines "$NNODES" --num_processes $((NNODES * GPUS_PER_NODE)) \
    --machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" \
    train/dp_lora.py --config "$0" "$@"
' "$CONFIG" "$@"
