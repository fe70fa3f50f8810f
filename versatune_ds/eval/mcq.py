"""Multiple-choice accuracy by log-likelihood, in the style of EleutherAI's lm-evaluation-harness.

Prompt (default; lm-eval's cloze format for ARC-style tasks: doc_to_text "Question: {{question}}\\nAnswer:",
target_delimiter " ", doc_to_choice = the choice texts):

    context      = "Question: " + question + "\\nAnswer:"
    continuation = " " + choice

With `PromptFormat(chat_template=True)` the context is instead the tokenizer's chat template applied to one
user turn holding "Question: ...\\nAnswer:" with the generation prompt added, and the delimiter is "" (the
template already ends the prompt, usually with a newline).

Scoring: for each choice, log-likelihood = sum over the continuation's tokens of log p(token | everything
before), log-softmax in fp32. Token boundary as lm-eval's `_encode_pair`: trailing spaces of the context move
to the continuation, then context+continuation and the context are tokenized (no special tokens unless
`add_bos`), and the continuation tokens are the difference `whole[len(context_tokens):]`; the model sees
context_tokens + continuation_tokens. The context's tokens are the same for every choice, so it runs once per
item and its KV cache serves all choices (`choice_logprobs`); lm-eval runs each choice's whole row, which
gives the same numbers up to float rounding at ~3x the tokens. When context + the longest continuation are
longer than `max_length` the oldest context tokens are cut; a continuation of `max_length` tokens or more is
an error.

Metrics per item: `acc` = argmax of the log-likelihoods is the answer; `acc_norm` = argmax of
log-likelihood / len(choice), the choice's length in *characters* (Python `len` of the choice text without
the delimiter). This is exactly lm-eval's `acc_norm` (`completion_len = [float(len(i)) for i in choices]`);
lm-eval's byte-length variant is a separate metric (`acc_bytes`) and is not computed here.

Distribution: items are split into even contiguous shares per rank; every rank runs the same number of
batches, two forward passes each (a one-token filler item fills short ranks, DESIGN.md section 4), and the
per-item results are gathered, so every rank (rank 0 in particular) ends with all of them, ordered by
(domain id, item index).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from versatune_ds import dist
from versatune_ds.data.encoding import decode_utf8
from versatune_ds.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class McqItem:
    domain_id: int
    index: int  # position in its domain's (possibly subsampled) item list
    question: str
    choices: tuple[str, ...]
    answer: int
    source: str = ""  # "file:line", for error messages


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
        rows = [dataclasses.replace(rows[k], index=i) for i, k in enumerate(keep)]
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
    return McqItem(domain_id, index, question, tuple(choices), answer, where)


# ----------------------------------------------------------------------------------------------
# Requests (one per item: the shared context and one continuation per choice)


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


@dataclass(frozen=True)
class ChoiceRequest:
    """One item's tokens: the context every choice shares and one continuation per choice."""

    key: tuple[int, int]  # (domain id, item index); () for a lockstep filler
    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]


def choice_request(item: McqItem, tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, max_length: int) -> ChoiceRequest:
    """The item's context and continuations; when context + the longest continuation exceed `max_length`, the
    oldest context tokens are cut (at least one is kept)."""
    text = context_text(item, tokenizer, fmt)
    pairs = [encode_pair(tokenizer, text, fmt.target_delimiter + choice, add_bos=fmt.add_bos) for choice in item.choices]
    context = pairs[0][0]
    where = item.source or f"item {item.index} of domain id {item.domain_id}"
    for choice, (ctx, continuation) in enumerate(pairs):
        if not continuation:
            raise UserError(f"{where}: choice {choice} tokenizes to nothing")
        if len(continuation) >= max_length:
            raise UserError(f"{where}: choice {choice} is {len(continuation)} tokens, at least --max-length ({max_length}); raise --max-length")
        # The context's tokens never depend on the continuation (encode_pair tokenizes it alone), so one prefix serves all.
        assert ctx == context, "context tokens differ between choices"
    longest = max(len(continuation) for _, continuation in pairs)
    context = context[-max(max_length - longest, 1) :]
    return ChoiceRequest((item.domain_id, item.index), tuple(context), tuple(tuple(c) for _, c in pairs))


def filler_request(pad_token_id: int) -> ChoiceRequest:
    """A one-token context with one one-token choice: keeps a rank with fewer items in lockstep, scores nothing."""
    return ChoiceRequest((), (pad_token_id,), ((pad_token_id,),))


# ----------------------------------------------------------------------------------------------
# Scoring


