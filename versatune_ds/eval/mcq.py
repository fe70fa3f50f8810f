"""Multiple-choice accuracy by log-likelihood, in the style of EleutherAI's lm-evaluation-harness.

Prompt (default; lm-eval's cloze format for ARC-style tasks: doc_to_text "Question: {{question}}\\nAnswer:",
target_delimiter " ", doc_to_choice = the choice texts):

    context      = "Question: " + question + "\\nAnswer:"
    continuation = " " + choice

With `PromptFormat(chat_template=True)` the context is instead the tokenizer's chat template applied to one
user turn holding "Question: ...\\nAnswer:" with the generation prompt added, and the delimiter is "" (the
template already ends the prompt, usually with a newline).

Scoring: for each choice, log-likelihood = sum over the continuation's tokens of log p(token | everything
before), computed as minus the summed cross-entropy of `evaluate.batch_loss_sums` with labels set on the
continuation only (same fp32 shift-by-one as the held-out loss). Token boundary as lm-eval's `_encode_pair`:
trailing spaces of the context move to the continuation, then context+continuation and the context are
tokenized (no special tokens unless `add_bos`), and the continuation tokens are the difference
`whole[len(context_tokens):]`; the model sees context_tokens + continuation_tokens. When that is longer
than `max_length` the oldest context tokens are cut.

Metrics per item: `acc` = argmax of the log-likelihoods is the answer; `acc_norm` = argmax of
log-likelihood / len(choice), the choice's length in *characters* (Python `len` of the choice text without
the delimiter). This is exactly lm-eval's `acc_norm` (`completion_len = [float(len(i)) for i in choices]`);
lm-eval's byte-length variant is a separate metric (`acc_bytes`) and is not computed here.

Distribution: items are split into even contiguous shares per rank; every rank runs the same number of
forward passes (dummy rows fill short ranks, DESIGN.md section 4) and the per-item results are gathered,
so every rank (rank 0 in particular) ends with all of them, ordered by (domain id, item index).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from versatune_ds import dist
from versatune_ds.data.encoding import decode_utf8
from versatune_ds.data.packing import IGNORE_INDEX, Row, collate_rows
from versatune_ds.errors import UserError
from versatune_ds.eval.heldout import ForwardFn, batch_loss_sums, lockstep_batches, lockstep_num_batches

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class McqItem:
    domain_id: int
    index: int  # position in its domain's (possibly subsampled) item list
    question: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class PromptFormat:
    template: str = "Question: {question}\nAnswer:"
    target_delimiter: str = " "
    chat_template: bool = False  # wrap the context in the tokenizer's chat template (one user turn)
    add_bos: bool = False  # lm-eval's default for causal LMs: no special tokens

    @classmethod
    def chat(cls) -> PromptFormat:
        return cls(target_delimiter="", chat_template=True)


@dataclass(frozen=True)
class ItemScore:
    domain_id: int
    index: int
    answer: int
    logprobs: tuple[float, ...]  # one per choice
    choice_chars: tuple[int, ...]  # len(choice) per choice, for acc_norm

    @property
    def pred(self) -> int:
        return int(np.argmax(self.logprobs))

    @property
    def pred_norm(self) -> int:
        return int(np.argmax(np.array(self.logprobs) / np.maximum(np.array(self.choice_chars, dtype=np.float64), 1.0)))


@dataclass(frozen=True)
class McqAccuracy:
    acc: np.ndarray  # float64 [D]; NaN where a domain has no items
    acc_norm: np.ndarray
    n: np.ndarray  # int64 [D]


# ----------------------------------------------------------------------------------------------
# Items


def load_mcq_file(path: str | Path, domain_id: int, *, max_items: int | None = None, seed: int = 0) -> list[McqItem]:
    """Read `{question, choices, answer}` JSONL rows (the schema of shared/data/eval); optionally a fixed-seed subset.

    The subset keeps file order (sorted indices of a seeded permutation), so `--max-items` gives the same
    items on every run and every rank.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--mcq: file not found: {path}")
    # Decoded whole, so a file in another encoding (Latin-1, UTF-16) is one clear error, not a traceback.
    text, reason = decode_utf8(path.read_bytes(), str(path))
    if text is None:
        raise UserError(f"--mcq: {reason}")
    rows: list[McqItem] = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        rows.append(_parse_item(line, f"{path}:{line_no}", domain_id, len(rows)))
    if not rows:
        raise UserError(f"{path}: no multiple-choice items (expected JSON lines with question, choices, answer)")
    if max_items is not None and max_items < len(rows):
        keep = np.sort(np.random.default_rng(seed).permutation(len(rows))[:max_items])
        rows = [McqItem(domain_id, i, rows[k].question, rows[k].choices, rows[k].answer) for i, k in enumerate(keep)]
    return rows


