"""Row formats: which format a row is in, and the row as a `Conversation` (data.conversation).

Three formats, told apart by their keys (`format: auto`, per file; every row of a file must match its first):

- alpaca:   prompt/answer columns (data.format_columns): instruction/input/output, query/response,
            prompt/completion, question/answer, with system, history and tools
- sharegpt: a `conversations` / `conversation` turn list (data.format_chat)
- messages: a `messages` turn list, or a row that is itself a list of turns (data.format_chat)

sharegpt and messages are one family (either turn shape is read under either key), so `format: sharegpt` also
reads `messages` rows. A column mapping (data.domains[i].columns) says where the parts are instead.

Rows that are not supervised fine-tuning data are refused with what they are, never half-read: preference
pairs, KTO labels, pre-tokenized ids, template-free segments, pre-training text, and rows that carry images,
video or audio (this loader trains text-only models).
"""

from __future__ import annotations

from typing import Any

from versatune_ds.config.schema import ColumnsConfig
from versatune_ds.data.conversation import Conversation, RowError
from versatune_ds.data.diagnostics import RowNotes
from versatune_ds.data.format_chat import LIST_KEYS, ChatLayout, chat_conversation
from versatune_ds.data.format_columns import ANSWER_KEYS, PROMPT_KEYS, ColumnsLayout, columns_conversation
from versatune_ds.data.values import TEXT_ONLY

FORMATS = ("alpaca", "sharegpt", "messages")
# Columns that describe a row rather than hold text to train: ignored without a note.
BOOKKEEPING = frozenset({
    "id", "idx", "index", "uuid", "hash", "source", "sources", "origin", "license", "domain", "category", "categories",
    "task", "task_type", "type", "lang", "language", "meta", "metadata", "dataset", "data_source", "url", "split",
    "tags", "created_at", "timestamp", "model", "length", "num_turns", "parallel_tool_calls",
})
PREFERENCE = (
    ("chosen_messages", "rejected_messages"), ("preferred_output", "non_preferred_output"), ("chosen", "rejected"),
)
MEDIA_COLUMNS = ("images", "image", "videos", "video", "audios", "audio")


def family(fmt: str) -> str:
    return "alpaca" if fmt == "alpaca" else "chat"


def describe_formats() -> str:
    return (
        "alpaca (prompt/answer columns such as instruction/input/output, query/response, question/answer), "
        "sharegpt (conversations with from/value) or messages (messages with role/content)"
    )


def _keys(row: Any) -> str:
    return ", ".join(sorted(map(str, row))) if isinstance(row, dict) else f"a JSON {type(row).__name__}"


