"""Conversation rendering and assistant-only loss masks (row formats are in data.formats).

A conversation is rendered to one string plus the character spans that carry loss, then tokenized in
one call with the tokenizer's offset mapping; a token is a loss token when it overlaps a loss
span (see `labels_from_offsets` for the one boundary case). So no prefix is ever assumed to tokenize the
same way on its own as inside the full text.

What the loss covers (the tests decode the masked tokens and compare with exactly this):

- `simple`:  each assistant content + EOS.
- `chatml`:  each assistant content + `<|im_end|>` (+ EOS when the tokenizer's EOS is another token).
- `chat_template` (the tokenizer's own): each assistant content + the template's end-of-turn text up to
  the last non-whitespace character (e.g. `</s>`, `<|im_end|>`, `<|eot_id|>`). The assistant part is
  found by rendering the conversation up to each assistant turn with `add_generation_prompt=True` and
  up to its end; if the template puts nothing after the content, EOS is inserted there, so every
  assistant turn ends with a stop token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from versatune_ds.data.formats import RowError
from versatune_ds.data.packing import IGNORE_INDEX

TEMPLATES = ("auto", "chat_template", "simple", "chatml")


# ----------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class Rendered:
    text: str
    loss_spans: tuple[tuple[int, int], ...]  # [start, end) character spans that carry loss


def resolve_template(tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    """`auto` -> `chat_template` when the tokenizer has one, else `simple`; checks what the others need."""
    has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        template = "chat_template" if has_chat_template else "simple"
    if template == "chat_template" and not has_chat_template:
        raise ValueError(
            "data.template is 'chat_template' but the tokenizer has no chat template; "
            "set data.template=simple or data.template=chatml (or auto)"
        )
    if tokenizer.eos_token is None:
        raise ValueError(
            "the tokenizer has no EOS token, so assistant turns cannot end with one; use a tokenizer with an eos_token"
        )
    return template


def render(messages: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase, template: str) -> Rendered:
    """Render a full conversation (template already resolved) with its loss spans."""
    if template == "simple":
        return _render_simple(messages, tokenizer)
    if template == "chatml":
        return _render_chatml(messages, tokenizer)
    if template == "chat_template":
        return _render_chat_template(messages, tokenizer)
    raise ValueError(f"unknown template {template!r}")


def render_prompt(messages: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    """The text a model continues to answer the last user turn (the generation prompt), for evaluation."""
    template = resolve_template(tokenizer, template)
    if template == "chat_template":
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    # The built-in templates: the conversation with an empty assistant turn, cut where its loss starts.
    rendered = render(list(messages) + [{"role": "assistant", "content": ""}], tokenizer, template)
    return rendered.text[: rendered.loss_spans[-1][0]]


def _bos(tokenizer: PreTrainedTokenizerBase) -> str:
    # A separate BOS only: tokenizers whose BOS is their EOS (GPT-2 style) start without one.
    bos = tokenizer.bos_token
    return bos if bos is not None and bos != tokenizer.eos_token else ""


_SIMPLE_HEADERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}


def _render_simple(messages: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase) -> Rendered:
    """`### Instruction:` / `### Response:` blocks (Alpaca style, multi-turn); each response ends with EOS."""
    parts = [_bos(tokenizer)]
    spans = []
    length = len(parts[0])
    for number, message in enumerate(messages):
        separator = "\n\n" if number else ""
        head = separator + _SIMPLE_HEADERS[message["role"]]
        parts.append(head)
        length += len(head)
        body = message["content"] + (tokenizer.eos_token if message["role"] == "assistant" else "")
        if message["role"] == "assistant":
            spans.append((length, length + len(body)))
        parts.append(body)
        length += len(body)
    return Rendered("".join(parts), tuple(spans))


def _render_chatml(messages: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase) -> Rendered:
    end = "<|im_end|>"
    eos = "" if tokenizer.eos_token == end else tokenizer.eos_token
    parts = [_bos(tokenizer)]
    spans = []
    length = len(parts[0])
    for message in messages:
        head = f"<|im_start|>{message['role']}\n"
        body = message["content"] + end + (eos if message["role"] == "assistant" else "")
        if message["role"] == "assistant":
            spans.append((length + len(head), length + len(head) + len(body)))
        piece = head + body + "\n"
        parts.append(piece)
        length += len(piece)
    return Rendered("".join(parts), tuple(spans))


def _render_chat_template(messages: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase) -> Rendered:
    messages = [dict(m) for m in messages]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    insert_eos_at = []
    for number, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:number], tokenize=False, add_generation_prompt=True) if number else ""
        through = tokenizer.apply_chat_template(messages[: number + 1], tokenize=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise RowError(
                "the tokenizer's chat template renders this conversation differently from its prefixes, so the "
                "assistant turns cannot be located; set data.template=chatml or data.template=simple"
            )
        turn = full[len(before) : len(through)]
        offset = len(before)
        content = message["content"]
        found = content
        at = turn.find(content) if content else -1
        if at < 0 and content.strip():  # templates that trim the content
            found = content.strip()
            at = turn.find(found)
        if at < 0:  # empty or rewritten content: the whole turn carries loss
            start, end = offset, offset + len(turn.rstrip())
        else:
            start = offset + at
            content_end = start + len(found)
            end = offset + len(turn.rstrip())
            if end <= content_end:  # nothing after the content: the turn needs an EOS
                insert_eos_at.append(content_end)
                end = content_end
        spans.append((start, end))
    if not insert_eos_at:
        return Rendered(full, tuple(spans))
    # Insert EOS after contents the template leaves without an end marker, shifting later spans.
    eos = tokenizer.eos_token
    text_parts, shifted, cursor, shift = [], [], 0, 0
    for (start, end) in spans:
        if end in insert_eos_at:
            text_parts.append(full[cursor:end] + eos)
            shifted.append((start + shift, end + shift + len(eos)))
            cursor = end
            shift += len(eos)
        else:
            shifted.append((start + shift, end + shift))
    text_parts.append(full[cursor:])
    return Rendered("".join(text_parts), tuple(shifted))


# ----------------------------------------------------------------------------------------------
# Tokenization with loss masks


def labels_from_offsets(input_ids: Sequence[int], offsets: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """`input_ids` with every token that does not overlap a loss span set to -100 (int64 array).

    Overlap (not "starts inside") so that no assistant character is ever left without loss: when the
    content starts with whitespace, byte-level BPE can merge the template's newline with it into one
    token (e.g. "\n   " + "return"); that token then carries loss, template newline included.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    if not spans or ids.size == 0:
        return labels
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    span_starts = np.array([s for s, _ in spans], dtype=np.int64)
    span_ends = np.array([e for _, e in spans], dtype=np.int64)
    # Spans are sorted and disjoint: the only span a token can overlap first is the first one ending after its start.
    candidate = np.searchsorted(span_ends, bounds[:, 0], side="right")
    valid = candidate < len(spans)
    overlaps = np.zeros(ids.shape, dtype=bool)
    overlaps[valid] = span_starts[candidate[valid]] < bounds[valid, 1]
    labels[overlaps] = ids[overlaps]
    return labels


