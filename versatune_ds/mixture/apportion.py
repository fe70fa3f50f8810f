"""Exact cumulative apportionment: the weight schedule, and which domain fills each global position.

Notation. Positions i = 0, 1, 2, ... of the global order. p_d(i) is domain d's weight in force at i
(piecewise constant: a stage starts at a block boundary), quantised to q_d / QUANTUM with integers
Σ_d q_d = QUANTUM (`quantize_weights`; each differs from w_d / Σw by < 2^-40), so everything below
is exact integer arithmetic. T_d(n) = Σ_{i<n} p_d(i) is the target, c_d(n) the number of d's rows
among positions < n, e_d(n) = T_d(n) − c_d(n) the lag; Σ_d T_d(n) = n = Σ_d c_d(n), so Σ_d e_d = 0.

Item rule (`edf_items`). Domain d's k-th row is a unit job with release r = min{n : T_d(n+1) > k−1}
and deadline D = min{m : T_d(m) ≥ k} − 1. Every position runs the released job with the earliest
deadline (EDF); ties go to the earlier release, then to a seeded domain priority (fixed per stage).
Deadlines of pending jobs use the weights in force at the position, the only ones known then: a
later `set_weights` must not re-order rows already handed out.

  Lemma A (any schedule, any weight changes). c_d(n) − T_d(n) < 1 for all d, n.
    Job k runs at some n ≥ r, so T_d(n+1) > k−1 = c_d(n+1) − 1, and T only grows. Some job is
    always released: Σ_d (T_d(n+1) − c_d(n)) = 1 > 0. A domain without items has weight 0 in every
    stage, so it is never released; a domain at weight 0 is released only while e_d > 0.
  Theorem B (the strict bound). In a stage that starts at s0 with every e_d(s0) < 1 and at most one
    domain ahead (e_d(s0) < 0), |c_d(n) − T_d(n)| < 1 for every n in the stage, up to its end.
    This covers stage 0, so every constant schedule from position 0.
    Proof. e_d(n) < 1 iff every job of d with deadline < n has run. In the stage T_d is linear.
    For a window [a, b] with a > s0, the jobs with r ≥ a and D ≤ b are the k with
    T_d(a) + 1 ≤ k ≤ T_d(b+1), at most ⌊T_d(b+1) − T_d(a)⌋ of them, and Σ_d (T_d(b+1) − T_d(a))
    = b+1−a. For a = s0 (jobs pending at s0 count as released at s0) they number Σ_d max(0, ⌊x_d⌋)
    with x_d = e_d(s0) + p_d·(b+1−s0) > −1 and Σ_d x_d = b+1−s0, which exceeds b+1−s0 by less
    than #{d : x_d < 0} ≤ #{d : e_d(s0) < 0} ≤ 1, so by at most 0. Hall's condition holds on every
    window, and then EDF meets every deadline: if job J misses D, let t0 − 1 be the last position
    ≤ D that ran a job with deadline > D (t0 = s0 if none). The jobs run in [t0, D], and J, have
    deadlines ≤ D and releases ≥ t0 (the first of each domain would otherwise have been pending at
    t0 − 1 and preferred), so D − t0 + 2 jobs need the D − t0 + 1 positions of [t0, D]. The jobs
    of one domain have increasing releases and deadlines, so they run in order. ∎
  Corollary C. If the stage starts with every e_d(s0) < 1 and M domains ahead, the same count
    exceeds each window by at most E = max(0, M − 1); deadlines shifted by E satisfy Hall's
    condition and EDF orders by them just the same, so no job is more than E positions late, and
    e_d(n) < 1 + p_d·E in that stage.
  Always: e_d(n) = −Σ_{d'≠d} e_d'(n) < #{d' : e_d'(n) < 0} ≤ (number of domains) − 1.
  No rule that decides position n from the weights known at n can keep |e| < 1 across stage changes
  (4 domains): let stage 0 end with each T_d an integer + ½. If |e| < 1, two domains are ahead by
  ½ and two behind by ½; a next stage giving weight ½ to each of the two behind leaves both 1
  behind after one position, and only one of them can run. Knowing the next block does not help
  (first insert blocks that give all the weight to a fifth domain).

Windows. Where Theorem B holds, a domain of weight w > 0 appears in every window of ⌈2/w⌉
consecutive positions: c_d(a+L) − c_d(a) > (T_d(a+L) − 1) − (T_d(a) + 1) = L·w − 2 ≥ 0.
⌈1/w⌉ is not achievable in general: with weights ½, ⅓, ⅙ the first domain must take every other
position, the second then every remaining one, and the third would never appear.

Token rule (`edf_tokens`). Time is the number of tokens drawn so far; T_d = Σ over the drawn rows
of (d's weight at that row's position) × (the row's tokens), R_d = tokens of d's rows. A domain
whose next row has ℓ tokens is released when T_d + w_d·ℓ > R_d (its target, counting that row, is
above what it has); its deadline is the first token time at which T_d ≥ R_d + ℓ. EDF as above.
  Lemma A' (always). R_d − T_d < the tokens of d's last drawn row: at release R_d − T_d < w_d·ℓ,
    and the draw adds ℓ to R_d and w_d·ℓ to T_d; T only grows. Σ_d (T_d + w_d·ℓ_d − R_d) =
    Σ_d w_d·ℓ_d > 0, so some domain is always released.
  Theorem B' (constant schedule). T_d − R_d < ℓ_d + w_d·(L − 1), ℓ_d the length of d's next row,
    L the longest row of the other domains. Proof (non-preemptive EDF busy period): if job J with
    integer deadline D finishes at f > D, let t0 be the last start before J of a job X with a later
    deadline (t0 = 0 if none); X is of another domain, so ℓ_X ≤ L. Every job run from t0 + ℓ_X up
    to J has deadline ≤ D, and the first of each domain d' was not released at t0 (else EDF would
    have preferred it), so their tokens lie in (T_d'(t0), T_d'(D)] and total < D − t0. So
    f < D + L. If d's next job is not finished at token time t, t < f < D + L, i.e.
    t − L + 1 < D, so T_d(t − L + 1) < R_d + ℓ_d. ∎
  Across stage changes only Lemma A' holds, and T_d − R_d = Σ_{d'≠d} (R_d' − T_d') < Σ_{d'≠d} ℓ_d'.
"""
from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from versatune_ds.mixture.composition import MixtureError

