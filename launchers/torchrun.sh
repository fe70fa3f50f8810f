#!/usr/bin/env bash
# One node, N processes, torchrun (no Slurm).
#
#   CONFIG=configs/my_run.yaml RUN_DIR=runs/my_run NPROC=8 launchers/torchrun.sh [key.sub=value ...] [--resume auto]
#
# Knobs (environment, all optional except CONFIG):
#   CONFIG       run config YAML                        RUN_DIR      run directory (sets train.run_dir)
#   NPROC        processes = GPUs on this node (default: GPUs visible, else 2 on CPU); more ranks than GPUs is refused
#   DEVICE       gpu | cpu (default: gpu if a GPU is visible)
#   TORCHRUN     torchrun executable                    EXTRA_ARGS   extra CLI arguments (word-split)
#   PYTHON       python for the supervisor              REPO_DIR     checkout put on PYTHONPATH (default: above this script)
#   STOP_SIGNAL  sent to the ranks on TERM/HUP/USR1/USR2 (SIGUSR1)   STOP_GRACE_S  torchrun's wait for them (900)
# The rendezvous port is picked free by --standalone, so two runs on one node do not collide.
# Arguments after the script name are passed to `versatune_ds train` unchanged.
# Output (secrets redacted) goes to the terminal and to $RUN_DIR/logs/torchrun-<time>.log.
# Stopping: `kill <this script>` (TERM) makes the ranks checkpoint at the next step and exit; the script then
# exits 75 -- run it again (it resumes). Ctrl-C stops at once, without a checkpoint.
set -euo pipefail

# shellcheck source=launchers/local_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/local_env.sh" torchrun
TORCHRUN=${TORCHRUN:-torchrun}
STOP_GRACE_S=${STOP_GRACE_S:-900}

echo "torchrun: $NPROC x $DEVICE, config $CONFIG, run dir $RUN_DIR, log $LOG" | tee -a "$LOG"

# torchrun passes the stop signal on to its workers when it is in --signals-to-handle, and waits
# --shutdown-timeout seconds for them (its default, 30 s, is too short for a big checkpoint).
# shellcheck disable=SC2086  # EXTRA_ARGS is word-split on purpose
supervise child "$TORCHRUN" --standalone --nproc_per_node "$NPROC" \
  --signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2" --shutdown-timeout "$STOP_GRACE_S" \
  -m versatune_ds train --config "$CONFIG" "train.run_dir=$RUN_DIR" $EXTRA_ARGS "$@"
exit "$LAUNCH_RC"
