"""Per-domain held-out loss, in ZeRO-3 lockstep (used by the train loop and the `eval` command).

Per-domain loss
    `evaluate_domain_losses` computes, for every domain d, the token-weighted mean cross-entropy over the
    response tokens (label != -100) of d's held-out examples:

        loss_d = sum over d's examples and response tokens t of -log p(token_t | tokens_<t) / (number of those tokens)

    with the shift-by-one of Hugging Face's causal-LM loss (engine.losses.row_loss_sums), in fp32.
    For one example this is exactly `model(input_ids, labels=labels).loss`.

Standard errors
    The examples, not the tokens, are the independent draws, so the error of the token-weighted mean
    L = Σ s_i / Σ n_i (s_i example i's summed loss, n_i its scored tokens, m examples) is the ratio
    estimator's, by the delta method: SE² = m/(m−1) · Σ (s_i − L·n_i)² / (Σ n_i)² (`ratio_se`). Every
    result keeps each example's (id, s_i, n_i) (`ItemLosses`), so a difference between two evaluations
    on the same examples -- the loss now and at the last evaluation, or against a reference -- gets the
    paired error `difference_se`, much smaller than either loss's own error when the examples are shared.
    (The ratio estimator is the usual one for a mean over clustered tokens; see e.g. Cochran, Sampling
    Techniques, ch. 6. The formula is written here from that.)

Evaluation budget (training only)
    `budget_subset` keeps a fixed pseudo-random subset of each domain's held-out examples (seeded by the
    domain id alone, so every run on the same data and every evaluation of a run scores the same examples)
    that fits a token budget, `eval.max_tokens_per_domain`. Unset, the budget is `auto_tokens_per_domain`:
    what makes one evaluation cost about `AUTO_EVAL_SHARE` (2 %) of the training time between two
    evaluations, a forward pass costing about a third of a training token's forward + backward.

ZeRO-3 lockstep (DESIGN.md section 4)
    Under ZeRO-3 every forward pass is a collective, so every rank must run the same number of them. Each
    rank takes an even contiguous shard of each domain's examples (`dist.even_shard`), mixes its shards
    into one list and runs ceil(max rank share / micro_batch_size) forward passes; a rank with fewer rows
    fills its last batches with `packing.dummy_row` rows (labels all -100, so they add nothing). The pass
    count depends only on the held-out sizes, which every rank knows, so no communication is needed to
    agree on it. Each example's loss sum and token count are then summed over ranks in one
    `dist.all_reduce_sum` (every rank fills its own examples' slots), so every rank returns the same
    `DomainLosses`.

Forward functions
    `forward_fn(batch)` gets the dict from `packing.collate_rows(..., packed=False)` (input_ids,
    attention_mask, position_ids, labels; CPU tensors) and returns either
      * logits [batch, seq, vocab] (any float dtype; upcast to fp32 here), e.g. `hf_forward(model)`, or
      * a pair (loss_sum_per_row, tokens_per_row), e.g. the engine's `forward_loss_sums`.
    The caller puts the model in eval mode; the forward runs under `torch.no_grad()`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from versatune_ds import dist
from versatune_ds.config.schema import EvalConfig
from versatune_ds.data.packing import Example, Row, collate_rows, dummy_row, row_from_examples
from versatune_ds.data.prepare import PreparedData
from versatune_ds.engine.losses import row_loss_sums

logger = logging.getLogger(__name__)

# batch dict -> logits [B, T, V] or (loss_sum_per_row [B], tokens_per_row [B])
ForwardFn = Callable[[dict[str, torch.Tensor]], Any]  # Any: a tensor, a (sums, counts) pair or a ModelOutput


# Share of the training time between two evaluations that one evaluation may take when
# eval.max_tokens_per_domain is unset (see `auto_tokens_per_domain`).
AUTO_EVAL_SHARE = 0.02
# A held-out token costs about this many training tokens (forward only vs forward + backward).
FORWARD_COST = 1.0 / 3.0
# Fixed seed of the evaluation subset: the same examples for every run on the same data.
SUBSET_SEED = 20241118
# The automatic budget keeps at least this many examples per domain (where there are), so a short
# eval.every with small batches still gives a standard error worth the name; an explicit budget keeps 2.
AUTO_MIN_EXAMPLES = 8


@dataclass(frozen=True)
class ItemLosses:
    """One domain's scored held-out examples: their ids (index in the held-out list), loss sums and tokens."""

    ids: np.ndarray  # int64 [m]
    sums: np.ndarray  # float64 [m]: summed per-token cross-entropy of each example (nats)
    tokens: np.ndarray  # float64 [m]: scored tokens of each example

    @property
    def loss(self) -> float:
        total = float(self.tokens.sum())
        return float(self.sums.sum()) / total if total > 0 else math.nan

    @property
    def se(self) -> float:
        return ratio_se(self.sums, self.tokens)

    def to_json(self) -> dict[str, list]:
        return {"ids": self.ids.tolist(), "sums": self.sums.tolist(), "tokens": self.tokens.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, list]) -> ItemLosses:
        return cls(np.asarray(data["ids"], dtype=np.int64), np.asarray(data["sums"], dtype=np.float64),
                   np.asarray(data["tokens"], dtype=np.float64))


