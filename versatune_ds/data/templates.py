"""Chat templates: which one renders a domain's rows, the two built-in ones, and tokenization with loss masks.

`data.template` (resolved once per run by `resolve_template`):

- `auto` (default): the tokenizer's own chat template; a tokenizer without one (a base model) falls back to
  `simple`, with a warning that names the fallback and the choices;
- `chat_template`: the tokenizer's own, required;
- a catalogue name (data.chat_templates: llama3, qwen2.5, mistral, gemma, alpaca) or a path to a .jinja file;
- `simple` / `chatml`: built in, rendered here. They cannot express tools: rows with tools are refused.

Jinja templates are rendered by data.template_jinja. A conversation is rendered to one string plus the
character spans that carry loss, then tokenized in one call with the tokenizer's offset mapping; a token is a
loss token when it overlaps a loss span (see `labels_from_offsets` for the one boundary case). So no prefix is
ever assumed to tokenize the same way on its own as inside the full text. What the loss covers:

- `simple`: each assistant content + EOS;
- `chatml`: each assistant content + `<|im_end|>` (+ EOS when the tokenizer's EOS is another token);
- Jinja: each assistant content (the whole turn for tool calls) + the template's end-of-turn text up to its
  last non-whitespace character (e.g. `</s>`, `<|im_end|>`, `<|eot_id|>`), EOS inserted where there is none.

Only assistant turns whose `loss` is true get spans (data.conversation); the others are context.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from versatune_ds.data.chat_templates import BUILT_IN, catalogue_entry
from versatune_ds.data.conversation import Message, RowError, Tool
from versatune_ds.data.packing import IGNORE_INDEX
from versatune_ds.data.template_jinja import Rendered, apply_template, render_jinja
from versatune_ds.errors import UserError

logger = logging.getLogger(__name__)
CHOICES_TEXT = "the catalogue (llama3, qwen2.5, mistral, gemma, alpaca), built-in simple / chatml, or a .jinja file"


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved data.template."""

    name: str  # chat_template (the tokenizer's own) | a catalogue name | simple | chatml | a file path
    source: str | None  # the Jinja text (None: the tokenizer's own template, or a built-in)
    builtin: bool  # simple / chatml, rendered in Python
    fingerprint: str  # a hash of what renders (part of the cache key)


def resolve_template(tokenizer: PreTrainedTokenizerBase, template: str) -> ChatTemplate:
    """The template `data.template` names for this tokenizer (see the module docstring)."""
    own = getattr(tokenizer, "chat_template", None)
    if tokenizer.eos_token is None:
        raise UserError("the tokenizer has no EOS token, so assistant turns cannot end with one; use a tokenizer with an eos_token")
    if template == "auto" and not own:
        logger.warning(
            "the tokenizer has no chat template (a base model?): rendering with the built-in 'simple' template "
            "(### Instruction: / ### Response:); set data.template to choose %s", CHOICES_TEXT,
        )
        template = "simple"
    if template in ("auto", "chat_template"):
        if not own:
            raise UserError(f"data.template is 'chat_template' but the tokenizer has no chat template; set data.template to {CHOICES_TEXT}")
        return ChatTemplate("chat_template", None, False, _hash("chat_template", json.dumps(own, sort_keys=True)))
    if template in BUILT_IN:
        return ChatTemplate(template, None, True, _hash(template, "builtin-1"))
    entry = catalogue_entry(template)
    if entry is not None:
        missing = [m for m in entry.markers if m not in tokenizer.get_vocab()]
        if missing:
            logger.warning(
                "data.template=%s writes %s, which the tokenizer does not have as tokens: they will be split into "
                "ordinary pieces; a model learns them, but its family's own tokenizer and template fit better",
                template, ", ".join(missing),
            )
        return ChatTemplate(entry.name, entry.source, False, _hash(entry.name, entry.source))
    return _template_file(tokenizer, template)


def _template_file(tokenizer: PreTrainedTokenizerBase, path: str) -> ChatTemplate:
    try:
        source = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"data.template: cannot read the Jinja template {path}: {exc}") from None
    try:
        apply_template(tokenizer, source, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], generation_prompt=False)
    except Exception as exc:  # a Jinja syntax error, or a template that refuses the simplest conversation
        raise UserError(f"data.template: {path} does not render a user/assistant conversation: {exc}") from None
    return ChatTemplate(path, source, False, _hash(path, source))


