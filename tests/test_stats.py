"""VersaTune summary statistics on hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from versatune_ds.eval.stats import (
    degradation_reduction,
    fit_plateau,
    multi_domain_score,
    non_target_change,
    non_target_degradation,
    paired_bootstrap_difference,
    paired_bootstrap_gain,
    SeedItemDraws,
    bootstrap_domain_scores,
    paired_ratio_difference,
    percent_change,
    percentile_ci,
    ratio_mean_se,
    relative_gain,
    seed_item_draws,
)


def test_multi_domain_score_and_relative_gain():
    assert multi_domain_score([0.4, 0.5, 0.6]) == pytest.approx(0.5)
    assert relative_gain(0.55, 0.5) == pytest.approx(10.0)
    assert relative_gain(0.45, 0.5) == pytest.approx(-10.0)
    with pytest.raises(ValueError):
        relative_gain(0.5, 0.0)
    with pytest.raises(ValueError):
        multi_domain_score([])


def test_percent_change_accuracy_and_loss():
    np.testing.assert_allclose(percent_change([0.6, 0.45], [0.5, 0.5]), [20.0, -10.0])
    # Loss 2.0 -> 1.5 is 25 % better.
    np.testing.assert_allclose(percent_change([1.5], [2.0], higher_is_better=False), [25.0])


def test_non_target_sums_and_degradation_reduction():
    # base 0.5 everywhere; target_only: target +40 %, others -10, -20, -6 -> C_nt = -36, deg = 36
    base = [0.5, 0.5, 0.5, 0.5]
    target_only = percent_change([0.7, 0.45, 0.4, 0.47], base)
    method = percent_change([0.65, 0.48, 0.45, 0.5], base)  # others -4, -10, 0 -> deg = 14
    assert non_target_change(target_only, 0) == pytest.approx(-36.0)
    assert non_target_degradation(target_only, 0) == pytest.approx(36.0)
    assert non_target_degradation(method, 0) == pytest.approx(14.0)
    assert degradation_reduction(36.0, 14.0) == pytest.approx(61.111111, abs=1e-5)  # (36-14)/36
    assert non_target_degradation([10.0, 5.0, 1.0], 0) == 0.0  # gains are no degradation
    assert math.isnan(degradation_reduction(0.0, 3.0))


def test_ratio_mean_se_by_hand():
    # Items (sum, tokens): (2, 1), (6, 2), (4, 1): L = 12 / 4 = 3; residuals s - L n = -1, 0, 1;
    # SE = sqrt(3/2 * 2) / 4 = sqrt(3) / 4.
    mean, se = ratio_mean_se([2.0, 6.0, 4.0], [1, 2, 1])
    assert mean == pytest.approx(3.0)
    assert se == pytest.approx(math.sqrt(3.0) / 4.0)
    # Equal token counts: the plain standard error of the per-item means.
    values = np.array([1.0, 2.0, 4.0, 7.0])
    mean, se = ratio_mean_se(values * 5, np.full(4, 5.0))
    assert mean == pytest.approx(values.mean())
    assert se == pytest.approx(values.std(ddof=1) / 2.0)
    assert math.isnan(ratio_mean_se([1.0], [2.0])[1])
    with pytest.raises(ValueError):
        ratio_mean_se([1.0, 2.0], [0.0, 0.0])


def test_paired_difference_removes_shared_item_noise():
    rng = np.random.default_rng(0)
    counts = rng.integers(20, 200, size=300).astype(float)
    difficulty = rng.gamma(2.0, 1.5, size=300)  # item-to-item variation shared by both models
    base = difficulty * counts
    after = (difficulty + 0.05) * counts + rng.normal(0, 0.01, size=300) * counts
    diff, se = paired_ratio_difference(after, base, counts)
    assert diff == pytest.approx(0.05, abs=0.005)
    _, unpaired_se = ratio_mean_se(after, counts)
    assert se < unpaired_se / 20  # the pairing is what makes a small rise detectable
    with pytest.raises(ValueError):
        paired_ratio_difference([1.0, 2.0], [1.0], [1.0, 1.0])


def test_paired_bootstrap_gain_interval():
    baseline = np.array([2.0, 2.2, 1.9, 2.1, 2.05])
    better = baseline * 0.9  # exactly 10 % lower on every seed: every resample gives -10 %
    ci = paired_bootstrap_gain(better, baseline, num_bootstrap=2000)
    assert ci.estimate == pytest.approx(-10.0)
    assert ci.low == pytest.approx(-10.0) and ci.high == pytest.approx(-10.0)
    # Seed noise larger than the effect: the interval covers 0 and contains the estimate.
    noisy = baseline + np.array([0.3, -0.3, 0.2, -0.25, 0.0])
    ci = paired_bootstrap_gain(noisy, baseline, num_bootstrap=4000, seed=1)
    assert ci.low < 0 < ci.high
    assert ci.low <= ci.estimate <= ci.high
    # Same seed, same interval; one seed, a degenerate interval.
    assert paired_bootstrap_gain(noisy, baseline, num_bootstrap=4000, seed=1) == ci
    single = paired_bootstrap_gain([1.1], [1.0], num_bootstrap=100)
    assert single.low == pytest.approx(10.0) and single.high == pytest.approx(10.0)
    with pytest.raises(ValueError):
        paired_bootstrap_gain([1.0, 2.0], [1.0], num_bootstrap=10)


def test_fit_plateau_recovers_a_power_law_and_flags_the_gap():
    steps = np.arange(1, 41) * 100.0
    curve = 2.5 + 4.0 * steps ** -0.5
    fit = fit_plateau(steps, curve)
    assert fit.asymptote == pytest.approx(2.5, rel=0.01)
    assert fit.exponent == pytest.approx(0.5, rel=0.05)
    assert fit.gap == pytest.approx((curve[-1] - fit.plateau) / fit.plateau)
    assert fit.gap == pytest.approx(4.0 * 4000**-0.5 / 2.5, rel=0.05)  # 2.5 % above the plateau
    # Early on (first 5 points), the latest loss is still far from where the curve is heading.
    assert fit_plateau(steps[:5], curve[:5]).gap > 0.05


def test_fit_plateau_on_a_rising_curve_is_its_minimum():
    steps = np.arange(1, 11) * 50.0
    losses = np.array([4.0, 3.5, 3.2, 3.1, 3.05, 3.06, 3.1, 3.15, 3.2, 3.3])  # overfitting after step 250
    fit = fit_plateau(steps, losses)
    assert fit.plateau <= 3.05
    assert fit.gap == pytest.approx((3.3 - fit.plateau) / fit.plateau)
    with pytest.raises(ValueError):
        fit_plateau([1.0, 2.0], [3.0, 2.0])


def test_paired_bootstrap_difference():
    a = np.array([3.0, 5.0, 4.0, 6.0])
    ci = paired_bootstrap_difference(a, a - 2.0, num_bootstrap=500)
    assert (ci.estimate, ci.low, ci.high) == pytest.approx((2.0, 2.0, 2.0))
    ci = paired_bootstrap_difference(a, np.zeros(4), num_bootstrap=4000)  # the mean's own interval
    assert ci.estimate == pytest.approx(4.5)
    assert 3.0 <= ci.low < 4.5 < ci.high <= 6.0
    with pytest.raises(ValueError):
        paired_bootstrap_difference([1.0], [1.0, 2.0])


def test_bootstrap_domain_scores_by_hand():
    # Replicate 0 draws everything once; replicate 1 draws seed 1 twice and item 0 of domain 0 three times.
    draws = SeedItemDraws(seeds=np.array([[1.0, 1.0], [0.0, 2.0]]),
                          items=(np.array([[1.0, 1.0, 1.0], [3.0, 0.0, 0.0]]), np.array([[1.0, 1.0], [0.0, 2.0]])))
    sums = [np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]), np.array([[6.0, 2.0], [4.0, 4.0]])]
    counts = [np.ones(3), np.array([2.0, 4.0])]  # domain 1: a token-weighted loss
    scores = bootstrap_domain_scores(sums, counts, draws)
    assert scores[0] == pytest.approx([(2 / 3 + 1 / 3) / 2, (8 / 6 + 8 / 6) / 2])
    assert scores[1] == pytest.approx([0.0, 4.0 / 4.0])  # seed 1 only: item 0 (a miss); item 1 of domain 1: 4 / 4
    base = bootstrap_domain_scores([np.array([[1.0, 1.0, 0.0]]), np.array([[2.0, 2.0]])], counts, draws)  # no seeds
    assert base[1] == pytest.approx([1.0, 2.0 / 4.0]) and base[0, 0] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="domain 0 has 2 items"):
        bootstrap_domain_scores([np.ones((2, 2)), sums[1]], counts, draws)


def test_item_bootstrap_matches_the_binomial_error_and_pairing_cancels_shared_noise():
    rng = np.random.default_rng(3)
    hits = (rng.random((1, 400)) < 0.5).astype(float)
    draws = seed_item_draws(1, [400], num_bootstrap=4000, seed=1)
    scores = bootstrap_domain_scores([hits], [np.ones(400)], draws)[:, 0]
    p = hits.mean()
    assert scores.std() == pytest.approx(math.sqrt(p * (1 - p) / 400), rel=0.1)
    # Paired: a method that differs from the baseline by the same amount on every item has a zero-width difference,
    # however much the items differ from each other.
    losses = rng.gamma(2.0, 1.0, size=(2, 50))
    counts = rng.integers(5, 40, size=50).astype(float)
    draws = seed_item_draws(2, [50], num_bootstrap=2000, seed=2)
    baseline = bootstrap_domain_scores([losses], [counts], draws)[:, 0]
    shifted = bootstrap_domain_scores([losses + 0.1 * counts], [counts], draws)[:, 0]
    np.testing.assert_allclose(shifted - baseline, 0.1)
    assert baseline.std() > 0.05 * baseline.mean()  # the items do differ
    ci = percentile_ci(0.1, shifted - baseline)
    assert ci.low == pytest.approx(0.1) and ci.high == pytest.approx(0.1) and ci.num_bootstrap == 2000


def test_two_level_interval_covers_a_null_difference_about_95_percent_of_the_time():
    # Two "strategies" with no true difference: 2 seeds each, 100 binary items per domain for 3 domains, each seed's
    # accuracy shifted by seed noise. Over 200 repetitions the 95 % interval of the G of S should hold 0 in ~95 %.
    rng = np.random.default_rng(11)
    covered = 0
    repetitions = 200
    for _ in range(repetitions):
        difficulty = rng.random((3, 100))  # per item: P(correct), shared by both strategies (the same items)
        sums = {name: [(rng.random((2, 100)) < np.clip(difficulty[d] + rng.normal(0, 0.03, size=(2, 1)), 0, 1)).astype(float)
                       for d in range(3)] for name in ("a", "b")}
        draws = seed_item_draws(2, [100] * 3, num_bootstrap=1000, seed=int(rng.integers(1 << 30)))
        a = bootstrap_domain_scores(sums["a"], [np.ones(100)] * 3, draws).mean(axis=1)
        b = bootstrap_domain_scores(sums["b"], [np.ones(100)] * 3, draws).mean(axis=1)
        ci = percentile_ci(0.0, (a - b) / b * 100)
        covered += ci.low <= 0.0 <= ci.high
    assert 0.88 <= covered / repetitions <= 0.99
