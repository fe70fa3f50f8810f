"""How good a domain classifier is on labelled texts: accuracy, confusion, precision/recall, calibration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from versatune_ds.errors import UserError
from versatune_ds.probe.classifier import DomainClassifier


@dataclass(frozen=True)
class ClassifierReport:
    """Hard-label quality of a classifier on labelled texts. confusion[true][predicted] counts."""

    accuracy: float
    confusion: list[list[int]]
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    num_examples: int


def report_from_predictions(predicted: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray,
                            num_domains: int) -> ClassifierReport:
    """Build the report from hard predictions; precision/recall of a domain with no predicted / no true
    examples is 0.0 (not NaN, so the report stays valid JSON)."""
    predicted_array = np.asarray(predicted, dtype=np.int64)
    label_array = np.asarray(labels, dtype=np.int64)
    if predicted_array.shape != label_array.shape:
        raise UserError(f"{len(predicted_array)} predictions but {len(label_array)} labels")
    confusion = np.zeros((num_domains, num_domains), dtype=np.int64)
    np.add.at(confusion, (label_array, predicted_array), 1)
    correct = np.diag(confusion).astype(np.float64)
    predicted_totals = confusion.sum(axis=0)
    true_totals = confusion.sum(axis=1)
    precision = np.divide(correct, predicted_totals, out=np.zeros(num_domains), where=predicted_totals > 0)
    recall = np.divide(correct, true_totals, out=np.zeros(num_domains), where=true_totals > 0)
    total = int(label_array.size)
    return ClassifierReport(
        accuracy=float(correct.sum() / total) if total else 0.0,
        confusion=confusion.tolist(),
        precision=tuple(float(x) for x in precision),
        recall=tuple(float(x) for x in recall),
        num_examples=total,
    )


def evaluate_classifier(clf: DomainClassifier, texts: Sequence[str], labels: Sequence[int] | np.ndarray) -> ClassifierReport:
    """Argmax of `clf.predict_proba(texts)` against integer domain labels."""
    label_array = np.asarray(labels, dtype=np.int64)
    if label_array.size and (label_array.min() < 0 or label_array.max() >= clf.num_domains):
        raise UserError(f"evaluate_classifier: labels must be in 0..{clf.num_domains - 1}, got {sorted(set(label_array.tolist()))}")
    probs = clf.predict_proba(list(texts))
    return report_from_predictions(probs.argmax(axis=1), label_array, clf.num_domains)


def expected_calibration_error(probs: np.ndarray, labels: Sequence[int] | np.ndarray, num_bins: int = 15) -> float:
    """ECE of the top-class confidence: sum over equal-width bins of |accuracy - mean confidence| x share of texts."""
    if len(probs) == 0:
        return 0.0
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    bins = np.minimum((confidence * num_bins).astype(np.int64), num_bins - 1)
    total = 0.0
    for b in range(num_bins):
        members = bins == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def confusion_lines(report: ClassifierReport, names: Sequence[str]) -> list[str]:
    """The confusion matrix as fixed-width text lines (rows = true, columns = predicted) with per-domain recall."""
    width = max(7, *(len(name) for name in names))
    header = " " * (width + 1) + " ".join(f"{name[:width]:>{width}}" for name in names) + "   recall"
    lines = [header]
    for i, row in enumerate(report.confusion):
        lines.append(f"{names[i]:>{width}} " + " ".join(f"{n:>{width}d}" for n in row) + f"   {report.recall[i]:.3f}")
    return lines
