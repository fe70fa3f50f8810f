"""Values inside rows: text (strings, numbers, typed content parts), tool schemas and tool calls.

Shared by the row formats (data.format_chat, data.format_columns). Anything that would be trained other than as
written is either converted with a note (a number becomes its text, a tool list stored as JSON text is
decoded) or refused with the reason (an image part, per-part loss flags, arguments that are not JSON).
"""

from __future__ import annotations

import json
import re
from typing import Any

from versatune_ds.data.conversation import Message, RowError, Tool
from versatune_ds.data.diagnostics import RowNotes

TEXT_ONLY = "this loader trains text-only models (remove the media rows)"
MEDIA_PARTS = ("image_url", "image", "input_image", "video", "video_url", "audio", "audio_url", "input_audio", "file")
_INLINE_IMAGE = re.compile(r"<img>.*?</img>", re.DOTALL)  # Qwen-VL's inline image reference


def text_value(value: Any, what: str, notes: RowNotes) -> str:
    """The text of a value where text is expected (`what` names it in messages); None is ""."""
    if value is None:
        return ""
    if isinstance(value, str):
        if _INLINE_IMAGE.search(value):
            raise RowError(f"{what} contains an inline image tag <img>...</img>; {TEXT_ONLY}")
        return value
    if isinstance(value, bool):
        notes.add("coerced", f"{what}: bool -> '{str(value).lower()}'")
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        notes.add("coerced", f"{what}: {type(value).__name__} {value!r} -> '{value}'")
        return str(value)
    if isinstance(value, list):
        return _parts_text(value, what)
    raise RowError(f"{what} must be text, got a JSON {type(value).__name__}")


def _parts_text(parts: list[Any], what: str) -> str:
    """Typed content parts ([{"type": "text", "text": ...}], LLaMA-Factory v1 uses "value"), joined with ""."""
    texts = []
    for number, part in enumerate(parts, start=1):
        if not isinstance(part, dict):
            raise RowError(f"{what} is a list whose item {number} is not a typed part ({{'type': 'text', 'text': ...}})")
        kind = part.get("type", "text")
        if kind in MEDIA_PARTS:
            raise RowError(f"{what} has content part type {kind!r}; {TEXT_ONLY}")
        if kind in ("tool_use", "tool_result"):
            raise RowError(f"{what} has content part type {kind!r} (Anthropic format); supported part types: text "
                           "(write tool calls as OpenAI tool_calls and results as role 'tool')")
        if kind != "text":
            raise RowError(f"{what} has content part type {kind!r}; supported part types: text")
        if any(part.get(flag) is not None for flag in ("train", "weight", "loss")):
            raise RowError(f"{what} sets loss flags on content parts; only per-turn loss flags are supported "
                           "(split the turn, or drop the part flags)")
        text = part.get("text", part.get("value"))
        if not isinstance(text, str):
            raise RowError(f"{what} part {number} has no text (expected a string under 'text' or 'value')")
        texts.append(text)
    return "".join(texts)


# ----------------------------------------------------------------------------------------------
# Tools


def parse_tools(value: Any, what: str) -> list[Tool] | None:
    """Tool schemas as a list of {"type": "function", "function": {...}}: JSON text is decoded, bare schemas are
    wrapped, empty ('', '[]', [], null) is no tools."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise RowError(f"{what} is text that is not valid JSON; give a list of tool schemas") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError(f"{what} must be a list of tool schemas, got a JSON {type(value).__name__}")
    tools = []
    for number, tool in enumerate(value, start=1):
        if not isinstance(tool, dict):
            raise RowError(f"{what}[{number}] must be a tool schema object")
        schema = tool["function"] if tool.get("type") == "function" and isinstance(tool.get("function"), dict) else tool
        if not isinstance(schema.get("name"), str) or not schema["name"]:
            raise RowError(f"{what}[{number}] has no function name")
        tools.append({"type": "function", "function": schema})
    return tools or None


def parse_arguments(value: Any, what: str, notes: RowNotes) -> dict[str, Any]:
    """Tool-call arguments as an object (templates print them with tojson): JSON text is decoded, twice if needed."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
            if isinstance(value, str):
                value = json.loads(value)
                notes.add("double_encoded", what)
        except (json.JSONDecodeError, RecursionError):
            raise RowError(f"{what}: tool-call arguments are not valid JSON") from None
    if not isinstance(value, dict):
        raise RowError(f"{what}: tool-call arguments must be a JSON object, got a {type(value).__name__}")
    return value


def parse_call(call: Any, what: str, notes: RowNotes) -> dict[str, Any]:
    """One tool call, OpenAI style ({"id", "type", "function": {"name", "arguments"}}) or bare ({"name", "arguments"})."""
    if not isinstance(call, dict):
        raise RowError(f"{what}: a tool call must be an object with a function name and arguments")
    function = call["function"] if isinstance(call.get("function"), dict) else call
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise RowError(f"{what}: a tool call has no function name")
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": parse_arguments(function.get("arguments"), what, notes)}}
    if isinstance(call.get("id"), str) and call["id"]:
        out["id"] = call["id"]
    return out


def calls_from_text(value: Any, what: str, notes: RowNotes) -> list[dict[str, Any]]:
    """The calls of a `function_call` / `tool_call` turn: JSON text (or an object) holding one call or a list."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise RowError(f"{what}: a tool-call turn must hold JSON {{\"name\": ..., \"arguments\": ...}}") from None
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise RowError(f"{what}: a tool-call turn holds no call")
    return [parse_call(call, what, notes) for call in calls]


def loss_flag(turn: dict[str, Any], role: str, what: str, notes: RowNotes) -> bool:
    """Per-turn loss: OpenAI `weight` 0/1, ms-swift/xtuner `loss`, LLaMA-Factory v1 `loss_weight`, axolotl `train`.

    Only assistant turns are trained; a truthy flag on another turn is ignored with a note (falsy ones are the
    normal value there). Fractions are refused: per-token loss scaling is not supported.
    """
    if turn.get("train_detail") is not None:
        raise RowError(f"{what} sets train_detail (loss by character offsets); only per-turn loss flags are supported")
    for key in ("weight", "loss", "loss_weight", "train"):
        value = turn.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
            flag = bool(value)
        else:
            raise RowError(f"{what} has {key} {value!r}; only 0/1 (or true/false) are supported - per-token loss scaling is not")
        if role != "assistant":
            if flag:
                notes.add("loss_flag_ignored", f"{what}, role {role}, {key}={json.dumps(value)}")
            return False
        return flag
    return role == "assistant"


def message(role: str, content: str, loss: bool) -> Message:
    return {"role": role, "content": content, "loss": loss}
