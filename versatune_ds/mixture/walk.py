"""Each domain's walk through its items, the second half of the sampler's global order (mixture.sampler).

Domain d is walked through its own permutation of its items, reshuffled each pass, seeded with
(seed, d, pass): walk position k of d is item `permutation(seed, d, k // size)[k % size]`. The sampler
decides which domain fills each global position (mixture.apportion); the k-th occurrence of d in the
global order takes walk position k. So a domain's rows are a pure function of the seed and of how many
rows of it came before, whatever the weights were.

Randomness: `np.random.Generator(np.random.PCG64(np.random.SeedSequence([...])))`, the same stream on every
platform.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

import numpy as np

# Namespaces in the seed sequences, so a tie-priority generator never equals a domain generator.
PRIORITY_STREAM = 0
DOMAIN_STREAM = 1
_PASSES_CACHED_PER_DOMAIN = 2


def generator(*entropy: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(entropy))))


def sizes_hash(domain_sizes: Sequence[int]) -> str:
    """A short stable hash of the domain sizes (recorded in checkpoints)."""
    return hashlib.sha256(json.dumps([int(s) for s in domain_sizes]).encode()).hexdigest()[:16]


def array_hash(values: np.ndarray) -> str:
    """A short stable hash of an integer array (rows' sizes, recorded in checkpoints)."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.int64).tobytes()).hexdigest()[:16]


class DomainWalks:
    """Item indices at walk positions, per domain; the last passes' permutations are cached."""

    def __init__(self, sizes: np.ndarray, seed: int) -> None:
        self._sizes = sizes
        self._seed = seed
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def _permutation(self, domain_id: int, pass_index: int) -> np.ndarray:
        key = (domain_id, pass_index)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        size = int(self._sizes[domain_id])
        dtype = np.int32 if size < 2**31 else np.int64
        permutation = generator(self._seed, DOMAIN_STREAM, domain_id, pass_index).permutation(size).astype(dtype)
        if len(self._cache) >= _PASSES_CACHED_PER_DOMAIN * self._sizes.size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = permutation
        return permutation

    def items(self, domain_id: int, walk: np.ndarray) -> np.ndarray:
        """Item indices at walk positions `walk` (increasing) of domain `domain_id`."""
        passes, offsets = np.divmod(walk, int(self._sizes[domain_id]))
        if passes[0] == passes[-1]:
            return self._permutation(domain_id, int(passes[0]))[offsets]
        result = np.empty(walk.size, dtype=np.int64)
        for pass_index in range(int(passes[0]), int(passes[-1]) + 1):
            rows = passes == pass_index
            result[rows] = self._permutation(domain_id, pass_index)[offsets[rows]]
        return result

    def rows(self, domains: np.ndarray, walk: np.ndarray) -> np.ndarray:
        """int64 [n, 2] of (domain id, item index) for positions with these domains and walk positions."""
        result = np.empty((domains.size, 2), dtype=np.int64)
        result[:, 0] = domains
        for domain_id in np.unique(domains):
            rows = domains == domain_id
            result[rows, 1] = self.items(int(domain_id), walk[rows])
        return result
