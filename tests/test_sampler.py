from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from versatune_ds.errors import UserError
from versatune_ds.mixture.composition import MixtureError, largest_remainder_counts
from versatune_ds.mixture.sampler import MixtureSampler, MixtureSchedule, Stage

SIZES = [5, 7, 3]
WEIGHTS = [0.5, 0.3, 0.2]


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
    )


def two_stage_schedule() -> MixtureSchedule:
    return MixtureSchedule((Stage(0, (0.5, 0.3, 0.2)), Stage(3, (0.1, 0.1, 0.8)), Stage(5, (0.0, 1.0, 0.0))))


# -- the global order --------------------------------------------------------------------------


def test_golden_order() -> None:
    # Pins the PCG64/SeedSequence streams: if numpy ever changes them, resumed runs would diverge.
    rows = make_sampler().global_items(0, 12).tolist()
    assert rows == [[1, 2], [2, 0], [2, 2], [0, 0], [1, 5], [0, 1], [0, 4], [0, 2], [0, 3], [0, 1], [1, 3], [1, 6]]


def test_two_instances_give_the_same_order() -> None:
    a, b = make_sampler(), make_sampler()
    assert np.array_equal(a.global_items(0, 500), b.global_items(0, 500))
    assert not np.array_equal(a.global_items(0, 500), make_sampler(seed=99).global_items(0, 500))


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


def test_block_counts_match_largest_remainder() -> None:
    schedule = two_stage_schedule()
    block_size = 8
    sampler = make_sampler(schedule=schedule, block_size=block_size)
    rows = sampler.global_items(0, 10 * block_size)
    for block in range(10):
        domains = rows[block * block_size : (block + 1) * block_size, 0]
        counts = np.bincount(domains, minlength=3)
        expected = largest_remainder_counts(schedule.weights_at(block), block_size)
        assert counts.tolist() == expected.tolist(), block


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


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    data=st.data(),
    block_size=st.integers(1, 40),
    world_size=st.integers(1, 4),
    rows_per_rank=st.integers(1, 6),
    seed=st.integers(0, 2**32),
)
def test_counts_and_partition_property(
    sizes: list[int], data: st.DataObject, block_size: int, world_size: int, rows_per_rank: int, seed: int
) -> None:
    weights = data.draw(
        st.lists(st.floats(0, 1), min_size=len(sizes), max_size=len(sizes)).filter(lambda w: sum(w) > 0)
    )
    global_batch_size = world_size * rows_per_rank
    schedule = MixtureSchedule.constant(weights)
    samplers = [
        MixtureSampler(
            sizes, seed=seed, block_size=block_size, global_batch_size=global_batch_size,
            rank=r, world_size=world_size, schedule=schedule,
        )
        for r in range(world_size)
    ]
    batches = np.concatenate([np.concatenate([s.next_batch() for s in samplers]) for _ in range(5)])
    assert np.array_equal(batches, samplers[0].global_items(0, 5 * global_batch_size))
    full_blocks = len(batches) // block_size
    expected = largest_remainder_counts(weights, block_size)
    for block in range(full_blocks):
        counts = np.bincount(batches[block * block_size : (block + 1) * block_size, 0], minlength=len(sizes))
        assert counts.tolist() == expected.tolist()
    assert np.all(batches[:, 1] < np.asarray(sizes)[batches[:, 0]])


# -- weight changes ----------------------------------------------------------------------------


def test_weight_change_takes_effect_at_the_next_block_boundary() -> None:
    block_size = 16
    sampler = make_sampler(block_size=block_size, global_batch_size=10)
    unchanged = make_sampler(block_size=block_size, global_batch_size=10)
    for _ in range(3):
        sampler.next_batch()
    assert sampler.consumed_samples == 30
    new_weights = [0.0, 0.0, 1.0]
    sampler.set_weights(new_weights)
    assert sampler.schedule.stages[-1] == Stage(2, (0.0, 0.0, 1.0))  # ceil(30 / 16) = 2
    rows = sampler.global_items(0, 64)
    # everything before block 2 (indices < 32) is exactly the old order, drawn or not
    assert np.array_equal(rows[:32], unchanged.global_items(0, 32))
    # from index 32 on, only the new weights
    assert set(rows[32:, 0].tolist()) == {2}


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
    pieces = run(first, range(0, 5))  # resumes after the first weight change
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


def test_state_dict_contents() -> None:
    sampler = make_sampler()
    sampler.next_batch()
    state = json.loads(json.dumps(sampler.state_dict()))
    assert state["consumed_samples"] == 4
    assert state["seed"] == 1234 and state["block_size"] == 8 and state["domain_sizes"] == SIZES
    assert isinstance(state["domain_sizes_hash"], str)


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


def test_changed_seed_or_block_size_is_an_error() -> None:
    state = make_sampler().state_dict()
    with pytest.raises(MixtureError, match="seed"):
        make_sampler(seed=1).load_state_dict(state)
    with pytest.raises(MixtureError, match="block_size"):
        make_sampler(block_size=16).load_state_dict(state)
    tampered = dict(state, domain_sizes=[5, 7, 4])
    with pytest.raises(MixtureError, match="corrupt"):
        make_sampler().load_state_dict(tampered)
