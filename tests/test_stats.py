"""VersaTune summary statistics on hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from versatune_ds.eval.stats import (
    degradation_reduction,
    multi_domain_score,
    non_target_change,
    non_target_degradation,
    percent_change,
    relative_gain,
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
