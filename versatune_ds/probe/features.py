"""TF-IDF feature blocks of the domain classifier, stored without pickle.

A block is one feature family -- "word" (1..word_ngram_max word n-grams, sklearn's default token pattern) or
"char" (char_wb n-grams inside word boundaries, which also catch code symbols) -- with a fixed vocabulary
and idf vector. `TfidfBlock.transform` computes sklearn's `TfidfVectorizer(sublinear_tf=True, norm="l2",
smooth_idf=True)` by hand, so a loaded block needs only its vocabulary and idf (no fitted sklearn object).
Vocabularies are saved as UTF-8 bytes + int64 offsets: compact, and read with `np.load(allow_pickle=False)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.preprocessing import normalize

from versatune_ds.errors import UserError

BLOCK_KINDS = ("word", "char")


class BlockSettings(Protocol):
    """What a block's counter needs (probe.classifier.TfidfConfig has it)."""

    @property
    def word_ngram_max(self) -> int: ...
    @property
    def word_max_features(self) -> int: ...
    @property
    def char_ngram_min(self) -> int: ...
    @property
    def char_ngram_max(self) -> int: ...
    @property
    def char_max_features(self) -> int: ...
    @property
    def min_df(self) -> int: ...


def make_counter(settings: BlockSettings, kind: str, vocabulary: Mapping[str, int] | None = None) -> CountVectorizer:
    """The count vectorizer of a block kind; with `vocabulary` it is fixed (nothing to fit)."""
    if kind == "word":
        analyzer, ngram_range, max_features = "word", (1, settings.word_ngram_max), settings.word_max_features
    elif kind == "char":
        analyzer, ngram_range = "char_wb", (settings.char_ngram_min, settings.char_ngram_max)
        max_features = settings.char_max_features
    else:
        raise UserError(f"unknown classifier feature block {kind!r} (known: {', '.join(BLOCK_KINDS)}); retrain the classifier")
    return CountVectorizer(
        analyzer=analyzer,
        ngram_range=ngram_range,
        lowercase=True,
        min_df=settings.min_df if vocabulary is None else 1,
        max_features=max_features if vocabulary is None else None,
        vocabulary=dict(vocabulary) if vocabulary is not None else None,
        dtype=np.float64,
    )


@dataclass(frozen=True)
class TfidfBlock:
    kind: str
    counter: CountVectorizer
    idf: np.ndarray

    @property
    def num_features(self) -> int:
        return int(self.idf.size)

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        counts = self.counter.transform(texts).tocsr().astype(np.float64)
        counts.data = 1.0 + np.log(counts.data)  # sublinear tf
        weighted = counts @ sp.diags(self.idf)
        return normalize(weighted, norm="l2", copy=False).tocsr()

    def terms(self) -> list[str]:
        vocabulary = self.counter.vocabulary
        assert isinstance(vocabulary, dict)
        return [term for term, _ in sorted(vocabulary.items(), key=lambda item: item[1])]


def fit_block(texts: Sequence[str], settings: BlockSettings, kind: str) -> tuple[TfidfBlock, sp.csr_matrix]:
    """Fit vocabulary + idf on `texts`; return the block and the texts' TF-IDF matrix."""
    params = make_counter(settings, kind).get_params()
    keys = ("analyzer", "ngram_range", "lowercase", "min_df", "max_features", "dtype")
    vectorizer = TfidfVectorizer(sublinear_tf=True, norm="l2", smooth_idf=True, **{key: params[key] for key in keys})
    features = vectorizer.fit_transform(texts).tocsr()
    block = TfidfBlock(kind=kind, counter=make_counter(settings, kind, vectorizer.vocabulary_),
                       idf=np.asarray(vectorizer.idf_, dtype=np.float64))
    return block, features


def pack_blocks(blocks: Sequence[TfidfBlock]) -> dict[str, np.ndarray]:
    """The arrays that store `blocks`: per block, the terms as UTF-8 bytes + offsets, and the idf."""
    arrays: dict[str, np.ndarray] = {}
    for index, block in enumerate(blocks):
        encoded = [term.encode("utf-8") for term in block.terms()]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(item) for item in encoded])
        arrays[f"block{index}_terms_utf8"] = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        arrays[f"block{index}_terms_offsets"] = offsets
        arrays[f"block{index}_idf"] = block.idf
    return arrays


def load_blocks(arrays: Mapping[str, np.ndarray], kinds: Sequence[str], settings: BlockSettings, where: str) -> list[TfidfBlock]:
    """The blocks stored by `pack_blocks`; `where` (the file) names a damaged one in the error."""
    blocks = []
    for index, kind in enumerate(kinds):
        try:
            utf8 = arrays[f"block{index}_terms_utf8"]
            offsets = arrays[f"block{index}_terms_offsets"]
            idf = np.asarray(arrays[f"block{index}_idf"], dtype=np.float64)
        except KeyError as error:
            raise UserError(f"{where}: the saved classifier lacks array {error}; it is damaged -- retrain it") from None
        if offsets.ndim != 1 or offsets.size != idf.size + 1 or offsets[0] != 0 or offsets[-1] != utf8.size \
                or np.any(np.diff(offsets) < 0):
            raise UserError(f"{where}: block {index}: vocabulary and idf do not fit together; the classifier is damaged -- retrain it")
        blob = utf8.tobytes()
        try:
            terms = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(idf.size)]
        except UnicodeDecodeError:
            raise UserError(f"{where}: block {index}: a vocabulary term is not UTF-8; the classifier is damaged -- retrain it") from None
        vocabulary = {term: position for position, term in enumerate(terms)}
        if len(vocabulary) != len(terms):
            raise UserError(f"{where}: block {index}: duplicate vocabulary terms; the classifier is damaged -- retrain it")
        blocks.append(TfidfBlock(kind=kind, counter=make_counter(settings, kind, vocabulary), idf=idf))
    return blocks
