#!/usr/bin/env bash
# One node, N processes, torchrun (no Slurm).
#
#   CONFIG=configs/my_run.yaml RUN_DIR=runs/my_run NPROC=8 launchers/torchrun.sh [key.sub=value ...] [--resume auto]
#
# Knobs (environment, all optional except CONFIG):
#   CONFIG       run config YAML                        RUN_DIR      run directory (sets train.run_dir)
#   NPROC        processes = GPUs on this node (default: GPUs seen by nvidia-smi, else 2 on CPU)
#   DEVICE       gpu | cpu (default: gpu if nvidia-smi works)
#   TORCHRUN     torchrun executable                    EXTRA_ARGS   extra CLI arguments (word-split)
#   REPO_DIR     checkout put on PYTHONPATH (default: the folder above this script)
# The rendezvous port is picked free by --standalone, so two runs on one node do not collide.
# Arguments after the script name are passed to `versatune_ds train` unchanged.
# Output goes to the terminal and to $RUN_DIR/logs/torchrun-<time>.log.
set -euo pipefail

# shellcheck source=launchers/local_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/local_env.sh" torchrun
TORCHRUN=${TORCHRUN:-torchrun}

echo "torchrun: $NPROC x $DEVICE, config $CONFIG, run dir $RUN_DIR, log $LOG" | tee -a "$LOG"

# shellcheck disable=SC2086  # EXTRA_ARGS is word-split on purpose
"$TORCHRUN" --standalone --nproc_per_node "$NPROC" \
  -m versatune_ds train --config "$CONFIG" "train.run_dir=$RUN_DIR" $EXTRA_ARGS "$@" 2>&1 | tee -a "$LOG"
