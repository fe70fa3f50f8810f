"""The summary statistics the VersaTune paper reports, on per-domain scores indexed by domain id.

All functions take scores where higher is better (accuracy). For losses pass `higher_is_better=False`
where offered; the sign is then flipped so that a positive change always means "better".

Formulas (s_d = a method's score on domain d, b_d = the reference's, D = number of domains, t = target):

    multi-domain score          S = (1/D) * sum_d s_d
    relative gain vs a baseline G = (S_method - S_base) / S_base * 100          [%]   (base: e.g. `uniform`)
    per-domain % change         c_d = (s_d - b_d) / b_d * 100                   [%]   (b: the base model)
                                (losses: c_d = (b_d - s_d) / b_d * 100, so a lower loss is a positive change)
    non-target change           C_nt = sum over d != t of c_d                   [% points]
    non-target degradation      deg = max(0, -C_nt)                             (how much the other domains lost)
    degradation reduction       R = (deg_target_only - deg_method) / deg_target_only * 100   [%]
                                (paper: VersaTune reduces non-target degradation by 38.77 % vs target-only
                                fine-tuning; NaN when target-only fine-tuning degraded nothing)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def multi_domain_score(scores: Sequence[float] | np.ndarray) -> float:
    """S = mean over domains of the per-domain score."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("multi_domain_score needs at least one domain score")
    return float(values.mean())


def relative_gain(score: float, base: float) -> float:
    """G = (score - base) / base * 100, in percent."""
    if base == 0:
        raise ValueError("relative_gain: the baseline score is 0; a relative gain is undefined")
    return (score - base) / base * 100.0


def percent_change(scores: Sequence[float] | np.ndarray, base: Sequence[float] | np.ndarray, *, higher_is_better: bool = True) -> np.ndarray:
    """c_d = (s_d - b_d) / b_d * 100 per domain (sign flipped for losses, so positive = better)."""
    s = np.asarray(scores, dtype=np.float64)
    b = np.asarray(base, dtype=np.float64)
    if s.shape != b.shape:
        raise ValueError(f"percent_change: {s.shape[0]} scores but {b.shape[0]} base scores")
    if np.any(b == 0):
        raise ValueError("percent_change: a base score is 0; a percentage change is undefined")
    change = (s - b) / b * 100.0
    return change if higher_is_better else -change


def non_target_change(changes: Sequence[float] | np.ndarray, target_id: int) -> float:
    """C_nt = sum over domains d != target of c_d (percentage points)."""
    values = np.asarray(changes, dtype=np.float64)
    return float(values.sum() - values[target_id])


def non_target_degradation(changes: Sequence[float] | np.ndarray, target_id: int) -> float:
    """deg = max(0, -C_nt): the total % lost on the non-target domains (0 when they gained overall)."""
    return max(0.0, -non_target_change(changes, target_id))


def degradation_reduction(deg_target_only: float, deg_method: float) -> float:
    """R = (deg_target_only - deg_method) / deg_target_only * 100, in percent (NaN if deg_target_only is 0)."""
    if deg_target_only <= 0:
        return math.nan
    return (deg_target_only - deg_method) / deg_target_only * 100.0
