"""Style augmentation of the probe's domain classifier: cheap, mechanical "views" of training texts.

The classifier is trained on a domain's SFT rows and raw passages, but it must label text of other
styles: free-running generations of a base model, exam questions, fragments. A linear model on
n-grams latches on to whatever separates the training sources best -- an instruction template, a
row layout, text length, the multiple-choice layout of one source -- and those cues are absent or
misleading in another style. Training also on views of each text that look like other styles makes
the content words carry the decision instead.

Every view is a function of one training text (and, for question views, of other training texts of
the *same* label); no rule looks at a domain's name or at any data source. The views are:

* ``fragment``: a contiguous window of 6-40 words starting anywhere (a cut-off generation);
* ``sentence``: one sentence (or line) of at least `min_words` words;
* ``question``: a multiple-choice item built from the text: one sentence turned into a cloze
  question (a 1-4 word span replaced by a blank, or a generic question frame around the sentence)
  followed by four options -- the removed span (when there is one) and short spans from other texts
  of the same label -- in random order, with or without letters;
* ``segment``: one part of a structured row alone (the probe passes an SFT row's turns: the user's
  instruction + input, the assistant's answer), when per-text segments are given;
* ``plain``: a fragment lower-cased with punctuation replaced by spaces.

`make_views` is deterministic given its seed. Measured effect (bench/results/classifier_accuracy.md): about
+8 points on multiple-choice question text and +1.5 on held-out raw passages, SFT rows unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from versatune_ds.errors import UserError

VIEW_KINDS = ("fragment", "sentence", "question", "segment", "plain")

# Generic exam-style frames; `{s}` is a sentence of the training text without its final punctuation.
_QUESTION_FRAMES = (
    "{s}?",
    "Which of the following is true? {s}.",
    "{s}. Which of the following best explains this?",
    "Which statement is correct about the following? {s}.",
    "According to the text, {s}?",
    "{s}. What is the most likely answer?",
    "Consider the following: {s}. Which option applies?",
    "Why is it that {s}?",
)
_LETTER_STYLES = ("", "{L}. ", "({L}) ", "{L}) ")
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
_NON_WORD = re.compile(r"[^\w\s]+")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class AugmentConfig:
    """How many views to make and of which kinds. `view_weight` is the training sample weight of a
    view (original texts weigh 1.0)."""

    views_per_text: int = 2
    view_weight: float = 0.5
    kinds: tuple[str, ...] = VIEW_KINDS
    min_words: int = 4
    fragment_words: tuple[int, int] = (6, 40)
    option_words: tuple[int, int] = (1, 6)
    num_options: int = 4

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kinds) - set(VIEW_KINDS))
        if unknown:
            raise UserError(f"AugmentConfig.kinds: unknown view kinds {unknown}; known: {list(VIEW_KINDS)}")
        if self.views_per_text < 0 or self.view_weight <= 0 or self.min_words < 1 or self.num_options < 2:
            raise UserError("AugmentConfig: need views_per_text >= 0, view_weight > 0, min_words >= 1, num_options >= 2")
        for low, high in (self.fragment_words, self.option_words):
            if not 1 <= low <= high:
                raise UserError(f"AugmentConfig: word ranges must satisfy 1 <= low <= high, got {(low, high)}")


def split_sentences(text: str) -> list[str]:
    """Sentences and lines of `text` (split after . ! ? ; : and at newlines), stripped, non-empty."""
    return [part.strip() for part in _SENTENCE_END.split(text) if part and part.strip()]


def plain(text: str) -> str:
    """Lower-case, punctuation replaced by spaces, whitespace collapsed."""
    return _SPACES.sub(" ", _NON_WORD.sub(" ", text.lower())).strip()


class _ViewMaker:
    def __init__(self, texts: Sequence[str], labels: np.ndarray, segments: Sequence[Sequence[str]] | None,
                 cfg: AugmentConfig, rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.rng = rng
        self.words = [text.split() for text in texts]
        self.segments = segments
        self.sentences = [[s for s in split_sentences(text) if len(s.split()) >= cfg.min_words] for text in texts]
        self.by_label = {int(label): np.flatnonzero(labels == label) for label in np.unique(labels)}

    def _int(self, low: int, high: int) -> int:
        return int(self.rng.integers(low, high + 1))

    def _pick(self, items: Sequence[str]) -> str:
        return items[int(self.rng.integers(len(items)))]

    def fragment(self, index: int) -> str | None:
        words = self.words[index]
        if len(words) < self.cfg.min_words:
            return None
        length = min(len(words), self._int(*self.cfg.fragment_words))
        start = self._int(0, len(words) - length)
        return " ".join(words[start:start + length])

    def sentence(self, index: int) -> str | None:
        sentences = self.sentences[index]
        return self._pick(sentences) if sentences else None

    def segment(self, index: int) -> str | None:
        if self.segments is None:
            return None
        present = [field for field in self.segments[index] if field.strip()]
        fields = [field for field in present if len(field.split()) >= self.cfg.min_words]
        return self._pick(fields) if len(present) > 1 and fields else None  # one field alone = the text

    def plain(self, index: int) -> str | None:
        fragment = self.fragment(index)
        return plain(fragment) if fragment else None

    def _option(self, label: int) -> str:
        pool = self.by_label[label]
        for _ in range(8):
            words = self.words[int(pool[int(self.rng.integers(pool.size))])]
            if words:
                length = min(len(words), self._int(*self.cfg.option_words))
                start = self._int(0, len(words) - length)
                return " ".join(words[start:start + length]).strip(" .,;:")
        return "None of the above"

    def question(self, index: int, label: int) -> str | None:
        stem = self.sentence(index) or self.fragment(index)
        if stem is None:
            return None
        options: list[str] = []
        words = stem.rstrip(" .?!;:").split()
        if self.rng.random() < 0.5 and len(words) > 6:
            length = min(self._int(1, 4), len(words) - 3)
            start = self._int(1, len(words) - length)
            options.append(" ".join(words[start:start + length]).strip(" .,;:"))
            question = " ".join(words[:start] + ["_____"] + words[start + length:]) + "."
        else:
            question = self._pick(_QUESTION_FRAMES).format(s=" ".join(words))
        while len(options) < self.cfg.num_options:
            options.append(self._option(label))
        order = self.rng.permutation(len(options))
        style = self._pick(_LETTER_STYLES)
        lines = [style.format(L=chr(ord("A") + i)) + options[j] for i, j in enumerate(order)]
        return "\n".join([question, *lines])


def make_views(texts: Sequence[str], labels: Sequence[int] | np.ndarray, *, config: AugmentConfig, seed: int,
               segments: Sequence[Sequence[str]] | None = None) -> tuple[list[str], np.ndarray]:
    """Up to `config.views_per_text` views of every text, each of a kind drawn uniformly from the
    kinds available for that text (a kind is skipped when the text is too short for it, and
    ``segment`` needs `segments`, one sequence of fields per text). Returns (view texts, labels)."""
    label_array = np.asarray(labels, dtype=np.int64)
    if len(texts) != label_array.size:
        raise UserError(f"make_views: {len(texts)} texts but {label_array.size} labels")
    if segments is not None and len(segments) != len(texts):
        raise UserError(f"make_views: {len(segments)} segment lists for {len(texts)} texts")
    rng = np.random.default_rng([seed, 0xA06])
    maker = _ViewMaker(texts, label_array, segments, config, rng)
    kinds = [kind for kind in config.kinds if kind != "segment" or segments is not None]
    out_texts: list[str] = []
    out_labels: list[int] = []
    for index, label in enumerate(label_array.tolist()):
        for _ in range(config.views_per_text):
            kind = kinds[int(rng.integers(len(kinds)))]
            if kind == "question":
                view = maker.question(index, label)
            else:
                view = getattr(maker, kind)(index)
            if view is None:
                view = maker.fragment(index)
            if view:
                out_texts.append(view)
                out_labels.append(label)
    return out_texts, np.asarray(out_labels, dtype=np.int64)