def _hash(name: str, text: str) -> str:
    return hashlib.sha256(f"{name}\0{text}".encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Rendering


def render(
    messages: Sequence[Mapping], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, tools: Sequence[Tool] | None = None
) -> Rendered:
    """A full conversation with its loss spans (`loss` missing on a message: true for assistant turns)."""
    messages = [dict(m) for m in messages]
    if not template.builtin:
        return render_jinja(messages, tools, tokenizer, template.source)
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        raise RowError(f"data.template={template.name} cannot express tools or tool calls; use a template that renders "
                       "them (the model's own if it does, or data.template=qwen2.5 / mistral), or remove the tool rows")
    return _render_simple(messages, tokenizer) if template.name == "simple" else _render_chatml(messages, tokenizer)


def render_prompt(messages: Sequence[Mapping], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> str:
    """The text a model continues to answer the last user turn (the generation prompt), for evaluation."""
    if not template.builtin:
        return apply_template(tokenizer, template.source, [dict(m) for m in messages], generation_prompt=True)
    # The built-in templates: the conversation with an empty assistant turn, cut where its loss starts.
    rendered = render(list(messages) + [{"role": "assistant", "content": ""}], tokenizer, template)
    return rendered.text[: rendered.loss_spans[-1][0]]


def _loss(message: Mapping) -> bool:
    return message["role"] == "assistant" and bool(message.get("loss", True))


def _bos(tokenizer: PreTrainedTokenizerBase) -> str:
    # A separate BOS only: tokenizers whose BOS is their EOS (GPT-2 style) start without one.
    bos = tokenizer.bos_token
    return bos if bos is not None and bos != tokenizer.eos_token else ""


_SIMPLE_HEADERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}


def _render_simple(messages: Sequence[Mapping], tokenizer: PreTrainedTokenizerBase) -> Rendered:
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
        if _loss(message):
            spans.append((length, length + len(body)))
        parts.append(body)
        length += len(body)
    return Rendered("".join(parts), tuple(spans))


def _render_chatml(messages: Sequence[Mapping], tokenizer: PreTrainedTokenizerBase) -> Rendered:
    end = "<|im_end|>"
    eos = "" if tokenizer.eos_token == end else tokenizer.eos_token
    parts = [_bos(tokenizer)]
    spans = []
    length = len(parts[0])
    for message in messages:
        head = f"<|im_start|>{message['role']}\n"
        body = message["content"] + end + (eos if message["role"] == "assistant" else "")
        if _loss(message):
            spans.append((length + len(head), length + len(head) + len(body)))
        piece = head + body + "\n"
        parts.append(piece)
        length += len(piece)
    return Rendered("".join(parts), tuple(spans))


# ----------------------------------------------------------------------------------------------
# Tokenization with loss masks


def labels_from_offsets(input_ids: Sequence[int], offsets: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """`input_ids` with every token that does not overlap a loss span set to -100 (int64 array).

    Overlap (not "starts inside") so that no assistant character is ever left without loss: when the
    content starts with whitespace, byte-level BPE can merge the template's newline with it into one
    token (e.g. "\\n   " + "return"); that token then carries loss, template newline included.
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


def render_conversation_json(text: str, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> Rendered:
    """Render a conversation stored as JSON text (data.records.Record.conversation_json)."""
    conversation = json.loads(text)
    return render(conversation["messages"], tokenizer, template, conversation.get("tools"))


def tokenize_batch(batch: Mapping[str, list], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> dict[str, list]:
    """`datasets.Dataset.map(batched=True)` function: conversation JSON -> input_ids, labels, error, note.

    Errors come back as data, not exceptions, so the main process can name file:line and apply
    `data.on_bad_row` (an exception inside a worker process would lose the row's location).
    """
    rendered: list[Rendered] = []
    errors: list[str] = []
    for text in batch["conversation"]:
        try:
            rendered.append(render_conversation_json(text, tokenizer, template))
            errors.append("")
        except RowError as exc:
            rendered.append(Rendered("", ()))
            errors.append(str(exc))
    ids, labels = tokenize_rendered(rendered, tokenizer)
    return {"input_ids": ids, "labels": labels, "error": errors, "note": [",".join(r.notes) for r in rendered]}


def tokenize_messages(messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> tuple[list[int], np.ndarray]:
    """(input_ids, labels) of one conversation without tools (tests and one-off callers)."""
    ids, labels = tokenize_rendered([render(messages, tokenizer, template)], tokenizer)
    return ids[0], np.asarray(labels[0])