def _parse_item(line: str, where: str, domain_id: int, index: int) -> McqItem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply; expected an object with question, choices, answer") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with question, choices, answer")
    question, choices, answer = obj.get("question"), obj.get("choices"), obj.get("answer")
    if not isinstance(question, str):
        raise UserError(f"{where}: 'question' must be a string, got {question!r:.60}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise UserError(f"{where}: 'choices' must be a list of at least 2 strings, got {choices!r:.80}")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise UserError(f"{where}: 'answer' must be an integer index into choices (0-{len(choices) - 1}), got {answer!r}")
    return McqItem(domain_id, index, question, tuple(choices), answer)


# ----------------------------------------------------------------------------------------------
# Requests (one per choice)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, add_bos: bool) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str, *, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """Context and continuation token ids split as lm-eval does (see the module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation, add_bos)
    context_ids = _encode(tokenizer, context, add_bos)
    continuation_ids = whole[len(context_ids) :]
    if not context_ids:
        # Nothing to condition on: like lm-eval, condition on the end-of-text token.
        context_ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id]
    return context_ids, continuation_ids


def context_text(item: McqItem, tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat) -> str:
    text = fmt.template.format(question=item.question)
    if fmt.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat-template: the tokenizer has no chat template; drop the flag to use the plain prompt")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text


def choice_row(item: McqItem, choice: int, tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, max_length: int) -> Row:
    """One scoring row: labels are the continuation tokens, everything else -100."""
    context_ids, continuation_ids = encode_pair(
        tokenizer, context_text(item, tokenizer, fmt), fmt.target_delimiter + item.choices[choice], add_bos=fmt.add_bos
    )
    if not continuation_ids:
        raise UserError(f"item {item.index} of domain id {item.domain_id}: choice {choice} tokenizes to nothing")
    ids = np.array(context_ids + continuation_ids, dtype=np.int64)[-max_length:]
    labels = ids.copy()
    labels[: max(len(ids) - len(continuation_ids), 1)] = IGNORE_INDEX  # the first token can never be scored
    return Row(
        domain_id=item.domain_id,
        input_ids=ids,
        labels=labels,
        position_ids=np.arange(len(ids), dtype=np.int64),
        example_indices=(item.index, choice),
    )


# ----------------------------------------------------------------------------------------------
# Scoring


def score_mcq(
    forward_fn: ForwardFn,
    items: Sequence[McqItem],
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int,
    pad_token_id: int,
    env: dist.DistEnv,
    fmt: PromptFormat = PromptFormat(),
    max_length: int = 2048,
) -> list[ItemScore]:
    """Score every item's choices; call on ALL ranks with the same `items`. Returns all scores on every rank."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    shares = [sum(len(items[i].choices) for i in dist.even_shard(len(items), env.world_size, r)) for r in range(env.world_size)]
    mine = [items[i] for i in dist.even_shard(len(items), env.world_size, env.rank)]
    rows = [choice_row(item, c, tokenizer, fmt, max_length) for item in mine for c in range(len(item.choices))]
    # Longest first keeps padding low, with a fixed tie order (results do not depend on it beyond float noise).
    order = sorted(range(len(rows)), key=lambda k: (-rows[k].num_tokens, k))
    rows = [rows[k] for k in order]
    num_batches = lockstep_num_batches(shares, batch_size)
    loglik: dict[tuple[int, int, int], float] = {}
    for batch_rows in lockstep_batches(rows, num_batches, batch_size, pad_token_id):
        batch = collate_rows(batch_rows, pad_token_id=pad_token_id, packed=False)
        sums, _ = batch_loss_sums(forward_fn, batch)
        for row, s in zip(batch_rows, sums):
            if row.example_indices:  # dummy rows have none
                loglik[(row.domain_id, *row.example_indices)] = -float(s)
    local = [
        ItemScore(
            domain_id=item.domain_id,
            index=item.index,
            answer=item.answer,
            logprobs=tuple(loglik[(item.domain_id, item.index, c)] for c in range(len(item.choices))),
            choice_chars=tuple(len(c) for c in item.choices),
        )
        for item in mine
    ]
    gathered = [score for part in dist.all_gather_objects(local) for score in part]
    gathered.sort(key=lambda s: (s.domain_id, s.index))
    logger.debug("mcq: %d items, %d forward passes per rank", len(gathered), num_batches)
    return gathered


def mcq_accuracy(scores: Sequence[ItemScore], num_domains: int) -> McqAccuracy:
    """Per-domain mean acc and acc_norm (NaN for a domain without items) and item counts."""
    n = np.zeros(num_domains, dtype=np.int64)
    hits = np.zeros(num_domains)
    hits_norm = np.zeros(num_domains)
    for score in scores:
        n[score.domain_id] += 1
        hits[score.domain_id] += score.pred == score.answer
        hits_norm[score.domain_id] += score.pred_norm == score.answer
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(n > 0, hits / np.maximum(n, 1), math.nan)
        acc_norm = np.where(n > 0, hits_norm / np.maximum(n, 1), math.nan)
    return McqAccuracy(acc=acc, acc_norm=acc_norm, n=n)