# Weights are integers out of QUANTUM = lcm(1..16)·2^22 ≈ 3.0e12 < 2^42: weights such as 1/3, 1/6,
# 1/7 or 0.3 are exact (so exact ties, which the seeded priority decides), any other is within
# 2^-40, and `edf_items` stays inside int64 (j·QUANTUM for j <= MAX_SEGMENT).
QUANTUM = 720720 * 2**22
# Keys for weight-0 domains: "overdue" (far in the past) and "never due".
_FAR = 2**62
MAX_SEGMENT = 2**20


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

    def item_targets(self, position: int, block_size: int) -> list[int]:
        """QUANTUM·T_d(position): the exact targets of the item rule, with the weights quantised."""
        totals = [0] * self.num_domains
        for index, stage in enumerate(self.stages):
            end = self.stages[index + 1].start_block * block_size if index + 1 < len(self.stages) else position
            length = max(0, min(end, position) - stage.start_block * block_size)
            totals = [t + length * int(q) for t, q in zip(totals, quantize_weights(stage.weights))]
        return totals

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


def quantize_weights(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Integers q_d >= 0 with Σ q_d = QUANTUM, q_d ≈ QUANTUM·w_d/Σw; a positive weight stays positive.

    Floors plus the leftover units to the largest remainders (ties: lower id). The caller has
    checked that the weights are finite, >= 0 and not all 0.
    """
    array = np.asarray(weights, dtype=np.float64)
    exact = array / array.sum() * QUANTUM
    counts = np.floor(exact).astype(np.int64)
    counts[(array > 0) & (counts == 0)] = 1
    remainders = np.where(array > 0, exact - np.floor(exact), -1.0)
    leftover = QUANTUM - int(counts.sum())
    if leftover >= 0:
        counts[np.lexsort((np.arange(array.size), -remainders))[:leftover]] += 1
    else:  # tiny weights were lifted to 1: take the units back from the largest weights
        counts[np.argsort(-counts, kind="stable")[:-leftover]] -= 1
    return counts


def edf_items(q: np.ndarray, lag: np.ndarray, priority: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The next `count` positions of the item rule: (domain per position, job number j >= 1 within the call).

    `q` are the stage's quantised weights, `lag[d]` = QUANTUM·e_d at the first position, `priority[d]`
    the tie rank (lower first). Exact EDF. All jobs released before the end are sorted by (deadline,
    release, priority); that order is the EDF order while each job is released by its turn, which
    is the common case. With heavy domains whose jobs come too early in it, `_waiting_domains`
    places them in closed form; otherwise EDF runs position by position with two heaps.
    """
    num_domains = q.size
    # Jobs released before `count`: j − 1 < (lag + count·q) / QUANTUM.
    reach = lag + count * q
    per_domain = np.minimum(np.maximum(-(-reach // QUANTUM), 0), count)
    total = int(per_domain.sum())
    starts = np.cumsum(per_domain) - per_domain
    domain = np.repeat(np.arange(num_domains), per_domain)
    job = np.arange(1, total + 1) - np.repeat(starts, per_domain)
    lag_of = lag[domain]
    zero = (q == 0)[domain]
    q_of = np.where(zero, 1, q[domain])
    before = (job - 1) * QUANTUM - lag_of  # QUANTUM·(k−1 − T) relative to the first position
    # Release offset: first n with lag + q·(n+1) > (j−1)·QUANTUM, i.e. floor(before / q); not clipped
    # at 0, so the tie key of a job is the same whichever position the computation starts from.
    release_key = np.where(zero, -_FAR, before // q_of)
    # Deadline offset + 1 = ceil((j·QUANTUM − lag) / q); a weight-0 domain is overdue or never due.
    deadline = np.where(zero, np.where(before + QUANTUM <= 0, -_FAR, _FAR), -((-before - QUANTUM) // q_of))
    order = np.lexsort((priority[domain] * (count + 1) + job, release_key, deadline))
    release = np.maximum(release_key[order], 0)

    # The sorted order is the EDF order as long as every job is released by its turn (its index).
    index = np.arange(total)
    late = release > index
    domain_sorted = domain[order]
    if not late[:count].any():
        return domain_sorted[:count], job[order[:count]]
    chosen_array = _waiting_domains(release, np.isin(domain_sorted, domain_sorted[late]), count)
    if chosen_array is not None:
        picked = order[chosen_array]
        return domain[picked], job[picked]

    # Otherwise position by position: a heap of the released domains' next jobs and a heap of the
    # others' next releases, each entry one integer (key · D + domain, D = number of domains).
    rank = np.empty(total, dtype=np.int64)
    rank[order] = index
    jobs_of, releases_of, pending = [], [], [_FAR]
    for d in range(num_domains):
        jobs = rank[starts[d] : starts[d] + per_domain[d]]
        jobs_of.append((jobs * num_domains + d).tolist() + [0])
        releases_of.append((release[jobs] * num_domains + d).tolist() + [_FAR])
        if per_domain[d]:
            pending.append(releases_of[d][0])
    heapq.heapify(pending)
    ready: list[int] = []
    taken = [0] * num_domains
    chosen: list[int] = []
    push, pop = heapq.heappush, heapq.heappop
    for position in range(count):
        limit = (position + 1) * num_domains  # pending entries below it are released
        while pending[0] < limit:
            d = pop(pending) % num_domains
            push(ready, jobs_of[d][taken[d]])
        entry = pop(ready)
        d = entry % num_domains
        chosen.append(entry // num_domains)
        taken[d] += 1
        push(pending, releases_of[d][taken[d]])
    picked = order[np.asarray(chosen, dtype=np.int64)]
    return domain[picked], job[picked]


def _waiting_domains(release: np.ndarray, is_waiting: np.ndarray, count: int) -> np.ndarray | None:
    """EDF when only some domains' jobs come before their release (heavy domains), or None.

    Let x_1 < x_2 < ... be the sorted indices of those domains' jobs. If their releases do not
    decrease along x, they run in that order: job k runs at the first slot t >= its release, after
    job k−1, at which it precedes the next other job; k−1 of them ran before t, so that other job
    is the (t − k + 1)-th, and it follows x_k exactly when t >= x_k. So s_k = max(release_k, x_k,
    s_{k−1} + 1), i.e. s_k − k is a running max. The other jobs fill the remaining slots in order,
    which is EDF if each of them is released by its slot (checked).
    """
    heavy = np.flatnonzero(is_waiting)
    others = np.flatnonzero(~is_waiting)
    if np.any(np.diff(release[heavy]) < 0):
        return None
    k = np.arange(heavy.size)
    slots = k + np.maximum.accumulate(np.maximum(release[heavy], heavy) - k)
    placed = int(np.searchsorted(slots, count))
    free = np.ones(count, dtype=bool)
    free[slots[:placed]] = False
    other_slots = np.flatnonzero(free)
    if other_slots.size > others.size or np.any(release[others[: other_slots.size]] > other_slots):
        return None
    chosen = np.empty(count, dtype=np.int64)
    chosen[slots[:placed]] = heavy[:placed]
    chosen[other_slots] = others[: other_slots.size]
    return chosen


def edf_tokens(
    q: Sequence[int], lag: Sequence[int], priority: Sequence[int], upcoming: Sequence[Sequence[int] | None], count: int
) -> tuple[list[int], list[int], list[int], list[int]]:
    """The next `count` positions of the token rule.

    `lag[d]` = QUANTUM·(T_d − R_d) in tokens, `upcoming[d]` the token counts of d's next rows in walk
    order (`count` of them; None for a domain that cannot be drawn). Returns the domain and the job
    number (1, 2, ... per domain) of each position, then the lags and tokens drawn per domain at the
    end. Python integers (token targets outgrow int64); keys are absolute token times, which do not
    change while time passes, so only the drawn domain's key is recomputed after each row.
    """
    time = 0
    base = [int(x) for x in lag]  # lag_d(time) = base[d] + q[d]·time: a draw moves one base only
    taken = [0] * len(base)
    drawn = [0] * len(base)
    ready: list[tuple[int, int, int, int]] = []  # (deadline, release, priority, domain), released
    pending: list[tuple[int, int]] = []  # (release, domain), not yet released

    def push(d: int) -> None:
        rows = upcoming[d]
        if rows is None or taken[d] == len(rows):
            return
        tokens, weight, now = rows[taken[d]], q[d], base[d] + q[d] * time
        if weight > 0:  # released from the first time with lag + weight·(tokens + t − time) > 0
            release = time + (-now - weight * tokens) // weight + 1
            entry = (time - ((now - QUANTUM * tokens) // weight), release, priority[d], d)
            if release <= time:
                heapq.heappush(ready, entry)
            else:
                heapq.heappush(pending, (release, d))
                keys[d] = entry
        elif now > 0:  # weight 0: a domain still behind its target from an earlier stage
            heapq.heappush(ready, (-_FAR if now >= QUANTUM * tokens else _FAR, -_FAR, priority[d], d))

    keys: dict[int, tuple[int, int, int, int]] = {}
    for d in range(len(base)):
        push(d)
    domains: list[int] = []
    jobs: list[int] = []
    for _ in range(count):
        while pending and pending[0][0] <= time:
            heapq.heappush(ready, keys.pop(heapq.heappop(pending)[1]))
        best = heapq.heappop(ready)[3]
        tokens = upcoming[best][taken[best]]  # type: ignore[index]
        base[best] -= QUANTUM * tokens
        time += tokens
        taken[best] += 1
        drawn[best] += tokens
        domains.append(best)
        jobs.append(taken[best])
        push(best)
    return domains, jobs, [b + w * time for b, w in zip(base, q)], drawn
