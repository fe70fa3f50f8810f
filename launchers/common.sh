# Shared functions of every launcher (and scripts/quickstart.sh); sourced, not run.
#
#   visible_gpu_count            GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else `nvidia-smi -L`
#   check_ranks_fit_gpus N WHAT  DEVICE=gpu and N ranks on this node: refuse (exit 2) when N > visible GPUs
#                                (NCCL refuses two ranks on one GPU) unless ALLOW_GPU_SHARING=1
#   fit_ranks_to_gpus N          prints min(N, visible GPUs) and says so on stderr when it lowers N (quickstart)
#   supervise MODE CMD...        runs CMD under versatune_ds.supervisor (secrets filtered out of the output
#                                into the terminal and $LOG; stop signals forwarded), waits, sets LAUNCH_RC
#   requeue_if_checkpointed      under Slurm: when LAUNCH_RC is 75 (stopped with a checkpoint), requeue this job
#
# Knobs read here: PYTHON (python), STOP_SIGNAL (SIGUSR1: must be one of train.stop_signals), DEVICE,
# ALLOW_GPU_SHARING, LOG, RUN_DIR.
PYTHON=${PYTHON:-python}
STOP_SIGNAL=${STOP_SIGNAL:-SIGUSR1}
EXIT_CHECKPOINTED=75

visible_gpu_count() {
  if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
    # "" or "-1" hide every GPU; otherwise one entry per device (index or UUID)
    if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == -1* ]]; then echo 0; return; fi
    awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"
    return
  fi
  local listing
  listing=$(nvidia-smi -L 2>/dev/null) || { echo 0; return; }
  grep -c '^GPU ' <<<"$listing" || true
}

check_ranks_fit_gpus() {
  local ranks=$1 what=$2 gpus
  [[ "${DEVICE:-}" == gpu ]] || return 0
  gpus=$(visible_gpu_count)
  if (( gpus == 0 )); then
    echo "error: DEVICE=gpu, but no GPU is visible here (nvidia-smi -L lists none, or CUDA_VISIBLE_DEVICES hides them);" \
         "set DEVICE=cpu to run on CPU" >&2
    exit 2
  fi
  if (( ranks > gpus )) && [[ "${ALLOW_GPU_SHARING:-0}" != 1 ]]; then
    echo "error: $what=$ranks ranks on this node, but only $gpus GPU(s) are visible; NCCL cannot run two ranks on one GPU." \
         "Set $what=$gpus (or fewer), DEVICE=cpu, or ALLOW_GPU_SHARING=1 if your GPUs are shared on purpose (MPS)" >&2
    exit 2
  fi
}

fit_ranks_to_gpus() {
  local ranks=$1 gpus
  gpus=$(visible_gpu_count)
  if (( gpus > 0 && ranks > gpus )); then
    echo "note: $ranks ranks asked for, but this machine has $gpus GPU(s) and NCCL cannot put two ranks on one GPU: using $gpus" >&2
    ranks=$gpus
  fi
  echo "$ranks"
}

_SUPERVISOR_PID=
_forward_to_supervisor() {
  [[ -n "$_SUPERVISOR_PID" ]] && kill -s "$1" "$_SUPERVISOR_PID" 2>/dev/null || true
}

supervise() {
  local mode=$1 sig
  shift
  # Secrets filter, log and signal forwarding live in one small Python process; it needs the package.
  if ! "$PYTHON" -c 'import versatune_ds.supervisor' 2>/dev/null; then
    echo "error: $PYTHON cannot import versatune_ds.supervisor (PYTHONPATH=${PYTHONPATH:-}); set PYTHON or REPO_DIR" >&2
    exit 2
  fi
  "$PYTHON" -u -m versatune_ds.supervisor --log "$LOG" --run-dir "$RUN_DIR" --forward "$mode" \
    --stop-signal "$STOP_SIGNAL" -- "$@" &
  _SUPERVISOR_PID=$!
  # The batch shell gets Slurm's --signal=B:USR1; a user's kill or Ctrl-C gets here too: pass each on.
  for sig in TERM HUP USR1 USR2 INT; do
    # shellcheck disable=SC2064  # $sig is expanded now, on purpose
    trap "_forward_to_supervisor $sig" "$sig"
  done
  # `wait` returns early (> 128) when a trapped signal arrives: wait again until the supervisor is gone,
  # then once more for its exit status (bash keeps it for a finished background job).
  while kill -0 "$_SUPERVISOR_PID" 2>/dev/null; do
    wait "$_SUPERVISOR_PID" || true
  done
  LAUNCH_RC=0
  wait "$_SUPERVISOR_PID" || LAUNCH_RC=$?
  trap - TERM HUP USR1 USR2 INT
}

requeue_if_checkpointed() {
  [[ "$LAUNCH_RC" == "$EXIT_CHECKPOINTED" && -n "${SLURM_JOB_ID:-}" ]] || return 0
  # Said before asking: Slurm ends a running job's batch script as soon as it takes the requeue (seen: the job
  # was "CANCELLED DUE TO JOB REQUEUE" in the same second), so a line printed afterwards is often never written.
  echo "stopped with a checkpoint (exit $EXIT_CHECKPOINTED): requeueing job $SLURM_JOB_ID; it continues with --resume auto" | tee -a "$LOG"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    echo "scontrol requeue failed (was the job submitted with --requeue?): resubmit the same command with --resume auto" \
      | tee -a "$LOG" >&2
  fi
}
