#!/usr/bin/env bash
# Create (or update) the project's virtual environment with everything the toolkit and its tests need.
#   VENV=.venv            where the environment lives
#   PYTHON=python3        the interpreter that creates it (3.10+)
#   TORCH_SPEC=torch==2.13.0
#       torch is pinned here because an unpinned resolve can pull a multi-GB CUDA build onto a CPU machine.
#       On a GPU cluster set TORCH_SPEC to the CUDA build you want (e.g. "torch==2.13.0" from the CUDA index).
#   EXTRAS=test           extras of versatune-ds to install (test, flash, wandb, tensorboard, gguf)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
echo "[setup] installing $TORCH_SPEC, deepspeed and versatune-ds[$EXTRAS] into $VENV"
# pip's "ignored location" warnings about this machine's local mirrors are noise; real errors still fail the script.
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" "deepspeed==0.19.8" -e ".[$EXTRAS]" 2>&1 \
  | { grep -v "^WARNING: Location .* is ignored" || true; }
"$VENV/bin/python" -c "import torch, deepspeed, transformers, datasets, sklearn; print('[setup] ok: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
