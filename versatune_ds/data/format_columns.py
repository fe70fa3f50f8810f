"""Prompt/answer rows: alpaca and the other column layouts (one user turn and one answer, plus history).

Recognised without a mapping (the alias lists ms-swift accepts):

- prompt:  `instruction` (+ `input`, appended after a newline), else `query`, `prompt`, `question`, `problem`, `input`
- answer:  `output`, `response`, `completion`, `answer`, `target`, `targets`
- `system` (or `system_prompt`), `history` ([[prompt, answer], ...], earlier turns, trained like the last one),
  `tools`.

With a column mapping (data.domains[i].columns) only the mapped columns are read. Instruction and input are
joined with "\n", as LLaMA-Factory and ms-swift do, so a data set made for them renders the same prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from versatune_ds.data.conversation import Conversation, Message, RowError
from versatune_ds.data.diagnostics import RowNotes
from versatune_ds.data.values import message, parse_tools, text_value

PROMPT_KEYS = ("instruction", "query", "prompt", "question", "problem")
ANSWER_KEYS = ("output", "response", "completion", "answer", "target", "targets")
INPUT_SEPARATOR = "\n"


@dataclass(frozen=True)
class ColumnsLayout:
    """Column names of a prompt/answer row; None = detect from the alias lists."""

    prompt: str | None = None
    query: str | None = None
    response: str | None = None
    history: str | None = "history"
    system: tuple[str, ...] = ("system", "system_prompt")
    tools: tuple[str, ...] = ("tools",)
    mapped: bool = False  # from a column mapping: only these columns are read

    def used_keys(self, row: dict[str, Any]) -> set[str]:
        if self.mapped:
            names = (self.prompt, self.query, self.response, self.history, *self.system, *self.tools)
            return {k for k in names if k}
        prompt, query, answer, _ = _detected(row)
        return {k for k in (prompt, query, answer, self.history, *self.system, *self.tools) if k}


def is_columns_row(row: dict[str, Any]) -> bool:
    present = {k for k, v in row.items() if v is not None}
    has_prompt = bool(present & set(PROMPT_KEYS)) or "input" in present
    return has_prompt and bool(present & set(ANSWER_KEYS))


def _detected(row: dict[str, Any]) -> tuple[str | None, str | None, str | None, list[str]]:
    """(prompt column, input column, answer column, other alias columns present) of an unmapped row."""
    present = [k for k in row if row[k] is not None]
    prompts = [k for k in PROMPT_KEYS if k in present]
    answers = [k for k in ANSWER_KEYS if k in present]
    if prompts:
        prompt, query = prompts[0], ("input" if prompts[0] == "instruction" and "input" in present else None)
    else:
        prompt, query = ("input" if "input" in present else None), None
    return prompt, query, (answers[0] if answers else None), prompts[1:] + answers[1:]


def columns_conversation(row: dict[str, Any], layout: ColumnsLayout, notes: RowNotes) -> Conversation:
    if layout.mapped:
        prompt_key, query_key, answer_key, extra = layout.prompt, layout.query, layout.response, []
    else:
        prompt_key, query_key, answer_key, extra = _detected(row)
    if extra:
        notes.add("several_columns", f"used {prompt_key} and {answer_key}, not {', '.join(extra)}")
    if answer_key is None or row.get(answer_key) is None:
        raise RowError(f"missing required field {answer_key or 'output'!r}")
    prompt = text_value(row.get(prompt_key) if prompt_key else None, prompt_key or "prompt", notes)
    if query_key:
        extra_input = text_value(row.get(query_key), query_key, notes)
        if extra_input.strip():
            prompt = f"{prompt}{INPUT_SEPARATOR}{extra_input}" if prompt else extra_input
    answer = text_value(row[answer_key], answer_key, notes)
    messages: list[Message] = []
    system_key = next((k for k in layout.system if row.get(k) is not None), None)
    if system_key:
        system = text_value(row[system_key], system_key, notes)
        if system.strip():
            messages.append(message("system", system, False))
    if layout.history and row.get(layout.history) is not None:
        messages.extend(_history(row[layout.history], layout.history, notes))
    messages += [message("user", prompt, False), message("assistant", answer, True)]
    tools_key = next((k for k in layout.tools if row.get(k) is not None), None)
    return Conversation(messages, parse_tools(row[tools_key], tools_key) if tools_key else None)


def _history(value: Any, key: str, notes: RowNotes) -> list[Message]:
    """[[prompt, answer], ...]: earlier turns, trained like the last answer (LLaMA-Factory's rule)."""
    if not isinstance(value, list):
        raise RowError(f"{key} must be a list of [prompt, answer] pairs")
    out = []
    for number, pair in enumerate(value, start=1):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RowError(f"{key}[{number}] must be a [prompt, answer] pair")
        out.append(message("user", text_value(pair[0], f"{key}[{number}] prompt", notes), False))
        out.append(message("assistant", text_value(pair[1], f"{key}[{number}] answer", notes), True))
    return out
