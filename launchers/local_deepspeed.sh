#!/usr/bin/env bash
# One node, N processes, the DeepSpeed launcher (no Slurm, no hostfile).
#
#   CONFIG=configs/my_run.yaml RUN_DIR=runs/my_run NPROC=8 launchers/local_deepspeed.sh [key.sub=value ...] [--resume auto]
#
# Knobs (environment, all optional except CONFIG):
#   CONFIG       run config YAML                        RUN_DIR      run directory (sets train.run_dir)
#   NPROC        processes = GPUs on this node (default: GPUs seen by nvidia-smi, else 2 on CPU)
#   MASTER_PORT  port of rank 0 (default 29500)         DEVICE       gpu | cpu (default: gpu if nvidia-smi works)
#   DEEPSPEED    deepspeed launcher executable          EXTRA_ARGS   extra CLI arguments (word-split)
#   REPO_DIR     checkout put on PYTHONPATH (default: the folder above this script)
# Arguments after the script name are passed to `versatune_ds train` unchanged.
# Output goes to the terminal and to $RUN_DIR/logs/deepspeed-<time>.log.
set -euo pipefail

REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
CONFIG=${CONFIG:?set CONFIG to a run config YAML, e.g. CONFIG=configs/my_run.yaml}
RUN_DIR=${RUN_DIR:-runs/$(basename "${CONFIG%.*}")}
if [[ -z "${DEVICE:-}" ]]; then
  if nvidia-smi -L >/dev/null 2>&1; then DEVICE=gpu; else DEVICE=cpu; fi
fi
if [[ "$DEVICE" == gpu ]]; then
  NPROC=${NPROC:-${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}}
else
  NPROC=${NPROC:-2}
  # The deepspeed launcher does not cap threads; unset, every rank takes all cores. Its CPU
  # accelerator counts "devices" from LOCAL_SIZE (else NUMA nodes), so tell it the rank count.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=cpu LOCAL_SIZE=$NPROC
fi
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED=${DEEPSPEED:-deepspeed}
EXTRA_ARGS=${EXTRA_ARGS:-}
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

mkdir -p "$RUN_DIR/logs"
LOG="$RUN_DIR/logs/deepspeed-$(date +%Y%m%d-%H%M%S).log"
echo "deepspeed: $NPROC x $DEVICE, config $CONFIG, run dir $RUN_DIR, log $LOG" | tee -a "$LOG"

# --no_local_rank: the launcher would otherwise insert --local_rank=N right after the module name,
# before the `train` subcommand; the CLI reads LOCAL_RANK from the environment instead.
# shellcheck disable=SC2086  # EXTRA_ARGS is word-split on purpose
"$DEEPSPEED" --num_gpus "$NPROC" --master_port "$MASTER_PORT" --no_local_rank \
  --module versatune_ds train --config "$CONFIG" "train.run_dir=$RUN_DIR" $EXTRA_ARGS "$@" 2>&1 | tee -a "$LOG"