def choice_logprobs(model: torch.nn.Module, requests: Sequence[ChoiceRequest], *, pad_token_id: int, device: torch.device) -> list[list[float]]:
    """Summed log-probabilities of every request's continuations, in exactly two forward passes.

    1. The contexts, left-padded so that all end in the last column, with the KV cache on; only the last
       position's logits are kept (`logits_to_keep`): they predict each continuation's first token.
    2. The cache is copied once per choice (`batch_select_indices`) and all continuations, right-padded, run on
       top of it with positions continuing their context's.
    Each context is thus computed once per item instead of once per choice (~3x fewer tokens on 4-choice items
    whose question is longer than its answers). Equal to scoring every context + continuation row alone up
    to float rounding (tests/test_mcq.py).
    """
    contexts, context_mask = _padded([r.context for r in requests], pad_token_id, left=True)
    accepted = inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    cache_key = "cache" if "cache" in accepted else "past_key_values"  # renamed in transformers 5.2x
    with torch.no_grad():
        out = model(input_ids=contexts.to(device), attention_mask=context_mask.to(device),
                    position_ids=(context_mask.cumsum(1) - 1).clamp(min=0).to(device), use_cache=True, **keep)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [items, V]
        owner = torch.tensor([b for b, r in enumerate(requests) for _ in r.continuations])
        cache = out[cache_key]
        cache.batch_select_indices(owner.to(device))
        tokens, mask = _padded([c for r in requests for c in r.continuations], pad_token_id, left=False)
        positions = context_mask.sum(1)[owner][:, None] + torch.arange(tokens.shape[1])[None, :]
        logits = model(input_ids=tokens.to(device), attention_mask=torch.cat([context_mask[owner], mask], 1).to(device),
                       position_ids=positions.to(device), use_cache=True, **{cache_key: cache}).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # position j predicts token j + 1
        first_token = first[owner.to(device), tokens[:, 0].to(device)]
        later = logp[:, :-1].gather(-1, tokens[:, 1:, None].to(device))[..., 0] * mask[:, 1:].to(device)
        sums = (first_token + later.sum(1)).double().cpu().tolist()
    result, k = [], 0
    for r in requests:
        result.append(sums[k : k + len(r.continuations)])
        k += len(r.continuations)
    return result


def _padded(sequences: Sequence[Sequence[int]], pad_token_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N, longest] padded on the left (so every row ends in the last column) or on the right, and the
    attention mask (1 on real tokens)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(sequences):
        where = slice(width - len(s), width) if left else slice(0, len(s))
        ids[b, where] = torch.tensor(s, dtype=torch.long)
        mask[b, where] = 1
    return ids, mask


def score_mcq(
    model: torch.nn.Module,
    items: Sequence[McqItem],
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int,
    pad_token_id: int,
    env: dist.DistEnv,
    fmt: PromptFormat = PromptFormat(),
    max_length: int = 2048,
    device: torch.device | None = None,
) -> list[ItemScore]:
    """Score every item's choices; call on ALL ranks with the same `items`. Returns all scores on every rank.

    `model` is a Hugging Face causal LM (a ZeRO-3 engine's `module` too). A batch holds up to `batch_size`
    choices (whole items, at least one): `batch_size // most choices of any item` items.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = device if device is not None else next(model.parameters()).device
    per_batch = max(1, batch_size // max((len(i.choices) for i in items), default=1))
    largest_share = max(len(dist.even_shard(len(items), env.world_size, r)) for r in range(env.world_size))
    num_batches = math.ceil(largest_share / per_batch)  # every rank knows every share: no collective needed
    mine = [items[i] for i in dist.even_shard(len(items), env.world_size, env.rank)]
    requests = [choice_request(item, tokenizer, fmt, max_length) for item in mine]
    # Longest context first keeps padding low; the tie order is fixed.
    requests.sort(key=lambda r: (-len(r.context), r.key))
    loglik: dict[tuple[int, int], list[float]] = {}
    for b in range(num_batches):
        batch = requests[b * per_batch : (b + 1) * per_batch] or [filler_request(pad_token_id)]
        for request, sums in zip(batch, choice_logprobs(model, batch, pad_token_id=pad_token_id, device=device)):
            if request.key:
                loglik[request.key] = sums
    local = [
        ItemScore(
            domain_id=item.domain_id,
            index=item.index,
            answer=item.answer,
            logprobs=tuple(loglik[(item.domain_id, item.index)]),
            choice_chars=tuple(len(c) for c in item.choices),
        )
        for item in mine
    ]
    gathered = [score for part in dist.all_gather_objects(local) for score in part]
    gathered.sort(key=lambda s: (s.domain_id, s.index))
    logger.debug("mcq: %d items, %d batches (2 forward passes each) per rank", len(gathered), num_batches)
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
