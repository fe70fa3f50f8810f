"""The train-time mixture policy (versatune_ds.weighting) against hand-made data and hand-computed updates."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from versatune_ds.config.schema import DomainConfig, MixtureConfig, RunConfig
from versatune_ds.data.packing import Row
from versatune_ds.dist import DistEnv
from versatune_ds.domains import Domains
from versatune_ds.errors import UserError
from versatune_ds.eval.heldout import DomainLosses, ItemLosses
from versatune_ds.mixture import rules as mixture
from versatune_ds.mixture.build import build_weight_policy, sampler_rows, units_per_item_from_data

NAMES = ("law", "medicine", "code")
DOMAINS = Domains(NAMES)
SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=29500, launcher="single")
P = np.array([0.5, 0.3, 0.2])


@dataclass(frozen=True)
class FakeDomainData:
    domain_id: int
    train_rows: list
    train_examples: int
    train_tokens: int
    fingerprint: str = "fp"


@dataclass(frozen=True)
class FakeData:
    per_domain: tuple


def _row(domain_id: int, tokens: int, examples: int) -> Row:
    ids = np.arange(tokens, dtype=np.int64)
    return Row(domain_id, ids, ids, ids, tuple(range(examples)))


def make_data(rows_spec=((10, 1), (20, 2), (40, 1))) -> FakeData:
    """Domain d: 4 rows of `tokens` tokens holding `examples` examples each."""
    per_domain = []
    for d, (tokens, examples) in enumerate(rows_spec):
        rows = [_row(d, tokens, examples) for _ in range(4)]
        per_domain.append(FakeDomainData(d, rows, train_examples=4 * examples, train_tokens=4 * tokens))
    return FakeData(tuple(per_domain))


def make_cfg(**mixture_kwargs) -> RunConfig:
    domains = tuple(DomainConfig(name=n, train=("x.jsonl",)) for n in NAMES)
    cfg = RunConfig()
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, domains=domains),
        mixture=dataclasses.replace(MixtureConfig(), **mixture_kwargs),
    )


def build(cfg: RunConfig, run_dir: Path | None = None, data: FakeData | None = None, **kwargs):
    kwargs.setdefault("initial_distribution", P)
    return build_weight_policy(cfg.mixture, DOMAINS, data or make_data(), run_dir, SINGLE, **kwargs)


REF = {"law": 1.0, "medicine": 1.5, "code": 0.5}


def L(values, items: tuple[ItemLosses, ...] = ()) -> DomainLosses:  # noqa: N802 - reads like the ℓ it stands for
    """An evaluation result with these per-domain losses (per-example losses only when given)."""
    loss = np.asarray(values, dtype=np.float64)
    return DomainLosses(loss=loss, loss_sum=loss.copy(), tokens=np.ones_like(loss), items=items)


def items_for(losses, spread: float = 0.2, n: int = 6, seed: int = 0) -> tuple[ItemLosses, ...]:
    """Per-example losses around each domain's loss (10 tokens per example), whose token mean is exactly it."""
    rng = np.random.default_rng(seed)
    out = []
    for loss in losses:
        noise = rng.normal(0.0, spread, n)
        noise -= noise.mean()
        out.append(ItemLosses(np.arange(n), (loss + noise) * 10.0, np.full(n, 10.0)))
    return tuple(out)


