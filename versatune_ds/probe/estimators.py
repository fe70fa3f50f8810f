"""Distribution estimators: per-text domain probabilities -> the knowledge distribution p, with a bootstrap CI.

- `estimate_distribution(probs, mode="mean")`: p = mean of per-text probabilities (the paper's estimator);
  `mode="hard"`: the share of argmax labels.
- `adjusted_distribution(probs, M)`: "adjusted classify and count" -- the mean corrected by the classifier's
  held-out mean-probability confusion M (`mean_probability_confusion`).
Every estimator returns a `DistributionEstimate` with a percentile-bootstrap interval per domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import nnls

from versatune_ds.errors import UserError


@dataclass(frozen=True)
class DistributionEstimate:
    """The knowledge distribution p over domain ids, with a per-domain bootstrap interval."""

    p: tuple[float, ...]
    ci_low: tuple[float, ...]
    ci_high: tuple[float, ...]
    num_texts: int
    mode: str
    confidence: float


def estimate_distribution(
    probs: np.ndarray,
    *,
    mode: Literal["mean", "hard"] = "mean",
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int,
) -> DistributionEstimate:
    """p = mean of per-text probabilities ("mean") or argmax share ("hard"), with a percentile
    bootstrap CI per domain: resample the texts with replacement `num_bootstrap` times and take
    the (1-confidence)/2 and 1-(1-confidence)/2 quantiles. `num_bootstrap=0` gives ci = p."""
    matrix = np.asarray(probs, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise UserError(f"estimate_distribution: probs must be a non-empty [num_texts, num_domains] array, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)) or matrix.min() < 0 or not np.allclose(matrix.sum(axis=1), 1.0, atol=1e-6):
        raise UserError("estimate_distribution: every row of probs must be finite, non-negative and sum to 1")
    if mode not in ("mean", "hard"):
        raise UserError(f"estimate_distribution: mode must be 'mean' or 'hard', got {mode!r}")
    if not 0.0 < confidence < 1.0:
        raise UserError(f"estimate_distribution: confidence must be in (0, 1), got {confidence}")
    if num_bootstrap < 0:
        raise UserError(f"estimate_distribution: num_bootstrap must be >= 0, got {num_bootstrap}")
    num_texts, num_domains = matrix.shape
    if mode == "hard":
        matrix = np.eye(num_domains)[matrix.argmax(axis=1)]
    p = matrix.mean(axis=0)
    if num_bootstrap == 0:
        low, high = p, p
    else:
        rng = np.random.default_rng(seed)
        stats = np.empty((num_bootstrap, num_domains))
        # Resampling as multinomial counts keeps memory at chunk x num_texts instead of
        # chunk x num_texts x num_domains.
        chunk = max(1, min(num_bootstrap, 4_000_000 // num_texts))
        uniform = np.full(num_texts, 1.0 / num_texts)
        for start in range(0, num_bootstrap, chunk):
            stop = min(start + chunk, num_bootstrap)
            counts = rng.multinomial(num_texts, uniform, size=stop - start).astype(np.float64)
            stats[start:stop] = counts @ matrix / num_texts
        tail = (1.0 - confidence) / 2.0
        low, high = np.quantile(stats, [tail, 1.0 - tail], axis=0)
    return DistributionEstimate(
        p=tuple(float(x) for x in p),
        ci_low=tuple(float(x) for x in low),
        ci_high=tuple(float(x) for x in high),
        num_texts=num_texts,
        mode=mode,
        confidence=confidence,
    )


def mean_probability_confusion(probs: np.ndarray, labels: np.ndarray, num_domains: int) -> np.ndarray:
    """M[i, j] = mean predicted probability of domain j over texts of domain i (identity row where i has none)."""
    matrix = np.eye(num_domains)
    for domain_id in range(num_domains):
        rows = probs[labels == domain_id]
        if len(rows):
            matrix[domain_id] = rows.mean(axis=0)
    return matrix


def adjusted_distribution(probs: np.ndarray, confusion_mean: np.ndarray, *, num_bootstrap: int, seed: int,
                          confidence: float = 0.95) -> DistributionEstimate:
    """"Adjusted classify and count" (Forman 2008, for probabilities): the measured mean q = M^T p, so solve
    for p >= 0 by NNLS and renormalise. It undoes the classifier's systematic spread of probability mass (a
    text of domain i gets some mass on every j), which pulls the plain mean toward uniform. The CI comes from
    the same percentile bootstrap over texts as `estimate_distribution`, solving once per resample."""
    def solve(measured: np.ndarray) -> np.ndarray:
        solution, _ = nnls(confusion_mean.T, measured)
        return solution / solution.sum() if solution.sum() > 0 else measured

    num_texts = probs.shape[0]
    p = solve(probs.mean(axis=0))
    low, high = p, p
    if num_bootstrap > 0:
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(num_texts, np.full(num_texts, 1.0 / num_texts), size=num_bootstrap)
        stats = np.stack([solve(row) for row in counts @ probs / num_texts])
        tail = (1.0 - confidence) / 2.0
        low, high = np.quantile(stats, [tail, 1.0 - tail], axis=0)
    return DistributionEstimate(p=tuple(map(float, p)), ci_low=tuple(map(float, low)), ci_high=tuple(map(float, high)),
                                num_texts=num_texts, mode="adjusted", confidence=confidence)
