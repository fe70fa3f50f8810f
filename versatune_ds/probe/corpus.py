"""The classifier's training texts: every domain's SFT rows and raw passages, with their parts.

Every SFT row keeps, besides its plain text (all turn contents joined with a newline), its
turns as separate parts (`segments`), which the style augmentation trains on one at a time; a raw passage has
no parts. `fingerprint` identifies the corpus, so a saved classifier is reused only for the texts it was
trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from versatune_ds.config.schema import DataConfig
from versatune_ds.data.conversation import Conversation, plain_text
from versatune_ds.data.diagnostics import Diagnostics
from versatune_ds.data.prepare import domain_files, log_diagnostics
from versatune_ds.data.records import read_records
from versatune_ds.data.sources import expand_source, read_raw_texts
from versatune_ds.errors import UserError


@dataclass(frozen=True)
class ClassifierCorpus:
    texts: list[str]
    labels: np.ndarray  # domain id per text
    segments: list[tuple[str, ...]]  # an SFT row's turn contents; () for a raw passage
    is_raw: np.ndarray  # bool per text

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for text, label, parts in zip(self.texts, self.labels.tolist(), self.segments):
            digest.update(f"{label}\x00{len(parts)}\x00".encode())
            digest.update(text.encode("utf-8", "surrogatepass") + b"\x00")
        return digest.hexdigest()[:24]


def classifier_corpus(data_cfg: DataConfig) -> ClassifierCorpus:
    """Plain texts, domain ids and parts of every domain's training sources (all turn contents, joined with a
    newline) and its `raw` sources (field `text`)."""
    texts: list[str] = []
    labels: list[int] = []
    segments: list[tuple[str, ...]] = []
    is_raw: list[bool] = []
    for domain_id, domain in enumerate(data_cfg.domains):
        key = f"data.domains[{domain_id}]"
        diagnostics = Diagnostics()
        files, _ = domain_files(domain, key)
        records = read_records(files, domain, data_cfg, key, diagnostics, limit=data_cfg.max_examples_per_domain)
        before = len(texts)
        for record in records:
            text = plain_text(Conversation(record.messages, record.tools))
            if text:
                texts.append(text)
                segments.append(tuple(m["content"] for m in record.messages if isinstance(m["content"], str) and m["content"]))
                is_raw.append(False)
        for i, source in enumerate(domain.raw):
            for file in expand_source(source, f"{key}.raw[{i}]"):
                passages = read_raw_texts(file, data_cfg.on_bad_row, diagnostics.skipped, data_cfg.max_row_bytes)
                texts.extend(passages)
                segments.extend(() for _ in passages)
                is_raw.extend(True for _ in passages)
        log_diagnostics(diagnostics, domain.name)
        if len(texts) == before:
            raise UserError(f"{key}: domain {domain.name!r} has no text to train the classifier on; add rows")
        labels.extend([domain_id] * (len(texts) - before))
    return ClassifierCorpus(texts, np.asarray(labels, dtype=np.int64), segments, np.asarray(is_raw, dtype=bool))
