"""What a resumed run may differ in from the checkpoint it continues, checked before any model is loaded.

A changed config (keys that change results; config.identity.HASH_EXCLUDED_KEYS are free to change) is
refused listing the changed keys unless allowed; a changed data set is refused naming the domain; a
different number of ranks is refused (the ZeRO shards belong to the ranks that wrote them).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from versatune_ds.config.identity import config_diff, config_hash, config_to_dict, without_excluded_keys
from versatune_ds.config.schema import RunConfig
from versatune_ds.errors import UserError

logger = logging.getLogger(__name__)


def config_state(cfg: RunConfig) -> dict:
    """What a checkpoint records about the config."""
    return {"config_hash": config_hash(cfg), "config": config_to_dict(cfg)}


def check_config_unchanged(state: Mapping[str, Any], cfg: RunConfig, *, allow_change: bool, where: str) -> list[str]:
    """Refuse a resume whose config changes results; returns the changed keys (empty when unchanged)."""
    if state.get("config_hash") == config_hash(cfg):
        return []
    changed = config_diff(without_excluded_keys(state.get("config", {})), without_excluded_keys(config_to_dict(cfg)))
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


def check_world_size(state: Mapping[str, Any], world_size: int, *, where: str) -> None:
    """ZeRO shards and the per-rank sample order belong to the number of ranks that saved them."""
    saved = int(state.get("world_size", world_size))
    if saved != world_size:
        raise UserError(
            f"checkpoint {where} was written by {saved} ranks, this run has {world_size}; resume with {saved} ranks, "
            "or export the checkpoint (versatune-ds export) and start a new run from the exported model"
        )
