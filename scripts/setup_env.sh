#!/usr/bin/env bash
# Create (or update) the project's virtual environment with everything the toolkit and its tests need.
#   VENV=.venv            where the environment lives
#   PYTHON=python3        the interpreter that creates it (3.10+)
#   TORCH_SPEC=torch==2.13.0
#       torch is pinned here because an unpinned resolve can pull a multi-GB CUDA build onto a CPU machine.
#   TORCH_INDEX=auto      where torch comes from:
#       auto  - no GPU (no nvidia-smi): PyTorch's CPU wheel index when it answers, so an ordinary Linux machine
#               gets the CPU build; otherwise (an offline mirror, a pinned local wheel) the default index.
#               A GPU: the default index (PyPI's Linux torch is the CUDA build).
#       none  - the default index only.
#       <url> - that index, e.g. https://download.pytorch.org/whl/cu124 for a CUDA 12.4 build.
#   EXTRAS=test           extras of versatune-ds to install (test, flash, wandb, tensorboard, gguf, bench)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-auto}
EXTRAS=${EXTRAS:-test}
CPU_INDEX=https://download.pytorch.org/whl/cpu
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$TORCH_INDEX" = auto ]; then
  TORCH_INDEX=none
  if ! command -v nvidia-smi >/dev/null 2>&1 && command -v curl >/dev/null 2>&1 \
     && curl -fsS --max-time 5 -o /dev/null "$CPU_INDEX/torch/" 2>/dev/null; then
    TORCH_INDEX=$CPU_INDEX
  fi
fi
torch_args=("$TORCH_SPEC")
if [ "$TORCH_INDEX" != none ]; then
  # The PyTorch index for torch itself; PyPI stays the source of everything else.
  torch_args=(--index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple "$TORCH_SPEC")
  echo "[setup] torch from $TORCH_INDEX"
fi
# pip's "ignored location" warnings about this machine's local mirrors are noise; real errors still fail the script.
quiet() { { grep -v "^WARNING: Location .* is ignored" || true; }; }
echo "[setup] installing $TORCH_SPEC into $VENV"
"$VENV/bin/python" -m pip install -q "${torch_args[@]}" 2>&1 | quiet
echo "[setup] installing deepspeed and versatune-ds[$EXTRAS] into $VENV"
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" "deepspeed==0.19.8" -e ".[$EXTRAS]" 2>&1 | quiet
"$VENV/bin/python" -c "import torch, deepspeed, transformers, datasets, sklearn; print('[setup] ok: torch', torch.__version__, '(cuda' if torch.version.cuda else '(cpu', 'build) | deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
