"""SFT row formats: every supported row becomes one list of `{"role", "content"}` messages.

Roles are system / user / assistant:

- alpaca:   `instruction`, optional `input`, `output`, optional `system`
- sharegpt: `conversations` = [{"from": human|gpt|system, "value": ...}, ...]
- messages: `messages` = [{"role": system|user|assistant, "content": ...}, ...] (OpenAI style)

`to_messages` raises `RowError` for a row that does not fit its format; the caller adds `file:line` and
applies `data.on_bad_row`.
"""

from __future__ import annotations

from typing import Any, Mapping

FORMATS = ("alpaca", "sharegpt", "messages")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MESSAGE_ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """A row that does not fit its format; the caller adds file:line and applies `data.on_bad_row`."""


def detect_format(row: Any) -> str | None:
    """The format a row looks like (from its keys), or None."""
    if not isinstance(row, Mapping):
        return None
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return None


def describe_formats() -> str:
    return (
        "alpaca (keys instruction, output, optional input/system), sharegpt (key conversations with from/value) "
        "or messages (key messages with role/content)"
    )


def _string_field(row: Mapping[str, Any], key: str, *, required: bool) -> str:
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"missing required field {key!r}")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def to_messages(row: Any, fmt: str) -> list[dict[str, str]]:
    """The row as a list of messages; raises RowError when the row does not fit `fmt`."""
    if not isinstance(row, Mapping):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    if fmt == "alpaca":
        instruction = _string_field(row, "instruction", required=True)
        extra = _string_field(row, "input", required=False)
        output = _string_field(row, "output", required=True)
        system = _string_field(row, "system", required=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if fmt == "sharegpt":
        return _turns(row, "conversations", "from", "value", SHAREGPT_ROLES)
    if fmt == "messages":
        return _turns(row, "messages", "role", "content", {r: r for r in MESSAGE_ROLES})
    raise ValueError(f"unknown format {fmt!r}")  # config validation keeps this out


def _turns(row: Mapping[str, Any], key: str, role_key: str, text_key: str, roles: Mapping[str, str]) -> list[dict[str, str]]:
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise RowError(f"field {key!r} must be a non-empty list of turns")
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or role_key not in turn or text_key not in turn:
            raise RowError(f"{key}[{number}] must be an object with {role_key!r} and {text_key!r}")
        role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise RowError(f"{key}[{number}].{role_key} is {turn[role_key]!r}; expected one of {', '.join(roles)}")
        if not isinstance(turn[text_key], str):
            raise RowError(f"{key}[{number}].{text_key} must be a string, got {type(turn[text_key]).__name__}")
        messages.append({"role": role, "content": turn[text_key]})
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(f"{key} has no assistant turn, so there is nothing to learn")
    return messages


def plain_text(row: Any, fmt: str) -> str:
    """The row's text without template markup (for the domain classifier)."""
    return "\n".join(m["content"] for m in to_messages(row, fmt) if m["content"])