@pytest.mark.parametrize(
    ("strategy", "extra", "expected"),
    [
        ("versatune_static", {}, P),
        ("uniform", {}, np.full(3, 1 / 3)),
        ("proportional", {"unit": "tokens"}, np.array([40, 80, 160]) / 280),
        ("proportional", {"unit": "examples"}, np.array([4, 8, 4]) / 16),
        ("inverse", {}, (1 - P) / (1 - P).sum()),
        ("fixed", {"weights": {"law": 2.0, "medicine": 1.0, "code": 1.0}}, np.array([0.5, 0.25, 0.25])),
        ("target_only", {"target_domain": "code"}, np.array([0.0, 0.0, 1.0])),
        ("target_plus_uniform", {"target_domain": "code", "target_share": 0.6}, np.array([0.2, 0.2, 0.6])),
    ],
)
def test_initial_weights_per_strategy(strategy, extra, expected):
    policy = build(make_cfg(strategy=strategy, floor=0.0, **extra))
    np.testing.assert_allclose(policy.weights, expected, rtol=1e-12)
    assert policy.after_eval(100, L([2.0, 2.0, 2.0])) is None  # static strategies never change


def test_floor_applies_to_probed_distribution():
    policy = build(make_cfg(strategy="versatune_static", floor=0.25), initial_distribution=[0.9, 0.09, 0.01])
    assert policy.weights.min() == pytest.approx(0.25)
    assert policy.weights.sum() == pytest.approx(1.0)


def test_the_sampler_gets_the_share_weights_and_each_rows_size():
    # The sampler apportions shares of tokens (examples) itself, counting each row's size: no conversion.
    for unit in ("tokens", "examples"):
        policy = build(make_cfg(strategy="uniform", unit=unit))
        np.testing.assert_array_equal(policy.initial_sampler_weights(), np.full(3, 1 / 3))
    data = make_data()
    unit, sizes = sampler_rows(data, "tokens")
    assert unit == "tokens" and [s.tolist() for s in sizes] == [[10] * 4, [20] * 4, [40] * 4]
    unit, sizes = sampler_rows(data, "examples")  # domain 1 packs two examples per row
    assert unit == "examples" and [s.tolist() for s in sizes] == [[1] * 4, [2] * 4, [1] * 4]
    assert sampler_rows(make_data(((10, 1), (20, 1), (40, 1))), "examples") == ("items", None)  # one example per row


def test_units_per_item_refuses_empty_domain():
    data = make_data()
    empty = dataclasses.replace(data.per_domain[1], train_rows=[])
    data = FakeData((data.per_domain[0], empty, data.per_domain[2]))
    with pytest.raises(UserError, match="medicine"):
        units_per_item_from_data(data, "tokens", DOMAINS)


def _rule(cfg: RunConfig) -> mixture.UpdateRule:
    m = cfg.mixture
    return mixture.UpdateRule(rule=m.rule, alpha=m.alpha, beta=m.beta, eta=m.eta, smoothing=m.smoothing,
                              floor=m.floor, max_change=m.max_change, noise_k=m.noise_k)


def test_update_sequence_matches_hand_calls_and_warmup(tmp_path):
    cfg = make_cfg(strategy="versatune", warmup_steps=100, reference_losses=REF, eta=2.0, max_change=0.1)
    policy = build(cfg, tmp_path)
    w0 = policy.weights.copy()
    ref = np.array([1.0, 1.5, 0.5])
    sequence = [(0, [3.0, 2.0, 1.0]), (50, [2.5, 2.1, 0.9]), (100, [2.0, 2.2, 0.8]), (150, [1.8, 2.5, 0.7])]
    expected_weights = w0
    prev = None
    for step, losses in sequence:
        losses = np.array(losses)
        out = policy.after_eval(step, L(losses))
        if step < 100:
            assert out is None
            np.testing.assert_array_equal(policy.weights, w0)
        else:
            update = mixture.update_weights(expected_weights, w0, losses, prev, ref, _rule(cfg))
            expected_weights = np.array(update.new_weights)
            np.testing.assert_array_equal(policy.weights, expected_weights)
            np.testing.assert_array_equal(out, expected_weights)  # what the sampler gets: the share weights
        prev = losses  # φ compares with the previous evaluation, warmup ones included
    document = json.loads((tmp_path / "mixture.json").read_text())
    assert [r["step"] for r in document["updates"]] == [100, 150]
    last = document["updates"][-1]
    assert set(last["new_weights"]) == set(NAMES)
    assert last["prev_losses"] == {"law": 2.0, "medicine": 2.2, "code": 0.8}
    assert last["phi"]["medicine"] == pytest.approx((2.5 - 2.2) / 2.2)
    assert last["gamma"]["law"] == pytest.approx((1.8 - 1.0) / 1.8)
    assert document["reference_source"] == "config"