@dataclass(frozen=True)
class DomainLosses:
    """Per-domain held-out results, indexed by domain id. `loss` is NaN for a domain with no response tokens."""

    loss: np.ndarray  # float64 [D]: loss_sum / tokens
    loss_sum: np.ndarray  # float64 [D]: summed per-token cross-entropy (nats)
    tokens: np.ndarray  # float64 [D]: number of response tokens scored
    items: tuple[ItemLosses, ...] = ()  # per domain: every scored example (empty: not kept)

    @property
    def se(self) -> np.ndarray:
        """float64 [D]: standard error of each domain's loss over its examples (NaN below two examples)."""
        if not self.items:
            return np.full(self.loss.shape, np.nan)
        return np.asarray([items.se for items in self.items], dtype=np.float64)

    @property
    def macro_mean(self) -> float:
        """Unweighted mean of the per-domain losses (domains without tokens left out)."""
        finite = self.loss[np.isfinite(self.loss)]
        return float(finite.mean()) if finite.size else float("nan")


def ratio_se(sums: np.ndarray, tokens: np.ndarray) -> float:
    """Standard error of Σ sums / Σ tokens over independent items (delta method); NaN below two items."""
    s = np.asarray(sums, dtype=np.float64)
    n = np.asarray(tokens, dtype=np.float64)
    total = float(n.sum())
    if s.size < 2 or total <= 0:
        return math.nan
    residual = s - (s.sum() / total) * n
    return math.sqrt(s.size / (s.size - 1) * float(np.sum(residual**2))) / total


def difference_se(a: ItemLosses, b: ItemLosses, scale: float = 1.0, b_se: float | None = None) -> float:
    """Standard error of loss(a) − scale·loss(b).

    Paired when both scored the same examples (same ids, same tokens): the ratio error of the per-example
    differences s_a,i − scale·s_b,i. Otherwise the two are independent samples: √(SE_a² + (scale·SE_b)²),
    with `b_se` standing in for b's error when given (b may then hold no examples at all).
    """
    if a.ids.size and a.ids.shape == b.ids.shape and np.array_equal(a.ids, b.ids) and np.array_equal(a.tokens, b.tokens):
        return ratio_se(a.sums - scale * b.sums, a.tokens)
    other = b.se if b_se is None else b_se
    return math.sqrt(a.se**2 + (scale * other) ** 2)


# ----------------------------------------------------------------------------------------------
# Loss sums


def hf_forward(model: torch.nn.Module, device: torch.device | None = None) -> ForwardFn:
    """A `forward_fn` for a Hugging Face causal LM (or `engine.module`): moves the batch and returns logits.

    Labels are not given to the model (its own mean loss is not needed), and `use_cache=False` keeps
    the forward free of KV-cache allocations.
    """

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        target = device
        if target is None:
            target = next(model.parameters()).device
        inputs = {k: v.to(target) for k, v in batch.items() if k != "labels"}
        return model(**inputs, use_cache=False).logits

    return forward


