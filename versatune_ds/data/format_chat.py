"""Chat rows: a list of turns (OpenAI `messages`, ShareGPT `conversations`, ms-swift / xtuner variants).

Accepted in every turn list (`messages`, `conversations`, `conversation`, or a row that is itself the list):

- turns with `role`/`content` or `from`/`value` (either pair in either list; other keys by column mapping);
- speakers system / user (human) / assistant (gpt; bot, chatgpt, model, ... with a note) / tool (observation,
  tool_response, and OpenAI's legacy `function`, which is a function RESULT) / a tool call (`function_call`,
  `tool_call`: JSON text holding one call or a list; consecutive ones are one assistant turn);
- assistant `tool_calls` (OpenAI) or a legacy `function_call`; arguments as an object or JSON text;
- content as text, or typed text parts; per-turn loss flags (data.values.loss_flag);
- pair objects instead of turns: {"human": q, "assistant": a} (ms-swift) and {"system"?, "input", "output"} (xtuner);
- a row-level `system` (or `system_prompt`) field and `tools` (or legacy `functions`), as a list or JSON text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from versatune_ds.data.conversation import Conversation, Message, RowError
from versatune_ds.data.diagnostics import RowNotes
from versatune_ds.data.values import calls_from_text, loss_flag, message, parse_call, parse_tools, text_value

ROLES = {
    "system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
    "tool": "tool", "observation": "tool", "tool_response": "tool", "function": "tool",
    "function_call": "call", "tool_call": "call",
}
NOTED_ROLES = {"bot": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant"}
NON_SFT_ROLES = {"pretrain": "marks pre-training text (xtuner), not SFT data"}
LIST_KEYS = ("messages", "conversations", "conversation")
SYSTEM_KEYS = ("system", "system_prompt")
TOOLS_KEYS = ("tools", "functions")


@dataclass(frozen=True)
class ChatLayout:
    """Where a chat row keeps its parts (defaults, or a column mapping)."""

    list_key: str | None  # None: the row is the turn list itself
    role_tag: str | None = None  # None: `role`, else `from`
    content_tag: str | None = None  # None: `content`, else `value`
    extra_roles: dict[str, str] = field(default_factory=dict)  # speaker names from the mapping's tags
    system_keys: tuple[str, ...] = SYSTEM_KEYS
    tools_keys: tuple[str, ...] = TOOLS_KEYS

    def used_keys(self) -> set[str]:
        return {k for k in (self.list_key, *self.system_keys, *self.tools_keys) if k}


def chat_conversation(row: Any, layout: ChatLayout, notes: RowNotes) -> Conversation:
    turns = row if layout.list_key is None else row.get(layout.list_key)
    name = layout.list_key or "the row"
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except (json.JSONDecodeError, RecursionError):
            raise RowError(f"{name} is text that is not valid JSON; expected a list of turns") from None
        notes.add("json_string", name)
    if not isinstance(turns, list) or not turns:
        raise RowError(f"{name} must be a non-empty list of turns")
    messages: list[Message] = []
    from_call = False  # the last message came from a tool-call turn (the next one merges into it)
    for number, turn in enumerate(turns, start=1):
        what = f"turn {number}"
        if not isinstance(turn, dict):
            raise RowError(f"{what} must be an object with a role and a content")
        if _is_pair(turn, layout):
            messages.extend(_pair_messages(turn, what, not messages, notes))
            from_call = False
            continue
        role = _role(turn, layout, what, notes)
        if role == "call":
            calls = calls_from_text(_content(turn, layout), what, notes)
            if from_call:  # ms-swift: consecutive tool_call turns are one turn; the first one's loss flag counts
                messages[-1]["tool_calls"].extend(calls)
                continue
            made = message("assistant", "", loss_flag(turn, "assistant", what, notes))
            made["tool_calls"] = calls
            messages.append(made)
            from_call = True
            continue
        from_call = False
        messages.append(_message(turn, role, layout, what, notes))
    return Conversation(_with_system(messages, row, layout, notes), _tools(row, layout))


def _role(turn: dict[str, Any], layout: ChatLayout, what: str, notes: RowNotes) -> str:
    key = layout.role_tag or ("role" if "role" in turn else "from")
    raw = turn.get(key)
    if not isinstance(raw, str):
        keys = ", ".join(sorted(map(str, turn)))
        raise RowError(f"{what} has no speaker (expected a string under {key!r}; the turn has keys {keys}); map the keys of "
                       "other turn shapes with data.domains[i].columns (role_tag, content_tag)")
    if raw in layout.extra_roles:
        return layout.extra_roles[raw]
    lower = raw.strip().lower()
    if lower in NON_SFT_ROLES:
        raise RowError(f"{what} has role {raw!r}, which {NON_SFT_ROLES[lower]}")
    if lower in ROLES:
        if raw != lower:
            notes.add("aliases", f"{raw}->{ROLES[lower]}")
        return ROLES[lower]
    if lower in NOTED_ROLES:
        notes.add("aliases", f"{raw}->{NOTED_ROLES[lower]}")
        return NOTED_ROLES[lower]
    raise RowError(
        f"{what} has role {raw!r}; known roles are system, user, assistant, tool (aliases: human, gpt, bot, model, "
        "observation, function_call, tool_call, tool_response, function); map other names with "
        "data.domains[i].columns (user_tag, assistant_tag, system_tag, observation_tag, function_tag)"
    )


def _content(turn: dict[str, Any], layout: ChatLayout) -> Any:
    if layout.content_tag:
        return turn.get(layout.content_tag)
    return turn["content"] if "content" in turn else turn.get("value")


def _message(turn: dict[str, Any], role: str, layout: ChatLayout, what: str, notes: RowNotes) -> Message:
    content = _content(turn, layout)
    has_calls = turn.get("tool_calls") is not None or turn.get("function_call") is not None
    if not has_calls and not ({layout.content_tag} if layout.content_tag else {"content", "value"}) & set(turn):
        key = layout.content_tag or "'content' or 'value'"
        raise RowError(f"{what} has no text (expected {key}; write an empty string for an empty turn)")
    if role == "tool" and isinstance(content, dict):  # a tool result stored as an object
        notes.add("coerced", f"{what}: object -> JSON text")
        content = json.dumps(content, ensure_ascii=False)
    made = message(role, text_value(content, what, notes), loss_flag(turn, role, what, notes))
    if role == "assistant":
        calls = turn.get("tool_calls")
        if calls is None and turn.get("function_call") is not None:
            calls = [turn["function_call"]]  # OpenAI's legacy single function call
        if calls is not None:
            if not isinstance(calls, list):
                raise RowError(f"{what}: tool_calls must be a list")
            if calls:
                made["tool_calls"] = [parse_call(call, what, notes) for call in calls]
        if turn.get("reasoning_content"):
            notes.add("reasoning_dropped", what)
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(turn.get(key), str) and turn[key]:
                made[key] = turn[key]
    elif turn.get("name"):
        notes.add("name_dropped", what)
    return made


def _is_pair(turn: dict[str, Any], layout: ChatLayout) -> bool:
    if (layout.role_tag or "role") in turn or "from" in turn:
        return False
    return bool({"human", "assistant", "input", "output"} & set(turn))


def _pair_messages(turn: dict[str, Any], what: str, first: bool, notes: RowNotes) -> list[Message]:
    """{"human": q, "assistant": a} (ms-swift) or {"system"?, "input": q, "output": a} (xtuner's legacy format)."""
    if "human" in turn or "assistant" in turn:
        prompt, answer = turn.get("human"), turn.get("assistant")
    else:
        prompt, answer = turn.get("input"), turn.get("output")
    out = []
    system = text_value(turn.get("system"), f"{what} system", notes)
    if system.strip():
        if not first:
            raise RowError(f"{what} sets a system prompt after the first pair; give it on the first pair only")
        out.append(message("system", system, False))
    out.append(message("user", text_value(prompt, f"{what} prompt", notes), False))
    out.append(message("assistant", text_value(answer, f"{what} answer", notes), True))
    return out


def _with_system(messages: list[Message], row: Any, layout: ChatLayout, notes: RowNotes) -> list[Message]:
    """At most one system message, first. A system turn wins over a `system` field (LLaMA-Factory's rule);
    an empty system is no system, so a template's default system prompt still applies."""
    field_value = ""
    if isinstance(row, dict):
        key = next((k for k in layout.system_keys if row.get(k) is not None), None)
        field_value = text_value(row.get(key), key, notes) if key else ""
    if messages and messages[0]["role"] == "system":
        if not messages[0]["content"].strip():
            messages = messages[1:]
        elif field_value.strip() and field_value != messages[0]["content"]:
            notes.add("duplicate_system")
        return messages
    if field_value.strip():
        return [message("system", field_value, False)] + messages
    return messages


def _tools(row: Any, layout: ChatLayout) -> list[dict[str, Any]] | None:
    if not isinstance(row, dict):
        return None
    key = next((k for k in layout.tools_keys if row.get(k) is not None), None)
    return parse_tools(row[key], key) if key else None
