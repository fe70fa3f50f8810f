"""LLM-judge domain classifier: ask a local instruct model which domain a text belongs to.

The prompt lists the domains under letters A, B, C, ... and asks for the letter. The domain
probabilities are the softmax over the next-token logits of the letters' first tokens (the rest of
the vocabulary is ignored), so a single forward pass per batch gives a full distribution -- no
sampling, no parsing of generated text.

ZeRO-3: every forward pass is a collective, so all ranks must run the same number of them. The
caller splits texts across ranks, computes `forward_batches(len(texts_on_rank))` on every rank,
takes the max over ranks, and passes it as `num_batches`; ranks with fewer batches then run dummy
batches whose outputs are thrown away (DESIGN.md section 4).
"""

from __future__ import annotations

import inspect
import logging
import math
import string
from typing import Any, Sequence

import numpy as np
import torch

from versatune_ds.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = (
    "Which domain does the following text belong to?\n\n"
    "Text:\n{text}\n\n"
    "Domains:\n{options}\n\n"
    "Answer with the letter of one domain."
)
# Without a chat template the answer follows "Answer:" on the same line, so the letter token is
# the one with a leading space (" A"); after a chat template's assistant header it is the bare letter.
PLAIN_ANSWER_SUFFIX = "\nAnswer:"
DUMMY_TEXT = "x"


class LlmJudgeClassifier:
    """DomainClassifier backed by a causal LM's next-token logits over label letters.

    `prompt_template` must contain `{text}` and `{options}` (the lettered domain list).
    `max_text_tokens` truncates each text (by the judge's tokenizer) before it goes into the prompt.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        domain_names: Sequence[str],
        *,
        batch_size: int = 8,
        prompt_template: str | None = None,
        max_text_tokens: int = 512,
        device: torch.device | str | None = None,
    ) -> None:
        if not 2 <= len(domain_names) <= len(string.ascii_uppercase):
            raise UserError(f"LlmJudgeClassifier: needs 2..26 domains (labels are letters A..Z), got {len(domain_names)}")
        if batch_size < 1 or max_text_tokens < 1:
            raise UserError(f"LlmJudgeClassifier: batch_size and max_text_tokens must be >= 1, got {batch_size}, {max_text_tokens}")
        template = prompt_template if prompt_template is not None else DEFAULT_PROMPT_TEMPLATE
        if "{text}" not in template or "{options}" not in template:
            raise UserError("LlmJudgeClassifier: prompt_template must contain the fields {text} and {options}")
        self.model = model
        self.tokenizer = tokenizer
        self.domain_names = tuple(domain_names)
        self.num_domains = len(self.domain_names)
        self.batch_size = batch_size
        self.prompt_template = template
        self.max_text_tokens = max_text_tokens
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.use_chat_template = bool(getattr(tokenizer, "chat_template", None))
        letters = string.ascii_uppercase[: self.num_domains]
        self.options = "\n".join(f"{letter}. {name}" for letter, name in zip(letters, self.domain_names))
        self.label_token_ids = self._label_token_ids(letters)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad_id) if pad_id is not None else 0
        # Only the last position's logits are needed; models that accept `logits_to_keep` skip
        # the vocabulary projection for the rest of the sequence.
        self._accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def _label_token_ids(self, letters: str) -> list[int]:
        prefix = "" if self.use_chat_template else " "
        ids = []
        for letter in letters:
            encoded = self.tokenizer.encode(prefix + letter, add_special_tokens=False)
            if not encoded:
                raise UserError(f"LlmJudgeClassifier: the tokenizer encodes label {prefix + letter!r} to no tokens")
            ids.append(int(encoded[0]))
        if len(set(ids)) != len(ids):
            raise UserError(
                f"LlmJudgeClassifier: the labels {[prefix + l for l in letters]} share first tokens {ids}; this "
                "tokenizer cannot tell them apart by one token -- use a judge model whose tokenizer has single letters"
            )
        return ids

    def forward_batches(self, num_texts: int) -> int:
        """How many forward calls `predict_proba` makes for `num_texts` texts (ceil(n / batch_size))."""
        return math.ceil(num_texts / self.batch_size)

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of the full judge prompt for one text (truncated text, template, answer cue)."""
        text_ids = self.tokenizer.encode(text, add_special_tokens=False)[: self.max_text_tokens]
        truncated = self.tokenizer.decode(text_ids)
        prompt = self.prompt_template.format(text=truncated, options=self.options)
        if self.use_chat_template:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            # The chat template already carries any BOS token.
            return list(self.tokenizer.encode(rendered, add_special_tokens=False))
        return list(self.tokenizer.encode(prompt + PLAIN_ANSWER_SUFFIX, add_special_tokens=True))

    def _batch_tensors(self, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        # Left padding puts every prompt's last token at position -1. Explicit position_ids keep
        # the real tokens at positions 0..len-1 whatever the padding, so a text's probabilities do
        # not depend on which batch it shares.
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "position_ids": position_ids.to(self.device),
        }

    def label_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """One forward pass; returns float64 [len(prompts), num_domains] next-token logits of the labels."""
        kwargs: dict[str, Any] = self._batch_tensors(prompts)
        if self._accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with torch.no_grad():
            logits = self.model(**kwargs, use_cache=False).logits[:, -1, :]
        return logits[:, self.label_token_ids].to(torch.float64).cpu()

    def predict_proba(self, texts: Sequence[str], *, num_batches: int | None = None) -> np.ndarray:
        """Probabilities [len(texts), num_domains] for the texts given to this rank.

        `num_batches` (ZeRO-3): the number of forward calls to make in total; batches beyond the
        ones the texts need are dummy batches (same batch size, outputs discarded). It must be at
        least `forward_batches(len(texts))`.
        """
        if isinstance(texts, str):
            raise UserError("predict_proba expects a sequence of texts, got a single str; wrap it in a list")
        needed = self.forward_batches(len(texts))
        total = needed if num_batches is None else num_batches
        if total < needed:
            raise UserError(
                f"LlmJudgeClassifier.predict_proba: num_batches={num_batches} but {len(texts)} texts need {needed} "
                f"batches of {self.batch_size}; pass the max of forward_batches() over all ranks"
            )
        was_training = bool(getattr(self.model, "training", False))
        self.model.eval()
        rows = []
        try:
            for start in range(0, len(texts), self.batch_size):
                prompts = [self.prompt_ids(text) for text in texts[start : start + self.batch_size]]
                rows.append(torch.softmax(self.label_logits(prompts), dim=-1).numpy())
            if total > needed:
                dummy = [self.prompt_ids(DUMMY_TEXT)] * self.batch_size
                for _ in range(total - needed):
                    self.label_logits(dummy)
        finally:
            if was_training:
                self.model.train()
        if not rows:
            return np.zeros((0, self.num_domains), dtype=np.float64)
        return np.concatenate(rows, axis=0)