def detect_format(row: Any, columns: ColumnsConfig | None = None) -> str:
    """alpaca | sharegpt | messages for a row of SFT data; RowError saying what the row is otherwise."""
    if isinstance(row, list):
        return "messages"
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {_keys(row)}")
    present = {k for k, v in row.items() if v is not None}
    _refuse_media(row, {k for k in present if row[k] not in ("", [], {})})
    if columns is not None:
        return "messages" if columns.messages is not None else "alpaca"
    _refuse_non_sft(row, present)
    for key in LIST_KEYS:
        if key in present:
            return "messages" if key == "messages" else "sharegpt"
    if isinstance(row.get("prompt"), list):  # RL prompt sets (verl): a turn list under `prompt`
        return "messages"
    if present & set(PROMPT_KEYS) or ("input" in present and present & set(ANSWER_KEYS)):
        return "alpaca"
    if present and present - BOOKKEEPING <= {"text", "response", "content"}:
        only = ", ".join(repr(k) for k in sorted(present - BOOKKEEPING))
        raise RowError(f"rows have only {only} - this is pre-training text, not prompt/answer SFT data; list it as "
                       "the domain's raw sources (rows with a 'text' field) or map columns")
    wrapped = [k for k, v in row.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if wrapped:
        raise RowError(f"cannot tell the row format (keys {_keys(row)}): the object is not a row; key {wrapped[0]!r} holds "
                       f"a list of {len(row[wrapped[0]])} rows - make that list the file's content (e.g. jq '.{wrapped[0]}' "
                       "in.json > rows.json)")
    example = sorted(present - BOOKKEEPING)[:2] + ["<prompt column>", "<answer column>"]
    raise RowError(f"cannot tell the row format (keys {_keys(row)}): cannot tell prompt from answer; expected "
                   f"{describe_formats()} - or map the columns in the domain's config, e.g. "
                   f"columns: {{prompt: {example[0]}, response: {example[1]}}}")


def _refuse_non_sft(row: dict[str, Any], present: set[str]) -> None:
    if "input_ids" in present:
        raise RowError("pre-tokenized data (input_ids/labels) is tied to one tokenizer; supply text messages instead")
    if "segments" in present:
        raise RowError("template-free 'segments' rows bypass chat templates; not supported - give prompt/answer rows")
    for pair in PREFERENCE:
        if set(pair) <= present:
            raise RowError(f"preference data (columns {pair[0]!r} and {pair[1]!r}) is not SFT data; train it with a "
                           "preference trainer, or map the preferred answer as the response explicitly (columns)")
    if "rejected_response" in present:
        raise RowError("preference data (column 'rejected_response') is not SFT data; drop that column to train the "
                       "messages as SFT")
    for key in ("label", "kto_tag"):
        if key in present:
            if isinstance(row[key], bool):
                raise RowError(f"rows carry a boolean {key!r} (KTO feedback); {key}=false rows are undesirable answers "
                               "and must not be trained as SFT")
            raise RowError(f"{key!r} column is not used by SFT (classification or regression data?); drop it to "
                           "train the rest as SFT")


def _refuse_media(row: dict[str, Any], present: set[str]) -> None:
    media = [k for k in MEDIA_COLUMNS if k in present]
    if media:
        counts = ", ".join(f"column {k!r}: {len(row[k]) if isinstance(row[k], list) else 1} item(s)" for k in media)
        raise RowError(f"rows carry {', '.join(media)} ({counts}); {TEXT_ONLY}")


def to_conversation(row: Any, fmt: str, columns: ColumnsConfig | None, notes: RowNotes) -> Conversation:
    """The row as a conversation (before data.conversation.finish); RowError when it does not fit `fmt`."""
    if fmt == "alpaca":
        if not isinstance(row, dict):
            raise RowError(f"expected a JSON object, got {_keys(row)}")
        layout = _columns_layout(columns)
        conversation = columns_conversation(row, layout, notes)
        _note_unused(row, layout.used_keys(row), notes)
        return conversation
    chat = _chat_layout(row, columns)
    conversation = chat_conversation(row, chat, notes)
    if isinstance(row, dict):
        _note_unused(row, chat.used_keys(), notes)
    return conversation


def _columns_layout(columns: ColumnsConfig | None) -> ColumnsLayout:
    if columns is None:
        return ColumnsLayout()
    return ColumnsLayout(
        prompt=columns.prompt, query=columns.query, response=columns.response, history=columns.history,
        system=(columns.system,) if columns.system else (), tools=(columns.tools,) if columns.tools else (), mapped=True,
    )


def _chat_layout(row: Any, columns: ColumnsConfig | None) -> ChatLayout:
    if isinstance(row, list):
        return ChatLayout(list_key=None)
    if columns is None:
        key = next((k for k in LIST_KEYS if row.get(k) is not None), "prompt" if isinstance(row.get("prompt"), list) else "messages")
        return ChatLayout(list_key=key)
    tags = {
        columns.user_tag: "user", columns.assistant_tag: "assistant", columns.system_tag: "system",
        columns.observation_tag: "tool", columns.function_tag: "call",
    }
    return ChatLayout(
        list_key=columns.messages, role_tag=columns.role_tag, content_tag=columns.content_tag,
        extra_roles={k: v for k, v in tags.items() if k},
        system_keys=(columns.system,) if columns.system else (), tools_keys=(columns.tools,) if columns.tools else (),
    )


def _note_unused(row: dict[str, Any], used: set[str], notes: RowNotes) -> None:
    unused = sorted(k for k, v in row.items() if k not in used and k not in BOOKKEEPING and v not in (None, "", [], {}))
    if unused:
        notes.add("unused_columns", ", ".join(unused))
