"""MixtureSampler: a deterministic, resumable global order of (domain id, item index) pairs.

The contract (DESIGN.md §3):

- The global order is a pure function of (seed, schedule, domain sizes, block_size, index).
  Global index i lies in block b = i // block_size. Block b holds
  `largest_remainder_counts(w_b, block_size)` items per domain, where w_b is the schedule's
  weights at b, in an order permuted by a generator seeded with (seed, b). Domain d is walked
  through its own permutation of its items, reshuffled each pass, seeded with (seed, d, pass);
  the k-th occurrence of d in the global order is walk position k. The walk position of every
  domain at the start of block b is a sum over the schedule's stages (counts are constant inside
  a stage), so seeking to any index costs O(#stages), never a replay of earlier blocks.
- A weight change is a new stage starting at the first block boundary at or after the samples
  consumed so far; samples already handed out are never re-ordered.
- Rank r of W reads rows [r·G/W, (r+1)·G/W) of each global batch of G rows, so all ranks together
  read each global batch exactly once, and every rank gets the same number of batches.
- `state_dict()` holds consumed samples + schedule + seed + block size + the domain sizes and their
  hash; loading it with changed data names the domain whose size changed.

The sampler always mixes *items*. To mix by tokens, convert the token weights with
`mixture.composition.item_weights_from_token_weights` before building the schedule or calling `set_weights`.

Randomness: `np.random.Generator(np.random.PCG64(np.random.SeedSequence([...])))`, which gives the
same stream on every platform. (Block placement after the levanter `MixtureDataset` idea of
block-deterministic mixing with weight stages; the code here is our own.)
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from versatune_ds.mixture.composition import MixtureError, largest_remainder_counts

# Namespaces in the seed sequences, so a block generator (seed, b) never equals a domain generator.
_BLOCK_STREAM = 0
_DOMAIN_STREAM = 1
# Small caches: the sampler reads forward, so only the newest few blocks / passes are reused.
_BLOCK_CACHE_SIZE = 4
_PASSES_CACHED_PER_DOMAIN = 2


@dataclass(frozen=True)
class Stage:
    """Weights in force from block `start_block` until the next stage starts."""

    start_block: int
    weights: tuple[float, ...]


@dataclass(frozen=True)
class MixtureSchedule:
    """The list of stages; the first starts at block 0, start blocks strictly increase."""

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise MixtureError("a mixture schedule needs at least one stage")
        if self.stages[0].start_block != 0:
            raise MixtureError(f"the first stage must start at block 0, not {self.stages[0].start_block}")
        num_domains = len(self.stages[0].weights)
        previous = -1
        for stage in self.stages:
            if stage.start_block <= previous:
                raise MixtureError(f"stage start blocks must strictly increase, got {self.start_blocks()}")
            previous = stage.start_block
            if len(stage.weights) != num_domains:
                raise MixtureError(
                    f"stage at block {stage.start_block} has {len(stage.weights)} weights, expected {num_domains}"
                )
            weights = np.asarray(stage.weights, dtype=np.float64)
            if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
                raise MixtureError(
                    f"stage at block {stage.start_block} has weights {list(stage.weights)}: "
                    "they must be finite, >= 0 and not all 0"
                )

    @classmethod
    def constant(cls, weights: Sequence[float] | np.ndarray) -> MixtureSchedule:
        return cls((Stage(0, tuple(float(w) for w in weights)),))

    @property
    def num_domains(self) -> int:
        return len(self.stages[0].weights)

    def start_blocks(self) -> list[int]:
        return [stage.start_block for stage in self.stages]

    def stage_index_at(self, block: int) -> int:
        if block < 0:
            raise MixtureError(f"block must be >= 0, got {block}")
        return bisect.bisect_right(self.start_blocks(), block) - 1

    def weights_at(self, block: int) -> np.ndarray:
        return np.asarray(self.stages[self.stage_index_at(block)].weights, dtype=np.float64)

    def with_weights(
        self, weights: Sequence[float] | np.ndarray, consumed_samples: int, block_size: int
    ) -> MixtureSchedule:
        """A new schedule whose last stage has `weights`, from the first block boundary >= consumed_samples.

        A stage already starting at that block (or later: a weight change overrides any planned
        future stages) is replaced.
        """
        if consumed_samples < 0 or block_size < 1:
            raise MixtureError(f"need consumed_samples >= 0 and block_size >= 1, got {consumed_samples}, {block_size}")
        start_block = -(-consumed_samples // block_size)  # ceil division in integers
        kept = tuple(stage for stage in self.stages if stage.start_block < start_block)
        new_stage = Stage(start_block, tuple(float(w) for w in weights))
        return MixtureSchedule(kept + (new_stage,))

    def to_json(self) -> dict:
        return {"stages": [{"start_block": s.start_block, "weights": list(s.weights)} for s in self.stages]}

    @classmethod
    def from_json(cls, data: dict) -> MixtureSchedule:
        try:
            stages = tuple(
                Stage(int(item["start_block"]), tuple(float(w) for w in item["weights"])) for item in data["stages"]
            )
        except (KeyError, TypeError, ValueError) as error:
            raise MixtureError(f"malformed mixture schedule {data!r}: {error}") from error
        return cls(stages)


def sizes_hash(domain_sizes: Sequence[int]) -> str:
    """A short stable hash of the domain sizes (recorded in checkpoints)."""
    return hashlib.sha256(json.dumps([int(s) for s in domain_sizes]).encode()).hexdigest()[:16]


def _generator(*entropy: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(entropy))))


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
    ) -> None:
        sizes = [int(s) for s in domain_sizes]
        if not sizes or any(s < 0 for s in sizes):
            raise MixtureError(f"domain sizes must be a non-empty list of counts >= 0, got {sizes}")
        if int(seed) != seed or seed < 0:
            raise MixtureError(f"seed must be an integer >= 0, got {seed!r}")
        if block_size < 1:
            raise MixtureError(f"block_size must be >= 1, got {block_size}")
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
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._names = None if domain_names is None else list(domain_names)
        self._seed = int(seed)
        self._block_size = int(block_size)
        self._global_batch_size = int(global_batch_size)
        self._rank = int(rank)
        self._world_size = int(world_size)
        self._consumed_samples = 0
        self._block_cache: dict[tuple[int, bytes], tuple[np.ndarray, np.ndarray]] = {}
        self._pass_cache: dict[tuple[int, int], np.ndarray] = {}
        self._set_schedule(schedule)

    # -- properties ----------------------------------------------------------------------------

    @property
    def consumed_samples(self) -> int:
        return self._consumed_samples

    @property
    def schedule(self) -> MixtureSchedule:
        return self._schedule

    @property
    def rows_per_rank(self) -> int:
        return self._global_batch_size // self._world_size

    # -- schedule ------------------------------------------------------------------------------

    def _domain_label(self, domain_id: int) -> str:
        return f"domain {domain_id}" if self._names is None else f"domain {self._names[domain_id]!r} (id {domain_id})"

    def _set_schedule(self, schedule: MixtureSchedule) -> None:
        if schedule.num_domains != self._sizes.size:
            raise MixtureError(f"schedule has {schedule.num_domains} weights per stage, but there are {self._sizes.size} domains")
        counts = np.stack([largest_remainder_counts(s.weights, self._block_size) for s in schedule.stages])
        for domain_id in np.flatnonzero((counts > 0).any(axis=0) & (self._sizes == 0)):
            raise MixtureError(f"{self._domain_label(int(domain_id))} has no items but a positive weight; give it weight 0")
        self._schedule = schedule
        self._stage_starts = np.asarray(schedule.start_blocks(), dtype=np.int64)
        self._stage_counts = counts  # [num_stages, num_domains], items per block in each stage

    def set_weights(self, weights: Sequence[float] | np.ndarray) -> None:
        """Switch to `weights` at the first block boundary at or after the samples consumed so far."""
        self._set_schedule(self._schedule.with_weights(weights, self._consumed_samples, self._block_size))

    # -- the global order ----------------------------------------------------------------------

    def _walk_position(self, block: int) -> np.ndarray:
        """Items of each domain placed in blocks [0, block): O(#stages)."""
        ends = np.append(self._stage_starts[1:], np.iinfo(np.int64).max)
        blocks_in_stage = np.clip(np.minimum(ends, block) - self._stage_starts, 0, None)
        return blocks_in_stage @ self._stage_counts

    def _block(self, block: int, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(domain id per offset, occurrence rank of that domain within the block) for one block."""
        key = (block, counts.tobytes())
        cached = self._block_cache.get(key)
        if cached is not None:
            return cached
        layout = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
        domains = layout[_generator(self._seed, _BLOCK_STREAM, block).permutation(self._block_size)]
        # Stable sort groups the offsets by domain in increasing offset order, matching `layout`,
        # so the j-th grouped offset is occurrence j − start(domain) of its domain.
        order = np.argsort(domains, kind="stable")
        ranks = np.empty(self._block_size, dtype=np.int64)
        ranks[order] = np.arange(self._block_size) - np.repeat(np.cumsum(counts) - counts, counts)
        if len(self._block_cache) >= _BLOCK_CACHE_SIZE:
            self._block_cache.pop(next(iter(self._block_cache)))
        self._block_cache[key] = (domains, ranks)
        return domains, ranks

    def _pass_permutation(self, domain_id: int, pass_index: int) -> np.ndarray:
        key = (domain_id, pass_index)
        cached = self._pass_cache.get(key)
        if cached is not None:
            return cached
        size = int(self._sizes[domain_id])
        dtype = np.int32 if size < 2**31 else np.int64
        permutation = _generator(self._seed, _DOMAIN_STREAM, domain_id, pass_index).permutation(size).astype(dtype)
        if len(self._pass_cache) >= _PASSES_CACHED_PER_DOMAIN * self._sizes.size:
            self._pass_cache.pop(next(iter(self._pass_cache)))
        self._pass_cache[key] = permutation
        return permutation

    def _items(self, domain_id: int, walk: np.ndarray) -> np.ndarray:
        """Item indices at walk positions `walk` of domain `domain_id`."""
        size = int(self._sizes[domain_id])
        passes, offsets = np.divmod(walk, size)
        first, last = int(passes.min()), int(passes.max())
        if first == last:
            return self._pass_permutation(domain_id, first)[offsets]
        table = np.stack([self._pass_permutation(domain_id, p) for p in range(first, last + 1)])
        return table[passes - first, offsets]

    def global_items(self, start: int, count: int) -> np.ndarray:
        """Rows [start, start + count) of the global order: int64 array [count, 2] of (domain id, item index)."""
        if start < 0 or count < 0:
            raise MixtureError(f"need start >= 0 and count >= 0, got {start}, {count}")
        result = np.empty((count, 2), dtype=np.int64)
        if count == 0:
            return result
        first_block = start // self._block_size
        last_block = (start + count - 1) // self._block_size
        blocks = np.arange(first_block, last_block + 1)
        stage_of_block = np.searchsorted(self._stage_starts, blocks, side="right") - 1
        counts = self._stage_counts[stage_of_block]  # [num_blocks, num_domains]
        walk_at_block = self._walk_position(first_block) + np.cumsum(counts, axis=0) - counts

        span = blocks.size * self._block_size
        domains = np.empty(span, dtype=np.int64)
        walk = np.empty(span, dtype=np.int64)
        for i, block in enumerate(blocks):
            block_domains, block_ranks = self._block(int(block), counts[i])
            rows = slice(i * self._block_size, (i + 1) * self._block_size)
            domains[rows] = block_domains
            walk[rows] = walk_at_block[i, block_domains] + block_ranks
        head = start - first_block * self._block_size
        domains = domains[head : head + count]
        walk = walk[head : head + count]

        result[:, 0] = domains
        for domain_id in np.unique(domains):
            rows = domains == domain_id
            result[rows, 1] = self._items(int(domain_id), walk[rows])
        return result

    def next_batch(self) -> np.ndarray:
        """This rank's rows of the next global batch, [global_batch_size // world_size, 2]."""
        per_rank = self.rows_per_rank
        rows = self.global_items(self._consumed_samples + self._rank * per_rank, per_rank)
        self._consumed_samples += self._global_batch_size
        return rows

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "consumed_samples": self._consumed_samples,
            "schedule": self._schedule.to_json(),
            "seed": self._seed,
            "block_size": self._block_size,
            "domain_sizes": [int(s) for s in self._sizes],
            "domain_sizes_hash": sizes_hash(self._sizes.tolist()),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position and schedule; refuse state made with other data, seed or block size."""
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
        if changed:
            raise MixtureError(
                "the training data changed since the checkpoint, so the sample order cannot be resumed exactly: "
                + "; ".join(changed)
                + ". Restore the original data, or start a fresh run."
            )
        if int(state["seed"]) != self._seed:
            raise MixtureError(f"sampler seed changed: checkpoint {state['seed']}, config {self._seed}; use the checkpoint's seed")
        if int(state["block_size"]) != self._block_size:
            raise MixtureError(
                f"sampler block_size changed: checkpoint {state['block_size']}, config {self._block_size}; "
                "use the checkpoint's block_size"
            )
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise MixtureError(f"sampler state has consumed_samples {consumed}")
        self._set_schedule(MixtureSchedule.from_json(state["schedule"]))
        self._consumed_samples = consumed
