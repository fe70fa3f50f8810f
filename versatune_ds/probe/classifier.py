"""Domain classification of probe generations and the knowledge distribution `p`.

The probe (DESIGN.md section 1, steps 1-2) samples free-running generations from the base model and
asks a classifier, for each text, how likely it is to belong to each of N domains (ids 0..N-1).
The mean of those per-text probabilities is the model's knowledge distribution `p`.

This module holds:

* `DomainClassifier`: the seam every classifier implements (`predict_proba` -> [n, N]).
* `TfidfDomainClassifier`: the default -- TF-IDF word 1-2-grams + char_wb n-grams and a
  multinomial logistic regression. Its state is saved as JSON + npz (never pickle), so a saved
  classifier can be loaded from an untrusted place without running code.
* `evaluate_classifier` / `ClassifierReport`: accuracy, confusion matrix, per-domain precision/recall.
The distribution estimators live in probe.estimators; the LLM-judge classifier in probe.judge.
Domain names are carried only for display and for the check on load; all logic is by id.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import normalize

from versatune_ds.errors import UserError
from versatune_ds.files import write_bytes_atomic, write_json_atomic

logger = logging.getLogger(__name__)

FORMAT_NAME = "versatune_ds.tfidf_domain_classifier"
FORMAT_VERSION = 1
META_FILE = "classifier.json"
ARRAYS_FILE = "classifier.npz"


class DomainClassifier(Protocol):
    """Anything that maps texts to per-domain probabilities (rows sum to 1)."""

    num_domains: int

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Return float64 [len(texts), num_domains]; row i is the distribution over domain ids."""
        ...


@dataclass(frozen=True)
class TfidfConfig:
    """Feature and model settings; stored in the saved metadata so load rebuilds the same transform.

    The defaults were chosen by bench/classifier_accuracy.py (see bench/results/classifier_accuracy.md).
    """

    word_ngram_max: int = 2
    word_max_features: int = 100_000
    use_char: bool = True
    char_ngram_min: int = 3
    char_ngram_max: int = 6
    char_max_features: int = 100_000
    min_df: int = 2
    c: float = 30.0
    max_iter: int = 300


def _word_vectorizer(cfg: TfidfConfig, vocabulary: dict[str, int] | None) -> CountVectorizer:
    # A `\S`-free token pattern would drop code symbols; the char n-grams catch those instead,
    # so the word part keeps sklearn's default pattern (2+ word characters).
    return CountVectorizer(
        analyzer="word",
        ngram_range=(1, cfg.word_ngram_max),
        lowercase=True,
        min_df=cfg.min_df if vocabulary is None else 1,
        max_features=cfg.word_max_features if vocabulary is None else None,
        vocabulary=vocabulary,
        dtype=np.float64,
    )


def _char_vectorizer(cfg: TfidfConfig, vocabulary: dict[str, int] | None) -> CountVectorizer:
    return CountVectorizer(
        analyzer="char_wb",
        ngram_range=(cfg.char_ngram_min, cfg.char_ngram_max),
        lowercase=True,
        min_df=cfg.min_df if vocabulary is None else 1,
        max_features=cfg.char_max_features if vocabulary is None else None,
        vocabulary=vocabulary,
        dtype=np.float64,
    )


@dataclass(frozen=True)
class _TfidfBlock:
    """One feature family (word or char): fixed vocabulary + idf. Transform = sklearn's
    TfidfVectorizer(sublinear_tf=True, norm='l2') computed by hand, so that a loaded block needs
    only the vocabulary and idf (no fitted sklearn object, no pickle)."""

    counter: CountVectorizer
    idf: np.ndarray

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        counts = self.counter.transform(texts).tocsr().astype(np.float64)
        counts.data = 1.0 + np.log(counts.data)  # sublinear tf
        weighted = counts @ sp.diags(self.idf)
        return normalize(weighted, norm="l2", copy=False).tocsr()

    def terms(self) -> list[str]:
        vocabulary = self.counter.vocabulary
        assert isinstance(vocabulary, dict)
        ordered = sorted(vocabulary.items(), key=lambda item: item[1])
        return [term for term, _ in ordered]


