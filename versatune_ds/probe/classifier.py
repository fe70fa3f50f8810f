"""The probe's domain classifier: TF-IDF n-grams + multinomial logistic regression, trained to read any style.

The probe (DESIGN.md section 1, steps 1-2) samples free-running generations from the base model and asks a
classifier, for each text, how likely it is to belong to each of N domains (ids 0..N-1). It is trained on the
domains' SFT rows and raw passages, but must read another style: generations. So the default recipe
(`classifier.kind: tfidf`, `TfidfConfig()`) adds, to a plain TF-IDF model, what made it better on text of
styles it never trained on (bench/results/classifier_accuracy.md has the numbers):

* **style augmentation** (probe.augment): every training text also contributes two short views -- a fragment,
  one sentence, a mechanical multiple-choice item, one turn of an SFT row, lower-cased text -- weighted 0.5;
* **class-balanced** sample weights;
* a **temperature** fitted on a stratified 10 % calibration split (and its views), so the probabilities the
  probe averages are calibrated in style; the model fitted on the other 90 % is kept (one fit).

`TfidfConfig.plain()` (`classifier.kind: tfidf_plain`) is the earlier recipe: no views, no balancing, no
temperature, char 3-6-grams, C=30. State is JSON + npz (probe.state), never pickle; domain names are carried
for display and the check on load, all logic is by id. Training is deterministic given the seed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.optimize import minimize_scalar
from sklearn.linear_model import LogisticRegression

from versatune_ds.errors import UserError
from versatune_ds.probe.augment import AugmentConfig, make_views
from versatune_ds.probe.features import TfidfBlock, fit_block, load_blocks, pack_blocks
from versatune_ds.probe.state import read_arrays, read_meta, write_state

logger = logging.getLogger(__name__)

FORMAT_NAME = "versatune_ds.tfidf_domain_classifier"
FORMAT_VERSION = 2  # 1: before style augmentation and temperature (refused on load: retrain)
META_FILE = "classifier.json"
ARRAYS_FILE = "classifier.npz"


class DomainClassifier(Protocol):
    """Anything that maps texts to per-domain probabilities (rows sum to 1)."""

    num_domains: int
    domain_names: tuple[str, ...]

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Return float64 [len(texts), num_domains]; row i is the distribution over domain ids."""
        ...


@dataclass(frozen=True)
class TfidfConfig:
    """Feature, model and training settings; stored in the saved metadata so load rebuilds the same transform.

    The defaults are the recipe chosen on a validation split of the training texts and style-shifted copies of
    it, never on evaluation data (bench/results/classifier_accuracy.md).
    """

    word_ngram_max: int = 2
    word_max_features: int = 100_000
    char_ngram_min: int = 3
    char_ngram_max: int = 5  # 0 = no char n-gram block
    char_max_features: int = 100_000
    min_df: int = 2
    c: float = 10.0
    max_iter: int = 200
    tol: float = 1e-4
    balanced: bool = True
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    calibration_fraction: float = 0.1  # 0 = no temperature (T = 1)

    def __post_init__(self) -> None:
        if self.c <= 0 or self.max_iter < 1 or self.min_df < 1 or self.word_ngram_max < 1:
            raise UserError("TfidfConfig: need c > 0, max_iter >= 1, min_df >= 1, word_ngram_max >= 1")
        if self.char_ngram_max and not 1 <= self.char_ngram_min <= self.char_ngram_max:
            raise UserError("TfidfConfig: need 1 <= char_ngram_min <= char_ngram_max (or char_ngram_max = 0: no char block)")
        if not 0.0 <= self.calibration_fraction < 0.5:
            raise UserError(f"TfidfConfig: calibration_fraction must be in [0, 0.5), got {self.calibration_fraction}")

    @classmethod
    def plain(cls) -> TfidfConfig:
        """The recipe before style augmentation (`classifier.kind: tfidf_plain`)."""
        return cls(char_ngram_max=6, c=30.0, max_iter=300, balanced=False, augment=None, calibration_fraction=0.0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> TfidfConfig:
        try:
            values = dict(data)
            augment = values.pop("augment", None)
            if augment is not None:
                fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in augment.items()}
                augment = AugmentConfig(**fields)
            return cls(**values, augment=augment)
        except (TypeError, AttributeError) as error:
            raise UserError(f"{where}: the saved classifier settings do not fit this version ({error}); retrain it") from None


