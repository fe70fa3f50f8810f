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

Uncertainty (below): `ratio_mean_se` / `paired_ratio_difference` (a token-weighted loss and its standard error
over items), `paired_bootstrap_gain` (G with a paired bootstrap CI over seeds), `paired_bootstrap_difference`, `fit_plateau` (where a held-out
loss curve is heading), and `seed_item_draws` + `bootstrap_domain_scores` + `percentile_ci` (a two-level bootstrap
over seeds *and* items, for scores that are means over a fixed set of items, below).

Two-level bootstrap. With 2 seeds a CI over seeds alone only spans the two seeds' values and says nothing of the
items: 100 multiple-choice items per domain have a binomial standard error of ~0.05 on an accuracy, larger than
most differences between fine-tuning mixes. Every model is scored on the same items, so each bootstrap replicate
draws one multiset of seeds and, per domain, one multiset of items, and applies both to every model (paired):
what the items share cancels in a difference, what the seeds share too, and the interval covers both sources of
noise. A domain's score in a replicate is Σ_i w_i·sums_i / Σ_i w_i·counts_i (w_i: how often item i was drawn),
averaged over the drawn seeds: the accuracy when sums are 0/1 hits and counts ones, the token-weighted loss when
sums are summed losses and counts scored tokens. (The resampling of both levels follows the usual hierarchical
bootstrap for nested data, e.g. Davison & Hinkley, Bootstrap Methods, section 3.8; written here from that.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


# ----------------------------------------------------------------------------------------------
# Uncertainty: standard errors over items, bootstrap over seeds, and a loss curve's plateau


def ratio_mean_se(sums: Sequence[float] | np.ndarray, counts: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Token-weighted mean L = Σ s_i / Σ n_i over items i (passages, examples) and its standard error over items.

    s_i is item i's summed loss, n_i its scored tokens. The items, not the tokens, are the independent units,
    so the error is the ratio estimator's (delta method): SE² = m/(m−1) · Σ (s_i − L·n_i)² / (Σ n_i)², m items.
    For a paired difference of two models on the same items pass s_i = s_i(a) − s_i(b) (`paired_ratio_difference`).
    """
    s = np.asarray(sums, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    if s.shape != n.shape or s.ndim != 1:
        raise ValueError(f"ratio_mean_se: sums {s.shape} and counts {n.shape} must be 1-d of one length")
    total = n.sum()
    if total <= 0:
        raise ValueError("ratio_mean_se: no scored tokens")
    mean = float(s.sum() / total)
    m = s.size
    if m < 2:
        return mean, math.nan
    residual = s - mean * n
    return mean, float(math.sqrt(m / (m - 1) * np.sum(residual**2)) / total)


def paired_ratio_difference(
    sums_a: Sequence[float] | np.ndarray, sums_b: Sequence[float] | np.ndarray, counts: Sequence[float] | np.ndarray
) -> tuple[float, float]:
    """(L_a − L_b, its standard error) for two models scored on the same items (same token counts n_i)."""
    a = np.asarray(sums_a, dtype=np.float64)
    b = np.asarray(sums_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_ratio_difference: {a.shape} vs {b.shape} items; pair the same items")
    return ratio_mean_se(a - b, counts)


@dataclass(frozen=True)
class BootstrapCI:
    estimate: float  # the statistic on all seeds
    low: float
    high: float
    confidence: float
    num_bootstrap: int


def paired_bootstrap_gain(
    method: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    *,
    num_bootstrap: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """G = (mean S_method − mean S_baseline) / mean S_baseline × 100 with a paired percentile bootstrap CI.

    `method[k]` and `baseline[k]` are the scores S of run k of each (same seed k: same sampler seed, same data),
    so the seeds are resampled together (one index set for both) and the pairing's shared noise cancels.
    With few seeds the interval is coarse (5 seeds give at most 126 distinct resamples); it says how far the
    seed-to-seed variation alone could move G, nothing about other data or models.
    """
    m = np.asarray(method, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if m.shape != b.shape or m.ndim != 1 or m.size == 0:
        raise ValueError(f"paired_bootstrap_gain: method {m.shape} and baseline {b.shape} must be 1-d, one score per seed")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_bootstrap_gain: confidence must be in (0, 1), got {confidence}")
    estimate = relative_gain(float(m.mean()), float(b.mean()))
    rng = np.random.default_rng(seed)
    index = rng.integers(0, m.size, size=(num_bootstrap, m.size))
    base_means = b[index].mean(axis=1)
    if np.any(base_means == 0):
        raise ValueError("paired_bootstrap_gain: a resampled baseline mean is 0; a relative gain is undefined")
    gains = (m[index].mean(axis=1) - base_means) / base_means * 100.0
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(gains, [tail, 100.0 - tail])
    return BootstrapCI(estimate, float(low), float(high), confidence, num_bootstrap)


def paired_bootstrap_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    num_bootstrap: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """mean(a − b) over seeds with a paired percentile bootstrap CI (b = zeros: the CI of mean(a) itself).

    For statistics that are not ratios of two scores, e.g. the worst single-domain regression of two
    strategies in percentage points, or a degradation reduction per seed.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"paired_bootstrap_difference: {x.shape} vs {y.shape}; one value per seed for both")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_bootstrap_difference: confidence must be in (0, 1), got {confidence}")
    diff = x - y
    index = np.random.default_rng(seed).integers(0, diff.size, size=(num_bootstrap, diff.size))
    means = diff[index].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return BootstrapCI(float(diff.mean()), float(low), float(high), confidence, num_bootstrap)


@dataclass(frozen=True)
class PlateauFit:
    """A decreasing loss curve L(t) ≈ c + a·t^(−α) fitted by least squares (a ≥ 0, 0 ≤ c ≤ min L)."""

    plateau: float  # min(c, lowest observed loss): where the curve is heading, or its minimum once it rises
    asymptote: float  # c
    amplitude: float  # a
    exponent: float  # α
    gap: float  # (last loss − plateau) / plateau: how far the latest point still is from the plateau
    points: int  # evaluations used in the fit


def fit_plateau(
    steps: Sequence[float] | np.ndarray, losses: Sequence[float] | np.ndarray, *, exponents: Sequence[float] | None = None
) -> PlateauFit:
    """The plateau of a held-out loss curve: the asymptote c of L(t) = c + a·t^(−α), fitted on the given points.

    α is searched on a grid (default 0.05 … 3, geometric); for each α, (c, a) is the least-squares solution
    with a ≥ 0 and 0 ≤ c ≤ min L; the α of least squared error wins. A curve that has passed its minimum
    (held-out loss rising again: overfitting) has its plateau at that minimum, so `plateau` is never above
    the lowest observed loss. The fit extrapolates: early on, while the curve still falls steeply, c lies
    far below the latest loss and `gap` is large, which is the conservative direction for a stopping rule.
    """
    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if t.shape != y.shape or t.ndim != 1 or t.size < 3:
        raise ValueError(f"fit_plateau: need ≥ 3 (step, loss) points of one length, got {t.shape} and {y.shape}")
    if np.any(t <= 0) or not np.all(np.isfinite(y)):
        raise ValueError("fit_plateau: steps must be positive and losses finite")
    lowest = float(y.min())
    grid = np.geomspace(0.05, 3.0, 120) if exponents is None else np.asarray(exponents, dtype=np.float64)
    best: tuple[float, float, float, float] | None = None  # (sse, c, a, alpha)
    for alpha in grid:
        x = t ** (-alpha)
        design = np.stack([np.ones_like(x), x], axis=1)
        (c, a), *_ = np.linalg.lstsq(design, y, rcond=None)
        if a < 0 or c > lowest or c < 0:
            # Constrained: clamp c into [0, lowest] and refit a ≥ 0 for that c.
            c = float(np.clip(c, 0.0, lowest)) if a >= 0 else lowest
            a = max(0.0, float(np.dot(y - c, x) / np.dot(x, x)))
        sse = float(np.sum((y - c - a * x) ** 2))
        if best is None or sse < best[0]:
            best = (sse, float(c), float(a), float(alpha))
    assert best is not None
    _, c, a, alpha = best
    plateau = min(c, lowest)
    if plateau <= 0:
        return PlateauFit(plateau, c, a, alpha, math.inf, int(t.size))
    return PlateauFit(plateau, c, a, alpha, float((y[-1] - plateau) / plateau), int(t.size))


@dataclass(frozen=True)
class SeedItemDraws:
    """Shared bootstrap draws: `seeds` [B, S] and per domain `items[d]` [B, I_d], each row a multiset as counts."""

    seeds: np.ndarray
    items: tuple[np.ndarray, ...]

    @property
    def num_bootstrap(self) -> int:
        return int(self.seeds.shape[0])


def seed_item_draws(num_seeds: int, items_per_domain: Sequence[int], *, num_bootstrap: int = 10_000, seed: int = 0) -> SeedItemDraws:
    """One multiset of seeds and, per domain, one of items per replicate (multinomial counts: drawing n of n
    with replacement). Use the same draws for every model compared (the pairing)."""
    if num_seeds < 1 or any(n < 1 for n in items_per_domain):
        raise ValueError(f"seed_item_draws: need at least one seed and one item per domain, got {num_seeds} and {list(items_per_domain)}")
    rng = np.random.default_rng(seed)
    seeds = rng.multinomial(num_seeds, np.full(num_seeds, 1.0 / num_seeds), size=num_bootstrap).astype(np.float64)
    items = tuple(rng.multinomial(n, np.full(n, 1.0 / n), size=num_bootstrap).astype(np.float64) for n in items_per_domain)
    return SeedItemDraws(seeds, items)


def bootstrap_domain_scores(sums: Sequence[np.ndarray], counts: Sequence[np.ndarray], draws: SeedItemDraws) -> np.ndarray:
    """Per replicate and domain, Σ_i w_i·sums[s, i] / Σ_i w_i·counts[i] averaged over the drawn seeds: [B, D].

    `sums[d]` is [S, I_d] (one row per seed, in the seeds' order, the same for every model compared) or [1, I_d]
    for a model without seeds (the base model: its rows are not resampled); `counts[d]` is [I_d].
    """
    if len(sums) != len(draws.items) or len(counts) != len(draws.items):
        raise ValueError(f"bootstrap_domain_scores: {len(sums)} sums and {len(counts)} counts for {len(draws.items)} domains")
    out = np.empty((draws.num_bootstrap, len(sums)))
    for d, (per_seed, count, weights) in enumerate(zip(sums, counts, draws.items)):
        per_seed = np.atleast_2d(np.asarray(per_seed, dtype=np.float64))
        count = np.asarray(count, dtype=np.float64)
        if per_seed.shape[1] != weights.shape[1] or count.shape != (weights.shape[1],):
            raise ValueError(f"bootstrap_domain_scores: domain {d} has {per_seed.shape[1]} items and {count.size} counts, "
                             f"the draws {weights.shape[1]}")
        denominator = weights @ count  # [B]
        if np.any(denominator <= 0):
            raise ValueError(f"bootstrap_domain_scores: domain {d}: a replicate drew only items without counts")
        per_replicate = (weights @ per_seed.T) / denominator[:, None]  # [B, S]
        if per_seed.shape[0] == 1:
            out[:, d] = per_replicate[:, 0]
        elif per_seed.shape[0] == draws.seeds.shape[1]:
            out[:, d] = (per_replicate * draws.seeds).sum(axis=1) / draws.seeds.sum(axis=1)
        else:
            raise ValueError(f"bootstrap_domain_scores: {per_seed.shape[0]} seeds, the draws have {draws.seeds.shape[1]}")
    return out


def percentile_ci(estimate: float, replicates: np.ndarray, *, confidence: float = 0.95) -> BootstrapCI:
    """A percentile interval of bootstrap replicates around the statistic computed on all the data."""
    if not 0 < confidence < 1:
        raise ValueError(f"percentile_ci: confidence must be in (0, 1), got {confidence}")
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(np.asarray(replicates, dtype=np.float64), [tail, 100.0 - tail])
    return BootstrapCI(float(estimate), float(low), float(high), confidence, int(np.size(replicates)))
