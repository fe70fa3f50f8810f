#!/usr/bin/env bash
# One node, N processes, the DeepSpeed launcher (no Slurm, no hostfile).
#
#   CONFIG=configs/my_run.yaml RUN_DIR=runs/my_run NPROC=8 launchers/local_deepspeed.sh [key.sub=value ...] [--resume auto]
#
# Knobs (environment, all optional except CONFIG):
#   CONFIG       run config YAML                        RUN_DIR      run directory (sets train.run_dir)
#   NPROC        processes = GPUs on this node (default: GPUs visible, else 2 on CPU); more ranks than GPUs is refused
#   MASTER_PORT  port of rank 0 (default 29500)         DEVICE       gpu | cpu (default: gpu if a GPU is visible)
#   DEEPSPEED    deepspeed launcher executable          EXTRA_ARGS   extra CLI arguments (word-split)
#   PYTHON       python for the supervisor              REPO_DIR     checkout put on PYTHONPATH (default: above this script)
#   STOP_SIGNAL  sent to the ranks on TERM/HUP/USR1/USR2 (SIGUSR1)
# Arguments after the script name are passed to `versatune_ds train` unchanged.
# Output (secrets redacted) goes to the terminal and to $RUN_DIR/logs/deepspeed-<time>.log.
# Stopping: `kill <this script>` (TERM) makes the ranks checkpoint at the next step and exit; the script then
# exits 75 -- run it again (it resumes). Ctrl-C stops at once, without a checkpoint.
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
# `supervise tree`: the stop signal goes to every process of the launch. DeepSpeed's runner has no handler
# (it would die and orphan the rest) and its per-node launcher gives the ranks 30 s after a TERM, so both are
# started ignoring the stop signal (inherited), while the ranks install their own handler for it.
# shellcheck disable=SC2086  # EXTRA_ARGS is word-split on purpose
supervise tree "$DEEPSPEED" --num_gpus "$NPROC" --master_port "$MASTER_PORT" --no_local_rank \
  --module versatune_ds train --config "$CONFIG" "train.run_dir=$RUN_DIR" $EXTRA_ARGS "$@"
exit "$LAUNCH_RC"
