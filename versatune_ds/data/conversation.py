"""The one shape every row becomes, and the checks every conversation goes through whatever its format.

A `Conversation` is a list of messages plus optional tools (OpenAI style, what chat templates take):

    {"role": "system" | "user" | "assistant" | "tool", "content": str, "loss": bool,
     "tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}, "id"?: str}],  # assistant
     "tool_call_id"?: str, "name"?: str}                                                              # tool
    tools: [{"type": "function", "function": {"name": ..., "description": ..., "parameters": ...}}] | None

At most one system message, first; only assistant messages can bear loss. `finish` applies the rules that do
not depend on the source format (data.formats makes the messages): trailing turns without an answer are
dropped, empty answers are never trained, `data.loss_on` is applied, and rows that teach nothing are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from versatune_ds.data.diagnostics import RowNotes

Message = dict[str, Any]
Tool = dict[str, Any]

LOSS_ON = ("all_assistant", "last_assistant")
_PLACEHOLDER = re.compile(r"\{\{\s*[A-Za-z_][A-Za-z0-9_]*\s*\}\}")
_MEDIA_TAG = re.compile(r"<(image|video|audio)>")


class RowError(ValueError):
    """A row that cannot be used as given; the reader adds `file:line` and applies `data.on_bad_row`."""


class RowSkipped(Exception):
    """A well-formed row with nothing to learn; skipped and counted under `kind` (data.diagnostics)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Conversation:
    messages: list[Message]
    tools: list[Tool] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.messages, "tools": self.tools}


def has_answer(message: Message) -> bool:
    """An assistant message that says something: text that is not only whitespace, or tool calls."""
    return bool(message.get("content", "").strip() or message.get("tool_calls"))


def finish(conversation: Conversation, loss_on: str, notes: RowNotes) -> Conversation:
    """The checks after conversion (see the module docstring); raises RowSkipped for a row with nothing to learn."""
    messages = [dict(m) for m in conversation.messages]
    if not any(m["role"] == "assistant" for m in messages):
        raise RowSkipped("no_assistant")
    # Turns after the last answer teach nothing (a prompt-only tail, or an empty last answer).
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant" and has_answer(m)), default=-1)
    if last < 0:
        raise RowSkipped("only_empty_assistant")
    if last < len(messages) - 1:
        dropped = messages[last + 1 :]
        notes.add("trailing_turns", f"{len(dropped)} after turn {last + 1}")
        messages = messages[: last + 1]
    for number, message in enumerate(messages, start=1):
        if message["role"] == "assistant" and not has_answer(message):
            message["loss"] = False
            notes.add("empty_assistant", f"turn {number}")
    if loss_on == "last_assistant":
        for message in messages[:last]:
            if message["role"] == "assistant":
                message["loss"] = False
    if not any(m["role"] == "assistant" and m["loss"] for m in messages):
        raise RowSkipped("no_loss")
    _note_shape(messages, notes)
    return Conversation(messages, conversation.tools)


def _note_shape(messages: list[Message], notes: RowNotes) -> None:
    """Warnings about conversations that load but may not be what was meant."""
    roles = [m["role"] for m in messages]
    core = [r for r in roles if r != "system"]
    if "user" not in roles:
        notes.add("no_user")
    elif core and core[0] == "assistant":
        notes.add("assistant_first")
    for number in range(1, len(roles)):
        if roles[number] == roles[number - 1] and roles[number] in ("user", "assistant"):
            notes.add("consecutive_roles", f"turns {number}-{number + 1} are both {roles[number]}")
            break
    if "system" in roles[1:]:
        notes.add("system_not_first", f"turn {roles.index('system', 1) + 1}")
    if any(m["role"] == "user" and not m["content"].strip() for m in messages):
        notes.add("empty_user")
    texts = [m["content"] for m in messages]
    found = sorted({p.group(0).replace(" ", "") for t in texts for p in _PLACEHOLDER.finditer(t)})
    if found:
        notes.add("placeholders", ", ".join(found[:4]))
    tags = sorted({f"<{t.group(1)}>" for text in texts for t in _MEDIA_TAG.finditer(text)})
    if tags:
        notes.add("media_tags", ", ".join(tags))


def plain_text(conversation: Conversation) -> str:
    """The conversation's text without template markup (for the domain classifier)."""
    return "\n".join(m["content"] for m in conversation.messages if m["content"])
