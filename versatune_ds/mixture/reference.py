"""Reference losses ℓ_ref for the learnable potential γ (used by mixture.policy).

First match wins:
1. `given` (already computed by the caller);
2. `mixture.reference_losses` in the config;
3. `mixture.reference_model`, evaluated once on the held-out sets by the caller's `evaluate_model`
   callable (collective: every rank calls it) and cached in `<run_dir>/reference_losses.json`, keyed by
   the model, the held-out data fingerprints and the evaluated examples' ids; the per-example losses are
   kept too, so γ's standard error can pair them with the trained model's (mixture.policy);
4. None: the policy then uses the first evaluated loss × `mixture.reference_fallback_factor` (a warning
   says so).
A missing, zero or non-finite reference loss is refused with the domain named.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from versatune_ds import dist
from versatune_ds.config.schema import MixtureConfig
from versatune_ds.data.prepare import PreparedData
from versatune_ds.dist import DistEnv
from versatune_ds.domains import Domains
from versatune_ds.errors import UserError
from versatune_ds.eval.heldout import DomainLosses, ItemLosses
from versatune_ds.files import write_json_atomic

logger = logging.getLogger(__name__)

REFERENCE_FILE = "reference_losses.json"


def resolve_reference_losses(
    m: MixtureConfig,
    domains: Domains,
    data: PreparedData,
    run_dir: str | os.PathLike[str] | None,
    env: DistEnv,
    *,
    given: np.ndarray | Sequence[float] | None,
    evaluate_model: Callable[[str], DomainLosses] | None,
    example_ids: Sequence[Sequence[int]] | None = None,
) -> tuple[np.ndarray | None, str, tuple[ItemLosses, ...] | None]:
    """ℓ_ref by domain id, where it came from, and the examples it was measured on (None: not known).

    ℓ_ref None = use the fallback at the first evaluation. `example_ids`: per domain, the ids of the
    held-out examples `evaluate_model` scores (a cached result for other examples is not reused).
    """
    if given is not None:
        return checked_reference(np.asarray(given, dtype=np.float64), domains, "reference_losses argument"), "given", None
    if m.reference_losses is not None:
        values = domains.array_from_mapping(m.reference_losses, key="mixture.reference_losses")
        return checked_reference(values, domains, "mixture.reference_losses"), "config", None
    if m.reference_model is not None:
        if evaluate_model is None:
            raise UserError("mixture.reference_model is set, but this caller cannot evaluate a model; pass evaluate_model")
        cache = None if run_dir is None else Path(run_dir) / REFERENCE_FILE
        fingerprints = [d.fingerprint for d in data.per_domain]
        cached = None
        if env.is_main and cache is not None and cache.is_file():
            cached = _cached_reference(cache, m.reference_model, domains, fingerprints, example_ids)
        cached = dist.broadcast_object(cached)  # every rank must agree whether to run the (collective) evaluation
        if cached is not None:
            logger.info("reference losses from %s", cache)
            result = cached
        else:
            logger.info("evaluating the reference model %s on the held-out sets", m.reference_model)
            result = evaluate_model(m.reference_model)
            checked_reference(result.loss, domains, f"mixture.reference_model ({m.reference_model})")  # never cache bad values
            if env.is_main and cache is not None:
                write_json_atomic(cache, {
                    "model": m.reference_model, "fingerprints": fingerprints,
                    "losses": domains.mapping_from_array(result.loss),
                    "loss_se": domains.mapping_from_array(result.se), "items": [i.to_json() for i in result.items],
                })
        values = checked_reference(np.asarray(result.loss, dtype=np.float64), domains, f"mixture.reference_model ({m.reference_model})")
        return values, f"model: {m.reference_model}", result.items or None
    logger.warning(
        "no mixture.reference_losses or mixture.reference_model: γ will use the first evaluated loss x %g "
        "(mixture.reference_fallback_factor) as the reference", m.reference_fallback_factor,
    )
    return None, "fallback", None


def _cached_reference(
    path: Path, model: str, domains: Domains, fingerprints: list[str], example_ids: Sequence[Sequence[int]] | None
) -> DomainLosses | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        losses = document.get("losses")
        if document.get("model") != model or document.get("fingerprints") != fingerprints or not isinstance(losses, dict):
            return None  # another model or other held-out data: evaluate again
        if sorted(losses) != sorted(domains.names) or len(document.get("items") or []) != len(domains):
            return None  # other domains, or written before per-example losses were kept
        items = tuple(ItemLosses.from_json(i) for i in document["items"])
        if example_ids is not None and [i.ids.tolist() for i in items] != [list(ids) for ids in example_ids]:
            return None  # another evaluation subset (eval.max_tokens_per_domain changed): evaluate again
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None  # unreadable cache: evaluate again
    values = np.asarray([float(losses[name]) for name in domains.names], dtype=np.float64)
    return DomainLosses(values, np.asarray([i.sums.sum() for i in items]), np.asarray([i.tokens.sum() for i in items]), items)


def checked_reference(values: np.ndarray, domains: Domains, where: str) -> np.ndarray:
    if values.shape != (len(domains),):
        raise UserError(f"{where}: expected one reference loss per domain ({len(domains)}), got shape {values.shape}")
    bad = first_bad_domain(values)
    if bad is not None:
        raise UserError(
            f"{where}: the reference loss of domain {domains.name_of(bad)!r} is {float(values[bad])!r}; reference "
            "losses must be finite and > 0 (check that domain's held-out set and the reference model)"
        )
    return values


def first_bad_domain(values: np.ndarray) -> int | None:
    for domain_id, value in enumerate(values):
        if not math.isfinite(float(value)) or value <= 0:
            return domain_id
    return None
