from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from versatune_ds.errors import UserError
from versatune_ds.mixture.composition import (
    MixtureError,
    apply_floor,
    initial_weights,
    item_weights_from_token_weights,
    largest_remainder_counts,
)
from versatune_ds.mixture.rules import (
    UpdateRule,
    expansion_target_share,
    expansion_weights,
    forgetting_degree,
    learnable_potential,
    update_weights,
)

# -- largest remainder -------------------------------------------------------------------------


def test_largest_remainder_hand_values() -> None:
    # quotas 3.5, 2.1, 1.4 → floors 3, 2, 1; the one leftover unit goes to the largest fraction (.5).
    assert largest_remainder_counts([0.5, 0.3, 0.2], 7).tolist() == [4, 2, 1]
    # equal fractions: ties go to the lower id
    assert largest_remainder_counts([1, 1, 1], 10).tolist() == [4, 3, 3]
    assert largest_remainder_counts([1, 1, 1], 11).tolist() == [4, 4, 3]
    # unnormalised weights are normalised; a zero weight never gets a unit
    assert largest_remainder_counts([2, 0, 2], 3).tolist() == [2, 0, 1]
    assert largest_remainder_counts([1, 0], 0).tolist() == [0, 0]


@pytest.mark.parametrize("weights", [[0, 0], [1, -0.1], [1, float("nan")], []])
def test_largest_remainder_rejects_bad_weights(weights: list[float]) -> None:
    with pytest.raises(MixtureError):
        largest_remainder_counts(weights, 5)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=12).filter(lambda w: sum(w) > 0),
    st.integers(0, 10_000),
)
def test_largest_remainder_property(weights: list[float], total: int) -> None:
    counts = largest_remainder_counts(weights, total)
    assert counts.sum() == total
    quotas = np.asarray(weights) / sum(weights) * total
    assert np.all(np.abs(counts - quotas) < 1.0 + 1e-9)
    assert np.all(counts[np.asarray(weights) == 0] == 0)


# -- floor -------------------------------------------------------------------------------------


def test_apply_floor_pins_low_domains_and_keeps_ratios() -> None:
    result = apply_floor([0.9, 0.09, 0.01], 0.05)
    assert result[2] == pytest.approx(0.05)
    assert result[0] == pytest.approx(0.9 * 0.95 / 0.99)
    assert result[0] / result[1] == pytest.approx(10.0)
    assert result.sum() == pytest.approx(1.0)


def test_apply_floor_cascades() -> None:
    # 0.02 and 0.01 are pinned to 0.1 → 0.97 takes the remaining 0.8
    assert apply_floor([0.97, 0.02, 0.01], 0.1) == pytest.approx([0.8, 0.1, 0.1])
    assert apply_floor([1.0, 0.0, 0.0, 0.0], 0.25) == pytest.approx([0.25] * 4)
    assert apply_floor([3.0, 1.0], 0.0) == pytest.approx([0.75, 0.25])


def test_apply_floor_too_high_is_an_error() -> None:
    with pytest.raises(MixtureError, match="at most 0.25"):
        apply_floor([1, 1, 1, 1], 0.3)


# -- initial weights ---------------------------------------------------------------------------


def test_initial_weights_strategies() -> None:
    p = [0.5, 0.3, 0.2]
    assert initial_weights("versatune", distribution=p) == pytest.approx(p)
    assert initial_weights("versatune_static", distribution=[0.98, 0.01, 0.01], floor=0.05) == pytest.approx(
        [0.9, 0.05, 0.05]
    )
    assert initial_weights("inverse", distribution=p) == pytest.approx([0.25, 0.35, 0.4])
    assert initial_weights("uniform", num_domains=4) == pytest.approx([0.25] * 4)
    assert initial_weights("proportional", domain_sizes=[100, 300]) == pytest.approx([0.25, 0.75])
    assert initial_weights("fixed", fixed=[2, 2, 4]) == pytest.approx([0.25, 0.25, 0.5])
    assert initial_weights("target_only", num_domains=3, target_id=2).tolist() == [0, 0, 1]
    assert initial_weights("target_plus_uniform", num_domains=4, target_id=1, target_share=0.4) == pytest.approx(
        [0.2, 0.4, 0.2, 0.2]
    )


@pytest.mark.parametrize(
    ("strategy", "kwargs", "message"),
    [
        ("versatune", {"num_domains": 3}, "distribution"),
        ("proportional", {"num_domains": 3}, "domain_sizes"),
        ("fixed", {"num_domains": 3}, "weights"),
        ("target_only", {"num_domains": 3}, "target domain id"),
        ("target_plus_uniform", {"num_domains": 3, "target_id": 0}, "target_share"),
        ("magic", {"num_domains": 3}, "unknown mixture strategy"),
        ("uniform", {}, "number of domains"),
    ],
)
def test_initial_weights_missing_inputs(strategy: str, kwargs: dict, message: str) -> None:
    with pytest.raises(MixtureError, match=message):
        initial_weights(strategy, **kwargs)


# -- scores ------------------------------------------------------------------------------------


