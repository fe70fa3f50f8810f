"""The DeepSpeed config: DeepSpeed-owned settings from a JSON file, run settings injected from the run config.

One source of truth. The JSON files under ds_configs/ hold only what DeepSpeed alone decides (ZeRO
stage, offload, buckets, ...). Batch sizes, gradient clipping and precision come from the run config and
are written into the final dict by `build_ds_config`; the optimizer and LR schedule are built by the
engine from `train.*` (a client optimizer, so no JIT-compiled fused Adam), so a JSON `optimizer` or
`scheduler` block is refused rather than silently ignored. `"auto"` values are refused too: only the HF
Trainer / Accelerate fill them in, DeepSpeed itself would fail on them later with a less clear message.

Where `deepspeed.config` is looked up:
  1. an absolute path is used as is;
  2. a bare name (`zero3`, or `zero3.json`) means the shipped `ds_configs/zero3.json` (in the wheel or the
     checkout, see versatune_ds.resources);
  3. any other relative path is tried from the current directory, then among the shipped files (so the
     older spelling `ds_configs/zero3.json` keeps working from anywhere).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from versatune_ds.config.schema import RunConfig
from versatune_ds.engine.models import resolve_dtype_name
from versatune_ds.errors import UserError
from versatune_ds.resources import shipped_names, shipped_path

logger = logging.getLogger(__name__)

NVME_PLACEHOLDER_PREFIX = "/SET/ME"

# JSON keys the run config owns, and the run-config key to change instead.
_INJECTED_BATCH_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "train_batch_size": "train.micro_batch_size x train.gradient_accumulation_steps x world size",
}
_REFUSED_BLOCKS = {
    "optimizer": "train.learning_rate / weight_decay / adam_beta1 / adam_beta2 / adam_eps",
    "scheduler": "train.lr_scheduler / warmup_steps / min_lr_ratio",
    "gradient_clipping": "train.max_grad_norm",
}


def resolve_ds_config_path(name: str) -> Path:
    """Find the DeepSpeed JSON named by `deepspeed.config` (rules in the module docstring)."""
    path = Path(name).expanduser()
    candidates: list[Path] = []
    if path.is_absolute():
        candidates = [path]
    else:
        if len(path.parts) > 1:
            candidates.append(Path.cwd() / path)
        shipped_name = path.name if path.suffix == ".json" else f"{path.name}.json"
        if len(path.parts) == 1 or path.parts[0] == "ds_configs":
            try:
                candidates.append(shipped_path(f"ds_configs/{shipped_name}"))
            except UserError:
                pass
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    shipped = ", ".join(shipped_names("ds_configs", ".json")) or "none found"
    looked = ", ".join(str(c) for c in candidates) or "the shipped ds_configs/"
    raise UserError(
        f"deepspeed.config: file not found: {name} (looked at {looked}); give a path to a DeepSpeed JSON file "
        f"or the name of a shipped one ({shipped})"
    )


def load_ds_json(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON file, refusing `"auto"` values and blocks the run config owns."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"deepspeed.config: file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"deepspeed.config: {path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise UserError(
            f"deepspeed.config: {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8 JSON"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"deepspeed.config: {path} must hold a JSON object, got {type(data).__name__}")
    autos = _auto_keys(data, "")
    if autos:
        raise UserError(
            f"deepspeed.config: {path} sets {', '.join(autos)} to \"auto\"; \"auto\" is only filled in by the HF "
            "Trainer. Remove batch/optimizer keys (they come from the run config's train.* keys) and give "
            "numbers for the others"
        )
    for block, run_keys in _REFUSED_BLOCKS.items():
        if block in data:
            raise UserError(
                f"deepspeed.config: {path} has a '{block}' entry, but this toolkit sets it from the run config "
                f"({run_keys}); remove '{block}' from the JSON file"
            )
    return data


def _auto_keys(node: Any, prefix: str) -> list[str]:
    if isinstance(node, dict):
        found: list[str] = []
        for key, value in node.items():
            found.extend(_auto_keys(value, f"{prefix}.{key}" if prefix else str(key)))
        return found
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _auto_keys(v, f"{prefix}[{i}]")]
    return [prefix] if isinstance(node, str) and node.strip().lower() == "auto" else []


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def build_ds_config(cfg: RunConfig, world_size: int, *, cuda: bool | None = None) -> dict[str, Any]:
    """The final DeepSpeed config dict for `world_size` ranks.

    Reads `cfg.deepspeed.config`, injects batch sizes, clipping and precision from the run config,
    fills the NVMe path, and checks `train_batch_size == micro x accumulation x world`. Call it before
    the process group starts so a wrong batch setup fails at once on every rank.
    """
    if world_size < 1:
        raise UserError(f"world size must be >= 1, got {world_size}")
    path = resolve_ds_config_path(cfg.deepspeed.config)
    ds = copy.deepcopy(load_ds_json(path))
    train = cfg.train
    micro, accum = train.micro_batch_size, train.gradient_accumulation_steps
    expected = micro * accum * world_size
    given = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum}
    for key, value in given.items():
        if key in ds and ds[key] != value:
            raise UserError(
                f"deepspeed.config: {path} sets {key}={ds[key]!r} but the run config gives {value} "
                f"({_INJECTED_BATCH_KEYS[key]}); remove {key} from the JSON file (the run config decides)"
            )
    if "train_batch_size" in ds and ds["train_batch_size"] != expected:
        raise UserError(
            f"deepspeed.config: {path} sets train_batch_size={ds['train_batch_size']!r}, but "
            f"micro_batch_size {micro} x gradient_accumulation_steps {accum} x world size {world_size} = {expected}; "
            "remove train_batch_size from the JSON file or make the numbers agree"
        )
    ds.update(given)
    ds["train_batch_size"] = expected
    ds["gradient_clipping"] = float(train.max_grad_norm)
    _inject_precision(ds, resolve_dtype_name(cfg.model.dtype, cuda=cuda), path)
    # A client optimizer (torch AdamW) with ZeRO: DeepSpeed must not insist on its own optimizers.
    ds["zero_allow_untested_optimizer"] = True
    ds["zero_force_ds_cpu_optimizer"] = False
    _inject_nvme_path(ds, cfg.deepspeed.nvme_path, path)
    ds.setdefault("steps_per_print", 1_000_000)  # our logger reports progress; keep DeepSpeed quiet
    return ds


def _inject_precision(ds: dict[str, Any], dtype: str, path: Path) -> None:
    for block, name in (("bf16", "bf16"), ("fp16", "fp16")):
        entry = ds.get(block)
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise UserError(f"deepspeed.config: {path}: '{block}' must be an object, got {entry!r}")
        if "enabled" in entry and bool(entry["enabled"]) != (dtype == name):
            raise UserError(
                f"deepspeed.config: {path} sets {block}.enabled={entry['enabled']} but model.dtype resolves to "
                f"{dtype}; remove {block}.enabled from the JSON file (model.dtype decides the precision)"
            )
    ds.setdefault("bf16", {})["enabled"] = dtype == "bf16"
    ds.setdefault("fp16", {})["enabled"] = dtype == "fp16"


def _inject_nvme_path(ds: dict[str, Any], nvme_path: str | None, path: Path) -> None:
    zero = ds.get("zero_optimization", {})
    for block in ("offload_optimizer", "offload_param"):
        entry = zero.get(block)
        if not isinstance(entry, dict) or entry.get("device") != "nvme":
            continue
        if nvme_path is not None:
            entry["nvme_path"] = str(Path(nvme_path).expanduser())
        value = entry.get("nvme_path")
        if not value or str(value).startswith(NVME_PLACEHOLDER_PREFIX):
            raise UserError(
                f"deepspeed.config: {path} offloads to NVMe but zero_optimization.{block}.nvme_path is "
                f"{value!r}, a placeholder; set deepspeed.nvme_path=/path/to/local/nvme (a fast local disk "
                "on every node) or edit the JSON file"
            )
        if not Path(value).is_dir():
            raise UserError(
                f"zero_optimization.{block}.nvme_path: folder {value} does not exist (from "
                f"{'deepspeed.nvme_path' if nvme_path else path}); create it on every node or point it at a local NVMe disk"
            )
