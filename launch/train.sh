#!/usr/bin/env bash
# Launch jsm_dist training on this machine, or on this node of a SLURM job (run under srun,
# one task per node). Thin: every knob is an environment variable with a default, and
# jsm_dist.launching.cli turns them into one validated `accelerate launch` command, which it execs.
# Arguments go to the training module:
#   launch/train.sh --config configs/demo.yaml --corpus shards/demo/train --epochs 2
#   MODE=deepspeed launch/train.sh --config configs/demo.yaml --corpus shards/demo/train
#   DRY_RUN=1 launch/train.sh --config configs/demo.yaml --corpus shards/demo/train  # print only
set -euo pipefail
REPO_ROOT="${JSM_REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
cd "$REPO_ROOT"

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO_ROOT/.venv/bin/python" ]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# cpu: DDP over gloo (sets ACCELERATE_USE_CPU=1); gpu: DDP over NCCL; deepspeed: ZeRO (ds_config.json,
# also runs on CPU hosts). Default: gpu when nvidia-smi lists a GPU, else cpu.
if [ -z "${MODE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && timeout 20 nvidia-smi -L 2>/dev/null | grep -q GPU; then MODE=gpu; else MODE=cpu; fi
fi
PROCS_PER_NODE="${PROCS_PER_NODE:-}"          # default: 2 (cpu) / GPUs SLURM gave the node
NUM_MACHINES="${NUM_MACHINES:-1}"             # ignored under SLURM (SLURM_NNODES)
MACHINE_RANK="${MACHINE_RANK:-0}"             # ignored under SLURM (SLURM_NODEID)
MAIN_PROCESS_IP="${MAIN_PROCESS_IP:-}"        # ignored under SLURM (first host of the job)
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-}"    # default 29500 (+ job id mod 10000 under SLURM)
MIXED_PRECISION="${MIXED_PRECISION:-no}"      # no | fp16 | bf16
DS_CONFIG="${DS_CONFIG:-$REPO_ROOT/ds_config.json}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-}"    # optional accelerate yaml; the flags built here win
JSM_TRAIN_MODULE="${JSM_TRAIN_MODULE:-jsm_dist.train}"  # module, or a path ending in .py
DRY_RUN="${DRY_RUN:-0}"
# FROM_SLURM=1: rendezvous from SLURM_* (auto when inside a SLURM job allocation).
if [ -z "${FROM_SLURM:-}" ]; then
  if [ -n "${SLURM_JOB_NODELIST:-}" ] && [ -n "${SLURM_NODEID:-}" ]; then FROM_SLURM=1; else FROM_SLURM=0; fi
fi
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"

args=(--mode "$MODE" --mixed-precision "$MIXED_PRECISION" --deepspeed-config "$DS_CONFIG"
      --train-module "$JSM_TRAIN_MODULE")
[ -n "$PROCS_PER_NODE" ] && args+=(--procs-per-node "$PROCS_PER_NODE")
[ -n "$MAIN_PROCESS_PORT" ] && args+=(--port "$MAIN_PROCESS_PORT")
[ -n "$ACCELERATE_CONFIG" ] && args+=(--config-file "$ACCELERATE_CONFIG")
if [ "$FROM_SLURM" = "1" ]; then
  [ -z "$PROCS_PER_NODE" ] && [ "$MODE" = "cpu" ] && args+=(--procs-per-node 2)
  args+=(--from-slurm)
else
  args+=(--num-machines "$NUM_MACHINES" --machine-rank "$MACHINE_RANK")
  [ -n "$MAIN_PROCESS_IP" ] && args+=(--main-process-ip "$MAIN_PROCESS_IP")
fi
[ "$DRY_RUN" = "1" ] && args+=(--dry-run)
exec "$PYTHON" -m jsm_dist.launching.cli "${args[@]}" -- "$@"
