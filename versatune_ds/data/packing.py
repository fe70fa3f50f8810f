"""Training rows: tokenized examples packed into `seq_len` rows without cross-contamination, and collation.

A *row* is what the sampler draws and the model sees as one batch line. With packing on, a row holds
several examples of one domain back to back; `position_ids` restart at 0 for each example. When the
batch is given to a Hugging Face model **without** an `attention_mask` and with `use_cache=False`,
transformers (>= 4.5x, `masking_utils.find_packed_sequence_indices`) turns the position restarts into a
block-diagonal causal mask for sdpa/eager, and flash-attention-2 uses them as sequence boundaries; so
each example attends only to itself and gives the same per-token logits as when run alone
(tests/test_packing.py proves it). With packing off, a row is one example and the padding collator
builds an ordinary attention mask.

Rows never mix domains, so the sampler's per-domain weights stay exact.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One tokenized example. `labels` is `input_ids` with every non-assistant token set to -100."""

    index: int  # position in its domain's training (or held-out) list; the id used in traces
    domain_id: int
    input_ids: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class Row:
    """One batch line: one example, or several packed examples of the same domain."""

    domain_id: int
    input_ids: np.ndarray  # int64 [n], n <= seq_len
    labels: np.ndarray  # int64 [n]
    position_ids: np.ndarray  # int64 [n], restarting at 0 for each example
    example_indices: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def row_from_examples(examples: Sequence[Example]) -> Row:
    """Concatenate examples (all of one domain) into one row with per-example position ids."""
    if not examples:
        raise ValueError("a row needs at least one example")
    domain_ids = {e.domain_id for e in examples}
    if len(domain_ids) != 1:
        raise ValueError(f"a row must hold examples of one domain, got domain ids {sorted(domain_ids)}")
    return Row(
        domain_id=examples[0].domain_id,
        input_ids=np.concatenate([e.input_ids for e in examples]).astype(np.int64),
        labels=np.concatenate([e.labels for e in examples]).astype(np.int64),
        position_ids=np.concatenate([np.arange(e.num_tokens, dtype=np.int64) for e in examples]),
        example_indices=tuple(e.index for e in examples),
    )


def pack_examples(examples: Sequence[Example], seq_len: int) -> list[Row]:
    """Pack examples into rows of at most `seq_len` tokens by best-fit decreasing.

    Best-fit decreasing puts each example, longest first, into the open row with the least room that
    still fits it; it is deterministic (ties broken by example index) and fills rows to well above 95 %
    on SFT-length data. Examples longer than `seq_len` are a bug here: the data pipeline applies the
    truncation policy before packing.
    """
    too_long = [e.index for e in examples if e.num_tokens > seq_len]
    if too_long:
        raise ValueError(f"examples {too_long[:5]} are longer than seq_len={seq_len}; truncate them before packing")
    order = sorted(range(len(examples)), key=lambda i: (-examples[i].num_tokens, examples[i].index))
    bins: list[list[int]] = []
    # (room left, bin number) kept sorted, so the tightest bin that fits is one bisect away.
    rooms: list[tuple[int, int]] = []
    for i in order:
        size = examples[i].num_tokens
        at = bisect.bisect_left(rooms, (size, -1))
        if at == len(rooms):
            bins.append([i])
            bisect.insort(rooms, (seq_len - size, len(bins) - 1))
            continue
        room, bin_number = rooms.pop(at)
        bins[bin_number].append(i)
        bisect.insort(rooms, (room - size, bin_number))
    return [row_from_examples([examples[i] for i in members]) for members in bins]


def rows_without_packing(examples: Sequence[Example]) -> list[Row]:
    return [row_from_examples([e]) for e in examples]


def packing_efficiency(rows: Sequence[Row], seq_len: int) -> float:
    """Share of non-pad tokens when every row is padded to `seq_len`."""
    if not rows:
        return 0.0
    return sum(r.num_tokens for r in rows) / (len(rows) * seq_len)


def padding_efficiency(rows: Sequence[Row], batch_size: int) -> float:
    """Share of non-pad tokens when consecutive batches of `batch_size` rows are padded to their longest row."""
    if not rows:
        return 0.0
    real = padded = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        real += sum(r.num_tokens for r in batch)
        padded += max(r.num_tokens for r in batch) * len(batch)
    return real / padded


def collate_rows(rows: Sequence[Row], *, pad_token_id: int, packed: bool, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Stack rows into torch tensors padded on the right (to the longest row, or to `pad_to`).

    Packed rows get `position_ids` and **no** attention mask (the model derives the block-diagonal mask
    from the position restarts; pad positions count on from 0 as one more masked-out "sequence").
    Unpacked rows get an ordinary `attention_mask`. Pad labels are -100 either way. A row may be a
    dummy (see `dummy_row`) that only keeps ranks in lockstep: its labels are all -100.
    """
    length = max(r.num_tokens for r in rows) if pad_to is None else pad_to
    batch = len(rows)
    input_ids = np.full((batch, length), pad_token_id, dtype=np.int64)
    labels = np.full((batch, length), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((batch, length), dtype=np.int64)
    attention_mask = np.zeros((batch, length), dtype=np.int64)
    for b, row in enumerate(rows):
        n = row.num_tokens
        input_ids[b, :n] = row.input_ids
        labels[b, :n] = row.labels
        position_ids[b, :n] = row.position_ids
        position_ids[b, n:] = np.arange(length - n)
        attention_mask[b, :n] = 1
    out = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
    }
    if not packed:
        out["attention_mask"] = torch.from_numpy(attention_mask)
    return out


def collate_flat(rows: Sequence[Row]) -> dict[str, torch.Tensor]:
    """The rows laid end to end as one `[1, T]` sequence (T = their total length): no pad position at all.

    `position_ids` restart at 0 at every example (the rows' own), which is where an attention that reads
    documents (engine.document_attention, flash-attention) cuts; labels are the rows' own, so every example's
    tokens and loss positions are exactly those of `collate_rows`. Rows stay whole and in order, so
    `labels.reshape(-1)` is the rows' labels concatenated.
    """
    return {
        "input_ids": torch.from_numpy(np.concatenate([r.input_ids for r in rows]).astype(np.int64)[None]),
        "labels": torch.from_numpy(np.concatenate([r.labels for r in rows]).astype(np.int64)[None]),
        "position_ids": torch.from_numpy(np.concatenate([r.position_ids for r in rows]).astype(np.int64)[None]),
    }


def dummy_row(pad_token_id: int, domain_id: int = -1) -> Row:
    """A one-token row with no loss tokens: filler so every rank runs the same number of forward passes."""
    return Row(
        domain_id=domain_id,
        input_ids=np.array([pad_token_id], dtype=np.int64),
        labels=np.array([IGNORE_INDEX], dtype=np.int64),
        position_ids=np.zeros(1, dtype=np.int64),
        example_indices=(),
    )
