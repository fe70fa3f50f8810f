"""Rendering a conversation with a Jinja chat template (the tokenizer's own, a catalogue entry, or a file),
and finding the characters that carry loss.

The template renders the whole conversation once (with `tools=` when the row has tools). Each assistant turn
that bears loss is then located:

1. by prefixes: the conversation up to the turn with the generation prompt, and up to its end, must both be
   prefixes of the full text; the turn is what lies between (most templates);
2. otherwise by search: the turn is rendered alone after a one-word user turn, and that text is looked for in
   the full text after the previous turn (templates whose early text depends on later turns, e.g. Mistral v0.3
   writes the tool list before the LAST user turn).

A turn that neither finds is refused, never guessed. The loss covers the answer (the content, or the whole
turn when the template rewrites it, e.g. tool calls) and the template's end-of-turn text up to its last
non-whitespace character; a template that writes nothing after the answer gets EOS inserted there.

Nothing is left out in silence: the full text must contain every message's text, every tool call's name and
every tool's name. A template that drops a tool call or ignores `tools` (Llama 3's, ChatML) makes the row a bad
row with that reason; one that drops the system prompt (Mistral v0.3, when the row ends with an answer) renders
the row without it and says so in a note.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from transformers import PreTrainedTokenizerBase

from versatune_ds.data.conversation import Message, RowError, Tool

Apply = Callable[[list[Message], bool], str]  # (messages, add_generation_prompt) -> text


@dataclass(frozen=True)
class Rendered:
    text: str
    loss_spans: tuple[tuple[int, int], ...]  # [start, end) character spans that carry loss
    notes: tuple[str, ...] = ()  # data.diagnostics kinds noticed while rendering (e.g. "system_dropped")


def render_jinja(
    messages: Sequence[Message], tools: Sequence[Tool] | None, tokenizer: PreTrainedTokenizerBase, source: str | None
) -> Rendered:
    """Render with `source` (None: the tokenizer's own template); RowError when the template cannot render the row."""
    plain = [{k: v for k, v in m.items() if k != "loss"} for m in messages]
    losses = [bool(m.get("loss", m["role"] == "assistant")) and m["role"] == "assistant" for m in messages]

    def apply(msgs: list[Message], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs, tools=list(tools) if tools else None, chat_template=source, tokenize=False, add_generation_prompt=generation_prompt
        )

    full = _apply_or_refuse(apply, plain)
    notes: tuple[str, ...] = ()
    if plain and plain[0]["role"] == "system" and plain[0]["content"].strip() and not _contains(full, plain[0]["content"]):
        # The template leaves the system prompt out of this conversation: render it without, and say so.
        plain, losses, notes = plain[1:], losses[1:], ("system_dropped",)
        full = _apply_or_refuse(apply, plain)
    _check_nothing_left_out(plain, full)
    if tools and _apply_or_refuse(lambda msgs, gen: tokenizer.apply_chat_template(
            msgs, chat_template=source, tokenize=False, add_generation_prompt=gen), plain) == full:
        raise RowError(_no_tools_reason("it renders the row the same with and without its tools"))
    turns = _turns_by_prefix(plain, full, apply)
    if turns is None:
        turns = _turns_by_search(plain, full, apply)
    spans, insert_eos_at = [], []
    for index, (start, end, needs_eos) in turns.items():
        if needs_eos:
            insert_eos_at.append(end)
        if losses[index]:
            spans.append((start, end))
    return _with_eos(full, spans, insert_eos_at, tokenizer.eos_token, notes)


def _apply_or_refuse(apply: Apply, messages: list[Message]) -> str:
    try:
        return apply(messages, False)
    except Exception as exc:  # jinja2 TemplateError, raise_exception(), a template reading a key the row lacks
        hints = []
        roles = [m["role"] for m in messages]
        if "system" in roles:
            hints.append("a template without a system role needs the system text folded into the first user turn")
        if any(a == b for a, b in zip(roles, roles[1:])) or (roles and roles[roles[0] == "system" :][:1] == ["assistant"]):
            hints.append("a template that needs user/assistant turns to alternate refuses this order")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise RowError(f"the chat template rejected this conversation: {exc}{hint}; fix the row or choose another data.template") from None


def _contains(text: str, content: str) -> bool:
    stripped = content.strip()
    return not stripped or stripped in text or json.dumps(stripped, ensure_ascii=False)[1:-1] in text


def _check_nothing_left_out(messages: list[Message], full: str) -> None:
    for number, message in enumerate(messages, start=1):
        if not _contains(full, message["content"]):
            raise RowError(f"the chat template leaves out turn {number} ({message['role']}: {message['content'][:40]!r}); "
                           "it cannot render this conversation as given - fix the row or choose another data.template")


def _no_tools_reason(what: str) -> str:
    return (f"the chat template cannot express tools or tool calls: {what}; use a template that renders them (the "
            "model's own if it does, or data.template=qwen2.5 / mistral), or remove the tool rows")


def _turns_by_prefix(messages: list[Message], full: str, apply: Apply) -> dict[int, tuple[int, int, bool]] | None:
    """{message index: (loss start, loss end, needs EOS)} for every assistant turn, or None when a prefix of the
    conversation does not render as a prefix of the whole."""
    turns = {}
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = apply(messages[:index], True) if index else ""
        through = apply(messages[: index + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            return None
        turns[index] = _span_in_turn(message, full, len(before), len(through))
    return turns


def _span_in_turn(message: Message, full: str, start: int, stop: int) -> tuple[int, int, bool]:
    """The loss span of an assistant turn that occupies full[start:stop]."""
    turn = full[start:stop]
    for call in message.get("tool_calls") or ():
        if call["function"]["name"] not in turn:
            raise RowError(_no_tools_reason(f"it left out the call to {call['function']['name']!r}"))
    end = start + len(turn.rstrip())
    content = message["content"]
    found, at = content, (turn.find(content) if content else -1)
    if at < 0 and content.strip():  # templates that trim the content
        found = content.strip()
        at = turn.find(found)
    if at < 0 or message.get("tool_calls"):  # rewritten content or tool calls: the whole turn carries loss
        return start, end, False
    content_end = start + at + len(found)
    if end <= content_end:  # nothing after the answer: it needs an EOS to stop on
        return start + at, content_end, True
    return start + at, end, False


def _turns_by_search(messages: list[Message], full: str, apply: Apply) -> dict[int, tuple[int, int, bool]]:
    turns = {}
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        probe_user = {"role": "user", "content": "Q"}
        try:
            before = apply([probe_user], True)
            alone = apply([probe_user, message], False)
        except Exception:  # the template refuses a lone turn: nothing to search for
            alone, before = "", "x"
        if alone.startswith(before):
            turn = alone[len(before) :].rstrip()
        else:  # the user turn renders differently alone: take the answer and what follows it (its end marker)
            content = message["content"] if message["content"] in alone else message["content"].strip()
            found = alone.rfind(content) if content.strip() and not message.get("tool_calls") else -1
            turn = alone[found:].rstrip() if found >= 0 else ""
        at = full.find(turn, cursor) if turn.strip() else -1
        if at < 0:
            raise RowError(
                "the chat template renders each turn differently in context, so the answers cannot be located for the "
                "loss; choose another data.template (e.g. the catalogue entry of the model family)"
            )
        turns[index] = _span_in_turn(message, full, at, at + len(turn))
        cursor = at + len(turn)
    return turns


def _with_eos(full: str, spans: list[tuple[int, int]], insert_eos_at: list[int], eos: str, notes: tuple[str, ...]) -> Rendered:
    """Insert EOS after answers the template leaves without an end marker, shifting the spans after them."""
    if not insert_eos_at:
        return Rendered(full, tuple(spans), notes)
    pieces, cursor = [], 0
    for at in sorted(insert_eos_at):
        pieces.append(full[cursor:at] + eos)
        cursor = at
    pieces.append(full[cursor:])

    def shift(position: int, is_end: bool) -> int:
        return position + len(eos) * sum(1 for at in insert_eos_at if at < position or (is_end and at == position))

    return Rendered("".join(pieces), tuple((shift(s, False), shift(e, True)) for s, e in spans), notes)


def apply_template(tokenizer: PreTrainedTokenizerBase, source: str | None, messages: list[Message], *, generation_prompt: bool) -> Any:
    """The template's text for `messages` (for prompts at evaluation time)."""
    plain = [{k: v for k, v in m.items() if k != "loss"} for m in messages]
    return tokenizer.apply_chat_template(plain, chat_template=source, tokenize=False, add_generation_prompt=generation_prompt)