def _fit_block(texts: Sequence[str], cfg: TfidfConfig, kind: str) -> tuple[_TfidfBlock, sp.csr_matrix]:
    make = _word_vectorizer if kind == "word" else _char_vectorizer
    prototype = make(cfg, None)
    fitted = TfidfVectorizer(sublinear_tf=True, norm="l2", smooth_idf=True, **_vectorizer_kwargs(prototype))
    features = fitted.fit_transform(texts).tocsr()
    block = _TfidfBlock(counter=make(cfg, dict(fitted.vocabulary_)), idf=np.asarray(fitted.idf_, dtype=np.float64))
    return block, features


def _vectorizer_kwargs(counter: CountVectorizer) -> dict[str, object]:
    params = counter.get_params()
    return {key: params[key] for key in ("analyzer", "ngram_range", "lowercase", "min_df", "max_features", "dtype")}


class TfidfDomainClassifier:
    """TF-IDF features (word + optional char_wb) -> multinomial logistic regression -> softmax."""

    def __init__(
        self,
        config: TfidfConfig,
        blocks: Sequence[_TfidfBlock],
        coef: np.ndarray,
        intercept: np.ndarray,
        domain_names: Sequence[str],
    ) -> None:
        num_features = sum(len(block.idf) for block in blocks)
        if coef.shape != (len(domain_names), num_features) or intercept.shape != (len(domain_names),):
            raise UserError(
                f"classifier arrays do not fit together: coef {coef.shape}, intercept {intercept.shape}, "
                f"{len(domain_names)} domains, {num_features} features; the saved classifier is corrupt -- retrain it"
            )
        self.config = config
        self.blocks = tuple(blocks)
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = np.asarray(intercept, dtype=np.float64)
        self.domain_names = tuple(domain_names)
        self.num_domains = len(self.domain_names)

    def features(self, texts: Sequence[str]) -> sp.csr_matrix:
        return sp.hstack([block.transform(texts) for block in self.blocks], format="csr")

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise UserError("predict_proba expects a sequence of texts, got a single str; wrap it in a list")
        if len(texts) == 0:
            return np.zeros((0, self.num_domains), dtype=np.float64)
        logits = np.asarray(self.features(texts) @ self.coef.T) + self.intercept
        return _softmax(logits)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `<path>/classifier.json` (config, domain names, shapes) and `<path>/classifier.npz`
        (vocabularies as UTF-8 bytes + offsets, idf, coef, intercept). Each file is written to a
        temporary name and renamed, so a crash never leaves a half-written classifier."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {"coef": self.coef, "intercept": self.intercept}
        kinds = []
        for index, block in enumerate(self.blocks):
            kind = block.counter.analyzer
            kinds.append(kind)
            utf8, offsets = _pack_terms(block.terms())
            arrays[f"block{index}_terms_utf8"] = utf8
            arrays[f"block{index}_terms_offsets"] = offsets
            arrays[f"block{index}_idf"] = block.idf
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "domain_names": list(self.domain_names),
            "config": asdict(self.config),
            "blocks": kinds,
        }
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_bytes_atomic(directory / ARRAYS_FILE, buffer.getvalue())
        write_json_atomic(directory / META_FILE, meta)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, domain_names: Sequence[str] | None = None
    ) -> TfidfDomainClassifier:
        """Load a classifier saved by `save`. If `domain_names` is given it must equal the saved
        names in the same order (ids are positions, so a reordered list would silently relabel)."""
        directory = Path(path)
        meta_path = directory / META_FILE
        arrays_path = directory / ARRAYS_FILE
        if not meta_path.is_file() or not arrays_path.is_file():
            raise UserError(
                f"no saved classifier at {directory}: expected {META_FILE} and {ARRAYS_FILE} there; "
                "train one first (bench/classifier_accuracy.py shows how) or fix the path"
            )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise UserError(
                f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}, expected "
                f"{FORMAT_NAME!r} version {FORMAT_VERSION}; retrain the classifier with this version"
            )
        saved_names = [str(name) for name in meta["domain_names"]]
        if domain_names is not None and list(domain_names) != saved_names:
            raise UserError(
                f"{meta_path}: the classifier was trained for domains {saved_names} (in this order), but the "
                f"run uses {list(domain_names)}; retrain the classifier for these domains or list the domains "
                "in the config in the classifier's order"
            )
        config = TfidfConfig(**meta["config"])
        blocks = []
        with np.load(arrays_path, allow_pickle=False) as arrays:
            for index, kind in enumerate(meta["blocks"]):
                terms = _unpack_terms(arrays[f"block{index}_terms_utf8"], arrays[f"block{index}_terms_offsets"])
                make = _word_vectorizer if kind == "word" else _char_vectorizer
                vocabulary = {term: position for position, term in enumerate(terms)}
                blocks.append(_TfidfBlock(counter=make(config, vocabulary), idf=arrays[f"block{index}_idf"]))
            coef = arrays["coef"]
            intercept = arrays["intercept"]
        return cls(config, blocks, coef, intercept, saved_names)