def test_learnable_potential_hand_values() -> None:
    # (2 − 1)/2 = 0.5; (4 − 5)/4 < 0 → 0
    assert learnable_potential([2.0, 4.0], [1.0, 5.0]).tolist() == [0.5, 0.0]


def test_forgetting_degree_hand_values() -> None:
    # (2 − 2.5)/2.5 < 0 → 0; (4 − 2)/2 = 1
    assert forgetting_degree([2.0, 4.0], [2.5, 2.0]).tolist() == [0.0, 1.0]
    assert forgetting_degree([2.0, 4.0], None).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_losses_are_rejected_naming_the_domain(bad: float) -> None:
    rule = UpdateRule()
    w = [0.4, 0.3, 0.3]
    with pytest.raises(MixtureError, match=rf"loss of domain 1 is {re.escape(repr(bad))}:"):
        update_weights(w, w, [1.0, bad, 2.0], None, [0.5, 0.5, 0.5], rule)
    with pytest.raises(MixtureError, match="reference loss of domain 2"):
        update_weights(w, w, [1.0, 1.0, 2.0], None, [0.5, 0.5, bad], rule)
    with pytest.raises(MixtureError, match="previous loss of domain 0"):
        update_weights(w, w, [1.0, 1.0, 2.0], [bad, 1.0, 1.0], [0.5, 0.5, 0.5], rule)
    with pytest.raises(ValueError):  # also catchable as a plain ValueError / UserError
        update_weights(w, w, [bad, 1.0, 1.0], None, None, UpdateRule(rule="official"))
    with pytest.raises(UserError):
        learnable_potential([bad, 1.0], [1.0, 1.0])


# -- update rule -------------------------------------------------------------------------------


def test_official_rule_is_w_exp_loss_normalised() -> None:
    w = np.array([0.5, 0.3, 0.2])
    losses = np.array([2.0, 3.0, 4.0])
    update = update_weights(w, w, losses, None, None, UpdateRule(rule="official"))
    expected = w * np.exp(losses) / np.sum(w * np.exp(losses))
    np.testing.assert_allclose(update.new_weights, expected, rtol=1e-12, atol=0)
    assert update.scores == tuple(losses)
    # huge losses do not overflow: computed as exp(ℓ − max ℓ)
    big = update_weights(w, w, [1000.0, 1001.0, 999.0], None, None, UpdateRule(rule="official"))
    assert all(math.isfinite(x) for x in big.new_weights)
    assert sum(big.new_weights) == pytest.approx(1.0)


def test_versatune_step_without_guards_is_multiplicative() -> None:
    w = np.array([0.5, 0.3, 0.2])
    losses, prev, ref = [2.0, 3.0, 4.0], [2.0, 2.5, 4.5], [1.0, 2.0, 3.0]
    rule = UpdateRule(alpha=1.0, beta=2.0, eta=0.5, smoothing=0.0, floor=0.0, max_change=None)
    update = update_weights(w, w, losses, prev, ref, rule)
    gamma = np.array([0.5, 1 / 3, 0.25])
    phi = np.array([0.0, 0.2, 0.0])
    scores = gamma + 2.0 * phi
    expected = w * np.exp(0.5 * scores) / np.sum(w * np.exp(0.5 * scores))
    np.testing.assert_allclose(update.gamma, gamma)
    np.testing.assert_allclose(update.phi, phi)
    np.testing.assert_allclose(update.scores, scores)
    np.testing.assert_allclose(update.new_weights, expected, rtol=1e-12)


def test_smoothing_mixes_toward_the_prior() -> None:
    w = np.array([0.5, 0.5])
    prior = np.array([0.9, 0.1])
    # equal losses and refs → zero scores → the softmax step leaves w unchanged
    rule = UpdateRule(smoothing=0.25, floor=0.0, max_change=None)
    update = update_weights(w, prior, [2.0, 2.0], None, [2.0, 2.0], rule)
    np.testing.assert_allclose(update.new_weights, 0.75 * w + 0.25 * prior)


def test_floor_holds_after_update() -> None:
    w = np.array([0.9, 0.05, 0.05])
    rule = UpdateRule(eta=10.0, smoothing=0.0, floor=0.04, max_change=None)
    update = update_weights(w, w, [10.0, 1.0, 1.0], None, [1.0, 1.0, 1.0], rule)
    new = np.array(update.new_weights)
    assert new.min() == pytest.approx(0.04)
    assert new.sum() == pytest.approx(1.0)


def test_cap_limits_every_change_and_keeps_direction() -> None:
    w = np.array([0.8, 0.1, 0.1])
    losses, ref = [1.0, 10.0, 1.0], [1.0, 1.0, 1.0]  # γ = [0, 0.9, 0]
    uncapped = np.array(update_weights(w, w, losses, None, ref, UpdateRule(eta=5.0, max_change=None)).new_weights)
    assert np.abs(uncapped - w).max() > 0.2
    capped = np.array(update_weights(w, w, losses, None, ref, UpdateRule(eta=5.0, max_change=0.2)).new_weights)
    assert np.abs(capped - w).max() == pytest.approx(0.2)
    assert capped.sum() == pytest.approx(1.0)
    assert capped.min() >= 0.01
    # same direction: capped − w is a positive multiple of uncapped − w
    ratio = (capped - w) / (uncapped - w)
    np.testing.assert_allclose(ratio, ratio[0])
    assert 0 < ratio[0] < 1


