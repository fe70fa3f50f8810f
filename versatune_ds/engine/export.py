"""Export a Hugging Face model folder (safetensors shards + index, config, tokenizer, generation config).

Two ways in, both streaming (engine.export_shards): host memory stays at about one shard (`--max-shard-size`,
5 GB by default) plus the largest tensor, whatever the model size.

- `export_from_engine` at the end of `train`: every rank gathers each ZeRO-3 parameter in turn
  (`deepspeed.zero.GatheredParameters`, one full tensor at a time); rank 0 casts it to the export dtype and adds
  it to the current shard. A write that fails on rank 0 (disk full) does not stop it from taking part in the
  remaining gathers, so the ranks stay in lockstep and all stop with the same message.
- `export_checkpoint` / the `export` command: one process reads a saved DeepSpeed checkpoint lazily (ZeRO-3
  pieces memory-mapped and assembled one parameter at a time; ZeRO-0 from the module file; ZeRO-1/2 through
  DeepSpeed's lazy zero_to_fp32), every file with torch.load(weights_only=True).

The folder is written under a temporary name and renamed into place, so a reader never sees half a model and
a failed export (a full disk) leaves nothing behind. It carries `versatune_export.json` (what was exported,
from where): `export --out` replaces only an empty folder or an earlier export of ours, anything else only with
`--force`, and never the run directory, a folder holding it, or its checkpoints. The result loads with
`AutoModelForCausalLM.from_pretrained` and gives the engine's logits (tests/test_export.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from versatune_ds import dist
from versatune_ds.config.loading import load_config
from versatune_ds.config.schema import RunConfig
from versatune_ds.data.tokenizer import load_tokenizer
from versatune_ds.engine import checkpoint, zero
from versatune_ds.engine.export_shards import DEFAULT_MAX_SHARD_BYTES, checkpoint_tensors, parse_size, write_tensors
from versatune_ds.engine.models import TORCH_DTYPES, resolve_dtype_name
from versatune_ds.errors import UserError
from versatune_ds.files import write_folder_atomic
from versatune_ds.protocols import TrainingEngine

logger = logging.getLogger(__name__)

EXPORT_MARKER = "versatune_export.json"


def export_dtype_name(cfg: RunConfig) -> str:
    """export.dtype, with `auto` = the training dtype."""
    return resolve_dtype_name(cfg.export.dtype if cfg.export.dtype != "auto" else cfg.model.dtype)


# ----------------------------------------------------------------------------------------------
# Where an export may go


def check_export_target(
    out: str | os.PathLike[str], *, force: bool, protected: Sequence[Path] = (), protected_trees: Sequence[Path] = ()
) -> Path:
    """The resolved target, or a refusal: a target that is not new, empty or an earlier export of ours (unless
    `force`); and always `protected` folders (the run directory) and any folder holding them, and anything in or
    above `protected_trees` (the checkpoints)."""
    target = Path(out).expanduser().resolve()
    for folder in [*protected, *protected_trees]:
        folder = folder.expanduser().resolve()
        inside = folder in protected_trees and target.is_relative_to(folder)
        if target == folder or folder.is_relative_to(target) or inside:
            raise UserError(
                f"--out {out}: that would replace {folder} (the run's own files; not even with --force); choose "
                "another folder, e.g. <run_dir>/export or a new path"
            )
    if not target.exists():
        return target
    if not target.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; give a folder path (the export is a folder of files)")
    if (target / EXPORT_MARKER).is_file() or not any(target.iterdir()):
        return target
    if force:
        logger.warning("--force: replacing %s, which is not an earlier export", target)
        return target
    raise UserError(
        f"--out {out} is a non-empty folder that is not an earlier versatune-ds export (no {EXPORT_MARKER}); "
        "choose a new or empty folder, or pass --force to replace it"
    )


def _marker(source: str, dtype: str, shards: Sequence[Path]) -> str:
    return json.dumps({"format": 1, "source": source, "dtype": dtype, "shards": [p.name for p in shards]}, indent=1) + "\n"


def _write_disk_failure(out_dir: Path, exc: OSError) -> UserError:
    try:
        free = f"{shutil.disk_usage(out_dir.parent if out_dir.parent.exists() else Path.cwd()).free / 2**20:.1f} MiB free there now"
    except OSError:
        free = "free space unknown"
    return UserError(
        f"could not write the export to {out_dir} ({type(exc).__name__}: {exc.strerror or exc}); {free}. Nothing was left "
        "behind and an earlier export there is intact; free space or choose another --out, then export again"
    )


# ----------------------------------------------------------------------------------------------
# From a live engine (end of train)


def iter_module_tensors(module: torch.nn.Module, *, is_main: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Each parameter's full value in turn (gathered under ZeRO-3), then the persistent buffers; rank 0 gets the
    values, other ranks take part in the gathers and get nothing. Iterate on ALL ranks to the end."""
    for name, param in module.named_parameters():
        if zero.is_partitioned(param):
            with zero.gathered([param]):
                if is_main:
                    yield name, param.data.detach().to("cpu", copy=True)
        elif is_main:
            yield name, param.data.detach().to("cpu", copy=True)
    if is_main:
        persistent = set(module.state_dict().keys())
        for name, buffer in module.named_buffers():
            if name in persistent:
                yield name, buffer.detach().to("cpu", copy=True)


