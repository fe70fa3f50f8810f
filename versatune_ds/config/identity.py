"""A config's identity: as a plain tree, as YAML, its hash (what a resume compares), and a diff of two.

Keys in HASH_EXCLUDED_KEYS do not change what a run computes (where it writes, how it logs, how many
processes tokenize), so a resumed run may change them freely.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping, Sequence

import yaml

from versatune_ds.config.schema import RunConfig


def config_to_dict(cfg: Any) -> Any:
    """A plain dict/list/scalar tree of a config (dataclasses and mapping proxies unwrapped)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (tuple, list)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# Keys that do not change what a run computes: a resumed run may change them freely.
HASH_EXCLUDED_KEYS: tuple[str, ...] = (
    "train.run_dir",
    "train.log_every",
    "train.trace_samples",
    "train.stop_signals",
    "train.lock_stale_after_s",
    "checkpoint",
    "logging",
    "export",
    "dist",
    "data.cache_dir",
    "data.num_proc",
    "data.lock_timeout_s",
    # The same rows and the same math, laid out with or without pads: only float rounding differs
    # (tests/test_train_dist.py: losses within 1e-4), so a run may switch layouts when it resumes, and a checkpoint
    # written before the setting existed resumes.
    "data.padding_free",
    "deepspeed.nvme_path",
)


def without_excluded_keys(tree: Mapping[str, Any], excluded: Sequence[str] = HASH_EXCLUDED_KEYS) -> dict[str, Any]:
    """A deep copy of a `config_to_dict` tree without the keys that do not change results."""
    pruned = json.loads(json.dumps(tree))
    for dotted in excluded:
        node = pruned
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part, {})
        node.pop(parts[-1], None)
    return pruned


def config_hash(cfg: RunConfig, excluded: Sequence[str] = HASH_EXCLUDED_KEYS) -> str:
    """A stable hash of the settings that determine the run's results (for refusing resumes with another config)."""
    canonical = json.dumps(without_excluded_keys(config_to_dict(cfg), excluded), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two `config_to_dict` trees (for resume errors)."""
    keys = sorted(set(old) | set(new))
    out: list[str] = []
    for key in keys:
        path = f"{prefix}.{key}" if prefix else key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_diff(a, b, path))
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out