def batch_loss_sums(forward_fn: ForwardFn, batch: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Run `forward_fn` on one batch and return per-row (loss sums, token counts) as float64 arrays."""
    with torch.no_grad():
        out = forward_fn(batch)
        if isinstance(out, (tuple, list)):
            sums, counts = out
        else:
            logits = getattr(out, "logits", out)  # a ModelOutput is accepted too
            sums, counts = row_loss_sums(logits, batch["labels"])
    return (
        torch.as_tensor(sums).detach().double().cpu().numpy(),
        torch.as_tensor(counts).detach().double().cpu().numpy(),
    )


# ----------------------------------------------------------------------------------------------
# The evaluation budget


def auto_tokens_per_domain(every: int, tokens_per_step: int, num_domains: int) -> int:
    """Held-out tokens per domain that make one evaluation cost ~AUTO_EVAL_SHARE of `every` training steps.

    `tokens_per_step` is the global batch in tokens (micro batch × accumulation × world size × seq_len):
    evaluation and training are split over the same ranks, so the share does not depend on the world size.
    """
    budget = AUTO_EVAL_SHARE * every * tokens_per_step / FORWARD_COST / max(num_domains, 1)
    return max(1, int(budget))


def budget_subset(
    examples: Sequence[Example], max_tokens: int | None, domain_id: int, min_examples: int = 2
) -> list[Example]:
    """A fixed subset of `examples` within `max_tokens` tokens (None: all), and at least `min_examples` of them.

    Examples are taken in a pseudo-random order seeded by SUBSET_SEED and the domain id, while they fit;
    one that does not fit is skipped, so a long example does not end the subset early. The subset keeps the
    held-out list's order.
    """
    if max_tokens is None:
        return list(examples)
    order = np.random.default_rng([SUBSET_SEED, domain_id]).permutation(len(examples))
    kept: list[int] = []
    used = 0
    for i in order.tolist():
        size = examples[i].num_tokens
        if used + size <= max_tokens or len(kept) < min_examples:
            kept.append(i)
            used += size
    return [examples[i] for i in sorted(kept)]


def training_heldout_sets(eval_cfg: EvalConfig, data: PreparedData, global_batch_rows: int) -> list[list[Example]]:
    """Each domain's held-out examples scored at every training evaluation (and by a reference model).

    The budget is eval.max_tokens_per_domain, or `auto_tokens_per_domain` for a step of `global_batch_rows`
    rows of the training data's mean row length.
    """
    budget, least = eval_cfg.max_tokens_per_domain, 2
    if budget is None:
        rows = sum(len(d.train_rows) for d in data.per_domain)
        mean_row_tokens = sum(r.num_tokens for d in data.per_domain for r in d.train_rows) / max(rows, 1)
        budget = auto_tokens_per_domain(eval_cfg.every, int(global_batch_rows * mean_row_tokens), len(data.per_domain))
        least = AUTO_MIN_EXAMPLES
    sets = [budget_subset(d.heldout, budget, d.domain_id, least) for d in data.per_domain]
    logger.info(
        "held-out evaluation: %s examples (of %s) and %s tokens per domain; budget %d tokens per domain (%s)",
        "/".join(str(len(s)) for s in sets), "/".join(str(len(d.heldout)) for d in data.per_domain),
        "/".join(str(sum(e.num_tokens for e in s)) for s in sets), budget,
        "eval.max_tokens_per_domain" if eval_cfg.max_tokens_per_domain is not None
        else f"automatic: ~{AUTO_EVAL_SHARE:.0%} of the training time, at least {AUTO_MIN_EXAMPLES} examples",
    )
    return sets


# ----------------------------------------------------------------------------------------------
# Lockstep sharding


def lockstep_num_batches(shard_sizes: Sequence[int], micro_batch_size: int) -> int:
    """Forward passes every rank runs: enough for the largest rank share (at least one if any rank has rows)."""
    return math.ceil(max(shard_sizes, default=0) / micro_batch_size)


def rank_rows(heldout: Sequence[Sequence[Example]], env: dist.DistEnv) -> tuple[list[Row], int]:
    """This rank's rows (its even shard of every domain, longest first) and the largest share of any rank.

    A row is one example; its `example_indices` hold the example's position in its domain's list.
    """
    for domain_id, examples in enumerate(heldout):
        for example in examples:
            if example.domain_id != domain_id:
                raise ValueError(
                    f"held-out example {example.index} has domain_id {example.domain_id} but sits in list {domain_id}"
                )
    shares = [
        sum(len(dist.even_shard(len(examples), env.world_size, r)) for examples in heldout) for r in range(env.world_size)
    ]
    rows = [
        _row_at(examples[i], i)
        for examples in heldout
        for i in dist.even_shard(len(examples), env.world_size, env.rank)
    ]
    # Longest first keeps padding low; ties in a fixed order so every run batches identically.
    rows.sort(key=lambda r: (-r.num_tokens, r.domain_id, r.example_indices))
    return rows, max(shares, default=0)


def _row_at(example: Example, position: int) -> Row:
    row = row_from_examples([example])
    return Row(row.domain_id, row.input_ids, row.labels, row.position_ids, (position,))


def lockstep_batches(rows: Sequence[Row], num_batches: int, micro_batch_size: int, pad_token_id: int) -> list[list[Row]]:
    """`num_batches` batches of this rank's rows; batches past the real rows hold one dummy row."""
    batches: list[list[Row]] = []
    for b in range(num_batches):
        chunk = list(rows[b * micro_batch_size : (b + 1) * micro_batch_size])
        batches.append(chunk if chunk else [dummy_row(pad_token_id)])
    return batches


# ----------------------------------------------------------------------------------------------
# Per-domain held-out loss


def evaluate_domain_losses(
    forward_fn: ForwardFn,
    heldout: Sequence[Sequence[Example]],
    *,
    micro_batch_size: int,
    pad_token_id: int,
    env: dist.DistEnv,
) -> DomainLosses:
    """Per-domain token-weighted mean held-out loss and its standard error; call on ALL ranks with the same `heldout`.

    `heldout[d]` is domain d's held-out list (identical on every rank); every rank scores its even shard
    and runs the same number of forward passes. Returns identical results on every rank, with every
    example's loss sum and tokens (`DomainLosses.items`, ids = the examples' `index`).
    """
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    rows, largest_share = rank_rows(heldout, env)
    num_batches = lockstep_num_batches([largest_share], micro_batch_size)
    offsets = np.cumsum([0] + [len(examples) for examples in heldout])
    # One slot per example: this rank fills its own, the all_reduce below fills the rest.
    per_item = np.zeros(2 * int(offsets[-1]), dtype=np.float64)
    sums, tokens = per_item[: offsets[-1]], per_item[offsets[-1] :]
    for batch_rows in lockstep_batches(rows, num_batches, micro_batch_size, pad_token_id):
        batch = collate_rows(batch_rows, pad_token_id=pad_token_id, packed=False)
        row_sums, row_tokens = batch_loss_sums(forward_fn, batch)
        for row, s, n in zip(batch_rows, row_sums, row_tokens):
            if row.domain_id >= 0:  # dummy rows carry domain -1 and no tokens
                slot = offsets[row.domain_id] + row.example_indices[0]
                sums[slot] = s
                tokens[slot] = n
    total = dist.all_reduce_sum(per_item)
    sums, tokens = total[: offsets[-1]], total[offsets[-1] :]
    items = tuple(
        ItemLosses(
            np.asarray([e.index for e in examples], dtype=np.int64), sums[offsets[d] : offsets[d + 1]].copy(),
            tokens[offsets[d] : offsets[d + 1]].copy(),
        )
        for d, examples in enumerate(heldout)
    )
    domain_sums = np.asarray([i.sums.sum() for i in items], dtype=np.float64)
    domain_tokens = np.asarray([i.tokens.sum() for i in items], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        loss = np.where(domain_tokens > 0, domain_sums / np.maximum(domain_tokens, 1.0), np.nan)
    logger.debug("held-out eval: %d forward passes per rank, %d tokens", num_batches, int(domain_tokens.sum()))
    return DomainLosses(loss=loss, loss_sum=domain_sums, tokens=domain_tokens, items=items)