def gather_state_dict(module: torch.nn.Module, *, is_main: bool, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (CPU, `dtype`); None elsewhere. Call on ALL ranks. For tests and small models."""
    state = {name: value.to(dtype) if value.is_floating_point() else value for name, value in iter_module_tensors(module, is_main=is_main)}
    return state if is_main else None


def export_from_engine(
    engine: TrainingEngine, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike[str], *, cfg: RunConfig,
    env: dist.DistEnv, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the engine's current model as an HF folder; call on ALL ranks (rank 0 writes)."""
    dtype_name = export_dtype_name(cfg)
    module = engine.module
    tensors = iter_module_tensors(module, is_main=env.is_main)
    failure: str | None = None
    if env.is_main:
        config = _export_config(module.config, module, TORCH_DTYPES[dtype_name])

        def write(tmp: Path) -> None:
            shards = write_tensors(tensors, tmp, dtype=TORCH_DTYPES[dtype_name], max_shard_bytes=max_shard_bytes)
            _write_metadata(tmp, config, getattr(module, "generation_config", None), tokenizer, _marker("train", dtype_name, shards))

        try:
            write_folder_atomic(out_dir, write)
            logger.info("exported the model (%s) to %s", dtype_name, out_dir)
        except OSError as exc:
            failure = str(_write_disk_failure(Path(out_dir), exc))
        except Exception as exc:  # noqa: BLE001 -- a bug: still finish the gathers so no rank waits, then re-raise
            for _ in tensors:
                pass
            dist.broadcast_object(f"rank 0 failed to write the export ({type(exc).__name__}: {exc})")
            raise
    for _ in tensors:  # the gathers rank 0 did not reach (a failed write), and every gather of the other ranks
        pass
    failure = dist.broadcast_object(failure)
    if failure is not None:
        raise UserError(failure)
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------
# From a checkpoint (the `export` command)


def _export_config(config: PretrainedConfig, model: torch.nn.Module, dtype: torch.dtype) -> PretrainedConfig:
    config = config.__class__.from_dict(config.to_dict())
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    if getattr(config, "quantization_config", None) is not None or hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF model is exported dequantised
    return config


def _write_metadata(
    folder: Path, config: PretrainedConfig, generation: GenerationConfig | None, tokenizer: PreTrainedTokenizerBase, marker: str
) -> None:
    config.save_pretrained(folder)
    if generation is not None:
        generation.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / EXPORT_MARKER).write_text(marker, encoding="utf-8")


def _expected_keys(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    """(names to write, names to skip): parameters once each (a tied output layer is written as the embedding, as
    Hugging Face does) and persistent buffers."""
    keep = {name for name, _ in model.named_parameters()}  # duplicates (tied weights) removed, first name kept
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    persistent = set(model.state_dict().keys())
    keep |= {name for name, _ in model.named_buffers() if name in persistent}
    return keep, every - keep


def export_checkpoint(
    cfg: RunConfig, folder: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> Path:
    """Write an HF folder from a checkpoint folder of a run with config `cfg` (one process)."""
    folder = Path(folder)
    dtype_name = export_dtype_name(cfg)
    dtype = TORCH_DTYPES[dtype_name]
    extra = {"gguf_file": cfg.model.gguf_file} if cfg.model.gguf_file else {}
    base_config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code, **extra)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config, trust_remote_code=cfg.model.trust_remote_code)
    keep, tied = _expected_keys(model)
    config = _export_config(base_config, model, dtype)
    try:
        generation = GenerationConfig.from_pretrained(cfg.model.path, **extra)
    except OSError:
        generation = GenerationConfig.from_model_config(base_config)
    tokenizer = load_tokenizer(cfg.model)
    seen: set[str] = set()

    def checked(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            if name in tied:
                continue
            if name not in keep:
                raise UserError(f"checkpoint {folder} does not match model {cfg.model.path}: unexpected tensor {name!r}")
            seen.add(name)
            yield name, tensor
        missing = sorted(keep - seen)
        if missing:
            raise UserError(f"checkpoint {folder} does not match model {cfg.model.path}: missing {missing[:5]}")

    def write(tmp: Path) -> None:
        shards = write_tensors(checked(checkpoint_tensors(folder)), tmp, dtype=dtype, max_shard_bytes=max_shard_bytes)
        _write_metadata(tmp, config, generation, tokenizer, _marker(str(folder), dtype_name, shards))

    try:
        write_folder_atomic(out_dir, write)
    except OSError as exc:
        raise _write_disk_failure(Path(out_dir), exc) from None
    logger.info("exported %s (%s) to %s", folder, dtype_name, out_dir)
    return Path(out_dir)


def consolidate_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DeepSpeed checkpoint folder in one dict (fp32; for tests and small models)."""
    return {name: tensor.clone() for name, tensor in checkpoint_tensors(Path(folder))}


def export_run(
    run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, checkpoint_tag: str | None = None,
    dtype: str | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD_BYTES, force: bool = False,
) -> Path:
    """Export a run's checkpoint (the latest complete one, or `checkpoint_tag`: a tag or a folder) (one process)."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"--run-dir: {config_file} not found; give the run directory a `train` run wrote")
    max_shard_bytes = parse_size(max_shard_size)
    check_export_target(out_dir, force=force, protected=[run_dir.resolve()], protected_trees=[checkpoint.checkpoints_root(run_dir).resolve()])
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
    check_export_target(out_dir, force=force, protected_trees=[folder.resolve()])
    return export_checkpoint(cfg, folder, out_dir, max_shard_bytes=max_shard_bytes)
