"""The data pipeline: sources -> rows -> messages -> tokens with assistant-only labels -> packed rows.

Per domain (by integer id, in the order of `data.domains`):

1. Read every source (data.sources): a JSONL / JSON (list of objects) / parquet file, a folder of such files, or a
   Hugging Face data set written `hf:<name>[:<split>]`. Each row keeps its `file:line` for messages.
2. Check the format (`format: auto` detects it from a file's first row; every row must then match),
   and turn rows into messages (data.formats). Bad rows stop with a `UserError` naming
   file:line, or with `data.on_bad_row=skip` are counted per file and reported.
3. Split off held-out rows (explicit `heldout` sources, or a fixed-seed sample of the training rows that
   training never sees), cap the training rows (`data.max_examples_per_domain`).
4. Tokenize with `datasets.Dataset.map(batched=True, num_proc=...)`, apply `data.truncation`.
5. Cache the tokens under `data.cache_dir` (data.cache), keyed by a hash of the file contents, the
   tokenizer and every setting that changes the tokens; a second run loads them instead of tokenizing.
   Cache files are written atomically, so ranks that prepare at once never read a half-written file.
6. Pack (`data.packing`, data.packing) or keep one example per row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from versatune_ds.config.schema import DataConfig, DomainConfig
from versatune_ds.data import templates
from versatune_ds.data.cache import CACHE_VERSION, Tokenized, read_cache, write_cache
from versatune_ds.data.packing import IGNORE_INDEX, Example, Row, pack_examples, rows_without_packing
from versatune_ds.data.sources import SKIP_HINT, Record, expand_source, file_hash, read_raw_texts, read_records
from versatune_ds.data.tokenizer import tokenizer_fingerprint
from versatune_ds.domains import Domains
from versatune_ds.errors import UserError

logger = logging.getLogger(__name__)

# The data.* settings that change the cached tokens (besides the files, the tokenizer, the template and the format).
_TOKEN_SETTINGS = ("seq_len", "truncation", "on_bad_row", "heldout_fraction", "heldout_max_examples", "max_examples_per_domain")


@dataclass(frozen=True)
class DomainData:
    domain_id: int
    train_rows: list[Row]  # packed rows (data.packing) or one example per row
    train_examples: int  # counts after bad-row skipping / truncation policy
    train_tokens: int  # all tokens of the training examples
    train_loss_tokens: int  # tokens with a label (assistant tokens)
    heldout: list[Example]  # never sampled for training
    fingerprint: str  # content hash of sources + tokenizer + settings (resume refuses a change)
    skipped: dict[str, int]  # file -> rows skipped (data.on_bad_row=skip / truncation=skip)


@dataclass(frozen=True)
class PreparedData:
    domains: Domains
    per_domain: tuple[DomainData, ...]
    seq_len: int
    packed: bool
    pad_token_id: int


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _warn_skipped(skipped: dict[str, int], domain_name: str) -> None:
    for file, count in skipped.items():
        logger.warning(
            "domain %s: skipped %d row(s) of %s (bad rows with data.on_bad_row=skip, too long with data.truncation=skip, "
            "or truncated until no assistant token was left)", domain_name, count, file,
        )


# ----------------------------------------------------------------------------------------------
# Tokenization


def tokenize_records(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig, template: str, skipped: dict[str, int], *, tag: str = ""
) -> Tokenized:
    """Tokenize with `Dataset.map(batched=True)`, then apply data.on_bad_row and data.truncation in order."""
    if not records:
        return Tokenized(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    dataset = Dataset.from_dict({"messages": [r.messages for r in records]})
    num_proc = min(data_cfg.num_proc, max(1, len(records) // 64))
    mapped = dataset.map(
        templates.tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "template": template},
        remove_columns=["messages"],
        new_fingerprint=hashlib.sha256(f"{tag}-{uuid.uuid4()}".encode()).hexdigest()[:16],
        desc=f"tokenizing {tag}".strip(),
    )
    table = mapped.data
    ids_column = table.column("input_ids").combine_chunks()
    labels_column = table.column("labels").combine_chunks()
    errors = table.column("error").to_pylist()
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
            f"data.seq_len={seq_len} ({len(too_long)} such example(s) in this domain); raise data.seq_len, or set "
            "data.truncation=truncate (cut to seq_len) or data.truncation=skip (drop them)"
        )
    keep_ids, keep_labels, lengths = [], [], []
    for i, record in enumerate(records):
        if errors[i]:
            if data_cfg.on_bad_row == "error":
                raise UserError(f"{record.where}: {errors[i]}; {SKIP_HINT}")
            skipped[record.file] = skipped.get(record.file, 0) + 1
            continue
        start, end = int(offsets[i]), int(offsets[i + 1])
        if end - start > seq_len:
            if policy == "skip":
                skipped[record.file] = skipped.get(record.file, 0) + 1
                continue
            end = start + seq_len
        if not (flat_labels[start:end] != IGNORE_INDEX).any():  # truncation cut off every assistant token
            skipped[record.file] = skipped.get(record.file, 0) + 1
            continue
        keep_ids.append(flat_ids[start:end])
        label_start = int(label_offsets[i])
        keep_labels.append(flat_labels[label_start : label_start + end - start])
        lengths.append(end - start)
    if not lengths:
        return Tokenized(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    return Tokenized(np.concatenate(keep_ids), np.concatenate(keep_labels), np.array(lengths, dtype=np.int64))


# ----------------------------------------------------------------------------------------------
# Held-out split


def split_heldout(num_rows: int, fraction: float, max_examples: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), both sorted: max(1, min(max_examples, round(fraction·n))) rows held out."""
    count = max(1, min(max_examples, round(fraction * num_rows)))
    if num_rows - count < 1:
        raise ValueError(f"{num_rows} row(s) cannot give {count} held-out row(s) and keep at least one for training")
    order = np.random.default_rng(seed).permutation(num_rows)
    return sorted(order[count:].tolist()), sorted(order[:count].tolist())