def tokenize_rendered(rendered: Sequence[Rendered], tokenizer: PreTrainedTokenizerBase) -> tuple[list[list[int]], list]:
    """Token ids and labels of rendered conversations (one batched tokenizer call for fast tokenizers)."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(
            [r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False
        )
        ids = [list(x) for x in encoded["input_ids"]]
        labels = [labels_from_offsets(i, o, r.loss_spans) for i, o, r in zip(ids, encoded["offset_mapping"], rendered)]
        return ids, labels
    # Slow tokenizers have no offsets: tokenize span by span (boundaries then always split tokens).
    all_ids, all_labels = [], []
    for r in rendered:
        ids: list[int] = []
        labels: list[int] = []
        cursor = 0
        for start, end in r.loss_spans:
            for piece, is_loss in ((r.text[cursor:start], False), (r.text[start:end], True)):
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
                ids.extend(piece_ids)
                labels.extend(piece_ids if is_loss else [IGNORE_INDEX] * len(piece_ids))
            cursor = end
        tail = tokenizer(r.text[cursor:], add_special_tokens=False)["input_ids"] if r.text[cursor:] else []
        ids.extend(tail)
        labels.extend([IGNORE_INDEX] * len(tail))
        all_ids.append(ids)
        all_labels.append(labels)
    return all_ids, all_labels


def tokenize_batch(batch: Mapping[str, list], tokenizer: PreTrainedTokenizerBase, template: str) -> dict[str, list]:
    """`datasets.Dataset.map(batched=True)` function: messages -> input_ids, labels, error ("" when fine).

    Errors come back as data, not exceptions, so the main process can name file:line and apply
    `data.on_bad_row` (an exception inside a worker process would lose the row's location).
    """
    rendered: list[Rendered] = []
    errors: list[str] = []
    for messages in batch["messages"]:
        try:
            rendered.append(render(messages, tokenizer, template))
            errors.append("")
        except RowError as exc:
            rendered.append(Rendered("", ()))
            errors.append(str(exc))
        except Exception as exc:  # a chat template that raises (e.g. jinja2 TemplateError on an unsupported role)
            rendered.append(Rendered("", ()))
            errors.append(f"the tokenizer's chat template rejected this conversation: {exc}")
    ids, labels = tokenize_rendered(rendered, tokenizer)
    return {"input_ids": ids, "labels": labels, "error": errors}
