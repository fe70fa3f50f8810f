"""Per-domain held-out loss, in ZeRO-3 lockstep (used by the train loop and the `eval` command).

Per-domain loss
    `evaluate_domain_losses` computes, for every domain d, the token-weighted mean cross-entropy over the
    response tokens (label != -100) of d's held-out examples:

        loss_d = sum over d's examples and response tokens t of -log p(token_t | tokens_<t) / (number of those tokens)

    with the shift-by-one of Hugging Face's causal-LM loss (engine.losses.row_loss_sums), in fp32.
    For one example this is exactly `model(input_ids, labels=labels).loss`.

ZeRO-3 lockstep (DESIGN.md section 4)
    Under ZeRO-3 every forward pass is a collective, so every rank must run the same number of them. Each
    rank takes an even contiguous shard of each domain's examples (`dist.even_shard`), mixes its shards
    into one list and runs ceil(max rank share / micro_batch_size) forward passes; a rank with fewer rows
    fills its last batches with `packing.dummy_row` rows (labels all -100, so they add nothing). The pass
    count depends only on the held-out sizes, which every rank knows, so no communication is needed to
    agree on it. Loss sums and token counts are then summed over ranks (`dist.all_reduce_sum`), so every
    rank returns the same `DomainLosses`.

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
from versatune_ds.data.packing import Example, Row, collate_rows, dummy_row, row_from_examples
from versatune_ds.engine.losses import row_loss_sums

logger = logging.getLogger(__name__)

# batch dict -> logits [B, T, V] or (loss_sum_per_row [B], tokens_per_row [B])
ForwardFn = Callable[[dict[str, torch.Tensor]], Any]  # Any: a tensor, a (sums, counts) pair or a ModelOutput


@dataclass(frozen=True)
class DomainLosses:
    """Per-domain held-out results, indexed by domain id. `loss` is NaN for a domain with no response tokens."""

    loss: np.ndarray  # float64 [D]: loss_sum / tokens
    loss_sum: np.ndarray  # float64 [D]: summed per-token cross-entropy (nats)
    tokens: np.ndarray  # float64 [D]: number of response tokens scored

    @property
    def macro_mean(self) -> float:
        """Unweighted mean of the per-domain losses (domains without tokens left out)."""
        finite = self.loss[np.isfinite(self.loss)]
        return float(finite.mean()) if finite.size else float("nan")


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
# Lockstep sharding


def lockstep_num_batches(shard_sizes: Sequence[int], micro_batch_size: int) -> int:
    """Forward passes every rank runs: enough for the largest rank share (at least one if any rank has rows)."""
    return math.ceil(max(shard_sizes, default=0) / micro_batch_size)


def rank_rows(heldout: Sequence[Sequence[Example]], env: dist.DistEnv) -> tuple[list[Row], int]:
    """This rank's rows (its even shard of every domain, longest first) and the largest share of any rank."""
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
        row_from_examples([examples[i]])
        for examples in heldout
        for i in dist.even_shard(len(examples), env.world_size, env.rank)
    ]
    # Longest first keeps padding low; ties in a fixed order so every run batches identically.
    rows.sort(key=lambda r: (-r.num_tokens, r.domain_id, r.example_indices))
    return rows, max(shares, default=0)


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
    """Per-domain token-weighted mean held-out loss; call on ALL ranks with the same `heldout`.

    `heldout[d]` is domain d's full held-out list (identical on every rank); every rank scores its
    even shard and runs the same number of forward passes. Returns identical results on every rank.
    """
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    num_domains = len(heldout)
    rows, largest_share = rank_rows(heldout, env)
    num_batches = lockstep_num_batches([largest_share], micro_batch_size)
    sums = np.zeros(num_domains, dtype=np.float64)
    tokens = np.zeros(num_domains, dtype=np.float64)
    for batch_rows in lockstep_batches(rows, num_batches, micro_batch_size, pad_token_id):
        batch = collate_rows(batch_rows, pad_token_id=pad_token_id, packed=False)
        row_sums, row_tokens = batch_loss_sums(forward_fn, batch)
        for row, s, n in zip(batch_rows, row_sums, row_tokens):
            if row.domain_id >= 0:  # dummy rows carry domain -1 and no tokens
                sums[row.domain_id] += s
                tokens[row.domain_id] += n
    total = dist.all_reduce_sum(np.concatenate([sums, tokens]))
    sums, tokens = total[:num_domains], total[num_domains:]
    with np.errstate(invalid="ignore", divide="ignore"):
        loss = np.where(tokens > 0, sums / np.maximum(tokens, 1.0), np.nan)
    logger.debug("held-out eval: %d forward passes per rank, %d tokens", num_batches, int(tokens.sum()))
    return DomainLosses(loss=loss, loss_sum=sums, tokens=tokens)
