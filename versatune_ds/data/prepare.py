"""The data pipeline: sources -> rows -> conversations -> tokens with assistant-only labels -> packed rows.

Per domain (by integer id, in the order of `data.domains`):

1. Read every source (data.sources): JSONL, JSON, CSV/TSV, parquet, a folder of such files, or `hf:<name>[:<split>]`.
   Each row keeps its `file:line`.
2. Tell each file's format (`format: auto`: from its first row; every row must then match) and turn rows into
   conversations (data.records -> data.formats, data.conversation). Bad rows stop with a `UserError` naming
   file:line, or with `data.on_bad_row=skip` are counted per file; rows with nothing to learn are skipped and
   counted; every skip and every quirk is summarised in one warning per domain (data.diagnostics).
3. Split off held-out rows (explicit `heldout` sources, or a fixed-seed sample of the training rows that
   training never sees), cap the training rows (`data.max_examples_per_domain`).
4. Render with the chat template (data.templates) and tokenize with `datasets.Dataset.map` (data.tokenization),
   apply `data.truncation`.
5. Cache the tokens under `data.cache_dir` (data.cache), keyed by a hash of the file contents, the tokenizer,
   the template and every setting that changes the tokens; a second run loads them instead of tokenizing. The
   first process to need a domain tokenizes it under a file lock while the others wait for its file.
6. Pack (`data.packing`, data.packing) or keep one example per row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from versatune_ds.config.schema import DataConfig, DomainConfig
from versatune_ds.data.cache import CACHE_VERSION, Tokenized, cache_lock, read_cache, write_cache
from versatune_ds.data.diagnostics import Diagnostics
from versatune_ds.data.packing import IGNORE_INDEX, Example, Row, pack_examples, rows_without_packing
from versatune_ds.data.records import read_records
from versatune_ds.data.sources import expand_source, file_hash
from versatune_ds.data.templates import ChatTemplate, resolve_template
from versatune_ds.data.tokenization import process_rank, tokenize_records
from versatune_ds.data.tokenizer import tokenizer_fingerprint
from versatune_ds.domains import Domains
from versatune_ds.errors import UserError

logger = logging.getLogger(__name__)

# The data.* settings that change the cached tokens (besides the files, the tokenizer, the template and the domain).
_TOKEN_SETTINGS = (
    "seq_len", "truncation", "on_bad_row", "heldout_fraction", "heldout_max_examples", "max_examples_per_domain",
    "loss_on", "max_row_bytes",
)

@dataclass(frozen=True)
class DomainData:
    domain_id: int
    train_rows: list[Row]  # packed rows (data.packing) or one example per row
    train_examples: int  # counts after bad-row skipping / truncation policy
    train_tokens: int  # all tokens of the training examples
    train_loss_tokens: int  # tokens with a label (assistant tokens)
    heldout: list[Example]  # never sampled for training
    fingerprint: str  # content hash of sources + tokenizer + settings (resume refuses a change)
    skipped: dict[str, int]  # file -> rows skipped (bad rows, nothing to learn, too long)


@dataclass(frozen=True)
class PreparedData:
    domains: Domains
    per_domain: tuple[DomainData, ...]
    seq_len: int
    packed: bool
    pad_token_id: int


def log_diagnostics(diagnostics: Diagnostics, domain_name: str) -> None:
    """One warning per domain; from rank 0 only, since every rank reads the same data and would repeat it."""
    summary = diagnostics.summary(domain_name)
    if summary:
        logger.log(logging.WARNING if process_rank() == 0 else logging.DEBUG, summary)


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


def log_data_sources(data_cfg: DataConfig) -> None:
    """Say which files (resolved, absolute) each domain trains and evaluates on, before they are read."""
    for domain in data_cfg.domains:
        for kind in ("train", "heldout", "raw"):
            sources = getattr(domain, kind)
            if sources:
                resolved = [s if s.startswith("hf:") else str(Path(s).expanduser().resolve()) for s in sources]
                logger.info("domain %s %s data: %s", domain.name, kind, ", ".join(resolved))


def prepare_data(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Tokenized training rows and held-out examples of every domain (cached; safe when every rank calls it)."""
    domains = Domains.from_names([d.name for d in data_cfg.domains])
    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no pad token; load it with versatune_ds.data.tokenizer.load_tokenizer, which sets one")
    template = resolve_template(tokenizer, data_cfg.template)
    tok_hash = tokenizer_fingerprint(tokenizer)
    per_domain = []
    for domain_id, domain in enumerate(data_cfg.domains):
        train, heldout, diagnostics, content_key = _load_domain(data_cfg, domain_id, domain, tokenizer, template, tok_hash)
        log_diagnostics(diagnostics, domain.name)
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
            skipped=dict(diagnostics.skipped),
        )
        logger.info(
            "domain %s: %d training examples (%d tokens, %d loss tokens) in %d rows, %d held-out examples",
            domain.name, data.train_examples, data.train_tokens, data.train_loss_tokens, len(rows), len(data.heldout),
        )
        per_domain.append(data)
    return PreparedData(domains, tuple(per_domain), data_cfg.seq_len, data_cfg.packing, int(tokenizer.pad_token_id))


def domain_files(domain: DomainConfig, key: str) -> tuple[list[str], list[str]]:
    """(training files, held-out files) of a domain's sources."""
    train = [f for i, s in enumerate(domain.train) for f in expand_source(s, f"{key}.train[{i}]")]
    heldout = [f for i, s in enumerate(domain.heldout) for f in expand_source(s, f"{key}.heldout[{i}]")]
    return train, heldout


