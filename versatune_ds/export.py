"""Export a Hugging Face model folder (safetensors + config + tokenizer + generation config).

Two ways in:

- `export_from_engine` at the end of `train`: every rank gathers each ZeRO-3 parameter in turn with
  `deepspeed.zero.GatheredParameters` (one full tensor at a time, so no rank ever holds two copies
  of the model); rank 0 keeps a CPU copy in the export dtype and writes the folder. All ranks call it.
- `export_checkpoint` / the `export` command: rank 0 consolidates a saved DeepSpeed checkpoint with
  DeepSpeed's `zero_to_fp32` (fp32 master weights, any ZeRO stage 1-3, any number of saving ranks;
  the module file for ZeRO-0) and writes the folder; no process group is needed, so it runs as one
  process or under a launcher (other ranks return at once).

The folder is written under a temporary name and renamed into place, so a reader never sees half
a model. It loads with `AutoModelForCausalLM.from_pretrained` and gives the same logits as the
trained engine (tests/test_export.py).

This is a command module: torch / transformers / deepspeed are imported inside functions only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from versatune_ds.errors import UserError

if TYPE_CHECKING:
    import argparse

    from versatune_ds import dist
    from versatune_ds.config import RunConfig
    from versatune_ds.engine import TrainEngine

logger = logging.getLogger(__name__)


def export_dtype_name(cfg: RunConfig) -> str:
    """export.dtype, with `auto` = the training dtype."""
    import torch

    from versatune_ds.ds_config import resolve_dtype_name

    name = cfg.export.dtype if cfg.export.dtype != "auto" else cfg.model.dtype
    return resolve_dtype_name(name, cuda=torch.cuda.is_available())


def gather_state_dict(module: Any, *, is_main: bool, dtype: Any) -> dict | None:
    """The full state dict on rank 0 (CPU, `dtype`); None elsewhere. Call on ALL ranks."""
    import deepspeed
    import torch

    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if hasattr(param, "ds_id"):  # a ZeRO-3 partitioned parameter: gather it, one at a time
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if is_main:
                    state[name] = param.data.detach().to("cpu", dtype).clone()
        elif is_main:
            state[name] = param.data.detach().to("cpu", dtype).clone()
    if not is_main:
        return None
    persistent = set(module.state_dict().keys())
    for name, buffer in module.named_buffers():
        if name in persistent and name not in state:
            state[name] = buffer.detach().to("cpu").clone()
    return state


def _write_folder(out_dir: Path, write: Any) -> Path:
    """Run `write(tmp_dir)` and rename the result to `out_dir` (replacing an older export)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def export_from_engine(engine: TrainEngine, tokenizer: Any, out_dir: str | os.PathLike[str], *, cfg: RunConfig, env: dist.DistEnv) -> Path:
    """Write the engine's current model as an HF folder; call on ALL ranks (rank 0 writes)."""
    from versatune_ds import dist as dist_module
    from versatune_ds.engine import TORCH_DTYPES

    dtype = TORCH_DTYPES[export_dtype_name(cfg)]
    module = engine.module
    state = gather_state_dict(module, is_main=env.is_main, dtype=dtype)
    if env.is_main:
        assert state is not None

        def write(tmp: Path) -> None:
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        _write_folder(Path(out_dir), write)
        logger.info("exported the model (%s) to %s", export_dtype_name(cfg), out_dir)
    dist_module.barrier()
    return Path(out_dir)


def consolidate_checkpoint(folder: Path) -> dict:
    """Full fp32 state dict of a DeepSpeed checkpoint folder (rank 0 only; no process group needed).

    DeepSpeed's files are read with torch.load(weights_only=True) (checkpoint.weights_only_loading):
    a checkpoint from elsewhere cannot run code when it is exported.
    """
    import torch

    from versatune_ds.checkpoint import weights_only_loading

    if any(folder.glob("*optim_states.pt")) and any(folder.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loading():
            return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    module_file = folder / "mp_rank_00_model_states.pt"
    if not module_file.is_file():
        raise UserError(f"{folder} holds no DeepSpeed checkpoint files (expected zero_pp_rank_* or mp_rank_00_model_states.pt)")
    with weights_only_loading():
        return torch.load(module_file, map_location="cpu", weights_only=True)["module"]


def export_checkpoint(cfg: RunConfig, folder: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write an HF folder from a checkpoint folder of a run with config `cfg` (one process)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from versatune_ds.data import load_tokenizer
    from versatune_ds.engine import TORCH_DTYPES

    folder = Path(folder)
    dtype = TORCH_DTYPES[export_dtype_name(cfg)]
    state = {k: v.to(dtype) for k, v in consolidate_checkpoint(folder).items()}
    extra = {"gguf_file": cfg.model.gguf_file} if cfg.model.gguf_file else {}
    config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code, **extra)
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF model is exported dequantised
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not _is_tied(model, k)]
    if missing or unexpected:
        raise UserError(f"checkpoint {folder} does not match model {cfg.model.path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    try:
        model.generation_config = GenerationConfig.from_pretrained(cfg.model.path, **extra)
    except OSError:
        pass  # the base model has no generation_config.json: transformers writes a default one
    tokenizer = load_tokenizer(cfg)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    _write_folder(Path(out_dir), write)
    logger.info("exported %s (%s) to %s", folder, export_dtype_name(cfg), out_dir)
    return Path(out_dir)


def _is_tied(model: Any, key: str) -> bool:
    return key.endswith("lm_head.weight") and bool(getattr(model.config, "tie_word_embeddings", False))


# ----------------------------------------------------------------------------------------------
# The `export` command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="the run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint tag (e.g. step_00000100) or folder; default: the latest")
    parser.add_argument("--out", required=True, help="folder to write the Hugging Face model to")
    parser.add_argument("--dtype", default=None, choices=["auto", "bf16", "fp16", "fp32"], help="override export.dtype")


def run_command(args: argparse.Namespace) -> int:
    from versatune_ds import checkpoint
    from versatune_ds.config import load_config
    from versatune_ds.dist import DistEnv

    if DistEnv.from_environ().rank != 0:
        return 0  # consolidation reads files only; rank 0 does it alone
    run_dir = Path(args.run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"--run-dir: {config_file} not found; give the run directory a `train` run wrote")
    cfg = load_config(config_file, check_files=False)
    if args.dtype is not None:
        cfg = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, dtype=args.dtype))
    if args.checkpoint is None:
        folder = checkpoint.find_latest(run_dir)
        if folder is None:
            raise UserError(f"--run-dir: {run_dir} has no complete checkpoint under {checkpoint.CHECKPOINT_DIR}/")
    else:
        candidate = Path(args.checkpoint)
        folder = candidate if candidate.is_dir() else checkpoint.checkpoints_root(run_dir) / args.checkpoint
        if not (folder / checkpoint.STATE_FILE).is_file():
            raise UserError(f"--checkpoint: {folder} is not a complete checkpoint (no {checkpoint.STATE_FILE})")
    export_checkpoint(cfg, folder, args.out)
    return 0
