from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import versatune_ds.mixture.sampler as sampler_module
from versatune_ds.errors import UserError
from versatune_ds.mixture.apportion import QUANTUM, quantize_weights
from versatune_ds.mixture.composition import MixtureError
from versatune_ds.mixture.sampler import MixtureSampler, MixtureSchedule, Stage

SIZES = [5, 7, 3]
WEIGHTS = [0.5, 0.3, 0.2]
FAST = settings(max_examples=40, deadline=None)


def make_sampler(
    *,
    sizes: list[int] = SIZES,
    weights: list[float] = WEIGHTS,
    seed: int = 1234,
    block_size: int = 8,
    global_batch_size: int = 4,
    rank: int = 0,
    world_size: int = 1,
    schedule: MixtureSchedule | None = None,
    domain_names: list[str] | None = None,
    unit: str = "items",
    row_sizes: list[np.ndarray] | None = None,
) -> MixtureSampler:
    return MixtureSampler(
        sizes,
        seed=seed,
        block_size=block_size,
        global_batch_size=global_batch_size,
        rank=rank,
        world_size=world_size,
        schedule=schedule or MixtureSchedule.constant(weights),
        domain_names=domain_names,
        unit=unit,
        row_sizes=row_sizes,
    )


def two_stage_schedule() -> MixtureSchedule:
    return MixtureSchedule((Stage(0, (0.5, 0.3, 0.2)), Stage(3, (0.1, 0.1, 0.8)), Stage(5, (0.0, 1.0, 0.0))))