def test_floor_wins_over_cap_when_old_weights_are_below_the_floor() -> None:
    w = np.array([0.995, 0.005, 0.0])
    rule = UpdateRule(smoothing=0.0, floor=0.05, max_change=0.01)
    update = update_weights(w, w, [2.0, 2.0, 2.0], None, [2.0, 2.0, 2.0], rule)
    new = np.array(update.new_weights)
    assert new.min() >= 0.05 - 1e-12
    assert new.sum() == pytest.approx(1.0)


def test_versatune_rule_needs_reference_losses() -> None:
    with pytest.raises(MixtureError, match="reference losses"):
        update_weights([0.5, 0.5], [0.5, 0.5], [1.0, 1.0], None, None, UpdateRule())


@pytest.mark.parametrize(
    "kwargs", [{"rule": "magic"}, {"eta": -1.0}, {"smoothing": 1.5}, {"floor": -0.1}, {"max_change": 0.0}]
)
def test_update_rule_validation(kwargs: dict) -> None:
    with pytest.raises(MixtureError):
        UpdateRule(**kwargs)


def test_weight_update_to_json_round_trips() -> None:
    w = [0.6, 0.4]
    update = update_weights(w, w, [2.0, 3.0], [2.0, 2.0], [1.0, 1.0], UpdateRule())
    data = json.loads(json.dumps(update.to_json()))
    assert data["new_weights"] == list(update.new_weights)
    assert data["phi"] == [0.0, 0.5]
    assert data["prev_losses"] == [2.0, 2.0]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(0.05, 20.0), min_size=2, max_size=8),
    st.floats(0.0, 3.0),
    st.floats(0.01, 0.5),
)
def test_update_invariants_property(losses: list[float], eta: float, max_change: float) -> None:
    n = len(losses)
    w = np.full(n, 1.0 / n)
    rule = UpdateRule(eta=eta, floor=0.5 / n, max_change=max_change)
    new = np.array(update_weights(w, w, losses, losses[::-1], [0.05] * n, rule).new_weights)
    assert np.all(np.isfinite(new))
    assert new.sum() == pytest.approx(1.0)
    assert new.min() >= 0.5 / n - 1e-12
    assert np.abs(new - w).max() <= max_change + 1e-12


# -- expansion and token units -----------------------------------------------------------------


def test_expansion_target_share_ramp() -> None:
    kwargs = {"start_share": 0.2, "cap": 0.6, "ramp_steps": 100}
    assert expansion_target_share(0, **kwargs) == pytest.approx(0.2)
    assert expansion_target_share(50, **kwargs) == pytest.approx(0.4)
    assert expansion_target_share(100, **kwargs) == pytest.approx(0.6)
    assert expansion_target_share(500, **kwargs) == pytest.approx(0.6)
    assert expansion_target_share(3, start_share=0.2, cap=0.6, ramp_steps=0) == pytest.approx(0.6)
    with pytest.raises(MixtureError):
        expansion_target_share(0, start_share=0.2, cap=1.5, ramp_steps=10)


def test_expansion_weights_split_rest_by_other_weights() -> None:
    result = expansion_weights([0.1, 0.9, 0.3, 0.6], target_id=1, target_share=0.5)
    assert result == pytest.approx([0.05, 0.5, 0.15, 0.3])
    assert expansion_weights([0.0, 1.0, 0.0], target_id=1, target_share=0.4) == pytest.approx([0.3, 0.4, 0.3])
    with pytest.raises(MixtureError):
        expansion_weights([0.5, 0.5], target_id=2, target_share=0.5)


def test_item_weights_give_token_shares() -> None:
    token_weights = np.array([0.5, 0.5])
    mean_tokens = np.array([100.0, 300.0])
    items = item_weights_from_token_weights(token_weights, mean_tokens)
    assert items == pytest.approx([0.75, 0.25])
    token_share = items * mean_tokens / np.sum(items * mean_tokens)
    assert token_share == pytest.approx(token_weights)
    with pytest.raises(MixtureError, match="domain 1"):
        item_weights_from_token_weights([0.5, 0.5], [10.0, 0.0])


def test_the_config_defaults_of_the_update_rule_are_the_rules_own() -> None:
    # MixtureConfig (what a user leaves out) takes its rule defaults from UpdateRule (what the library assumes);
    # this fails if someone types a default into the config again and it drifts.
    import dataclasses

    from versatune_ds.config.schema import MixtureConfig

    config_defaults = {f.name: f.default for f in dataclasses.fields(MixtureConfig)}
    for field in dataclasses.fields(UpdateRule):
        assert config_defaults[field.name] == field.default, field.name
