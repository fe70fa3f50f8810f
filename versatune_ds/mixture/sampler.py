"""MixtureSampler: a deterministic, resumable global order of (domain id, item index) pairs.

- The global order is a pure function of (seed, schedule, domain sizes, block_size, index, and with
  unit tokens / examples the rows' sizes); the rank and the world size play no part in it.
- The domain of each position is exact cumulative apportionment (`apportion.py`: rule and proofs):
  earliest-deadline-first over |rows − target| < 1, exact throughout a constant schedule, never a
  whole row ahead of the target, and decided from the stages up to that position only, so a
  weight change (a new stage from the first block boundary at or after the samples consumed)
  never re-orders rows before it. EDF ties go to a priority drawn from (seed, stage start block).
- Domain d is walked through its own permutation of its items, reshuffled each pass, seeded with
  (seed, d, pass); the k-th occurrence of d in the global order is walk position k (`mixture.walk`).
- The order from position n on depends on the per-domain counts at n. The sampler keeps them at
  consumed_samples and at the segment ends it passes (a bounded, thinned set), and computes a range
  from the nearest known state before it (position 0 at worst).
- Rank r of W reads rows [r·G/W, (r+1)·G/W) of each global batch of G rows; every rank computes the
  whole batch, as the state after it depends on all of its rows.
- `state_dict()` is JSON; it loads on any rank and world size, with the same global batch size.

unit="items" mixes rows: the weights are shares of rows. unit="tokens" (or "examples") takes shares of
tokens (or examples) as they are, with `row_sizes` (per domain, each row's tokens, or the examples packed
into it), and keeps each domain's realised tokens (examples) within about one row of its share
(`apportion.py`, the token rule: it works for any positive integer size per row).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from versatune_ds.mixture.apportion import (
    MAX_SEGMENT,
    QUANTUM,
    MixtureSchedule,
    Stage,
    edf_items,
    edf_tokens,
    quantize_weights,
)
from versatune_ds.mixture.composition import MixtureError
from versatune_ds.mixture.walk import PRIORITY_STREAM, DomainWalks, array_hash, generator, sizes_hash

__all__ = ["UNITS", "MixtureSampler", "MixtureSchedule", "Stage", "sizes_hash"]
# Positions per engine call (rounded to whole blocks): long enough to amortise its set-up, short
# enough to keep the token-mode look-ahead small. At most _STATES_KEPT saved states; past that
# every other one is dropped, so a seek replays at most a small fraction of the way back.
_SEGMENT = 4096
_STATES_KEPT = 4096
UNITS = ("items", "tokens", "examples")  # tokens and examples: the token rule over the rows' sizes
STATE_FORMAT = 2


@dataclass(frozen=True)
class _State:
    """Where the order stands at global position `position` (exact integers)."""

    position: int
    rows: tuple[int, ...]  # rows of each domain before `position` = each domain's walk position
    lag: tuple[int, ...]  # QUANTUM·(target − realised), in rows (unit items) or in the rows' sizes (tokens, examples)
    units: tuple[int, ...] = ()  # units tokens / examples: the summed sizes of each domain's rows before `position`


@dataclass(frozen=True)
class _Span:
    """The last computed range of the order (the ranks' slices of one batch reuse it)."""

    start: int
    domains: np.ndarray
    walk: np.ndarray
    end: _State


class MixtureSampler:
    """Yields this rank's slice of each global batch of (domain id, item index) rows."""

    def __init__(
        self,
        domain_sizes: Sequence[int],
        *,
        seed: int,
        block_size: int,
        global_batch_size: int,
        rank: int,
        world_size: int,
        schedule: MixtureSchedule,
        domain_names: Sequence[str] | None = None,
        unit: str = "items",
        row_sizes: Sequence[np.ndarray] | None = None,
    ) -> None:
        sizes = [int(s) for s in domain_sizes]
        if not sizes or any(s < 0 for s in sizes):
            raise MixtureError(f"domain sizes must be a non-empty list of counts >= 0, got {sizes}")
        if int(seed) != seed or seed < 0:
            raise MixtureError(f"seed must be an integer >= 0, got {seed!r}")
        if not 1 <= block_size <= MAX_SEGMENT:
            raise MixtureError(f"block_size must be in [1, {MAX_SEGMENT}], got {block_size}")
        if global_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise MixtureError(
                f"need global_batch_size >= 1, world_size >= 1 and 0 <= rank < world_size, "
                f"got {global_batch_size}, {world_size}, {rank}"
            )
        if global_batch_size % world_size != 0:
            raise MixtureError(
                f"global batch size {global_batch_size} is not divisible by the world size {world_size}: "
                "every rank must read the same number of rows; change the batch size or the number of GPUs"
            )
        if domain_names is not None and len(domain_names) != len(sizes):
            raise MixtureError(f"{len(domain_names)} domain names for {len(sizes)} domain sizes")
        if unit not in UNITS:
            raise MixtureError(f"sampler unit must be one of {', '.join(UNITS)}, got {unit!r}")
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._names = None if domain_names is None else list(domain_names)
        self._unit = unit
        self._weighted = unit != "items"
        self._row_sizes = self._checked_row_sizes(row_sizes)
        # recorded in checkpoints: resuming needs the same sizes
        self._row_sizes_hashes = [array_hash(t) for t in self._row_sizes or []]
        self._seed = int(seed)
        self._block_size = int(block_size)
        self._global_batch_size = int(global_batch_size)
        self._rank = int(rank)
        self._world_size = int(world_size)
        self._segment = self._block_size * max(1, _SEGMENT // self._block_size)
        self._walks = DomainWalks(self._sizes, self._seed)
        self._priorities: dict[int, np.ndarray] = {}
        zeros = (0,) * len(sizes)
        self._zero = _State(0, zeros, zeros, zeros if self._weighted else ())
        self._head = self._zero  # the state at consumed_samples
        self._set_schedule(schedule, keep_until=-1)

    def _checked_row_sizes(self, row_sizes: Sequence[np.ndarray] | None) -> list[np.ndarray] | None:
        if (row_sizes is None) == self._weighted:
            raise MixtureError("row_sizes (one array per domain) is needed with unit 'tokens' or 'examples', and only then")
        if row_sizes is None:
            return None
        if len(row_sizes) != self._sizes.size:
            raise MixtureError(f"{len(row_sizes)} row_sizes arrays for {self._sizes.size} domains")
        arrays = [np.asarray(sizes) for sizes in row_sizes]
        for d, array in enumerate(arrays):
            if array.shape != (self._sizes[d],) or (array.size and array.dtype.kind not in "iu"):
                raise MixtureError(
                    f"row_sizes of {self._domain_label(d)} must be {self._sizes[d]} integers, "
                    f"got shape {array.shape}, dtype {array.dtype}"
                )
            if array.size and array.min() < 1:
                raise MixtureError(f"{self._domain_label(d)} has a row of size {array.min()} ({self._unit}); rows need >= 1")
        return arrays

    @property
    def consumed_samples(self) -> int:
        return self._head.position

    @property
    def schedule(self) -> MixtureSchedule:
        return self._schedule

    @property
    def rows_per_rank(self) -> int:
        return self._global_batch_size // self._world_size

    @property
    def unit(self) -> str:
        return self._unit

    def _domain_label(self, domain_id: int) -> str:
        return f"domain {domain_id}" if self._names is None else f"domain {self._names[domain_id]!r} (id {domain_id})"

    # -- schedule ------------------------------------------------------------------------------

    def _set_schedule(self, schedule: MixtureSchedule, keep_until: int) -> None:
        """Use `schedule`; saved states after position `keep_until` (all if < 0) were made with another one."""
        if schedule.num_domains != self._sizes.size:
            raise MixtureError(f"schedule has {schedule.num_domains} weights per stage, but there are {self._sizes.size} domains")
        quantized = [quantize_weights(stage.weights) for stage in schedule.stages]
        for domain_id in np.flatnonzero(np.any(quantized, axis=0) & (self._sizes == 0)):
            raise MixtureError(f"{self._domain_label(int(domain_id))} has no items but a positive weight; give it weight 0")
        self._schedule = schedule
        self._stage_starts = [stage.start_block * self._block_size for stage in schedule.stages]
        self._stage_weights = quantized
        if keep_until < 0:
            self._states: dict[int, _State] = {}
            self._stride = 1
        else:
            self._states = {p: s for p, s in self._states.items() if p <= keep_until}
        self._state_keys = sorted(self._states)
        self._span: _Span | None = None

    def set_weights(self, weights: Sequence[float] | np.ndarray) -> None:
        """Switch to `weights` at the first block boundary at or after the samples consumed so far."""
        schedule = self._schedule.with_weights(weights, self.consumed_samples, self._block_size)
        self._set_schedule(schedule, keep_until=schedule.stages[-1].start_block * self._block_size)

    def _priority(self, stage: int) -> np.ndarray:
        """EDF tie ranks (lower first) for a stage, drawn from (seed, the stage's start block)."""
        start_block = self._schedule.stages[stage].start_block
        if start_block not in self._priorities:
            order = generator(self._seed, PRIORITY_STREAM, start_block).permutation(self._sizes.size)
            self._priorities[start_block] = np.argsort(order)
        return self._priorities[start_block]

    # -- the global order ----------------------------------------------------------------------

    def _segment_order(self, state: _State, end: int) -> tuple[np.ndarray, np.ndarray, _State]:
        """(domain, walk position) of positions [state.position, end), all in one stage; the state at end."""
        count = end - state.position
        stage = bisect.bisect_right(self._stage_starts, state.position) - 1
        q, priority = self._stage_weights[stage], self._priority(stage)
        rows = np.asarray(state.rows, dtype=np.int64)
        units_after: tuple[int, ...]
        if not self._weighted:
            lag = np.asarray(state.lag, dtype=np.int64)
            domains, jobs = edf_items(q, lag, priority, count)
            placed = np.bincount(domains, minlength=rows.size)
            lag_after, units_after = (lag + count * q - QUANTUM * placed).tolist(), ()
        else:
            upcoming: list[list[int] | None] = [None] * rows.size
            for d in range(rows.size):
                if self._sizes[d] and (q[d] or state.lag[d] > 0):  # the others cannot be drawn
                    walk = np.arange(rows[d], rows[d] + count)
                    upcoming[d] = self._row_sizes[d][self._walks.items(d, walk)].tolist()  # type: ignore[index]
            domain_list, job_list, lag_after, drawn = edf_tokens(q.tolist(), state.lag, priority.tolist(), upcoming, count)
            domains, jobs = np.asarray(domain_list, dtype=np.int64), np.asarray(job_list, dtype=np.int64)
            placed = np.bincount(domains, minlength=rows.size)
            units_after = tuple(a + b for a, b in zip(state.units, drawn))
        after = _State(end, tuple((rows + placed).tolist()), tuple(lag_after), units_after)
        return domains, rows[domains] + jobs - 1, after

    def _run(self, state: _State, end: int, keep: bool) -> tuple[list[np.ndarray], list[np.ndarray], _State]:
        """Compute from `state` to `end`, segment by segment, saving the states at segment ends."""
        domains, walks = [], []
        while state.position < end:
            position = state.position
            stage_end = next((s for s in self._stage_starts if s > position), end)
            stop = min(end, (position // self._segment + 1) * self._segment, stage_end)
            segment_domains, segment_walk, state = self._segment_order(state, stop)
            if keep:
                domains.append(segment_domains)
                walks.append(segment_walk)
            self._save(state)
        return domains, walks, state

    def _save(self, state: _State) -> None:
        """Keep the states at multiples of segment × stride; double the stride when there are too many."""
        if state.position % (self._segment * self._stride) or state.position in self._states:
            return
        self._states[state.position] = state
        bisect.insort(self._state_keys, state.position)
        while len(self._states) > _STATES_KEPT:
            self._stride *= 2
            self._states = {p: s for p, s in self._states.items() if p % (self._segment * self._stride) == 0}
            self._state_keys = sorted(self._states)

    def _nearest_state(self, position: int) -> _State:
        """The known state closest to `position` from below."""
        index = bisect.bisect_right(self._state_keys, position) - 1
        best = self._states[self._state_keys[index]] if index >= 0 else self._zero
        for state in (self._head, self._span.end if self._span else None):
            if state is not None and best.position < state.position <= position:
                best = state
        return best

    def _order(self, start: int, end: int, need_end: bool) -> tuple[np.ndarray, np.ndarray, _State]:
        """(domain, walk position) of global positions [start, end), and the state at `end` (if need_end)."""
        span = self._span
        covered = span is not None and span.start <= start and end <= span.end.position
        if span is not None and covered and (not need_end or end == span.end.position):
            rows = slice(start - span.start, end - span.start)
            return span.domains[rows], span.walk[rows], span.end
        _, _, state = self._run(self._nearest_state(start), start, keep=False)
        domains, walks, end_state = self._run(state, end, keep=True)
        self._span = _Span(start, np.concatenate(domains), np.concatenate(walks), end_state)
        return self._span.domains, self._span.walk, end_state

    def global_items(self, start: int, count: int) -> np.ndarray:
        """Rows [start, start + count) of the global order: int64 array [count, 2] of (domain id, item index)."""
        if start < 0 or count < 0:
            raise MixtureError(f"need start >= 0 and count >= 0, got {start}, {count}")
        if count == 0:
            return np.empty((0, 2), dtype=np.int64)
        domains, walk, _ = self._order(start, start + count, need_end=False)
        return self._walks.rows(domains, walk)

    def next_batch(self) -> np.ndarray:
        """This rank's rows of the next global batch, [global_batch_size // world_size, 2]."""
        start = self.consumed_samples
        domains, walk, self._head = self._order(start, start + self._global_batch_size, need_end=True)
        rows = slice(self._rank * self.rows_per_rank, (self._rank + 1) * self.rows_per_rank)
        return self._walks.rows(domains[rows], walk[rows])

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-ready state at consumed_samples; it holds no rank or world size."""
        state = {
            "format": STATE_FORMAT,
            "consumed_samples": self._head.position,
            "global_batch_size": self._global_batch_size,
            "unit": self._unit,
            "schedule": self._schedule.to_json(),
            "seed": self._seed,
            "block_size": self._block_size,
            "weight_quantum": QUANTUM,
            "domain_sizes": [int(s) for s in self._sizes],
            "domain_sizes_hash": sizes_hash(self._sizes.tolist()),
            "rows_drawn": list(self._head.rows),
        }
        if self._weighted:
            state["units_drawn"] = list(self._head.units)
            # QUANTUM × each domain's target (in tokens or examples) so far: exact integers, which the order needs
            state["unit_targets"] = [lag + QUANTUM * t for lag, t in zip(self._head.lag, self._head.units)]
            state["row_sizes_hashes"] = self._row_sizes_hashes
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore position, schedule and per-domain counts; refuse state made with other data or settings.

        The rank and world size may differ from the run that saved it; the global batch size may not.
        """
        if "rows_drawn" not in state:
            raise MixtureError(
                "this sampler state has no 'rows_drawn': it was written by the per-block sampler, whose order "
                "differs, so it cannot be resumed exactly; start a fresh run"
            )
        old_sizes = [int(s) for s in state["domain_sizes"]]
        if sizes_hash(old_sizes) != state["domain_sizes_hash"]:
            raise MixtureError("sampler state is corrupt: domain_sizes does not match domain_sizes_hash")
        new_sizes = self._sizes.tolist()
        if len(old_sizes) != len(new_sizes):
            raise MixtureError(
                f"the checkpoint has {len(old_sizes)} domains but the data now has {len(new_sizes)}: "
                "resume with the same domains, or start a fresh run"
            )
        changed = [
            f"{self._domain_label(d)}: {old} items in the checkpoint, {new} now"
            for d, (old, new) in enumerate(zip(old_sizes, new_sizes))
            if old != new
        ]
        if self._weighted and state.get("unit") == self._unit:
            changed += [
                f"{self._domain_label(d)}: the sizes ({self._unit}) of its rows changed"
                for d, (old, new) in enumerate(zip(state["row_sizes_hashes"], self._row_sizes_hashes))
                if old != new
            ]
        if changed:
            raise MixtureError(
                "the training data changed since the checkpoint, so the sample order cannot be resumed exactly: "
                + "; ".join(changed)
                + ". Restore the original data, or start a fresh run."
            )
        for key, now, hint in (
            ("seed", self._seed, "use the checkpoint's seed"),
            ("block_size", self._block_size, "use the checkpoint's block_size"),
            ("unit", self._unit, "use the checkpoint's mixture unit"),
            ("global_batch_size", self._global_batch_size, (
                "keep the global batch size (micro batch × gradient accumulation × world size) when resuming; "
                "the number of ranks may change"
            )),
            ("weight_quantum", QUANTUM, "the checkpoint is from another sampler version"),
        ):
            if state[key] != now:
                raise MixtureError(f"sampler {key} changed: checkpoint {state[key]!r}, now {now!r}; {hint}")
        schedule = MixtureSchedule.from_json(state["schedule"])
        position, rows = int(state["consumed_samples"]), tuple(int(r) for r in state["rows_drawn"])
        if position < 0 or len(rows) != len(new_sizes) or min(rows) < 0 or sum(rows) != position:
            raise MixtureError(
                f"sampler state is corrupt: rows_drawn {list(rows)} do not add up to consumed_samples {position}"
            )
        self._set_schedule(schedule, keep_until=-1)
        if not self._weighted:
            targets = self._schedule.item_targets(position, self._block_size)
            lag = tuple(t - QUANTUM * r for t, r in zip(targets, rows))
            if min(lag) <= -QUANTUM:  # a whole row ahead of the target: impossible (apportion.py, Lemma A)
                raise MixtureError(f"sampler state is corrupt: rows_drawn {list(rows)} do not fit the schedule")
            self._head = _State(position, rows, lag)
        else:
            units = tuple(int(t) for t in state["units_drawn"])
            lag = tuple(int(t) - QUANTUM * r for t, r in zip(state["unit_targets"], units))
            if len(units) != len(rows) or len(lag) != len(rows) or sum(lag) != 0:
                raise MixtureError("sampler state is corrupt: unit_targets do not add up to units_drawn")
            self._head = _State(position, rows, lag, units)