def position_weights(schedule: MixtureSchedule, block_size: int, n: int) -> np.ndarray:
    """[n, domains] quantised weights in force at each position (QUANTUM = weight 1)."""
    per_stage = np.stack([quantize_weights(s.weights) for s in schedule.stages])
    stage_of = np.searchsorted(schedule.start_blocks(), np.arange(n) // block_size, side="right") - 1
    return per_stage[stage_of]


def prefix_counts(values: np.ndarray, domains: np.ndarray, num_domains: int) -> np.ndarray:
    """[n + 1, domains]: cumulative sum of `values` per domain over the first m positions."""
    table = np.zeros((domains.size + 1, num_domains), dtype=np.int64)
    table[np.arange(1, domains.size + 1), domains] = values
    return np.cumsum(table, axis=0)


def item_lags(sampler: MixtureSampler, n: int) -> tuple[np.ndarray, np.ndarray]:
    """QUANTUM·(T_d(m) − c_d(m)) for m = 0..n, exact, and the domain of each position."""
    domains = sampler.global_items(0, n)[:, 0]
    weights = position_weights(sampler.schedule, sampler._block_size, n)
    targets = np.vstack([np.zeros((1, weights.shape[1]), dtype=np.int64), np.cumsum(weights, axis=0)])
    counts = prefix_counts(np.ones(n, dtype=np.int64), domains, weights.shape[1])
    return targets - QUANTUM * counts, domains


# -- strategies --------------------------------------------------------------------------------

weight_values = st.one_of(st.sampled_from([0.0, 0.0, 1e-9, 1e-4, 0.01, 1.0]), st.floats(0.0, 1.0))


@st.composite
def configs(draw: st.DrawFn, max_stages: int = 4) -> dict:
    """Random sizes (some empty), block size and multi-stage schedule with zeros and tiny weights."""
    num_domains = draw(st.integers(1, 6))
    sizes = draw(st.lists(st.integers(0, 30), min_size=num_domains, max_size=num_domains))
    if max(sizes) == 0:
        sizes[0] = 1
    block_size = draw(st.integers(1, 40))
    stages, start = [], 0
    for _ in range(draw(st.integers(1, max_stages))):
        drawn = draw(st.lists(weight_values, min_size=num_domains, max_size=num_domains))
        weights = [w if size else 0.0 for w, size in zip(drawn, sizes)]
        if sum(weights) == 0:
            weights[sizes.index(max(sizes))] = 1.0
        stages.append(Stage(start, tuple(weights)))
        start += draw(st.integers(1, max(1, 120 // block_size)))
    return {"sizes": sizes, "block_size": block_size, "schedule": MixtureSchedule(tuple(stages)),
            "seed": draw(st.integers(0, 2**32))}


def sampler_for(config: dict, **kwargs: object) -> MixtureSampler:
    return make_sampler(sizes=config["sizes"], block_size=config["block_size"], schedule=config["schedule"],
                        seed=config["seed"], **kwargs)


# -- the global order --------------------------------------------------------------------------


def test_golden_order() -> None:
    # Pins the PCG64/SeedSequence streams and the apportionment: if either changes, resumed runs diverge.
    rows = make_sampler().global_items(0, 12).tolist()
    assert rows == [[0, 0], [1, 2], [0, 1], [2, 0], [0, 4], [1, 5], [0, 2], [2, 2], [1, 3], [0, 3], [0, 1], [1, 6]]


def test_two_instances_give_the_same_order() -> None:
    a, b = make_sampler(), make_sampler()
    assert np.array_equal(a.global_items(0, 500), b.global_items(0, 500))
    assert not np.array_equal(a.global_items(0, 500), make_sampler(seed=99).global_items(0, 500))


def test_seed_breaks_ties_differently() -> None:
    # Uniform weights tie every deadline; the seeded priority decides the interleaving.
    sequences = {
        tuple(make_sampler(sizes=[9] * 6, weights=[1.0] * 6, seed=seed).global_items(0, 12)[:, 0]) for seed in range(8)
    }
    assert len(sequences) > 1
    for sequence in sequences:  # still exact: each domain once per 6 positions
        assert sorted(sequence[:6]) == list(range(6)) and sorted(sequence[6:]) == list(range(6))


def test_index_purity_slices_equal_a_long_call() -> None:
    sampler = make_sampler(schedule=two_stage_schedule())
    full = sampler.global_items(0, 300)
    rng = np.random.default_rng(0)
    for _ in range(50):
        start = int(rng.integers(0, 250))
        count = int(rng.integers(0, 50))
        assert np.array_equal(sampler.global_items(start, count), full[start : start + count])
    # a fresh sampler seeking straight to a far index (no earlier calls) agrees too
    assert np.array_equal(make_sampler(schedule=two_stage_schedule()).global_items(257, 13), full[257:270])
    assert sampler.global_items(10, 0).shape == (0, 2)


@FAST
@given(config=configs(), data=st.data())
def test_far_seek_equals_a_long_call(config: dict, data: st.DataObject) -> None:
    full = sampler_for(config).global_items(0, 700)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampler_module, "_SEGMENT", 16)  # many segments and saved states...
        patch.setattr(sampler_module, "_STATES_KEPT", 3)  # ...and thinning of the saved states
        seeker = sampler_for(config)
        for _ in range(4):
            start = data.draw(st.integers(0, 690))
            count = data.draw(st.integers(1, 700 - start))
            assert np.array_equal(seeker.global_items(start, count), full[start : start + count])
        assert len(seeker._states) <= 3  # bounded memory


def _reference_domains(sampler: MixtureSampler, n: int) -> list[int]:
    """EDF straight from its definition, one position at a time, in exact integers."""
    schedule, block = sampler.schedule, sampler._block_size
    weights = position_weights(schedule, block, n).tolist()
    num_domains = len(weights[0])
    rows, targets, result = [0] * num_domains, [0] * num_domains, []
    for i in range(n):
        q = weights[i]
        priority = sampler._priority(schedule.stage_index_at(i // block))
        keys = []
        for d in range(num_domains):
            lag = targets[d] - QUANTUM * rows[d]
            if lag + q[d] <= 0:  # next row not released: T_d(i+1) <= rows_d
                continue
            if q[d]:  # deadline: last i' with T_d(i') < rows_d + 1; release: first i' with T_d(i'+1) > rows_d
                keys.append((i - ((lag - QUANTUM) // q[d]) - 1, i + (-lag) // q[d], priority[d], d))
            else:
                keys.append((-(2**62) if lag >= QUANTUM else 2**62, -(2**62), priority[d], d))
        chosen = min(keys)[-1]
        result.append(chosen)
        rows[chosen] += 1
        targets = [t + w for t, w in zip(targets, q)]
    return result


@FAST
@given(config=configs())
def test_fast_apportionment_equals_the_definition(config: dict) -> None:
    sampler = sampler_for(config)
    assert sampler.global_items(0, 400)[:, 0].tolist() == _reference_domains(sampler, 400)


@pytest.mark.parametrize(
    "weights",
    [[0.9, 0.02, 0.02, 0.02, 0.02, 0.02], [0.5, 0.1, 0.1, 0.1, 0.1, 0.1], [0.45, 0.45, 0.04, 0.03, 0.03],
     [0.535, 0.415, 0.035, 0.01, 0.005], [0.57, 0.23, 0.12, 0.05, 0.03, 0.004], [0.003, 0.52, 0.46, 0.017],
     [0.33, 0.002, 0.024, 0.354, 0.064, 0.225], [0.009, 0.52, 0.046, 0.425], [0.001, 0.009, 0.382, 0.608]],
)
def test_heavy_domains_take_the_fast_paths_exactly(weights: list[float]) -> None:
    # Heavy domains make jobs come before their release in the sorted order: the closed form for
    # them (monotone releases) and the heap fallback (releases out of order) must both be exact.
    sampler = make_sampler(sizes=[50] * len(weights), weights=weights, block_size=256)
    assert sampler.global_items(0, 1024)[:, 0].tolist() == _reference_domains(sampler, 1024)


def test_look_ahead_before_a_weight_change_is_forgotten() -> None:
    sampler = make_sampler(block_size=64, global_batch_size=16)
    sampler.global_items(0, 9000)  # passes (and saves) two segment ends with the old weights
    sampler.next_batch()
    sampler.set_weights([0.2, 0.2, 0.6])
    fresh = make_sampler(block_size=64, schedule=sampler.schedule)
    assert np.array_equal(sampler.global_items(8500, 500), fresh.global_items(8500, 500))
    assert np.array_equal(sampler.global_items(0, 9000), fresh.global_items(0, 9000))


def test_next_batch_after_a_long_call_advances_one_batch() -> None:
    sampler, fresh = make_sampler(global_batch_size=4), make_sampler(global_batch_size=4)
    sampler.global_items(0, 300)
    for _ in range(3):
        assert np.array_equal(sampler.next_batch(), fresh.next_batch())
    assert sampler.consumed_samples == 12 and sampler.state_dict() == fresh.state_dict()


def test_every_item_visited_once_per_pass() -> None:
    sampler = make_sampler(sizes=[7, 13, 5], weights=[0.3, 0.5, 0.2], block_size=10)
    rows = sampler.global_items(0, 2000)
    for domain_id, size in enumerate([7, 13, 5]):
        items = rows[rows[:, 0] == domain_id, 1]
        passes = [items[i : i + size] for i in range(0, len(items) - size + 1, size)]
        assert len(passes) >= 10
        for one_pass in passes:
            assert sorted(one_pass.tolist()) == list(range(size))
        # reshuffled each pass
        assert any(not np.array_equal(passes[0], p) for p in passes[1:])


# -- the bounds --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(config=configs())
def test_prefix_bound(config: dict) -> None:
    sampler = sampler_for(config)
    schedule, block = config["schedule"], config["block_size"]
    n = min(600, (schedule.stages[-1].start_block + 3) * block)
    lags, _ = item_lags(sampler, n)
    # Lemma A: never a whole row ahead of the target, whatever the stage changes.
    assert np.all(lags > -QUANTUM)
    starts = [s * block for s in schedule.start_blocks()] + [n + 1]
    for index, (start, end) in enumerate(itertools.pairwise(starts)):
        if start > n:
            break
        at_start, inside = lags[start], lags[start : min(end, n) + 1]
        if index == 0 or (np.all(at_start < QUANTUM) and np.sum(at_start < 0) <= 1):
            assert np.all(inside < QUANTUM), f"strict bound broken in stage {index}"  # Theorem B
        elif np.all(at_start < QUANTUM):  # Corollary C: late by at most E = (domains ahead) − 1 positions
            late = int(np.sum(at_start < 0)) - 1
            q = quantize_weights(schedule.stages[index].weights)
            assert np.all(inside < QUANTUM + late * q), f"stage {index}"
    # Always: behind by less than the number of domains ahead.
    assert np.all(lags < QUANTUM * np.maximum(1, np.sum(lags < 0, axis=1, keepdims=True)))


def test_strict_bound_fails_across_a_stage_change_for_any_online_rule() -> None:
    # The counter-example from apportion.py, built against this sampler: after stage 0 two domains
    # are behind by 1/2; giving the next stage to exactly those two forces a lag of 1.
    stage0 = (2.5, 2.5, 1.5, 1.5)  # T = (2.5, 2.5, 1.5, 1.5) after one block of 8
    sampler = make_sampler(sizes=[9] * 4, weights=list(stage0), block_size=8, global_batch_size=8)
    sampler.next_batch()
    lags, _ = item_lags(sampler, 8)
    behind = [d for d in range(4) if lags[8][d] > 0]
    assert len(behind) == 2 and np.all(np.abs(lags) < QUANTUM)
    weights = [1.0 if d in behind else 0.0 for d in range(4)]
    sampler.set_weights(weights)
    lags, _ = item_lags(sampler, 16)
    assert np.max(lags[9]) == QUANTUM  # exactly one row behind: |c − T| < 1 cannot hold here
    assert np.all(lags[10:] < 2 * QUANTUM) and np.all(lags > -QUANTUM)


def test_uniform_weights_give_exact_shares() -> None:
    sampler = make_sampler(sizes=[100] * 6, weights=[1.0] * 6, block_size=256)
    domains = sampler.global_items(0, 6000)[:, 0]
    assert np.bincount(domains, minlength=6).tolist() == [1000] * 6
    for n in range(1, 6000, 37):  # every prefix within one row of n/6
        assert np.all(np.abs(np.bincount(domains[:n], minlength=6) - n / 6) < 1)


def test_small_weight_is_drawn() -> None:
    # 0.001 with block 256: per-block rounding gave this domain 0 rows per block, so it was never drawn.
    sampler = make_sampler(sizes=[10, 1000], weights=[0.001, 0.999], block_size=256)
    positions = np.flatnonzero(sampler.global_items(0, 20000)[:, 0] == 0)
    assert len(positions) == 20 and np.max(np.diff(positions)) <= 2000 and positions[0] < 2000


def windows_without(domains: np.ndarray, domain: int) -> int:
    """Longest run of consecutive positions without `domain` (start and end included)."""
    positions = np.concatenate([[-1], np.flatnonzero(domains == domain), [domains.size]])
    return int(np.max(np.diff(positions)) - 1)


@FAST
@given(config=configs(max_stages=1))
def test_window_bound(config: dict) -> None:
    sampler = sampler_for(config)
    domains = sampler.global_items(0, 800)[:, 0]
    for d, q in enumerate(quantize_weights(config["schedule"].stages[0].weights)):
        window = -(-2 * QUANTUM // q) if q else None  # ⌈2/w⌉
        if window is not None and window <= 800:
            assert windows_without(domains, d) < window, (d, q / QUANTUM)


# -- ranks -------------------------------------------------------------------------------------


def test_rank_slices_partition_the_global_batch() -> None:
    world_size, global_batch_size = 4, 16
    samplers = [
        make_sampler(rank=r, world_size=world_size, global_batch_size=global_batch_size, block_size=12)
        for r in range(world_size)
    ]
    reference = make_sampler(block_size=12)
    for step in range(7):
        parts = [s.next_batch() for s in samplers]
        assert all(p.shape == (global_batch_size // world_size, 2) for p in parts)
        expected = reference.global_items(step * global_batch_size, global_batch_size)
        assert np.array_equal(np.concatenate(parts), expected)
    assert {s.consumed_samples for s in samplers} == {7 * global_batch_size}


def test_batch_size_must_divide_by_world_size() -> None:
    with pytest.raises(MixtureError, match="not divisible"):
        make_sampler(global_batch_size=10, world_size=4)


@FAST
@given(config=configs(), world_size=st.sampled_from([1, 2, 4]), rows_per_rank=st.integers(1, 6))
def test_ranks_read_disjoint_slices_of_one_global_order(config: dict, world_size: int, rows_per_rank: int) -> None:
    global_batch_size = 4 * rows_per_rank  # the same for every world size below
    reference = sampler_for(config).global_items(0, 5 * global_batch_size)
    for world in (1, world_size):
        samplers = [sampler_for(config, rank=r, world_size=world, global_batch_size=global_batch_size) for r in range(world)]
        batches = np.concatenate([np.concatenate([s.next_batch() for s in samplers]) for _ in range(5)])
        assert np.array_equal(batches, reference)  # disjoint, covering, the same for every world size
    assert np.all(reference[:, 1] < np.asarray(config["sizes"])[reference[:, 0]])


# -- weight changes ----------------------------------------------------------------------------


def test_weight_change_takes_effect_at_the_next_block_boundary() -> None:
    block_size = 16
    sampler = make_sampler(block_size=block_size, global_batch_size=10)
    unchanged = make_sampler(block_size=block_size, global_batch_size=10)
    for _ in range(3):
        sampler.next_batch()
    assert sampler.consumed_samples == 30
    sampler.global_items(0, 64)  # computed with the old weights: must not leak into the new order
    sampler.set_weights([0.0, 0.0, 1.0])
    assert sampler.schedule.stages[-1] == Stage(2, (0.0, 0.0, 1.0))  # ceil(30 / 16) = 2
    rows = sampler.global_items(0, 64)
    # everything before block 2 (indices < 32) is exactly the old order, drawn or not
    assert np.array_equal(rows[:32], unchanged.global_items(0, 32))
    # from index 32 on, only the new weights
    assert set(rows[32:, 0].tolist()) == {2}


@FAST
@given(config=configs(max_stages=1), delta=st.sampled_from([0.02, 0.05]), steps=st.integers(0, 12))
def test_small_update_changes_the_stream_within_one_block(config: dict, delta: float, steps: int) -> None:
    config = dict(config, block_size=256, sizes=[max(s, 1) for s in config["sizes"]])
    weights = np.asarray(quantize_weights(config["schedule"].stages[0].weights), dtype=np.float64) / QUANTUM
    if weights.size < 2:
        return
    moved = weights.copy()
    up = int(np.argmin(weights))
    down = int(np.argmax(np.where(np.arange(weights.size) == up, -1.0, weights)))
    moved[up] += delta
    moved[down] -= delta
    base, changed = sampler_for(config, global_batch_size=16), sampler_for(config, global_batch_size=16)
    for _ in range(steps):
        base.next_batch()
        changed.next_batch()
    changed.set_weights(moved)
    start = changed.schedule.stages[-1].start_block * 256
    old, new = base.global_items(0, start + 256), changed.global_items(0, start + 256)
    assert np.array_equal(old[:start], new[:start])
    # T of domain `up` moves by 256·delta >= 5.12 rows in the block; unchanged rows would leave it
    # behind by more than Corollary C allows (1 + (1/6 + delta)·4 rows), so the sequence must change.
    assert not np.array_equal(old[start:, 0], new[start:, 0])


def test_weight_change_exactly_on_a_boundary_and_replacing_a_stage() -> None:
    schedule = MixtureSchedule.constant(WEIGHTS).with_weights([1, 0, 0], consumed_samples=32, block_size=16)
    assert schedule.stages[-1].start_block == 2
    replaced = schedule.with_weights([0, 1, 0], consumed_samples=17, block_size=16)
    assert [s.start_block for s in replaced.stages] == [0, 2]
    assert replaced.stages[-1].weights == (0.0, 1.0, 0.0)
    assert MixtureSchedule.from_json(json.loads(json.dumps(replaced.to_json()))) == replaced


@pytest.mark.parametrize(
    "stages",
    [(), (Stage(1, (1.0,)),), (Stage(0, (1.0,)), Stage(0, (1.0,))), (Stage(0, (1.0, 2.0)), Stage(2, (1.0,))),
     (Stage(0, (0.0, 0.0)),), (Stage(0, (1.0, float("nan"))),)],
)
def test_bad_schedules_are_rejected(stages: tuple[Stage, ...]) -> None:
    with pytest.raises(MixtureError):
        MixtureSchedule(stages)


def test_empty_domain_needs_zero_weight() -> None:
    sampler = make_sampler(sizes=[5, 0, 3], weights=[0.5, 0.0, 0.5])
    assert 1 not in sampler.global_items(0, 100)[:, 0]
    with pytest.raises(MixtureError, match="'code'"):
        make_sampler(sizes=[5, 0, 3], weights=[0.5, 0.1, 0.4], domain_names=["law", "code", "math"])


def test_quantized_weights_are_exact_for_simple_fractions() -> None:
    assert quantize_weights([1, 1, 1, 1, 1, 1]).tolist() == [QUANTUM // 6] * 6
    assert quantize_weights([0.5, 0.3, 0.2]).tolist() == [QUANTUM // 2, 3 * QUANTUM // 10, QUANTUM // 5]
    tiny = quantize_weights([1e-300, 1.0])
    assert tiny.tolist() == [1, QUANTUM - 1]  # a positive weight never rounds to 0


# -- token mode --------------------------------------------------------------------------------


@st.composite
def token_configs(draw: st.DrawFn) -> dict:
    config = draw(configs())
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    high = draw(st.sampled_from([1, 5, 60]))
    config["row_sizes"] = [rng.integers(1, high + 1, size) for size in config["sizes"]]
    return config


def token_errors(sampler: MixtureSampler, row_sizes: list[np.ndarray], n: int) -> tuple[np.ndarray, ...]:
    """QUANTUM·(R_d − T_d) after each prefix, the domains and the tokens of each drawn row."""
    rows = sampler.global_items(0, n)
    lengths = np.asarray([row_sizes[d][i] for d, i in rows], dtype=np.int64)
    weights = position_weights(sampler.schedule, sampler._block_size, n)
    targets = np.vstack([np.zeros((1, weights.shape[1]), dtype=np.int64), np.cumsum(weights * lengths[:, None], axis=0)])
    realised = prefix_counts(lengths, rows[:, 0], weights.shape[1])
    return QUANTUM * realised - targets, rows[:, 0], lengths


@settings(max_examples=50, deadline=None)
@given(config=token_configs())
def test_token_bounds(config: dict) -> None:
    row_sizes = config["row_sizes"]
    sampler = sampler_for(config, unit="tokens", row_sizes=row_sizes)
    n = 400
    errors, domains, lengths = token_errors(sampler, row_sizes, n)
    num_domains = len(row_sizes)
    # Lemma A': R_d − T_d < tokens of d's last drawn row, across all stage changes.
    last = np.zeros((n + 1, num_domains), dtype=np.int64)
    for m in range(n):
        last[m + 1] = last[m]
        last[m + 1, domains[m]] = lengths[m]
    assert np.all(errors[1:] < QUANTUM * np.maximum(last[1:], 1))
    # Theorem B' in stage 0: T_d − R_d < ℓ_d + w_d·(L − 1), L the longest row of the other domains.
    stage0_end = min(n, config["schedule"].stages[1].start_block * config["block_size"]) if len(
        config["schedule"].stages) > 1 else n
    q = quantize_weights(config["schedule"].stages[0].weights)
    longest = [int(t.max()) if t.size else 0 for t in row_sizes]
    for d in range(num_domains):
        others = max([longest[e] for e in range(num_domains) if e != d] + [1])
        assert np.all(-errors[: stage0_end + 1, d] < QUANTUM * max(longest[d], 1) + q[d] * (others - 1))


@settings(max_examples=25, deadline=None)
@given(config=token_configs())
def test_token_mode_follows_its_definition(config: dict) -> None:
    sampler = sampler_for(config, unit="tokens", row_sizes=config["row_sizes"])
    rows = sampler.global_items(0, 150)
    block, schedule = config["block_size"], config["schedule"]
    weights = position_weights(schedule, block, 150).tolist()
    num_domains = len(config["sizes"])
    targets, realised, time = [0] * num_domains, [0] * num_domains, 0
    for i, (domain, item) in enumerate(rows):
        q, priority = weights[i], sampler._priority(schedule.stage_index_at(i // block))
        walk = int(np.sum(rows[:i, 0] == domain))  # the row drawn is d's next row in walk order
        assert item == sampler._walks.items(int(domain), np.asarray([walk]))[0]
        keys = []
        for d in range(num_domains):
            count = int(np.sum(rows[:i, 0] == d))
            if not config["sizes"][d]:
                continue
            tokens = int(config["row_sizes"][d][sampler._walks.items(d, np.asarray([count]))[0]])
            lag = targets[d] - QUANTUM * realised[d]
            if lag + q[d] * tokens <= 0:
                continue
            if q[d]:
                deadline = time - ((lag - QUANTUM * tokens) // q[d])  # first time with T_d >= R_d + tokens
                keys.append((deadline, time + (-lag - q[d] * tokens) // q[d] + 1, priority[d], d))
            else:
                keys.append((-(2**62) if lag >= QUANTUM * tokens else 2**62, -(2**62), priority[d], d))
        assert min(keys)[-1] == domain, i
        tokens = int(config["row_sizes"][domain][item])
        realised[domain] += tokens
        targets = [t + w * tokens for t, w in zip(targets, q)]
        time += tokens


def test_token_mode_tracks_token_shares() -> None:
    rng = np.random.default_rng(3)
    row_sizes = [rng.integers(1, 400, 500), rng.integers(100, 120, 500)]
    tokens = make_sampler(sizes=[500, 500], weights=[0.5, 0.5], unit="tokens", row_sizes=row_sizes, block_size=64)
    rows = tokens.global_items(0, 3000)
    drawn = [sum(int(row_sizes[d][i]) for d, i in rows if d == domain) for domain in (0, 1)]
    # Lemma A' and Theorem B': R_0 − R_1 < 399 + (399 + 0.5·398) tokens, whatever the lengths
    assert abs(drawn[0] - drawn[1]) < 1000 and sum(drawn) > 400_000


def test_examples_unit_apportions_the_examples_packed_into_rows() -> None:
    # Packed rows hold 1-5 examples (domain 0) or 1-2 (domain 1): equal example shares, not equal rows.
    rng = np.random.default_rng(5)
    sizes = [rng.integers(1, 6, 200), rng.integers(1, 3, 200)]
    sampler = make_sampler(sizes=[200, 200], weights=[0.5, 0.5], unit="examples", row_sizes=sizes, block_size=32)
    rows = sampler.global_items(0, 2000)
    drawn = [sum(int(sizes[d][i]) for d, i in rows if d == domain) for domain in (0, 1)]
    # Lemma A' and Theorem B': each within 5 + 0.5·4 examples of half the total, so they differ by < 14
    assert abs(drawn[0] - drawn[1]) < 14 and np.bincount(rows[:, 0]).tolist()[0] < 1000
    state = sampler.state_dict()
    assert state["unit"] == "examples" and sum(state["units_drawn"]) == 0  # nothing consumed yet
    with pytest.raises(MixtureError, match="unit"):
        make_sampler(sizes=[200, 200], weights=[0.5, 0.5], unit="tokens", row_sizes=sizes, block_size=32).load_state_dict(state)


def test_token_mode_arguments_are_checked() -> None:
    with pytest.raises(MixtureError, match="row_sizes"):
        make_sampler(unit="tokens")
    with pytest.raises(MixtureError, match="domain 'code' \\(id 1\\) has a row of size 0"):
        make_sampler(unit="tokens", row_sizes=[np.ones(5, int), np.zeros(7, int), np.ones(3, int)],
                     domain_names=["law", "code", "math"])
    with pytest.raises(MixtureError, match="unit"):
        make_sampler(unit="bytes")


# -- resume ------------------------------------------------------------------------------------


def _resumed(state: dict, **kwargs: object) -> MixtureSampler:
    sampler = make_sampler(**kwargs)  # built with the *initial* schedule, as a restarted job would be
    sampler.load_state_dict(json.loads(json.dumps(state)))
    return sampler


def test_resume_is_exact_across_two_resumes_and_a_weight_change() -> None:
    kwargs = {"block_size": 8, "global_batch_size": 6, "rank": 1, "world_size": 2}

    def run(sampler: MixtureSampler, steps: range) -> list[np.ndarray]:
        out = []
        for step in steps:
            if step == 4:
                sampler.set_weights([0.1, 0.1, 0.8])
            if step == 9:
                sampler.set_weights([0.6, 0.2, 0.2])
            out.append(sampler.next_batch())
        return out

    uninterrupted = run(make_sampler(**kwargs), range(15))

    first = make_sampler(**kwargs)
    pieces = run(first, range(5))  # resumes after the first weight change
    second = _resumed(first.state_dict(), **kwargs)
    pieces += run(second, range(5, 7))
    third = _resumed(second.state_dict(), **kwargs)  # second resume in a row
    pieces += run(third, range(7, 15))

    assert len(pieces) == len(uninterrupted)
    for step, (a, b) in enumerate(zip(pieces, uninterrupted)):
        assert np.array_equal(a, b), step
    assert third.schedule == make_sampler(**kwargs).schedule.with_weights([0.1, 0.1, 0.8], 24, 8).with_weights(
        [0.6, 0.2, 0.2], 54, 8
    )


@FAST
@given(config=token_configs(), unit=st.sampled_from(["items", "tokens"]), data=st.data())
def test_resume_property(config: dict, unit: str, data: st.DataObject) -> None:
    """Two resumes at random steps, on other world sizes, with a weight update: the same global order."""
    extra = {"unit": unit, "row_sizes": config["row_sizes"] if unit == "tokens" else None, "global_batch_size": 4}
    steps = 14
    update_step = data.draw(st.integers(0, steps - 1))
    new_weights = [w if size else 0.0 for w, size in zip(data.draw(
        st.lists(weight_values, min_size=len(config["sizes"]), max_size=len(config["sizes"]))), config["sizes"])]
    if sum(new_weights) == 0:
        new_weights[config["sizes"].index(max(config["sizes"]))] = 1.0
    cuts = data.draw(st.lists(st.integers(1, steps - 1), min_size=2, max_size=2, unique=True))

    def run(world: int, stop_early: bool) -> list[np.ndarray]:
        samplers = [sampler_for(config, rank=r, world_size=world, **extra) for r in range(world)]
        worlds = iter([4, 1])  # resume on other numbers of ranks
        out = []
        for step in range(steps):
            if stop_early and step in cuts:
                world = next(worlds)
                states = [json.loads(json.dumps(s.state_dict())) for s in samplers]
                assert all(state == states[0] for state in states)
                samplers = [sampler_for(config, rank=r, world_size=world, **extra) for r in range(world)]
                for s in samplers:
                    s.load_state_dict(states[0])
            if step == update_step:
                for s in samplers:
                    s.set_weights(new_weights)
            out.append(np.concatenate([s.next_batch() for s in samplers]))
        return out

    assert all(np.array_equal(a, b) for a, b in zip(run(1, False), run(2, True)))


def test_state_dict_contents() -> None:
    sampler = make_sampler()
    sampler.next_batch()
    state = json.loads(json.dumps(sampler.state_dict()))
    assert state["consumed_samples"] == 4 and state["global_batch_size"] == 4 and state["unit"] == "items"
    assert state["seed"] == 1234 and state["block_size"] == 8 and state["domain_sizes"] == SIZES
    assert isinstance(state["domain_sizes_hash"], str)
    assert sum(state["rows_drawn"]) == 4 and state["rows_drawn"] == np.bincount(
        make_sampler().global_items(0, 4)[:, 0], minlength=3).tolist()
    assert MixtureSchedule.from_json(state["schedule"]) == sampler.schedule


def test_changed_domain_size_names_the_domain() -> None:
    names = ["law", "code", "math"]
    state = make_sampler(domain_names=names).state_dict()
    changed = make_sampler(sizes=[5, 8, 3], domain_names=names)
    with pytest.raises(MixtureError, match=r"domain 'code' \(id 1\): 7 items in the checkpoint, 8 now"):
        changed.load_state_dict(state)
    with pytest.raises(UserError, match=r"domain 2: 3 items in the checkpoint, 4 now"):
        make_sampler(sizes=[5, 7, 4]).load_state_dict(state)
    with pytest.raises(MixtureError, match="3 domains but the data now has 2"):
        make_sampler(sizes=[5, 7], weights=[0.5, 0.5]).load_state_dict(state)


def test_changed_row_sizes_name_the_domain() -> None:
    names = ["law", "code", "math"]
    tokens = [np.ones(5, int), np.full(7, 3), np.ones(3, int)]
    state = make_sampler(domain_names=names, unit="tokens", row_sizes=tokens).state_dict()
    tokens[1] = tokens[1].copy()
    tokens[1][4] = 5
    with pytest.raises(MixtureError, match=r"domain 'code' \(id 1\): the sizes \(tokens\) of its rows changed"):
        make_sampler(domain_names=names, unit="tokens", row_sizes=tokens).load_state_dict(state)


def test_changed_settings_are_errors() -> None:
    state = make_sampler().state_dict()
    with pytest.raises(MixtureError, match="seed"):
        make_sampler(seed=1).load_state_dict(state)
    with pytest.raises(MixtureError, match="block_size"):
        make_sampler(block_size=16).load_state_dict(state)
    with pytest.raises(MixtureError, match="global batch size"):
        make_sampler(global_batch_size=8).load_state_dict(state)
    with pytest.raises(MixtureError, match="unit"):
        make_sampler(unit="tokens", row_sizes=[np.ones(s, int) for s in SIZES]).load_state_dict(state)
    make_sampler(global_batch_size=4, world_size=2, rank=1).load_state_dict(state)  # other world size: fine
    tampered = dict(state, domain_sizes=[5, 7, 4])
    with pytest.raises(MixtureError, match="corrupt"):
        make_sampler().load_state_dict(tampered)
    with pytest.raises(MixtureError, match="corrupt"):
        make_sampler().load_state_dict(dict(state, consumed_samples=4))
    with pytest.raises(MixtureError, match="do not fit the schedule"):  # 4 rows of a domain whose target is 2
        make_sampler().load_state_dict(dict(state, consumed_samples=4, rows_drawn=[4, 0, 0]))
    old_format = {k: v for k, v in state.items() if k != "rows_drawn"}
    with pytest.raises(MixtureError, match="per-block sampler"):
        make_sampler().load_state_dict(old_format)
