"""Resume a ZeRO-3 checkpoint on another number of ranks, straight from the files the saving ranks wrote.

DeepSpeed refuses to load ZeRO optimizer state saved by a different data-parallel world size. Its answer, the
universal checkpoint (`ds_to_universal`), works on CPU with DeepSpeed 0.19.8 (measured: 2 -> 1 ranks, identical
losses once a shared Adam `step` tensor it creates is split), but it first writes a converted copy of the whole
checkpoint (another fp32 weights + Adam moments, plus a temporary copy while converting: ~24 bytes per parameter,
1.7 TB for a 70B model), and every loading rank then reads every parameter's full tensors. Here nothing is
converted: each new rank reads only its own slice of the old shards, from memory-mapped files.

How ZeRO-3 lays out its shards (DeepSpeed 0.19, also what `zero_to_fp32` relies on): every parameter of
`numel` elements is split into `ceil(numel / W)` elements per rank (the last ranks padded), rank r holding
elements [r * size, (r + 1) * size). Each rank's optimizer file holds, per optimizer sub-group, the
concatenation of its pieces of that sub-group's parameters (`fp32_flat_groups`) and Adam's `exp_avg` /
`exp_avg_sq` in the same layout; the model-states file lists the sub-groups' parameter names and shapes
(`param_shapes`). Sub-group boundaries depend on W, so the mapping is per parameter, by name: for each
parameter of the new engine, this rank's new range is copied from the old ranks that hold it. The state dict
built that way has exactly the layout this rank would have saved itself, and goes through DeepSpeed's own
loader (`optimizer.load_state_dict`), which refreshes the 16-bit partitions from fp32 as in a normal resume.
The LR schedule, step counters and buffers come from rank 0's model-states file (they are the same on
every rank).

Refused, with what to do instead: ZeRO-1/2 optimizer state (partitioned over a flat buffer with alignment
padding per world size; not implemented) and NVMe-offloaded optimizer state (DeepSpeed keeps it in per-rank
swap folders).

Every file is read with `torch.load(weights_only=True)` (zero.weights_only_loading), memory-mapped.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from versatune_ds.engine.zero import weights_only_loading
from versatune_ds.errors import UserError

logger = logging.getLogger(__name__)

_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
# What DeepSpeed keeps in a model-states file besides the client state (engine._load_checkpoint's list).
_DEEPSPEED_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params", "frozen_param_fragments",
    "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names", "skipped_steps", "global_steps",
    "global_samples", "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions", "ds_config", "ds_version",
})


def saved_world_size(folder: str | Path) -> int | None:
    """The data-parallel world size that wrote the ZeRO-1/2/3 checkpoint `folder`; None for ZeRO-0 (no shards)."""
    ranks = [int(m.group(1)) for p in Path(folder).iterdir() if (m := _OPTIM_FILE.match(p.name))]
    return max(ranks) + 1 if ranks else None


def _optim_file(folder: Path, rank: int) -> Path:
    for prefix in ("", "bf16_"):
        path = folder / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        if path.is_file():
            return path
    raise UserError(f"checkpoint {folder}: the optimizer shard of rank {rank} is missing; resume from an earlier checkpoint")


def _load(path: Path) -> Any:
    with weights_only_loading():
        # mmap: only the pages this rank's slices touch are read from disk.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def check_reshardable(ds_engine: Any, folder: Path, saved: int) -> None:
    """Refuse, saying what to do, when the checkpoint cannot be resumed on this engine's world size."""
    world = int(ds_engine.dp_world_size)
    stage = int(ds_engine.zero_optimization_stage())
    if stage in (1, 2):
        raise UserError(
            f"checkpoint {folder} holds ZeRO-{stage} optimizer state of {saved} ranks and this run has {world}; ZeRO-1/2 "
            f"state is only resumed on the same number of ranks. Relaunch with {saved} ranks (the global batch is kept "
            "either way), or export the checkpoint (versatune-ds export) and start a new run from it"
        )
    if ds_engine.zero_nvme_offload_optimizer():
        raise UserError(
            f"checkpoint {folder} keeps its optimizer state on NVMe in per-rank swap folders of {saved} ranks; this run has "
            f"{world}. Relaunch with {saved} ranks, or export the checkpoint and start a new run from it"
        )