# ----------------------------------------------------------------------------------------------
# Prepare


def prepare_data(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Tokenized training rows and held-out examples of every domain (cached; safe when every rank calls it)."""
    domains = Domains.from_names([d.name for d in data_cfg.domains])
    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no pad token; load it with versatune_ds.data.tokenizer.load_tokenizer, which sets one")
    template = _resolve_template(tokenizer, data_cfg.template)
    tok_hash = tokenizer_fingerprint(tokenizer)
    per_domain = []
    for domain_id, domain in enumerate(data_cfg.domains):
        train, heldout, skipped, content_key = _load_domain(data_cfg, domain_id, domain, tokenizer, template, tok_hash)
        train_examples = train.examples(domain_id)
        rows = pack_examples(train_examples, data_cfg.seq_len) if data_cfg.packing else rows_without_packing(train_examples)
        fingerprint = hashlib.sha256(f"{content_key}|packing={data_cfg.packing}".encode()).hexdigest()[:16]
        data = DomainData(
            domain_id=domain_id,
            train_rows=rows,
            train_examples=len(train_examples),
            train_tokens=int(train.lengths.sum()),
            train_loss_tokens=int((train.labels != IGNORE_INDEX).sum()),
            heldout=heldout.examples(domain_id),
            fingerprint=fingerprint,
            skipped=skipped,
        )
        logger.info(
            "domain %s: %d training examples (%d tokens, %d loss tokens) in %d rows, %d held-out examples",
            domain.name, data.train_examples, data.train_tokens, data.train_loss_tokens, len(rows), len(data.heldout),
        )
        per_domain.append(data)
    return PreparedData(domains, tuple(per_domain), data_cfg.seq_len, data_cfg.packing, int(tokenizer.pad_token_id))


def _resolve_template(tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    try:
        return templates.resolve_template(tokenizer, template)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _load_domain(
    data_cfg: DataConfig, domain_id: int, domain: DomainConfig, tokenizer: PreTrainedTokenizerBase, template: str, tok_hash: str
) -> tuple[Tokenized, Tokenized, dict[str, int], str]:
    key = f"data.domains[{domain_id}]"
    train_files = [f for i, s in enumerate(domain.train) for f in expand_source(s, f"{key}.train[{i}]")]
    heldout_files = [f for i, s in enumerate(domain.heldout) for f in expand_source(s, f"{key}.heldout[{i}]")]
    all_files = train_files + heldout_files
    settings = {
        "version": CACHE_VERSION,
        "train": [file_hash(f) for f in train_files],
        "heldout": [file_hash(f) for f in heldout_files],
        "format": domain.format,
        "tokenizer": tok_hash,
        "template": template,
        **{k: getattr(data_cfg, k) for k in _TOKEN_SETTINGS},
    }
    content_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    cache_file = Path(os.path.expanduser(data_cfg.cache_dir)) / "tokenized" / f"{content_key[:32]}.npz"
    cached = read_cache(cache_file)
    if cached is not None:
        train, heldout, skipped_by_index = cached
        logger.info("domain %s: cache hit (%s), tokenization skipped", domain.name, cache_file)
        skipped = {all_files[int(i)]: n for i, n in skipped_by_index.items()}
    else:
        # The held-out split is seeded by the training files' contents only, not by train.seed, the tokenizer or
        # seq_len: runs that differ in those are evaluated on the same rows.
        split_seed = int(hashlib.sha256(" ".join(settings["train"]).encode()).hexdigest()[:15], 16)
        train, heldout, skipped = _tokenize_domain(data_cfg, domain, key, train_files, heldout_files, tokenizer, template, split_seed)
        write_cache(cache_file, train, heldout, {str(all_files.index(f)): n for f, n in skipped.items()})
    _warn_skipped(skipped, domain.name)
    return train, heldout, skipped, content_key


def _tokenize_domain(
    data_cfg: DataConfig,
    domain: DomainConfig,
    key: str,
    train_files: list[str],
    heldout_files: list[str],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    split_seed: int,
) -> tuple[Tokenized, Tokenized, dict[str, int]]:
    skipped: dict[str, int] = {}
    records = read_records(train_files, domain.format, data_cfg.on_bad_row, key, skipped)
    if not records:
        raise UserError(
            f"{key}.train: domain {domain.name!r} has no usable rows in {', '.join(train_files)} "
            f"({sum(skipped.values())} skipped); add rows or fix the files"
        )
    if heldout_files:
        heldout_records = read_records(heldout_files, domain.format, data_cfg.on_bad_row, key, skipped)
    else:
        try:
            train_index, heldout_index = split_heldout(
                len(records), data_cfg.heldout_fraction, data_cfg.heldout_max_examples, split_seed
            )
        except ValueError as exc:
            raise UserError(
                f"{key}: domain {domain.name!r} has no held-out data: {exc}; add rows or give {key}.heldout files"
            ) from None
        heldout_records = [records[i] for i in heldout_index]
        records = [records[i] for i in train_index]
    if data_cfg.max_examples_per_domain is not None:
        records = records[: data_cfg.max_examples_per_domain]
    train = tokenize_records(records, tokenizer, data_cfg, template, skipped, tag=f"{domain.name} train")
    heldout = tokenize_records(heldout_records, tokenizer, data_cfg, template, skipped, tag=f"{domain.name} held-out")
    if train.lengths.size == 0:
        raise UserError(
            f"{key}: domain {domain.name!r} has no training examples left after "
            f"data.truncation={data_cfg.truncation}; raise data.seq_len"
        )
    if heldout.lengths.size == 0:
        where = f"{key}.heldout" if heldout_files else key
        raise UserError(
            f"{where}: domain {domain.name!r} has no held-out data; add rows to its held-out files "
            f"or remove {key}.heldout to split from train"
        )
    return train, heldout, skipped


# ----------------------------------------------------------------------------------------------
# Other entry points


def tokenize_sft_file(
    path: str, tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig, domains: Domains, domain_id: int, fmt: str = "auto"
) -> list[Example]:
    """Tokenized examples of any SFT file / folder / hf: source (for `eval`), with the run's template and policies."""
    skipped: dict[str, int] = {}
    records = read_records(expand_source(path, "path"), fmt, data_cfg.on_bad_row, "path", skipped)
    template = _resolve_template(tokenizer, data_cfg.template)
    tokenized = tokenize_records(records, tokenizer, data_cfg, template, skipped, tag=Path(path).name)
    _warn_skipped(skipped, domains.name_of(domain_id))
    if tokenized.lengths.size == 0:
        raise UserError(f"{path}: no usable examples ({sum(skipped.values())} skipped)")
    return tokenized.examples(domain_id)


def domain_texts(data_cfg: DataConfig) -> tuple[list[str], list[int]]:
    """Plain texts and domain ids of every domain's training sources (alpaca: instruction + input + output;
    chats: all turn contents) and its `raw` sources (field `text`), for training the probe classifier."""
    texts: list[str] = []
    ids: list[int] = []
    for domain_id, domain in enumerate(data_cfg.domains):
        key = f"data.domains[{domain_id}]"
        skipped: dict[str, int] = {}
        files = [f for i, s in enumerate(domain.train) for f in expand_source(s, f"{key}.train[{i}]")]
        records = read_records(files, domain.format, data_cfg.on_bad_row, key, skipped)
        if data_cfg.max_examples_per_domain is not None:
            records = records[: data_cfg.max_examples_per_domain]
        domain_texts_ = ["\n".join(m["content"] for m in r.messages if m["content"]) for r in records]
        for i, source in enumerate(domain.raw):
            for file in expand_source(source, f"{key}.raw[{i}]"):
                domain_texts_.extend(read_raw_texts(file, data_cfg.on_bad_row, skipped))
        _warn_skipped(skipped, domain.name)
        if not domain_texts_:
            raise UserError(f"{key}: domain {domain.name!r} has no text to train the classifier on; add rows")
        texts.extend(domain_texts_)
        ids.extend([domain_id] * len(domain_texts_))
    return texts, ids
