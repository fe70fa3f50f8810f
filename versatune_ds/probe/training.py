"""The probe's classifier for a run config: trained (and saved), reused from the run directory, or loaded.

`probe_classifier` is what `versatune-ds probe` / `train` and `versatune-ds classify` call:

* `classifier.path` set: that saved classifier is loaded (any kind `save` wrote);
* otherwise the classifier of `classifier.kind` is trained on the domains' texts (probe.corpus) minus a fixed-seed
  hold-out of `HELDOUT_FRACTION` per domain, saved to `<run_dir>/probe/classifier/`, and measured on the hold-out:
  accuracy, confusion, accuracy on raw passages and on SFT rows apart, calibration error, and the mean-probability
  confusion M the `adjusted` estimator needs, all in `<run_dir>/probe/classifier_report.json`;
* a classifier already saved there is reused when `trained_for.json` says it was trained for the same kind,
  seed, domains and texts (a fingerprint of the corpus), so `classify` after `probe` (or a resumed probe) does
  not train again.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from versatune_ds.config.schema import ClassifierConfig, DataConfig
from versatune_ds.errors import UserError
from versatune_ds.files import write_json_atomic
from versatune_ds.probe.classifier import (
    FORMAT_VERSION,
    DomainClassifier,
    TfidfConfig,
    TfidfDomainClassifier,
    train_tfidf_classifier,
)
from versatune_ds.probe.corpus import ClassifierCorpus, classifier_corpus
from versatune_ds.probe.estimators import mean_probability_confusion
from versatune_ds.probe.reports import expected_calibration_error, report_from_predictions

logger = logging.getLogger(__name__)

CLASSIFIER_DIR = "classifier"
CLASSIFIER_REPORT_FILE = "classifier_report.json"
TRAINED_FOR_FILE = "trained_for.json"
HELDOUT_FRACTION = 0.2  # of the classifier's texts, per domain, for its report
TRAINED_KINDS = ("tfidf", "tfidf_plain", "embed_blend", "tfidf_zeroshot")
EMBEDDING_KINDS = ("embed_blend", "tfidf_zeroshot")  # TF-IDF blended with an expert on MiniLM embeddings (the `embed` extra)
_SPLIT_STREAM = 11  # seed-sequence namespace for the classifier's hold-out split


@dataclass(frozen=True)
class ProbeClassifier:
    classifier: DomainClassifier
    confusion_mean: np.ndarray | None  # M[i, j] = mean P(j) over held-out texts of domain i (None: not measured)
    origin: str  # trained | reused | loaded


def tfidf_settings(kind: str) -> TfidfConfig:
    """The TF-IDF recipe of a classifier kind (the blends use the default recipe for their TF-IDF part)."""
    return TfidfConfig.plain() if kind == "tfidf_plain" else TfidfConfig()


def load_classifier(path: str | Path, *, domain_names: Sequence[str] | None = None) -> DomainClassifier:
    """A classifier saved by any trained kind (TF-IDF, or a blend: told apart by its metadata file)."""
    from versatune_ds.probe import embedding

    directory = Path(path)
    if (directory / embedding.BLEND_META).is_file():
        return embedding.BlendedClassifier.load(directory, domain_names=domain_names)
    return TfidfDomainClassifier.load(directory, domain_names=domain_names)


def heldout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) positions: `fraction` of each domain's texts held out, chosen by a seeded permutation."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    train: list[int] = []
    test: list[int] = []
    for domain_id in np.unique(labels):
        members = np.flatnonzero(labels == domain_id)
        members = members[rng.permutation(members.size)]
        cut = int(round(members.size * fraction)) if members.size > 1 else 0
        test.extend(members[:cut].tolist())
        train.extend(members[cut:].tolist())
    return sorted(train), sorted(test)


def probe_classifier(classifier_cfg: ClassifierConfig, data_cfg: DataConfig, domain_names: Sequence[str], seed: int,
                     probe_dir: Path, *, need_confusion: bool) -> ProbeClassifier:
    """The classifier of the run (see the module doc); with `need_confusion`, also its held-out M."""
    if classifier_cfg.kind not in TRAINED_KINDS:
        raise UserError(f"classifier.kind={classifier_cfg.kind} is not a trained classifier; use one of {', '.join(TRAINED_KINDS)}")
    if classifier_cfg.path:
        classifier = load_classifier(classifier_cfg.path, domain_names=domain_names)
        if not need_confusion:
            return ProbeClassifier(classifier, None, "loaded")
        logger.warning("classifier.estimator=adjusted with a saved classifier (classifier.path): its confusion is measured on "
                       "a hold-out it may have trained on, so the correction may be too weak")
        corpus = classifier_corpus(data_cfg)
        _, test_ids = heldout_split(corpus.labels, HELDOUT_FRACTION, seed)
        probs = classifier.predict_proba([corpus.texts[i] for i in test_ids])
        return ProbeClassifier(classifier, mean_probability_confusion(probs, corpus.labels[test_ids], len(domain_names)), "loaded")
    corpus = classifier_corpus(data_cfg)
    folder = probe_dir / CLASSIFIER_DIR
    trained_for = {"kind": classifier_cfg.kind, "seed": seed, "domains": list(domain_names), "heldout_fraction": HELDOUT_FRACTION,
                   "corpus": corpus.fingerprint(), "num_texts": len(corpus.texts), "tfidf_format_version": FORMAT_VERSION,
                   "tfidf_settings": tfidf_settings(classifier_cfg.kind).to_json()}
    trained_for = json.loads(json.dumps(trained_for))  # tuples -> lists, as read back from the file
    reused = _reuse(folder, probe_dir / CLASSIFIER_REPORT_FILE, trained_for, domain_names)
    if reused is not None:
        return reused
    return _train_and_report(classifier_cfg.kind, corpus, domain_names, seed, probe_dir, trained_for)


def _reuse(folder: Path, report_path: Path, trained_for: dict, domain_names: Sequence[str]) -> ProbeClassifier | None:
    marker = folder / TRAINED_FOR_FILE
    try:
        saved = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
        report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # damaged bookkeeping: train again
    if saved != trained_for or report is None or "mean_probability_confusion" not in report:
        return None
    logger.info("reusing the probe classifier in %s (trained for the same kind, seed, domains and texts)", folder)
    classifier = load_classifier(folder, domain_names=domain_names)
    return ProbeClassifier(classifier, np.asarray(report["mean_probability_confusion"], dtype=np.float64), "reused")


def _train_and_report(kind: str, corpus: ClassifierCorpus, domain_names: Sequence[str], seed: int, probe_dir: Path,
                      trained_for: dict) -> ProbeClassifier:
    train_ids, test_ids = heldout_split(corpus.labels, HELDOUT_FRACTION, seed)
    train_texts = [corpus.texts[i] for i in train_ids]
    logger.info("training the probe classifier (classifier.kind=%s) on %d texts, %d held out for its report",
                kind, len(train_ids), len(test_ids))
    started = time.perf_counter()
    classifier: DomainClassifier = train_tfidf_classifier(
        train_texts, corpus.labels[train_ids], len(domain_names), seed=seed, config=tfidf_settings(kind),
        domain_names=domain_names, segments=[corpus.segments[i] for i in train_ids])
    if kind in EMBEDDING_KINDS:
        from versatune_ds.probe.embedding import train_blended_classifier

        assert isinstance(classifier, TfidfDomainClassifier)
        classifier = train_blended_classifier(classifier, train_texts, corpus.labels[train_ids], seed=seed,
                                              zero_shot=kind == "tfidf_zeroshot")
    train_seconds = time.perf_counter() - started
    folder = probe_dir / CLASSIFIER_DIR
    if folder.exists():  # another kind's files must not be picked up by load_classifier
        shutil.rmtree(folder)
    classifier.save(folder)  # type: ignore[attr-defined]  # every trained kind has save()
    test_texts, test_labels = [corpus.texts[i] for i in test_ids], corpus.labels[test_ids]
    probs = classifier.predict_proba(test_texts)
    report = report_from_predictions(probs.argmax(axis=1), test_labels, len(domain_names))
    confusion_mean = mean_probability_confusion(probs, test_labels, len(domain_names))
    raw = corpus.is_raw[test_ids]
    by_style = {name: style_accuracy(probs[mask], test_labels[mask]) for name, mask in (("raw", raw), ("sft", ~raw))}
    write_json_atomic(probe_dir / CLASSIFIER_REPORT_FILE, {
        "kind": kind, "domains": list(domain_names), "accuracy": report.accuracy, "confusion": report.confusion,
        "mean_probability_confusion": confusion_mean.tolist(), "precision": list(report.precision),
        "recall": list(report.recall), "accuracy_by_style": by_style,
        "expected_calibration_error": expected_calibration_error(probs, test_labels),
        "num_test_texts": report.num_examples, "num_train_texts": len(train_ids), "heldout_fraction": HELDOUT_FRACTION,
        "seed": seed, "train_seconds": round(train_seconds, 2),
        "note": "held out from the classifier's own training texts (train + raw sources); generations of a base model "
                "are another style of text, where accuracy is usually lower (bench/results/classifier_accuracy.md)",
    })
    write_json_atomic(folder / TRAINED_FOR_FILE, trained_for)  # last: marks the folder complete and reusable
    logger.info("probe classifier: held-out accuracy %.3f on %d texts (raw %s, sft %s), trained in %.0f s",
                report.accuracy, report.num_examples, _fmt(by_style["raw"]), _fmt(by_style["sft"]), train_seconds)
    return ProbeClassifier(classifier, confusion_mean, "trained")


def style_accuracy(probs: np.ndarray, labels: np.ndarray) -> dict[str, float | int] | None:
    """Accuracy and count of a slice of predictions (None for an empty slice)."""
    if len(labels) == 0:
        return None
    return {"accuracy": float(np.mean(probs.argmax(axis=1) == labels)), "num_texts": int(len(labels))}


def _fmt(entry: dict[str, float | int] | None) -> str:
    return "-" if entry is None else f"{entry['accuracy']:.3f} on {entry['num_texts']}"

