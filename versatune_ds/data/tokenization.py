"""Records -> tokens: `datasets.Dataset.map(batched=True)` over the rendered conversations, then the row policies.

Conversations travel as JSON text (Arrow would unify tool-call argument shapes across rows and add nulls).
After tokenization, in row order: a row the template cannot render is a bad row (`data.on_bad_row`); a row
longer than `data.seq_len` follows `data.truncation`; a row left without loss tokens is skipped. Everything
skipped or changed is filed in the domain's diagnostics with its `file:line`.

Progress: the `datasets` progress bar shows on rank 0 on a terminal only; elsewhere rank 0 logs a line when a
split starts and ends, and the other ranks stay quiet.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
import uuid
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from versatune_ds.config.schema import DataConfig
from versatune_ds.data.cache import Tokenized
from versatune_ds.data.diagnostics import Diagnostics
from versatune_ds.data.packing import IGNORE_INDEX
from versatune_ds.data.records import Record
from versatune_ds.data.sources import SKIP_HINT
from versatune_ds.data.templates import ChatTemplate, tokenize_batch
from versatune_ds.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)


def process_rank() -> int:
    """This process's global rank from the launcher's environment (0 outside a launcher); data preparation runs
    before the process group exists, so the environment is all there is."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


@contextlib.contextmanager
def _datasets_progress(show: bool) -> Iterator[None]:
    """Show or hide the `datasets` progress bars for one call, restoring the previous state (a library switch)."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    if was_enabled and not show:
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not show:
            datasets_logging.enable_progress_bar()


def empty_tokenized() -> Tokenized:
    return Tokenized(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))


def tokenize_records(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    data_cfg: DataConfig,
    template: ChatTemplate,
    diagnostics: Diagnostics,
    *,
    tag: str = "",
) -> Tokenized:
    """Tokenize, then apply data.on_bad_row (template errors) and data.truncation, in row order."""
    if not records:
        return empty_tokenized()
    # Imported here, not at the top: `datasets` (with pandas and pyarrow) adds about a second to every rank's
    # start-up, and only the process that tokenizes needs it (the others read the cache).
    from datasets import Dataset

    dataset = Dataset.from_dict({"conversation": [r.conversation_json() for r in records]})
    num_proc = min(data_cfg.num_proc, max(1, len(records) // 64))
    rank_zero = process_rank() == 0
    bar = rank_zero and sys.stderr.isatty()
    if rank_zero and not bar:
        logger.info("tokenizing %s: %d rows", tag, len(records))
    started = time.monotonic()
    with _datasets_progress(bar):
        mapped = dataset.map(
            tokenize_batch,
            batched=True,
            batch_size=256,
            num_proc=num_proc if num_proc > 1 else None,
            fn_kwargs={"tokenizer": tokenizer, "template": template},
            remove_columns=["conversation"],
            new_fingerprint=hashlib.sha256(f"{tag}-{uuid.uuid4()}".encode()).hexdigest()[:16],
            desc=f"tokenizing {tag}".strip(),
        )
    if rank_zero and not bar:
        logger.info("tokenized %s in %.1f s", tag, time.monotonic() - started)
    return _apply_policies(records, mapped, data_cfg, diagnostics)


def _apply_policies(records: Sequence[Record], mapped: Dataset, data_cfg: DataConfig, diagnostics: Diagnostics) -> Tokenized:
    table = mapped.data
    ids_column = table.column("input_ids").combine_chunks()
    labels_column = table.column("labels").combine_chunks()
    errors = table.column("error").to_pylist()
    notes = table.column("note").to_pylist()
    flat_ids = ids_column.values.to_numpy(zero_copy_only=False).astype(np.int64)
    flat_labels = labels_column.values.to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = ids_column.offsets.to_numpy().astype(np.int64)
    label_offsets = labels_column.offsets.to_numpy().astype(np.int64)
    seq_len, policy = data_cfg.seq_len, data_cfg.truncation
    too_long = [i for i in range(len(records)) if not errors[i] and offsets[i + 1] - offsets[i] > seq_len]
    if too_long and policy == "error":
        first = records[too_long[0]]
        raise UserError(
            f"{first.where}: the example has {offsets[too_long[0] + 1] - offsets[too_long[0]]} tokens, more than "
            f"data.seq_len={seq_len} ({len(too_long)} such example(s) in this split); raise data.seq_len, or set "
            "data.truncation=truncate (cut to seq_len) or data.truncation=skip (drop them)"
        )
    keep_ids, keep_labels, lengths = [], [], []
    for i, record in enumerate(records):
        if errors[i]:
            if data_cfg.on_bad_row == "error":
                raise UserError(f"{record.where}: {errors[i]}; {SKIP_HINT}")
            diagnostics.skip(record.file, record.where, "template_error", errors[i])
            continue
        for kind in filter(None, notes[i].split(",")):
            diagnostics.note(kind, record.where)
        start, end = int(offsets[i]), int(offsets[i + 1])
        truncated = end - start > seq_len
        if truncated:
            if policy == "skip":
                diagnostics.skip(record.file, record.where, "too_long", f"{end - start} tokens")
                continue
            end = start + seq_len
            diagnostics.note("truncated", record.where)
        label_start = int(label_offsets[i])
        labels = flat_labels[label_start : label_start + end - start]
        if not (labels != IGNORE_INDEX).any():
            diagnostics.skip(record.file, record.where, "truncated_no_loss" if truncated else "no_loss")
            continue
        keep_ids.append(flat_ids[start:end])
        keep_labels.append(labels)
        lengths.append(end - start)
    if not lengths:
        return empty_tokenized()
    return Tokenized(np.concatenate(keep_ids), np.concatenate(keep_labels), np.array(lengths, dtype=np.int64))