def test_official_rule_needs_no_reference_and_warns_that_it_has_no_guards(tmp_path, caplog):
    cfg = make_cfg(strategy="versatune", rule="official")
    with caplog.at_level("WARNING"):
        policy = build(cfg, tmp_path)
    assert "mixture.rule=official has no floor, cap or smoothing" in caplog.text
    losses = np.array([2.0, 1.0, 3.0])
    policy.after_eval(0, L(losses))
    expected = P * np.exp(losses) / (P * np.exp(losses)).sum()
    np.testing.assert_allclose(policy.weights, expected, rtol=1e-12)


def test_fallback_reference_uses_first_loss_times_factor(caplog):
    with caplog.at_level("WARNING"):
        policy = build(make_cfg(strategy="versatune", reference_fallback_factor=0.5))
    assert "reference" in caplog.text
    policy.after_eval(0, L([2.0, 4.0, 1.0]))
    np.testing.assert_array_equal(policy.reference, [1.0, 2.0, 0.5])
    assert policy.state_dict()["reference_source"].startswith("fallback")


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf"), -1.0])
def test_bad_reference_refused_naming_domain(bad):
    with pytest.raises(UserError, match="medicine"):
        build(make_cfg(strategy="versatune"), reference_losses=[1.0, bad, 1.0])
    with pytest.raises(UserError, match="medicine"):
        build(make_cfg(strategy="versatune", reference_model="ref"), evaluate_model=lambda path: L([1.0, bad, 1.0]))
    policy = build(make_cfg(strategy="versatune"))  # fallback: the first loss must be valid
    with pytest.raises(UserError, match="medicine"):
        policy.after_eval(0, L([1.0, bad, 1.0]))


def test_bad_loss_mid_training_skips_update(tmp_path):
    policy = build(make_cfg(strategy="versatune", reference_losses=REF), tmp_path)
    policy.after_eval(0, L([3.0, 3.0, 3.0]))
    before = policy.weights.copy()
    assert policy.after_eval(10, L([3.0, float("nan"), 3.0])) is None
    np.testing.assert_array_equal(policy.weights, before)
    assert np.all(np.isfinite(policy.weights))
    record = json.loads((tmp_path / "mixture.json").read_text())["updates"][-1]
    assert "medicine" in record["skipped"] and record["losses"]["medicine"] is None


def test_reference_model_evaluated_once_and_cached(tmp_path):
    calls = []

    def evaluate(path: str) -> DomainLosses:
        calls.append(path)
        values = [1.0, 1.1, 1.2]
        items = items_for(values)
        return DomainLosses(np.array(values), np.array([i.sums.sum() for i in items]), np.full(3, 60.0), items)

    cfg = make_cfg(strategy="versatune", reference_model="/models/ref")
    ids = [list(range(6))] * 3
    first = build(cfg, tmp_path, evaluate_model=evaluate, example_ids=ids)
    second = build(cfg, tmp_path, evaluate_model=evaluate, example_ids=ids)
    assert calls == ["/models/ref"]
    np.testing.assert_array_equal(first.reference, second.reference)
    for a, b in zip(first.reference_items, second.reference_items):  # the per-example losses come back from the cache
        np.testing.assert_array_equal(a.sums, b.sums)
    cache = json.loads((tmp_path / "reference_losses.json").read_text())
    assert cache["losses"] == {"law": 1.0, "medicine": 1.1, "code": 1.2}
    assert set(cache["loss_se"]) == set(NAMES) and len(cache["items"]) == 3
    # Other held-out data (fingerprint), or other evaluated examples, invalidate the cache.
    data = make_data()
    data = FakeData((dataclasses.replace(data.per_domain[0], fingerprint="new"),) + data.per_domain[1:])
    build(cfg, tmp_path, data=data, evaluate_model=evaluate, example_ids=ids)
    assert len(calls) == 2
    build(cfg, tmp_path, data=data, evaluate_model=evaluate, example_ids=[list(range(5))] * 3)
    assert len(calls) == 3


