"""`versatune-ds classify`: label the rows of a file by domain with the probe's classifier for a config.

The classifier is the one `versatune-ds probe` uses for the same config (probe.training.probe_classifier:
`classifier.path`, or the one saved in `<run_dir>/probe/classifier/` when it was trained for the same texts,
or a new one trained and saved there). Every input row gets the predicted domain and the probability of
every domain, in input order; with a labels field, the accuracy and the confusion matrix are printed too.
Input rows are read like data files (JSONL, JSON, CSV/TSV, parquet) with `file:line` in every error.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from versatune_ds.config.loading import load_config
from versatune_ds.data.sources import read_rows
from versatune_ds.errors import UserError
from versatune_ds.files import write_text_atomic
from versatune_ds.probe.distribution import PROBE_DIR
from versatune_ds.probe.reports import ClassifierReport, confusion_lines, report_from_predictions
from versatune_ds.probe.training import probe_classifier

logger = logging.getLogger(__name__)

CHUNK = 2000  # texts per predict_proba call (bounds memory; progress between chunks)


@dataclass(frozen=True)
class ClassifyRequest:
    config: str
    input: str
    out: str
    fields: tuple[str, ...] = ("text",)
    labels_field: str | None = None
    run_dir: str | None = None
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClassifyResult:
    domains: tuple[str, ...]
    predicted: np.ndarray  # domain id per row
    probs: np.ndarray  # [rows, domains]
    report: ClassifierReport | None  # with a labels field
    out: Path


def read_inputs(file: str, fields: Sequence[str], labels_field: str | None, domains: Sequence[str],
                max_row_bytes: int) -> tuple[list[str], list[str], list[int] | None]:
    """(where, text, label id) per row. A text is its `fields` joined by newlines (a list of strings counts as
    its items); every row needs at least one of them, and the labels field, when given, must name a domain."""
    wheres: list[str] = []
    texts: list[str] = []
    labels: list[int] | None = [] if labels_field else None
    index = {name: i for i, name in enumerate(domains)}
    if not Path(file).is_file():
        raise UserError(f"--input {file}: no such file")
    for where, row, problem in read_rows(file, max_row_bytes):
        if problem:
            raise UserError(f"{where}: {problem}")
        if not isinstance(row, dict):
            raise UserError(f"{where}: a row must be an object with the field(s) {', '.join(fields)}, got {type(row).__name__}")
        texts.append(_row_text(row, fields, where))
        wheres.append(where)
        if labels is not None:
            value = row.get(labels_field)
            if value not in index:
                raise UserError(f"{where}: --labels-field {labels_field} is {value!r}; expected one of the config's domains "
                                f"({', '.join(domains)})")
            labels.append(index[value])
    if not texts:
        raise UserError(f"--input {file}: no rows to classify")
    return wheres, texts, labels


def _row_text(row: dict[str, Any], fields: Sequence[str], where: str) -> str:
    parts: list[str] = []
    present = False
    for name in fields:
        if name not in row or row[name] is None:
            continue
        present = True
        value = row[name]
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            parts.extend(value)
        else:
            raise UserError(f"{where}: field {name!r} is {type(value).__name__}; expected text (or a list of texts)")
    if not present:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise UserError(f"{where}: none of the field(s) {', '.join(fields)} is in the row (it has {keys}); name the text "
                        "field with --field (several: --field instruction,input,output)")
    return "\n".join(part for part in parts if part)


def run_classify(request: ClassifyRequest) -> ClassifyResult:
    """Load or train the config's classifier, classify every row of `request.input`, write `request.out`."""
    cfg = load_config(request.config, list(request.overrides))
    domains = cfg.domain_names
    wheres, texts, labels = read_inputs(request.input, request.fields, request.labels_field, domains, cfg.data.max_row_bytes)
    probe_dir = Path(request.run_dir if request.run_dir is not None else cfg.train.run_dir) / PROBE_DIR
    classifier = probe_classifier(cfg.classifier, cfg.data, domains, cfg.train.seed, probe_dir, need_confusion=False).classifier
    started = time.perf_counter()
    chunks = []
    for start in range(0, len(texts), CHUNK):
        chunks.append(classifier.predict_proba(texts[start:start + CHUNK]))
        if len(texts) > CHUNK:
            logger.info("classified %d of %d rows (%.0f s)", min(start + CHUNK, len(texts)), len(texts), time.perf_counter() - started)
    probs = np.concatenate(chunks, axis=0)
    predicted = probs.argmax(axis=1)
    lines = []
    for i, where in enumerate(wheres):
        record: dict[str, Any] = {"row": where, "domain": domains[predicted[i]],
                                  "probabilities": {name: round(float(p), 6) for name, p in zip(domains, probs[i])}}
        if labels is not None:
            record["label"] = domains[labels[i]]
        lines.append(json.dumps(record, ensure_ascii=False))
    out = write_text_atomic(request.out, "\n".join(lines) + "\n")
    report = report_from_predictions(predicted, labels, len(domains)) if labels is not None else None
    return ClassifyResult(tuple(domains), predicted, probs, report, out)


def summary_lines(result: ClassifyResult) -> list[str]:
    """What the command prints: predicted counts per domain; with labels, accuracy and the confusion matrix."""
    counts = np.bincount(result.predicted, minlength=len(result.domains))
    total = len(result.predicted)
    lines = [f"classified {total} rows -> {result.out}",
             "predicted: " + ", ".join(f"{name} {n} ({n / total:.1%})" for name, n in zip(result.domains, counts.tolist()))]
    if result.report is not None:
        lines += [f"accuracy {result.report.accuracy:.4f} ({result.report.num_examples} labelled rows)",
                  "confusion (rows = label, columns = predicted):", *confusion_lines(result.report, result.domains)]
    return lines