def load_resharded(ds_engine: Any, folder: str | Path) -> dict[str, Any]:
    """Load ZeRO-3 checkpoint `folder` (written by any number of ranks) into `ds_engine` (ALL ranks).

    Returns the client state, as `DeepSpeedEngine.load_checkpoint` would.
    """
    folder = Path(folder)
    saved = saved_world_size(folder)
    if saved is None:
        raise UserError(f"checkpoint {folder} has no ZeRO optimizer shards to redistribute")
    check_reshardable(ds_engine, folder, saved)
    optimizer = ds_engine.optimizer
    model_state = _load(folder / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    old = [_load(_optim_file(folder, r))["optimizer_state_dict"] for r in range(saved)]
    state = _zero3_state_dict(optimizer, model_state["param_shapes"], old, folder)
    rank = int(torch_dist.get_rank(group=optimizer.dp_process_group)) if torch_dist.is_initialized() else 0
    optimizer.checkpoint_event_prologue()
    states: list[Any] = [None] * int(ds_engine.dp_world_size)
    states[rank] = state
    optimizer.load_state_dict(state_dict_list=states, load_optimizer_states=True, load_from_fp32_weights=True)
    optimizer.checkpoint_event_epilogue()
    if ds_engine.lr_scheduler is not None and model_state.get("lr_scheduler") is not None:
        ds_engine.lr_scheduler.load_state_dict(model_state["lr_scheduler"])
    ds_engine.global_steps = int(model_state["global_steps"])
    ds_engine.global_samples = int(model_state.get("global_samples", ds_engine.global_steps * ds_engine.train_batch_size()))
    ds_engine.skipped_steps = int(model_state["skipped_steps"])
    _load_buffers(ds_engine.module, model_state)
    logger.info("redistributed checkpoint %s from %d rank(s) to %d", folder, saved, int(ds_engine.dp_world_size))
    return {k: v for k, v in model_state.items() if k not in _DEEPSPEED_KEYS}


def _zero3_state_dict(optimizer: Any, param_shapes: list[dict[str, torch.Size]], old: list[dict], folder: Path) -> dict:
    """This rank's ZeRO-3 optimizer state dict in the new layout, assembled from the old ranks' shards."""
    saved = len(old)
    where: dict[str, tuple[int, int, int, int]] = {}  # name -> (old sub-group, offset in it, old piece size, numel)
    for sub_group, shapes in enumerate(param_shapes):
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            piece = math.ceil(numel / saved)
            where[name] = (sub_group, offset, piece, numel)
            offset += piece
    old_states = [o["optimizer_state_dict"]["state"] for o in old]
    rank = int(torch_dist.get_rank(group=optimizer.dp_process_group)) if torch_dist.is_initialized() else 0
    keys = ("exp_avg", "exp_avg_sq")
    fp32_groups, moments = [], {}
    for sub_group, params in enumerate(optimizer.fp16_groups):
        total = int(optimizer.fp32_partitioned_groups_flat[sub_group].numel())
        buffers = {key: torch.zeros(total, dtype=torch.float32) for key in ("fp32", *keys)}
        offset = 0
        for param in params:
            name = optimizer.param_names[param]
            if name not in where:
                raise UserError(f"checkpoint {folder} has no parameter {name!r}: it was written for another model")
            old_group, old_offset, old_piece, numel = where[name]
            if numel != int(param.ds_numel):
                raise UserError(f"checkpoint {folder}: parameter {name!r} has {numel} elements there, {int(param.ds_numel)} in the model")
            piece = int(param.partition_numel())
            start, stop = rank * piece, min((rank + 1) * piece, numel)
            for old_rank in range(start // old_piece, -(-stop // old_piece)) if stop > start else ():
                low, high = max(start, old_rank * old_piece), min(stop, (old_rank + 1) * old_piece)
                src = slice(old_offset + low - old_rank * old_piece, old_offset + high - old_rank * old_piece)
                dst = slice(offset + low - start, offset + high - start)
                buffers["fp32"][dst] = old[old_rank]["fp32_flat_groups"][old_group][src]
                for key in keys:
                    buffers[key][dst] = old_states[old_rank][old_group][key][src]
            offset += piece
        if offset != total:
            raise RuntimeError(f"ZeRO-3 sub-group {sub_group}: {offset} elements assembled, the optimizer holds {total}")
        fp32_groups.append(buffers.pop("fp32"))
        moments[sub_group] = buffers
    step = old_states[0][0]["step"]
    base_groups = old[0]["optimizer_state_dict"]["param_groups"]
    groups = []
    for group_id, group in enumerate(base_groups):
        members = [s for s in range(len(fp32_groups)) if optimizer.sub_group_to_group_id[s] == group_id]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": members})
    # A step tensor per sub-group: AdamW increments it in place, a shared one would be counted once per sub-group.
    state = {s: {"step": step.clone() if torch.is_tensor(step) else step, **moments[s]} for s in moments}
    return {
        # Loss scaler and flags as saved; partition metadata of the old topology is left out.
        **{k: v for k, v in old[0].items() if k not in ("optimizer_state_dict", "fp32_flat_groups", "ds_zero_partition_groups")},
        "partition_count": int(optimizer.partition_count),
        "optimizer_state_dict": {"state": state, "param_groups": groups},
        "fp32_flat_groups": fp32_groups,
    }


def _load_buffers(module: torch.nn.Module, model_state: dict) -> None:
    """Persistent buffers from the saved module state (parameters come from the optimizer shards)."""
    saved = model_state.get("module") or {}
    names = set(model_state.get("buffer_names") or [])
    for name, buffer in module.named_buffers():
        if name in names and name in saved and saved[name].numel() == buffer.numel():
            buffer.data.copy_(saved[name].to(buffer.device, buffer.dtype).view_as(buffer))