def test_expansion_schedule_and_split(tmp_path):
    cfg = make_cfg(strategy="versatune", target_domain="code", target_share=0.6, target_ramp_steps=100,
                   reference_losses=REF, max_change=None, smoothing=0.0, floor=0.0)
    policy = build(cfg, tmp_path)
    start = policy.w0[2]
    assert start == pytest.approx(0.2)
    losses = np.array([2.0, 3.0, 1.0])
    policy.after_eval(50, L(losses))
    assert policy.weights[2] == pytest.approx(start + (0.6 - start) * 0.5)
    # The others split the rest by the γ/φ rule computed among themselves.
    sub = mixture.update_weights(P[:2] / P[:2].sum(), P[:2] / P[:2].sum(), losses[:2], None, np.array([1.0, 1.5]), _rule(cfg))
    np.testing.assert_allclose(policy.weights[:2], np.array(sub.new_weights) * (1 - policy.weights[2]), rtol=1e-12)
    policy.after_eval(200, L([2.0, 3.5, 0.9]))
    assert policy.weights[2] == pytest.approx(0.6)
    assert policy.weights.sum() == pytest.approx(1.0)
    record = json.loads((tmp_path / "mixture.json").read_text())["updates"][-1]
    assert record["target_share"] == pytest.approx(0.6)
    assert record["phi"]["medicine"] == pytest.approx(0.5 / 3.0)


def test_state_round_trip_continues_exactly(tmp_path):
    cfg = make_cfg(strategy="versatune", reference_losses=REF, eta=3.0)
    steps = [(0, [3.0, 2.0, 1.0]), (10, [2.5, 2.4, 0.9]), (20, [2.2, 2.6, 1.1]), (30, [2.0, 2.0, 1.3])]
    straight = build(cfg, tmp_path / "a")
    outputs = [straight.after_eval(s, L(l)) for s, l in steps]
    first = build(cfg, tmp_path / "b")
    for s, l in steps[:2]:
        first.after_eval(s, L(l))
    state = json.loads(json.dumps(first.state_dict()))
    # A third update happened before the crash; resume must drop it from mixture.json.
    first.after_eval(20, L([9.0, 9.0, 9.0]))
    resumed = build(cfg, tmp_path / "b")
    resumed.load_state_dict(state)
    for (s, l), expected in zip(steps[2:], outputs[2:]):
        np.testing.assert_array_equal(resumed.after_eval(s, L(l)), expected)
    a = json.loads((tmp_path / "a" / "mixture.json").read_text())["updates"]
    b = json.loads((tmp_path / "b" / "mixture.json").read_text())["updates"]
    assert a == b


def test_state_refuses_other_domains():
    policy = build(make_cfg(strategy="uniform"))
    state = policy.state_dict()
    state["domains"] = ["a", "b", "c"]
    with pytest.raises(UserError, match="domains"):
        policy.load_state_dict(state)


def test_weights_never_nan_for_extreme_losses():
    policy = build(make_cfg(strategy="versatune", reference_losses=REF, eta=50.0, max_change=None))
    for step, losses in enumerate([[1e6, 1e-6, 1.0], [1e-6, 1e6, 1e3], [5.0, 5.0, 5.0]]):
        policy.after_eval(step, L(losses))
        assert np.all(np.isfinite(policy.weights)) and math.isclose(policy.weights.sum(), 1.0)
        assert policy.weights.min() >= 0.01 - 1e-12
