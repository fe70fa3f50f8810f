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

# shellcheck source=launchers/local_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/local_env.sh" deepspeed
if [[ "$DEVICE" == cpu ]]; then
  # The deepspeed launcher's CPU accelerator counts "devices" from LOCAL_SIZE (else NUMA nodes).
  export LOCAL_SIZE=$NPROC
fi
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED=${DEEPSPEED:-deepspeed}

echo "deepspeed: $NPROC x $DEVICE, config $CONFIG, run dir $RUN_DIR, log $LOG" | tee -a "$LOG"

# --no_local_rank: the launcher would otherwise insert --local_rank=N right after the module name,
# before the `train` subcommand; the CLI reads LOCAL_RANK from the environment instead.
# shellcheck disable=SC2086  # EXTRA_ARGS is word-split on purpose
"$DEEPSPEED" --num_gpus "$NPROC" --master_port "$MASTER_PORT" --no_local_rank \
  --module versatune_ds train --config "$CONFIG" "train.run_dir=$RUN_DIR" $EXTRA_ARGS "$@" 2>&1 | tee -a "$LOG"
