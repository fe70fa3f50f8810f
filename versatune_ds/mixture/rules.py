"""The update rule of VersaTune: the γ/φ scores, the weight update and its guards, domain expansion.

Pure functions over numpy arrays indexed by integer domain id (names never appear here; callers
turn ids into names in messages and logs). Nothing here touches torch, files or global state.

The update rule (DESIGN.md §1.4) in short:

    γ_i = max((ℓ_i − ℓ_ref,i) / ℓ_i, 0)          learnable potential
    φ_i = max((ℓ_i(t) − ℓ_i(t−1)) / ℓ_i(t−1), 0)  forgetting degree
    log w ← log w + η·(α·γ + β·φ); softmax; smoothing toward the prior; floor; cap per update.

Noise. ℓ_i is measured on a sample of held-out examples, so both differences carry a standard error
(eval.heldout: SE_γ of ℓ_i − ℓ_ref,i, SE_φ of ℓ_i(t) − ℓ_i(t−1), paired over the examples when both
losses scored the same ones). The rule counts only the part of a difference beyond k standard errors
(k = `UpdateRule.noise_k`, mixture.noise_k, default 2):

    γ_i = max((ℓ_i − ℓ_ref,i − k·SE_γ,i) / ℓ_i, 0)      φ_i = max((ℓ_i(t) − ℓ_i(t−1) − k·SE_φ,i) / ℓ_i(t−1), 0)

so a rise inside the noise is no "forgetting", and a domain within noise of its reference has no
potential left; a difference well beyond the noise moves the weights almost as before (it loses k·SE).
Each score is thus a lower confidence bound, which leans against the domains measured least precisely:
at the first evaluation with the fallback reference (ℓ_ref = 0.8·ℓ, paired), γ_i = 0.2·(1 − k·SE_i/ℓ_i)
instead of 0.2 for all. Counting a difference in full once it passes k·SE avoids that lean but lets noise
through in jumps: on the noise test (tests/test_noise.py) it drifted past the cap like the published rule.
k = 0, or no standard errors given, is the rule as published. An unknown error (NaN: fewer than two
examples) counts as 0.

`UpdateRule(rule="official")` is the released code's rule instead: `w ← w·exp(ℓ) / Σ_j w_j·exp(ℓ_j)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from versatune_ds.mixture.composition import MixtureError, apply_floor, as_weights, normalise

RULES = ("versatune", "official")


def _as_losses(losses: Sequence[float] | np.ndarray, what: str, num_domains: int) -> np.ndarray:
    array = np.asarray(losses, dtype=np.float64)
    if array.shape != (num_domains,):
        raise MixtureError(f"{what} must have one value per domain ({num_domains}), got shape {array.shape}")
    for domain_id, value in enumerate(array):
        # A zero, negative or NaN loss would turn into NaN/inf weights two lines later; stop here.
        if not math.isfinite(value) or value <= 0:
            raise MixtureError(
                f"{what} of domain {domain_id} is {float(value)!r}: losses must be finite and > 0 "
                "(a NaN/inf loss means training diverged; a zero loss means an empty or broken eval set)"
            )
    return array


def noise_margin(standard_errors: Sequence[float] | np.ndarray | None, k: float, num_domains: int) -> np.ndarray:
    """k·SE per domain (zeros without errors; an unknown, NaN, error counts as 0)."""
    if standard_errors is None:
        return np.zeros(num_domains)
    errors = np.asarray(standard_errors, dtype=np.float64)
    if errors.shape != (num_domains,):
        raise MixtureError(f"standard errors must have one value per domain ({num_domains}), got shape {errors.shape}")
    errors = np.where(np.isfinite(errors), errors, 0.0)
    if np.any(errors < 0):
        raise MixtureError(f"standard errors must be >= 0, got {errors.tolist()}")
    return k * errors


def learnable_potential(
    losses: Sequence[float] | np.ndarray, ref_losses: Sequence[float] | np.ndarray, margin: np.ndarray | None = None
) -> np.ndarray:
    """γ_i = max((ℓ_i − ℓ_ref,i − margin_i) / ℓ_i, 0): the fraction of the current loss a reference model removes."""
    current = _as_losses(losses, "loss", np.asarray(losses).size)
    reference = _as_losses(ref_losses, "reference loss", current.size)
    extra = np.zeros(current.size) if margin is None else margin
    return np.maximum((current - reference - extra) / current, 0.0)


def forgetting_degree(
    losses: Sequence[float] | np.ndarray, prev_losses: Sequence[float] | np.ndarray | None, margin: np.ndarray | None = None
) -> np.ndarray:
    """φ_i = max((ℓ_i(t) − ℓ_i(t−1) − margin_i) / ℓ_i(t−1), 0); zeros at the first evaluation (no previous loss)."""
    current = _as_losses(losses, "loss", np.asarray(losses).size)
    if prev_losses is None:
        return np.zeros(current.size)
    previous = _as_losses(prev_losses, "previous loss", current.size)
    extra = np.zeros(current.size) if margin is None else margin
    return np.maximum((current - previous - extra) / previous, 0.0)



@dataclass(frozen=True)
class UpdateRule:
    """Knobs of the weight update. `max_change` is in absolute probability; None disables the cap.

    `noise_k`: how many standard errors of a loss difference γ and φ ignore (see the module docstring).
    """

    rule: str = "versatune"
    alpha: float = 1.0
    beta: float = 1.0
    eta: float = 1.0
    smoothing: float = 0.1
    floor: float = 0.01
    max_change: float | None = 0.2
    noise_k: float = 2.0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise MixtureError(f"update rule {self.rule!r} is unknown; choose one of {', '.join(RULES)}")
        for name in ("alpha", "beta", "eta", "noise_k"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise MixtureError(f"update rule {name} must be finite and >= 0, got {value!r}")
        if not 0.0 <= self.smoothing <= 1.0:
            raise MixtureError(f"update rule smoothing must be in [0, 1], got {self.smoothing!r}")
        if not math.isfinite(self.floor) or self.floor < 0:
            raise MixtureError(f"update rule floor must be finite and >= 0, got {self.floor!r}")
        if self.max_change is not None and not (math.isfinite(self.max_change) and self.max_change > 0):
            raise MixtureError(f"update rule max_change must be > 0 or None, got {self.max_change!r}")


@dataclass(frozen=True)
class WeightUpdate:
    """One update, everything needed to explain it afterwards (written to mixture.json)."""

    losses: tuple[float, ...]
    prev_losses: tuple[float, ...] | None
    ref_losses: tuple[float, ...] | None
    gamma: tuple[float, ...]
    phi: tuple[float, ...]
    scores: tuple[float, ...]
    old_weights: tuple[float, ...]
    new_weights: tuple[float, ...]
    gamma_se: tuple[float, ...] | None = None  # standard error of ℓ − ℓ_ref that γ discounted (None: none given)
    phi_se: tuple[float, ...] | None = None  # standard error of ℓ(t) − ℓ(t−1) that φ discounted

    def to_json(self) -> dict:
        return {f.name: _list_or_none(getattr(self, f.name)) for f in fields(self)}


def _list_or_none(values: tuple[float, ...] | None) -> list[float] | None:
    return None if values is None else list(values)


def update_weights(
    weights: Sequence[float] | np.ndarray,
    prior: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    prev_losses: Sequence[float] | np.ndarray | None,
    ref_losses: Sequence[float] | np.ndarray | None,
    rule: UpdateRule,
    *,
    gamma_se: Sequence[float] | np.ndarray | None = None,
    phi_se: Sequence[float] | np.ndarray | None = None,
) -> WeightUpdate:
    """New mixture weights from the per-domain held-out losses.

    rule="versatune", in this exact order:
      1. scores s = α·γ + β·φ (γ needs `ref_losses`; φ is 0 without `prev_losses`), each difference
         discounted by noise_k times its standard error (`gamma_se`, `phi_se`; module docstring);
      2. multiplicative step in log space: u = softmax(log w + η·s);
      3. smoothing toward the prior (normally w0): v = (1 − c)·u + c·prior;
      4. floor: t = apply_floor(v, floor), so every weight >= floor and Σt = 1;
      5. cap: w_new = w + λ·(t − w) with one λ = min(1, max(λ_cap, λ_floor)), where
         λ_cap = max_change / max_i |t_i − w_i| and λ_floor is the smallest step that lifts old
         weights below the floor up to it. A convex combination of two probability vectors sums
         to 1 with no renormalising, keeps the direction of the step, and keeps every weight that
         was >= floor at >= floor (t is). So the cap and the floor both hold whenever the old
         weights respect the floor (always, after the first update with the same floor); if they
         do not (floor raised on resume, or w0 without a floor), the floor wins over the cap.
    rule="official" (the released code): scores = current loss, η = 1, no smoothing/floor/cap/noise margin:
      w_new = w·exp(ℓ) / Σ_j w_j·exp(ℓ_j)  (computed with exp(ℓ − max ℓ), the same value, no overflow).

    Both rules reject non-finite or non-positive losses/references with a MixtureError naming the
    domain id and the value, so no NaN weight can ever come out.
    """
    old = normalise(as_weights(weights, "current weights"))
    n = old.size
    current = _as_losses(losses, "loss", n)
    previous = None if prev_losses is None else _as_losses(prev_losses, "previous loss", n)
    reference = None if ref_losses is None else _as_losses(ref_losses, "reference loss", n)
    official = rule.rule == "official"
    gamma_margin = noise_margin(None if official else gamma_se, rule.noise_k, n)
    phi_margin = noise_margin(None if official else phi_se, rule.noise_k, n)
    gamma = np.zeros(n) if reference is None else learnable_potential(current, reference, gamma_margin)
    phi = forgetting_degree(current, previous, phi_margin)

    if official:
        scores = current
        scaled = old * np.exp(current - current.max())
        new = scaled / scaled.sum()
    else:
        if reference is None:
            raise MixtureError("the versatune update rule needs reference losses (ref_losses) for γ")
        prior_array = normalise(as_weights(prior, "prior weights"))
        if prior_array.size != n:
            raise MixtureError(f"prior has {prior_array.size} weights, expected {n}")
        scores = rule.alpha * gamma + rule.beta * phi
        with np.errstate(divide="ignore"):  # log 0 = −inf is fine: that domain stays at 0 in the softmax
            logits = np.log(old) + rule.eta * scores
        stepped = np.exp(logits - logits.max())
        stepped /= stepped.sum()
        smoothed = (1.0 - rule.smoothing) * stepped + rule.smoothing * prior_array
        target = apply_floor(smoothed, rule.floor)
        new = _cap_step(old, target, rule.floor, rule.max_change)

    assert np.all(np.isfinite(new)), new
    return WeightUpdate(
        losses=_tuple(current),
        prev_losses=None if previous is None else _tuple(previous),
        ref_losses=None if reference is None else _tuple(reference),
        gamma=_tuple(gamma),
        phi=_tuple(phi),
        scores=_tuple(scores),
        old_weights=_tuple(old),
        new_weights=_tuple(new),
        gamma_se=None if gamma_se is None else _tuple(np.asarray(gamma_se, dtype=np.float64)),
        phi_se=None if phi_se is None else _tuple(np.asarray(phi_se, dtype=np.float64)),
    )


def _cap_step(old: np.ndarray, target: np.ndarray, floor: float, max_change: float | None) -> np.ndarray:
    """Step from `old` toward `target` by one shared fraction λ (see update_weights, step 5)."""
    delta = target - old
    largest = float(np.abs(delta).max())
    if max_change is None or largest <= max_change:
        return target
    step = max_change / largest
    below = old < floor  # target >= floor here, so delta > 0 for these domains
    if below.any():
        step = max(step, float(((floor - old[below]) / delta[below]).max()))
    step = min(step, 1.0)
    return old + step * delta


def _tuple(array: np.ndarray) -> tuple[float, ...]:
    return tuple(float(x) for x in array)




def expansion_target_share(step: int, *, start_share: float, cap: float, ramp_steps: int) -> float:
    """The target's share at `step`: linear from `start_share` (step 0) to `cap` (step >= ramp_steps)."""
    for name, value in (("start_share", start_share), ("cap", cap)):
        if not 0.0 <= value <= 1.0:
            raise MixtureError(f"domain expansion {name} must be in [0, 1], got {value!r}")
    if step < 0:
        raise MixtureError(f"step must be >= 0, got {step}")
    if ramp_steps <= 0:
        return float(cap)
    progress = min(step / ramp_steps, 1.0)
    return float(start_share + (cap - start_share) * progress)


def expansion_weights(
    other_weights: Sequence[float] | np.ndarray, target_id: int, target_share: float
) -> np.ndarray:
    """Weights with `target_share` on the target and the rest split ∝ `other_weights`.

    `other_weights` has one entry per domain (the target's entry is ignored); the caller gets it
    from the γ/φ update applied to the non-target domains. If the others all weigh 0, they split
    the rest evenly.
    """
    others = np.asarray(other_weights, dtype=np.float64).copy()
    n = others.size
    if not 0 <= target_id < n:
        raise MixtureError(f"target domain id {target_id} is out of range [0, {n})")
    if not 0.0 <= target_share <= 1.0:
        raise MixtureError(f"target_share must be in [0, 1], got {target_share!r}")
    others[target_id] = 0.0
    if not np.all(np.isfinite(others)) or np.any(others < 0):
        raise MixtureError(f"other_weights must be finite and >= 0, got {others.tolist()}")
    if n == 1:
        return np.ones(1)
    if others.sum() <= 0:
        others[:] = 1.0
        others[target_id] = 0.0
    result = others / others.sum() * (1.0 - target_share)
    result[target_id] = target_share
    return result
