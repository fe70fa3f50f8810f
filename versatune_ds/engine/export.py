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

"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase

from versatune_ds import dist
from versatune_ds.config.loading import load_config
from versatune_ds.config.schema import RunConfig
from versatune_ds.data.tokenizer import load_tokenizer
from versatune_ds.engine import checkpoint, zero
from versatune_ds.engine.models import TORCH_DTYPES, resolve_dtype_name
from versatune_ds.errors import UserError
from versatune_ds.files import write_folder_atomic
from versatune_ds.protocols import TrainingEngine

logger = logging.getLogger(__name__)


def export_dtype_name(cfg: RunConfig) -> str:
    """export.dtype, with `auto` = the training dtype."""
    return resolve_dtype_name(cfg.export.dtype if cfg.export.dtype != "auto" else cfg.model.dtype)


def gather_state_dict(module: torch.nn.Module, *, is_main: bool, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (CPU, `dtype`); None elsewhere. Call on ALL ranks."""
    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if zero.is_partitioned(param):  # gather it, one at a time
            with zero.gathered([param]):
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


def export_from_engine(
    engine: TrainingEngine, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike[str], *, cfg: RunConfig, env: dist.DistEnv
) -> Path:
    """Write the engine's current model as an HF folder; call on ALL ranks (rank 0 writes)."""
    dtype = TORCH_DTYPES[export_dtype_name(cfg)]
    module = engine.module
    state = gather_state_dict(module, is_main=env.is_main, dtype=dtype)
    if env.is_main:
        assert state is not None

        def write(tmp: Path) -> None:
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        write_folder_atomic(out_dir, write)
        logger.info("exported the model (%s) to %s", export_dtype_name(cfg), out_dir)
    dist.barrier()
    return Path(out_dir)


def consolidate_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of a DeepSpeed checkpoint folder (rank 0 only; no process group needed).

    DeepSpeed's files are read with torch.load(weights_only=True) (zero.weights_only_loading):
    a checkpoint from elsewhere cannot run code when it is exported.
    """
    if any(folder.glob("*optim_states.pt")) and any(folder.glob("zero_pp_rank_*")):
        return zero.fp32_state_dict(str(folder.parent), folder.name)
    module_file = folder / "mp_rank_00_model_states.pt"
    if not module_file.is_file():
        raise UserError(f"{folder} holds no DeepSpeed checkpoint files (expected zero_pp_rank_* or mp_rank_00_model_states.pt)")
    with zero.weights_only_loading():
        return torch.load(module_file, map_location="cpu", weights_only=True)["module"]


def export_checkpoint(cfg: RunConfig, folder: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write an HF folder from a checkpoint folder of a run with config `cfg` (one process)."""
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
    tokenizer = load_tokenizer(cfg.model)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    write_folder_atomic(out_dir, write)
    logger.info("exported %s (%s) to %s", folder, export_dtype_name(cfg), out_dir)
    return Path(out_dir)


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    return key.endswith("lm_head.weight") and bool(getattr(model.config, "tie_word_embeddings", False))


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, checkpoint_tag: str | None = None,
               dtype: str | None = None) -> Path:
    """Export a run's checkpoint (the latest complete one, or `checkpoint_tag`: a tag or a folder) (one process)."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"--run-dir: {config_file} not found; give the run directory a `train` run wrote")
    cfg = load_config(config_file, check_files=False)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, dtype=dtype))
    if checkpoint_tag is None:
        folder = checkpoint.find_latest(run_dir)
        if folder is None:
            raise UserError(f"--run-dir: {run_dir} has no complete checkpoint under {checkpoint.CHECKPOINT_DIR}/")
    else:
        candidate = Path(checkpoint_tag)
        folder = candidate if candidate.is_dir() else checkpoint.checkpoints_root(run_dir) / checkpoint_tag
        if not (folder / checkpoint.STATE_FILE).is_file():
            raise UserError(f"--checkpoint: {folder} is not a complete checkpoint (no {checkpoint.STATE_FILE})")
    return export_checkpoint(cfg, folder, out_dir)