class TfidfDomainClassifier:
    """TF-IDF blocks (word, char_wb) -> linear logits -> softmax(logits / temperature)."""

    def __init__(self, config: TfidfConfig, blocks: Sequence[TfidfBlock], coef: np.ndarray, intercept: np.ndarray,
                 domain_names: Sequence[str], temperature: float = 1.0) -> None:
        num_features = sum(block.num_features for block in blocks)
        if coef.shape != (len(domain_names), num_features) or intercept.shape != (len(domain_names),):
            raise UserError(
                f"classifier arrays do not fit together: coef {coef.shape}, intercept {intercept.shape}, "
                f"{len(domain_names)} domains, {num_features} features; the saved classifier is damaged -- retrain it")
        if not (np.isfinite(temperature) and temperature > 0):
            raise UserError(f"classifier temperature must be a positive number, got {temperature}; retrain the classifier")
        self.config = config
        self.blocks = tuple(blocks)
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = np.asarray(intercept, dtype=np.float64)
        self.domain_names = tuple(domain_names)
        self.num_domains = len(self.domain_names)
        self.temperature = float(temperature)

    def features(self, texts: Sequence[str]) -> sp.csr_matrix:
        return sp.hstack([block.transform(texts) for block in self.blocks], format="csr")

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """Logits [n, num_domains] before the temperature."""
        if isinstance(texts, str):
            raise UserError("predict_proba expects a sequence of texts, got a single str; wrap it in a list")
        if len(texts) == 0:
            return np.zeros((0, self.num_domains), dtype=np.float64)
        return np.asarray(self.features(texts) @ self.coef.T) + self.intercept

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return softmax(self.logits(texts) / self.temperature)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `<path>/classifier.json` (format, settings, names, temperature) and `<path>/classifier.npz`
        (vocabularies as UTF-8 bytes + offsets, idf, coef, intercept), each atomically."""
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "domain_names": list(self.domain_names),
                "config": self.config.to_json(), "blocks": [block.kind for block in self.blocks],
                "temperature": self.temperature}
        arrays = {"coef": self.coef, "intercept": self.intercept, **pack_blocks(self.blocks)}
        write_state(Path(path), META_FILE, meta, ARRAYS_FILE, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, domain_names: Sequence[str] | None = None) -> TfidfDomainClassifier:
        """Load a classifier saved by `save`; `domain_names`, when given, must equal the saved ones in order."""
        directory = Path(path)
        meta = read_meta(directory / META_FILE, FORMAT_NAME, FORMAT_VERSION, domain_names)
        where = str(directory / META_FILE)
        config = TfidfConfig.from_json(meta.get("config", {}), where)
        arrays = read_arrays(directory / ARRAYS_FILE, ["coef", "intercept"])
        blocks = load_blocks(arrays, list(meta.get("blocks", [])), config, str(directory / ARRAYS_FILE))
        return cls(config, blocks, arrays["coef"], arrays["intercept"], meta["domain_names"],
                   temperature=float(meta.get("temperature", float("nan"))))


def train_tfidf_classifier(
    texts: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    num_domains: int,
    *,
    seed: int,
    config: TfidfConfig | None = None,
    domain_names: Sequence[str] | None = None,
    segments: Sequence[Sequence[str]] | None = None,
) -> TfidfDomainClassifier:
    """Fit the classifier on labelled texts (domain ids 0..num_domains-1); default settings `TfidfConfig()`.

    `segments` (optional, one entry per text): the parts a structured text was joined from (an SFT row's turns);
    the style augmentation then also trains on single parts. `()` for texts without parts (raw passages).
    `domain_names` are for display and the check on load (default "0".."N-1"). With
    `config.calibration_fraction` > 0 the temperature is fitted on a stratified hold-out of that fraction (and its
    views) of a model fitted on the rest, and that model is returned.
    """
    cfg = config if config is not None else TfidfConfig()
    label_array = _check_inputs(texts, labels, num_domains, segments)
    names = tuple(domain_names) if domain_names is not None else tuple(str(i) for i in range(num_domains))
    if len(names) != num_domains:
        raise UserError(f"train_tfidf_classifier: {len(names)} domain names for num_domains={num_domains}")
    texts = list(texts)
    fit_ids, calib_ids = _stratified_split(label_array, cfg.calibration_fraction, seed)

    def pick(items: Sequence[Any] | None, ids: np.ndarray) -> list[Any] | None:
        return None if items is None else [items[i] for i in ids]

    fit_texts = pick(texts, fit_ids)
    assert fit_texts is not None
    model = _fit(fit_texts, label_array[fit_ids], num_domains, cfg, seed, names, pick(segments, fit_ids))
    if calib_ids.size:
        calib_texts, calib_labels = [texts[i] for i in calib_ids], label_array[calib_ids]
        if cfg.augment is not None and cfg.augment.views_per_text > 0:
            views, view_labels = make_views(calib_texts, calib_labels, config=cfg.augment, seed=seed + 1,
                                            segments=pick(segments, calib_ids))
            calib_texts, calib_labels = calib_texts + views, np.concatenate([calib_labels, view_labels])
        model.temperature = fit_temperature(model.logits(calib_texts), calib_labels)
    logger.info("trained the TF-IDF classifier on %d of %d texts (%d features, %d domains, temperature %.3f from %d texts)",
                fit_ids.size, len(texts), model.coef.shape[1], num_domains, model.temperature, calib_ids.size)
    return model


def _fit(texts: list[str], labels: np.ndarray, num_domains: int, cfg: TfidfConfig, seed: int, names: tuple[str, ...],
         segments: Sequence[Sequence[str]] | None) -> TfidfDomainClassifier:
    weights = np.ones(len(texts))
    all_texts, all_labels = texts, labels
    if cfg.augment is not None and cfg.augment.views_per_text > 0:
        views, view_labels = make_views(texts, labels, config=cfg.augment, seed=seed, segments=segments)
        all_texts = texts + views
        all_labels = np.concatenate([labels, view_labels])
        weights = np.concatenate([weights, np.full(len(views), cfg.augment.view_weight)])
    if cfg.balanced:
        # Weights from the counts of original texts, so a domain of long texts (more views) is not favoured.
        counts = np.bincount(labels, minlength=num_domains).astype(np.float64)
        weights = weights * (len(labels) / (num_domains * counts))[all_labels]
    kinds = ["word"] + (["char"] if cfg.char_ngram_max else [])
    fitted = [fit_block(all_texts, cfg, kind) for kind in kinds]
    features = sp.hstack([matrix for _, matrix in fitted], format="csr")
    model = LogisticRegression(C=cfg.c, max_iter=cfg.max_iter, tol=cfg.tol, random_state=seed)
    model.fit(features, all_labels, sample_weight=weights / weights.mean())
    coef, intercept = np.asarray(model.coef_, dtype=np.float64), np.asarray(model.intercept_, dtype=np.float64)
    if num_domains == 2:  # binary LogisticRegression keeps one row: P(1) = sigmoid(z) = softmax([0, z])[1]
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([np.zeros(1), intercept])
    return TfidfDomainClassifier(cfg, [block for block, _ in fitted], coef, intercept, names)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """T > 0 minimising the mean negative log-likelihood of softmax(logits / T), searched on log T in [1/20, 20]."""
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        scaled = logits / np.exp(log_t)
        scaled = scaled - scaled.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(scaled).sum(axis=1)) - scaled[rows, labels]))

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, calibration) positions: `fraction` of each domain with at least 10 texts, by a seeded permutation."""
    rng = np.random.default_rng([seed, 0xCA1])
    fit_ids: list[int] = []
    held: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(members.size)]
        cut = int(round(members.size * fraction)) if members.size >= 10 else 0
        held.extend(members[:cut].tolist())
        fit_ids.extend(members[cut:].tolist())
    return np.asarray(sorted(fit_ids), dtype=np.int64), np.asarray(sorted(held), dtype=np.int64)


def _check_inputs(texts: Sequence[str], labels: Sequence[int] | np.ndarray, num_domains: int,
                  segments: Sequence[Sequence[str]] | None) -> np.ndarray:
    if isinstance(texts, str):
        raise UserError("train_tfidf_classifier: texts must be a sequence of str, got a single str")
    label_array = np.asarray(labels, dtype=np.int64)
    if len(texts) != label_array.size:
        raise UserError(f"train_tfidf_classifier: {len(texts)} texts but {label_array.size} labels; give one label per text")
    if num_domains < 2:
        raise UserError(f"train_tfidf_classifier: need at least 2 domains, got {num_domains}")
    if label_array.size and (label_array.min() < 0 or label_array.max() >= num_domains):
        raise UserError(f"train_tfidf_classifier: labels must be domain ids in 0..{num_domains - 1}, "
                        f"got {sorted(set(label_array.tolist()))}")
    missing = sorted(set(range(num_domains)) - set(label_array.tolist()))
    if missing:
        raise UserError(f"train_tfidf_classifier: no training texts for domain ids {missing}; every domain needs examples")
    if segments is not None and len(segments) != len(texts):
        raise UserError(f"train_tfidf_classifier: {len(segments)} segment entries for {len(texts)} texts")
    return label_array