def _load_domain(
    data_cfg: DataConfig, domain_id: int, domain: DomainConfig, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, tok_hash: str
) -> tuple[Tokenized, Tokenized, Diagnostics, str]:
    key = f"data.domains[{domain_id}]"
    train_files, heldout_files = domain_files(domain, key)
    all_files = train_files + heldout_files
    settings = {
        "version": CACHE_VERSION,
        "train": [file_hash(f) for f in train_files],
        "heldout": [file_hash(f) for f in heldout_files],
        "format": domain.format,
        "columns": dataclasses.asdict(domain.columns) if domain.columns else None,
        "tokenizer": tok_hash,
        "template": template.fingerprint,
        **{k: getattr(data_cfg, k) for k in _TOKEN_SETTINGS},
    }
    content_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    cache_file = Path(os.path.expanduser(data_cfg.cache_dir)) / "tokenized" / f"{content_key[:32]}.npz"
    cached = read_cache(cache_file)
    if cached is None:
        with cache_lock(cache_file, data_cfg.lock_timeout_s, f"domain {domain.name}"):
            cached = read_cache(cache_file)  # written by the process we waited for
            if cached is None:
                # The held-out split is seeded by the training files' contents only, not by train.seed, the tokenizer or
                # seq_len: runs that differ in those are evaluated on the same rows.
                split_seed = int(hashlib.sha256(" ".join(settings["train"]).encode()).hexdigest()[:15], 16)
                train, heldout, diagnostics = _tokenize_domain(
                    data_cfg, domain, key, train_files, heldout_files, tokenizer, template, split_seed
                )
                meta = diagnostics.to_json()
                meta["skipped"] = {str(all_files.index(f)): n for f, n in diagnostics.skipped.items()}
                write_cache(cache_file, train, heldout, {"diagnostics": meta})
                return train, heldout, diagnostics, content_key
    train, heldout, meta = cached
    logger.info("domain %s: cache hit (%s), tokenization skipped", domain.name, cache_file)
    stored = dict(meta["diagnostics"])
    stored["skipped"] = {all_files[int(i)]: n for i, n in stored["skipped"].items()}
    return train, heldout, Diagnostics.from_json(stored), content_key


def _tokenize_domain(
    data_cfg: DataConfig,
    domain: DomainConfig,
    key: str,
    train_files: list[str],
    heldout_files: list[str],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    split_seed: int,
) -> tuple[Tokenized, Tokenized, Diagnostics]:
    diagnostics = Diagnostics()
    records = read_records(train_files, domain, data_cfg, key, diagnostics)
    if heldout_files:
        heldout_records = read_records(heldout_files, domain, data_cfg, key, diagnostics, split="heldout")
    else:
        try:
            train_index, heldout_index = split_heldout(len(records), data_cfg.heldout_fraction, data_cfg.heldout_max_examples, split_seed)
        except ValueError as exc:
            raise UserError(
                f"{key}: domain {domain.name!r} has no held-out data: {exc}; add rows or give {key}.heldout files"
            ) from None
        heldout_records = [records[i] for i in heldout_index]
        records = [records[i] for i in train_index]
    if data_cfg.max_examples_per_domain is not None:
        records = records[: data_cfg.max_examples_per_domain]
    train = tokenize_records(records, tokenizer, data_cfg, template, diagnostics, tag=f"{domain.name} train")
    heldout = tokenize_records(heldout_records, tokenizer, data_cfg, template, diagnostics, tag=f"{domain.name} held-out")
    if train.lengths.size == 0:
        raise UserError(
            f"{key}: domain {domain.name!r} has no training examples left after data.truncation={data_cfg.truncation} "
            f"and data.on_bad_row={data_cfg.on_bad_row} ({diagnostics.num_skipped} rows skipped); raise data.seq_len or fix the rows"
        )
    if heldout.lengths.size == 0:
        where = f"{key}.heldout" if heldout_files else key
        raise UserError(
            f"{where}: domain {domain.name!r} has no held-out data; add rows to its held-out files "
            f"or remove {key}.heldout to split from train"
        )
    return train, heldout, diagnostics


# ----------------------------------------------------------------------------------------------
# Other entry points


def tokenize_sft_file(
    path: str, tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig, domains: Domains, domain_id: int, fmt: str = "auto"
) -> list[Example]:
    """Tokenized examples of any SFT file / folder / hf: source (for `eval`), with the run's template and policies
    (and the domain's format and column mapping when the run config has the domain)."""
    name = domains.name_of(domain_id)
    configured = next((d for d in data_cfg.domains if d.name == name), None)
    domain = DomainConfig(name=name, format=fmt if fmt != "auto" or configured is None else configured.format,
                          columns=configured.columns if configured is not None else None)
    diagnostics = Diagnostics()
    records = read_records(expand_source(path, f"domain {name}"), domain, data_cfg, f"domain {name}", diagnostics, split=None)
    template = resolve_template(tokenizer, data_cfg.template)
    tokenized = tokenize_records(records, tokenizer, data_cfg, template, diagnostics, tag=f"{name} {Path(path).name}")
    log_diagnostics(diagnostics, name)
    if tokenized.lengths.size == 0:
        raise UserError(f"{path}: domain {name}: no usable examples ({diagnostics.num_skipped} skipped)")
    return tokenized.examples(domain_id)


