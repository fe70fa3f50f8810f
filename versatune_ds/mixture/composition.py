"""Initial mixture composition: the strategies' starting weights, the floor, weights -> counts and items.

Pure functions over numpy arrays indexed by integer domain id (names never appear here; callers turn ids
into names in messages and logs). Nothing here touches torch, files or global state. The update rule that
changes the weights during training is in mixture.rules.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from versatune_ds.errors import UserError

STRATEGIES = (
    "versatune",
    "versatune_static",
    "uniform",
    "proportional",
    "inverse",
    "fixed",
    "target_only",
    "target_plus_uniform",
)
# Strategies whose initial weights start from the probed knowledge distribution.
DISTRIBUTION_STRATEGIES = ("versatune", "versatune_static", "inverse")


class MixtureError(UserError, ValueError):
    """Bad mixture input (weights, losses, schedule, sampler state).

    A `UserError` so the CLI shows it as one readable message, and a `ValueError` so code that
    validates numbers can catch it the usual way.
    """


def as_weights(weights: Sequence[float] | np.ndarray, what: str = "weights") -> np.ndarray:
    array = np.asarray(weights, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise MixtureError(f"{what} must be a non-empty 1-D sequence, got shape {array.shape}")
    for domain_id, value in enumerate(array):
        if not math.isfinite(value) or value < 0:
            raise MixtureError(
                f"{what}[{domain_id}] = {float(value)!r}: every weight must be finite and >= 0"
            )
    if array.sum() <= 0:
        raise MixtureError(f"{what} sum to 0 ({array.tolist()}): give at least one positive weight")
    return array


def normalise(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


def largest_remainder_counts(weights: Sequence[float] | np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to `weights` that sum exactly to `total` (Hamilton's method).

    Each domain gets floor(w_d·total); the leftover units go to the largest fractional parts,
    ties broken by the lower domain id. A zero weight never gets a leftover unit.
    """
    array = normalise(as_weights(weights))
    if int(total) != total or total < 0:
        raise MixtureError(f"total must be a non-negative integer, got {total!r}")
    quotas = array * int(total)
    counts = np.floor(quotas).astype(np.int64)
    leftover = int(total) - int(counts.sum())
    fractions = quotas - counts
    fractions[array == 0] = -1.0  # never hand a unit to a domain with weight 0
    # lexsort: last key is primary → largest fraction first, then lowest id.
    order = np.lexsort((np.arange(array.size), -fractions))
    counts[order[:leftover]] += 1
    assert counts.sum() == total, (counts, total)
    return counts


def apply_floor(weights: Sequence[float] | np.ndarray, floor: float) -> np.ndarray:
    """Normalise `weights` and raise every weight to at least `floor`, keeping the sum at 1.

    Domains below the floor are pinned to it; the remaining mass is shared by the others in
    proportion to their weights (repeated until no free domain falls below the floor), so the
    ratios between unaffected domains are kept.
    """
    array = normalise(as_weights(weights))
    if not math.isfinite(floor) or floor < 0:
        raise MixtureError(f"floor must be finite and >= 0, got {floor!r}")
    if floor * array.size > 1 + 1e-12:
        raise MixtureError(
            f"floor {floor} times {array.size} domains is {floor * array.size:.4g} > 1: "
            f"use a floor of at most {1 / array.size:.4g}"
        )
    if floor == 0:
        return array
    pinned = np.zeros(array.size, dtype=bool)
    result = array.copy()
    while True:  # ends: each pass pins at least one more domain or stops
        free_mass = 1.0 - floor * pinned.sum()
        free_total = array[~pinned].sum()
        result = np.where(pinned, floor, array * (free_mass / free_total) if free_total > 0 else 0.0)
        newly_pinned = (~pinned) & (result < floor)
        if not newly_pinned.any():
            break
        pinned |= newly_pinned
        if pinned.all():
            result = np.full(array.size, 1.0 / array.size)
            break
    return result


