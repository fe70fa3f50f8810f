"""What a resumed run may differ in from the checkpoint it continues, checked before any model is loaded.

A changed config (keys that change results; config.identity.HASH_EXCLUDED_KEYS are free to change) is
refused listing the changed keys unless allowed; a changed data set is refused naming the domain.

A different number of ranks is allowed: the checkpoint's ZeRO shards are redistributed (`engine.reshard`) and
the global batch is kept, so the global sample order (a pure function of the sample index) continues exactly:
`keep_global_batch` changes `train.gradient_accumulation_steps` (and says so) so that micro-batch x
accumulation x ranks equals the checkpoint's global batch, and refuses, saying what would work, when no whole
number of accumulation steps does. A change of micro-batch size or accumulation steps that keeps the global batch
is not a config change (the updates are the same, train_engine's contract).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

from versatune_ds.config.identity import config_diff, config_hash, config_to_dict, without_excluded_keys
from versatune_ds.config.schema import RunConfig
from versatune_ds.errors import UserError

logger = logging.getLogger(__name__)


def config_state(cfg: RunConfig) -> dict:
    """What a checkpoint records about the config."""
    return {"config_hash": config_hash(cfg), "config": config_to_dict(cfg)}


# Keys whose change keeps the results when the global batch stays the same.
_BATCH_SPLIT_KEYS = ("train.micro_batch_size", "train.gradient_accumulation_steps")


def saved_global_batch(state: Mapping[str, Any]) -> int:
    """The global batch (rows per optimizer step) of the run that wrote `state`."""
    if "global_batch_size" in state:
        return int(state["global_batch_size"])
    train = state.get("config", {}).get("train", {})  # checkpoints from before the key was recorded
    return int(state.get("world_size", 1)) * int(train.get("micro_batch_size", 1)) * int(train.get("gradient_accumulation_steps", 1))


def check_config_unchanged(
    state: Mapping[str, Any], cfg: RunConfig, *, allow_change: bool, where: str, world_size: int | None = None
) -> list[str]:
    """Refuse a resume whose config changes results; returns the changed keys (empty when unchanged).

    With `world_size`, a changed micro-batch size or accumulation count that keeps the checkpoint's global batch
    on that many ranks is not counted as a change.
    """
    if state.get("config_hash") == config_hash(cfg):
        return []
    changed = config_diff(without_excluded_keys(state.get("config", {})), without_excluded_keys(config_to_dict(cfg)))
    if world_size is not None and _global_batch(cfg, world_size) == saved_global_batch(state):
        changed = [line for line in changed if not line.startswith(_BATCH_SPLIT_KEYS)]
    if not changed:
        return []
    if allow_change:
        logger.warning("resuming %s with a changed config (allowed): %s", where, "; ".join(changed))
        return changed
    raise UserError(
        f"the config differs from the one checkpoint {where} was made with:\n  "
        + "\n  ".join(changed)
        + "\nresume with the original config, start a new run_dir, or pass --allow-config-change "
        "(checkpoint.allow_config_change=true) to continue anyway"
    )


def check_data_unchanged(state: Mapping[str, Any], names: Sequence[str], fingerprints: Sequence[str], *, where: str) -> None:
    """Refuse a resume whose training data changed, naming the domain(s)."""
    old = dict(zip(state.get("domain_names", []), state.get("data_fingerprints", [])))
    changed = [name for name, fp in zip(names, fingerprints) if name in old and old[name] != fp]
    added = [name for name in names if name not in old]
    removed = [name for name in old if name not in names]
    problems = [f"domain {n!r}: its data changed" for n in changed]
    problems += [f"domain {n!r} is new" for n in added] + [f"domain {n!r} was removed" for n in removed]
    if problems:
        raise UserError(
            f"the training data differs from checkpoint {where}: " + "; ".join(problems)
            + ". Restore the original data files (and tokenizer / data settings), or start a new run_dir"
        )


def _global_batch(cfg: RunConfig, world_size: int) -> int:
    return cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world_size


def keep_global_batch(state: Mapping[str, Any], cfg: RunConfig, world_size: int, *, where: str) -> RunConfig:
    """`cfg` with the accumulation steps that keep the checkpoint's global batch on `world_size` ranks.

    Unchanged when the batch already matches, or when the world size is the one that saved (then a changed
    global batch is a config change, allowed or refused by `check_config_unchanged`).
    """
    saved_world = int(state.get("world_size", world_size))
    target = saved_global_batch(state)
    if saved_world == world_size or _global_batch(cfg, world_size) == target:
        return cfg
    micro = cfg.train.micro_batch_size
    accumulation, remainder = divmod(target, micro * world_size)
    if remainder or accumulation < 1:
        worlds = [w for w in range(1, target // micro + 1) if (target // micro) % w == 0] if target % micro == 0 else []
        micros = [m for m in range(1, target // world_size + 1) if target % (world_size * m) == 0]
        problem = (
            f"{world_size} ranks x train.micro_batch_size={micro} = {world_size * micro} rows is more than that"
            if accumulation < 1 else
            f"{world_size} ranks x train.micro_batch_size={micro} cannot make {target} with a whole number of accumulation steps"
        )
        raise UserError(
            f"checkpoint {where} was trained with a global batch of {target} rows per step on {saved_world} rank(s); "
            f"{problem}. Resume on a number of ranks that works with this micro-batch size "
            f"({', '.join(map(str, worlds[:8])) or 'none'}), or set train.micro_batch_size to one of "
            f"{', '.join(map(str, micros[:8])) or 'none'} for {world_size} ranks, or start a new run_dir"
        )
    logger.info(
        "resuming %s on %d rank(s) (it was written by %d): train.gradient_accumulation_steps %d -> %d keeps the global "
        "batch of %d rows per step", where, world_size, saved_world, cfg.train.gradient_accumulation_steps, accumulation, target,
    )
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, gradient_accumulation_steps=accumulation))
