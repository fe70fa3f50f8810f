"""Streaming, sharded export: tensors go to safetensors shards one at a time, cast per tensor.

`ShardWriter` takes `(name, tensor)` pairs in model order, casts each floating tensor to the export dtype, and
writes a shard (`model-00001-of-0000N.safetensors`) as soon as the next tensor would take it past
`max_shard_bytes`; `close()` names the shards and writes `model.safetensors.index.json` (one shard: plain
`model.safetensors`, as Hugging Face does). At most one shard of cast tensors is held, plus the tensor being
added.

`zero3_checkpoint_tensors` reads a ZeRO-3 checkpoint lazily: each parameter's fp32 values are assembled from
the saving ranks' pieces (memory-mapped, so nothing else is read), one parameter at a time. The maps are dropped
and reopened every `remap_bytes` of data read, so the file pages already consumed leave the process and its
resident memory stays at about a shard plus the largest parameter in fp32, whatever the model size
(measured in bench/export_memory.py). DeepSpeed's own lazy `zero_to_fp32` mode keeps every map open until the
end; ZeRO-1/2 checkpoints (models that fit one GPU) go through it, ZeRO-0 through the module file.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from versatune_ds.engine import zero
from versatune_ds.errors import UserError

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB', '50MB', '500MiB' or a number of bytes -> bytes."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(text)
        if not match:
            raise UserError(f"--max-shard-size: {text!r} is not a size; write e.g. 5GB, 500MB or 500MiB")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])
    if size < 1:
        raise UserError(f"--max-shard-size must be positive, got {text!r}")
    return size


class ShardWriter:
    """Write tensors into safetensors shards of at most `max_shard_bytes` (a larger single tensor gets its own)."""

    def __init__(self, folder: Path, *, dtype: torch.dtype, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.folder = Path(folder)
        self.dtype = dtype
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        value = tensor.detach()
        value = value.to("cpu", self.dtype) if value.is_floating_point() else value.to("cpu")
        value = value.contiguous()
        size = value.numel() * value.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        if value.data_ptr() == tensor.data_ptr():
            value = value.clone()  # never keep a view into a memory-mapped file or a live parameter
        self._pending[name] = value
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self._written) + 1:05d}.safetensors"
        try:
            save_file(self._pending, str(path), metadata={"format": "pt"})
        except SafetensorError as exc:  # safetensors reports I/O errors as its own type: make them OSErrors again
            code = re.search(r"os error (\d+)", str(exc))
            number = int(code.group(1)) if code else errno.EIO
            raise OSError(number, os.strerror(number), str(path)) from None
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, give the shards their final names and write the index; returns the shard files."""
        if self._pending or not self._written:
            self._flush()
        count = len(self._written)
        if count == 1:
            final = self.folder / SAFE_WEIGHTS_NAME
            os.replace(self._written[0][0], final)
            return [final]
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self._written, start=1):
            final = self.folder / f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(path, final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return files


def write_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], folder: Path, *, dtype: torch.dtype, max_shard_bytes: int,
    keep: Callable[[str], bool] = lambda name: True,
) -> list[Path]:
    """Stream `tensors` into shards under `folder` (only names `keep` accepts); returns the shard files."""
    writer = ShardWriter(folder, dtype=dtype, max_shard_bytes=max_shard_bytes)
    for name, tensor in tensors:
        if keep(name):
            writer.add(name, tensor)
    return writer.close()


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint lazily


def _load_mapped(path: Path) -> Any:
    with zero.weights_only_loading():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def zero3_checkpoint_tensors(folder: Path, *, remap_bytes: int = 2**30) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32 tensor) of every parameter of a ZeRO-3 checkpoint, then its buffers; one at a time."""
    model_files = sorted(folder.glob("*zero_pp_rank_*_mp_rank_00_model_states.pt"), key=_rank_of)
    optim_files = sorted(folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
    world = len(optim_files)
    if world == 0 or [_rank_of(p) for p in optim_files] != list(range(world)):
        raise UserError(f"{folder}: the ZeRO-3 optimizer shards are incomplete (found {[p.name for p in optim_files]})")
    model_state = _load_mapped(model_files[0])
    param_shapes: list[dict[str, Any]] = model_state["param_shapes"]
    buffers = {name: model_state["module"][name] for name in model_state.get("buffer_names") or [] if name in model_state["module"]}
    del model_state

    def open_groups() -> list[list[torch.Tensor]]:
        return [_load_mapped(path)["optimizer_state_dict"]["fp32_flat_groups"] for path in optim_files]

    groups = open_groups()
    read_since_remap = 0
    for group_id, shapes in enumerate(param_shapes):
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            piece = math.ceil(numel / world)
            flat = torch.cat([groups[rank][group_id][offset : offset + piece] for rank in range(world)])
            yield name, flat[:numel].view(tuple(shape))
            del flat
            offset += piece
            read_since_remap += piece * world * 4
            if read_since_remap >= remap_bytes:  # unmap the pages read so far (they count as resident otherwise)
                groups, read_since_remap = open_groups(), 0
    del groups
    for name, buffer in buffers.items():
        yield name, buffer


def zero12_checkpoint_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """ZeRO-1/2: DeepSpeed's lazy zero_to_fp32 (it holds the merged fp32 vector; ZeRO-2 models fit one GPU)."""
    state = zero.lazy_fp32_state_dict(str(folder.parent), folder.name)
    for name, value in state.items():
        yield name, value.contiguous() if hasattr(value, "contiguous") else value


def module_file_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """ZeRO-0: the module state dict DeepSpeed saved whole, memory-mapped."""
    module = _load_mapped(path)["module"]
    yield from module.items()


def checkpoint_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The full tensors of any DeepSpeed checkpoint folder (ZeRO-0..3), read lazily."""
    if any(folder.glob("*zero_pp_rank_*_optim_states.pt")):
        sample = _load_mapped(next(iter(sorted(folder.glob("*zero_pp_rank_*_optim_states.pt")))))
        stage = int(sample["optimizer_state_dict"]["zero_stage"])
        del sample
        return zero3_checkpoint_tensors(folder) if stage == 3 else zero12_checkpoint_tensors(folder)
    module_file = folder / "mp_rank_00_model_states.pt"
    if not module_file.is_file():
        raise UserError(f"{folder} holds no DeepSpeed checkpoint files (expected zero_pp_rank_* or mp_rank_00_model_states.pt)")
    return module_file_tensors(module_file)


def _rank_of(path: Path) -> int:
    match = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(match.group(1)) if match else -1