def initial_weights(
    strategy: str,
    *,
    distribution: Sequence[float] | np.ndarray | None = None,
    domain_sizes: Sequence[int] | np.ndarray | None = None,
    fixed: Sequence[float] | np.ndarray | None = None,
    floor: float = 0.0,
    target_id: int | None = None,
    target_share: float | None = None,
    num_domains: int | None = None,
) -> np.ndarray:
    """Starting weights w0 for a strategy; sums to 1.

    - `versatune`, `versatune_static`: the probed distribution p, with `floor` applied.
    - `inverse`: ∝ 1 − p, with `floor` applied (a baseline favouring what the model knows least).
    - `uniform`: 1/n.  `proportional`: ∝ domain_sizes.  `fixed`: the user's weights, normalised.
    - `target_only`: one-hot on `target_id`.
    - `target_plus_uniform`: `target_share` on the target, the rest split evenly among the others.

    `floor` applies only to the strategies derived from the probe (versatune*, inverse); the
    others are exactly what the user asked for. The number of domains comes from whichever of
    distribution / domain_sizes / fixed / num_domains is given.
    """
    if strategy not in STRATEGIES:
        raise MixtureError(f"unknown mixture strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    n = _num_domains(distribution, domain_sizes, fixed, num_domains)
    if strategy in ("versatune", "versatune_static", "inverse"):
        if distribution is None:
            raise MixtureError(
                f"strategy {strategy!r} needs the probed domain distribution: run the probe first "
                "or pass distribution="
            )
        p = normalise(as_weights(distribution, "distribution"))
        if strategy == "inverse":
            base = 1.0 - p
            # A single domain (or p one-hot over n=1) leaves nothing to invert; fall back to p.
            p = base if base.sum() > 0 else p
        return apply_floor(p, floor)
    if strategy == "uniform":
        return np.full(n, 1.0 / n)
    if strategy == "proportional":
        if domain_sizes is None:
            raise MixtureError("strategy 'proportional' needs domain_sizes (number of items per domain)")
        return normalise(as_weights(domain_sizes, "domain_sizes"))
    if strategy == "fixed":
        if fixed is None:
            raise MixtureError("strategy 'fixed' needs the weights: set mixture.weights in the config")
        return normalise(as_weights(fixed, "fixed weights"))
    # target_only / target_plus_uniform
    if target_id is None or not 0 <= target_id < n:
        raise MixtureError(f"strategy {strategy!r} needs a target domain id in [0, {n}), got {target_id!r}")
    weights = np.zeros(n)
    if strategy == "target_only":
        weights[target_id] = 1.0
        return weights
    if target_share is None or not 0.0 <= target_share <= 1.0:
        raise MixtureError(f"strategy 'target_plus_uniform' needs target_share in [0, 1], got {target_share!r}")
    if n == 1:
        return np.ones(1)
    weights[:] = (1.0 - target_share) / (n - 1)
    weights[target_id] = target_share
    return weights


def _num_domains(*sources: object) -> int:
    *arrays, num_domains = sources
    sizes = [int(np.asarray(source).size) for source in arrays if source is not None]
    if not sizes and (num_domains is None or int(num_domains) < 1):
        raise MixtureError("cannot tell the number of domains: pass distribution, domain_sizes, fixed or num_domains")
    return sizes[0] if sizes else int(num_domains)


def item_weights_from_token_weights(
    token_weights: Sequence[float] | np.ndarray, mean_tokens_per_item: Sequence[float] | np.ndarray
) -> np.ndarray:
    """The long-run share of rows q_d ∝ w_d / mean_tokens_d that token shares w imply (used by `plan`).

    (Tokens from domain d per row drawn is q_d·mean_tokens_d ∝ w_d.) The sampler does not draw with q: it
    apportions the token shares themselves, row by row (mixture.sampler, unit tokens).
    """
    weights = as_weights(token_weights, "token weights")
    mean_tokens = np.asarray(mean_tokens_per_item, dtype=np.float64)
    if mean_tokens.shape != weights.shape:
        raise MixtureError(f"mean_tokens_per_item has shape {mean_tokens.shape}, expected {weights.shape}")
    for domain_id, value in enumerate(mean_tokens):
        if not math.isfinite(value) or value <= 0:
            raise MixtureError(f"mean tokens per item of domain {domain_id} is {float(value)!r}: must be finite and > 0")
    return normalise(weights / mean_tokens)