def train_tfidf_classifier(
    texts: Sequence[str],
    labels: Sequence[int],
    num_domains: int,
    *,
    seed: int,
    max_features: int = 100_000,
    config: TfidfConfig | None = None,
    domain_names: Sequence[str] | None = None,
) -> TfidfDomainClassifier:
    """Fit the TF-IDF classifier. `max_features` caps each feature family (word and char) unless a
    full `config` is given. `domain_names` (display only; default "0".."N-1") go into the saved metadata."""
    cfg = config if config is not None else TfidfConfig(word_max_features=max_features, char_max_features=max_features)
    label_array = np.asarray(labels, dtype=np.int64)
    if len(texts) != len(label_array):
        raise UserError(f"train_tfidf_classifier: {len(texts)} texts but {len(label_array)} labels; give one label per text")
    if label_array.size and (label_array.min() < 0 or label_array.max() >= num_domains):
        raise UserError(f"train_tfidf_classifier: labels must be domain ids in 0..{num_domains - 1}, got {sorted(set(label_array.tolist()))}")
    missing = sorted(set(range(num_domains)) - set(label_array.tolist()))
    if missing:
        raise UserError(f"train_tfidf_classifier: no training texts for domain ids {missing}; every domain needs examples")
    names = tuple(domain_names) if domain_names is not None else tuple(str(i) for i in range(num_domains))
    if len(names) != num_domains:
        raise UserError(f"train_tfidf_classifier: {len(names)} domain names for num_domains={num_domains}")

    kinds = ["word", "char"] if cfg.use_char else ["word"]
    fitted = [_fit_block(texts, cfg, kind) for kind in kinds]
    blocks = [block for block, _ in fitted]
    features = sp.hstack([matrix for _, matrix in fitted], format="csr")
    model = LogisticRegression(C=cfg.c, max_iter=cfg.max_iter, random_state=seed)
    model.fit(features, label_array)
    coef, intercept = np.asarray(model.coef_, dtype=np.float64), np.asarray(model.intercept_, dtype=np.float64)
    if num_domains == 2:
        # Binary LogisticRegression keeps one row: P(1) = sigmoid(z) = softmax([0, z])[1].
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([np.zeros(1), intercept])
    logger.info("trained TF-IDF classifier: %d texts, %d features, %d domains", len(texts), features.shape[1], num_domains)
    return TfidfDomainClassifier(cfg, blocks, coef, intercept, names)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _pack_terms(terms: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    # Fixed-width numpy unicode arrays would pad every term to the longest one; bytes + offsets
    # stay compact and load with allow_pickle=False.
    encoded = [term.encode("utf-8") for term in terms]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(item) for item in encoded])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def _unpack_terms(utf8: np.ndarray, offsets: np.ndarray) -> list[str]:
    blob = utf8.tobytes()
    return [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


@dataclass(frozen=True)
class ClassifierReport:
    """Hard-label quality of a classifier on labelled texts. confusion[true][predicted] counts."""

    accuracy: float
    confusion: list[list[int]]
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    num_examples: int


def report_from_predictions(predicted: Sequence[int], labels: Sequence[int], num_domains: int) -> ClassifierReport:
    """Build the report from hard predictions; precision/recall of a domain with no predicted /
    no true examples is 0.0 (not NaN, so the report stays valid JSON)."""
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


def evaluate_classifier(clf: DomainClassifier, texts: Sequence[str], labels: Sequence[int]) -> ClassifierReport:
    """Argmax of `clf.predict_proba(texts)` against integer domain labels."""
    label_array = np.asarray(labels, dtype=np.int64)
    if label_array.size and (label_array.min() < 0 or label_array.max() >= clf.num_domains):
        raise UserError(f"evaluate_classifier: labels must be in 0..{clf.num_domains - 1}, got {sorted(set(label_array.tolist()))}")
    probs = clf.predict_proba(list(texts))
    return report_from_predictions(probs.argmax(axis=1), label_array, clf.num_domains)
