"""Rows -> records: every row of a domain's files as a conversation with its `file:line`, or a counted skip.

For each file: read rows (data.sources), tell the format from the first usable row (or take the domain's
`format`), convert each row (data.formats) and finish it (data.conversation.finish). What happens to a row:

- a bad row (not JSON, wrong types, an unknown speaker, not SFT data, too big): `data.on_bad_row=error` stops
  with `file:line`, the reason and the fix; `skip` counts it under the file and names it in the domain's warning;
- a row with nothing to learn (no assistant turn, only empty answers, no turn with loss): skipped and counted;
- a kept row whose data was changed or looks suspicious: kept, and counted under a note (data.diagnostics).

A file that yields no row at all is refused with the reason, whatever `on_bad_row` says: losing a whole file
is never what was meant.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from versatune_ds.config.schema import DataConfig, DomainConfig
from versatune_ds.data import formats
from versatune_ds.data.conversation import Conversation, Message, RowError, RowSkipped, Tool, finish
from versatune_ds.data.diagnostics import MESSAGES, Diagnostics, RowNotes
from versatune_ds.data.sources import SKIP_HINT, read_rows
from versatune_ds.errors import UserError


@dataclass(frozen=True)
class Record:
    """One row as training sees it: where it came from and its conversation."""

    where: str  # file:line (or `file row N` for parquet / hf)
    file: str
    messages: list[Message]
    tools: list[Tool] | None = None

    def conversation_json(self) -> str:
        """The conversation as JSON text (how it travels through datasets.map: Arrow would unify the shapes of
        tool-call arguments across rows and add nulls)."""
        return json.dumps(Conversation(self.messages, self.tools).to_json(), ensure_ascii=False)


def read_records(
    files: Sequence[str], domain: DomainConfig, data_cfg: DataConfig, key: str, diagnostics: Diagnostics,
    *, split: str | None = "train", limit: int | None = None,
) -> list[Record]:
    """The records of `files` in order (at most `limit`), with skips and notes filed in `diagnostics`.

    `key` names the domain in messages (data.domains[i]), `split` the source list (train, heldout).
    """
    records: list[Record] = []
    for file in files:
        left = None if limit is None else limit - len(records)
        records.extend(_read_file(file, domain, data_cfg, key, split, diagnostics, left))
        if limit is not None and len(records) >= limit:
            break
    return records


def _read_file(
    file: str, domain: DomainConfig, data_cfg: DataConfig, key: str, split: str | None, diagnostics: Diagnostics, limit: int | None
) -> list[Record]:
    records: list[Record] = []
    skipped: Counter[str] = Counter()
    file_format = None if domain.format == "auto" else domain.format
    first_where = ""
    first_skip = ""  # the first skipped row and why, for a file that yields nothing
    rows = 0
    for where, row, problem in read_rows(file, data_cfg.max_row_bytes):
        rows += 1
        notes = RowNotes()
        if not problem:
            try:
                detected = formats.detect_format(row, domain.columns)
                if file_format is None:
                    file_format, first_where = detected, where
                elif formats.family(detected) != formats.family(file_format):
                    raise RowError(_mismatch(row, detected, file_format, first_where, domain.format != "auto", key))
                conversation = formats.to_conversation(row, detected, domain.columns, notes)
                conversation = finish(conversation, data_cfg.loss_on, notes)
            except RowError as exc:
                problem = str(exc)
            except RowSkipped as skip:
                skipped[skip.kind] += 1
                first_skip = first_skip or f"{where}: {MESSAGES[skip.kind]}"
                diagnostics.skip(file, where, skip.kind, skip.detail)
                diagnostics.add_notes(where, notes)
                continue
        if problem:
            if data_cfg.on_bad_row == "error":
                raise UserError(f"{where}: {problem}; {SKIP_HINT}")
            skipped["bad_row"] += 1
            first_skip = first_skip or f"{where}: {problem}"
            diagnostics.skip(file, where, "bad_row", problem)
            continue
        diagnostics.add_notes(where, notes)
        records.append(Record(where, file, conversation.messages, conversation.tools))
        if limit is not None and len(records) >= limit:
            break
    diagnostics.rows_read += rows
    if not records and (limit is None or limit > 0):
        where = f"{key}.{split}: domain {domain.name!r}" if split else key
        if split == "heldout":
            where += " has no held-out data"
        raise UserError(_empty_file_reason(file, where, rows, skipped, first_skip))
    return records


def _mismatch(row: Any, detected: str, file_format: str, first_where: str, configured: bool, key: str) -> str:
    keys = ", ".join(sorted(map(str, row))) if isinstance(row, dict) else "a list of turns"
    if configured:
        return f"{key}.format is {file_format!r} but the rows look like {detected} (keys {keys}); set {key}.format={detected} or auto"
    return (f"the row does not match the file's format {file_format} (set by its first row, {first_where}): it looks like "
            f"{detected} (keys {keys}); one format per file")


def _empty_file_reason(file: str, key: str, rows: int, skipped: Counter[str], first_skip: str) -> str:
    if rows == 0:
        return f"{key}: {file}: no records (the file is empty or holds only blank lines); add rows or remove the file"
    if skipped["no_assistant"] == rows:
        return (f"{key}: {file}: no row has an assistant turn - looks like a prompt-only (RL/inference) set; "
                "SFT rows need answers to learn")
    reasons = "; ".join(f"{n} {MESSAGES[kind]}" for kind, n in skipped.most_common())
    return f"{key}: {file}: no usable rows: all {rows} skipped ({reasons}); the first: {first_skip}"
