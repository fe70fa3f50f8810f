#!/usr/bin/env bash
# The CPU quickstart, end to end on the sample data written by us (data/sample) and a tiny random Llama:
#   setup -> tiny model -> check-config -> probe -> plan -> train (2 ranks, ZeRO-3, gloo) -> eval -> export -> report
# Everything lands in runs/quickstart/. Takes a few minutes on a 2-core machine; the numbers mean nothing
# (random model, smoke-test data) — it shows every stage working. For a real model see README "Real models".
#   NPROC=2 (ranks; on a GPU machine at most its number of GPUs)  RUN_DIR=runs/quickstart
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launchers/common.sh
source launchers/common.sh
NPROC=${NPROC:-2}
RUN_DIR=${RUN_DIR:-runs/quickstart}
CONFIG=configs/sample_tiny.yaml
# On a GPU machine every rank needs a GPU of its own (NCCL refuses two ranks on one): fewer ranks if need be.
NPROC=$(fit_ranks_to_gpus "$NPROC")
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
(( $(visible_gpu_count) > 0 )) || export DS_ACCELERATOR=cpu
step() { printf '\n==> %s\n' "$*"; }

step "1/8 tiny model (random init) + tokenizer trained on the sample text"
[ -f runs/tiny-model/config.json ] || versatune-ds tiny-model --out runs/tiny-model --text data/sample/*.jsonl
step "2/8 check-config: the resolved run config and the final DeepSpeed config"
versatune-ds check-config --config "$CONFIG" --world-size "$NPROC" "train.run_dir=$RUN_DIR" | tail -n 25
step "3/8 probe: generations from a lone BOS token -> domain classifier -> knowledge distribution"
torchrun --standalone --nproc_per_node "$NPROC" -m versatune_ds probe --config "$CONFIG" "train.run_dir=$RUN_DIR"
step "4/8 plan: per-domain sizes and the token budget of the VersaTune mixture"
versatune-ds plan --config "$CONFIG" --world-size "$NPROC" "train.run_dir=$RUN_DIR" \
  "mixture.distribution=$PWD/$RUN_DIR/probe/distribution.json"
step "5/8 train: ZeRO-3 on $NPROC ranks, re-weighting after every evaluation, checkpoints, export at the end"
torchrun --standalone --nproc_per_node "$NPROC" -m versatune_ds train --config "$CONFIG" "train.run_dir=$RUN_DIR" \
  "mixture.distribution=$PWD/$RUN_DIR/probe/distribution.json" --resume auto
step "6/8 eval: per-domain held-out loss of the exported model"
versatune-ds eval --run-dir "$RUN_DIR" --out "$RUN_DIR/eval.json"
step "7/8 export: the latest checkpoint again as a Hugging Face folder (train already wrote $RUN_DIR/final)"
versatune-ds export --run-dir "$RUN_DIR" --out "$RUN_DIR/export_latest"
step "8/8 report: plots + summary"
versatune-ds report --run-dir "$RUN_DIR"
printf '\nDone. See %s/report/summary.md, %s/mixture.json, %s/metrics.jsonl and %s/final/\n' "$RUN_DIR" "$RUN_DIR" "$RUN_DIR" "$RUN_DIR"
