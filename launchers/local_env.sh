# Shared set-up of the one-machine launchers (torchrun.sh, local_deepspeed.sh); sourced, not run.
# Reads CONFIG, RUN_DIR, DEVICE, NPROC/GPUS_PER_NODE, EXTRA_ARGS, REPO_DIR, OMP_NUM_THREADS, ALLOW_GPU_SHARING;
# sets them, exports PYTHONPATH and the CPU switches, creates $RUN_DIR/logs, sets LOG for launcher name $1,
# and brings in launchers/common.sh (GPU count check, the supervisor: secrets filter + signal forwarding).
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
CONFIG=${CONFIG:?set CONFIG to a run config YAML, e.g. CONFIG=configs/my_run.yaml}
RUN_DIR=${RUN_DIR:-runs/$(basename "${CONFIG%.*}")}
if [[ -z "${DEVICE:-}" ]]; then
  if (( $(visible_gpu_count) > 0 )); then DEVICE=gpu; else DEVICE=cpu; fi
fi
if [[ "$DEVICE" == gpu ]]; then
  NPROC=${NPROC:-${GPUS_PER_NODE:-$(visible_gpu_count)}}
  check_ranks_fit_gpus "$NPROC" NPROC
else
  NPROC=${NPROC:-2}
  # On CPU every rank would otherwise start one thread per core and the ranks fight for them.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=cpu
fi
EXTRA_ARGS=${EXTRA_ARGS:-}
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$RUN_DIR/logs"
LOG="$RUN_DIR/logs/$1-$(date +%Y%m%d-%H%M%S).log"
