"""What loading a domain noticed: rows skipped and why, quirks kept or dropped, each counted with `file:line`.

Nothing in a data set is dropped in silence: every row that is skipped and every value that is not trained as
written is recorded here under a kind (the keys of `MESSAGES`), counted, with the first few places named.
`summary` turns that into one warning per domain, e.g.

    domain law: 2 of 40 rows skipped, 3 rows with notes:
      - 2 rows skipped: its only assistant turn is empty (law.jsonl:4, law.jsonl:9)
      - 3 rows: unreplaced template variables such as {{name}} - replace them before training (law.jsonl:1, ...)

The same record is stored in the tokenization cache, so a cached run warns exactly like the first one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# kind -> what it means (rows skipped start with "skipped").
MESSAGES: dict[str, str] = {
    # Rows skipped
    "bad_row": "skipped (data.on_bad_row=skip)",
    "no_assistant": "skipped: no assistant turn, so nothing to learn",
    "only_empty_assistant": "skipped: its only assistant turn(s) are empty (training them would teach the model to stop at once)",
    "no_loss": "skipped: no assistant turn bears loss (weight 0 / loss false on every one, or data.loss_on)",
    "too_long": "skipped: longer than data.seq_len (data.truncation=skip)",
    "truncated_no_loss": "skipped: data.truncation cut off every loss token",
    "template_error": "skipped: the chat template cannot render it (data.on_bad_row=skip)",
    # Rows kept, with a change or a warning
    "truncated": "cut to data.seq_len (data.truncation=truncate)",
    "trailing_turns": "dropped turns after the last assistant turn (they carry no answer to learn)",
    "empty_assistant": "an empty assistant turn kept as context, not trained",
    "coerced": "non-text values coerced to text",
    "aliases": "speaker names mapped",
    "several_columns": "more than one column for the same role; the first was used",
    "unused_columns": "columns not read (map them with data.domains[i].columns if they hold text to train)",
    "duplicate_system": "both a `system` field and a system turn that differ; the system turn is used",
    "system_not_first": "a system turn after the start (kept; gemma and mistral templates refuse it)",
    "consecutive_roles": "two user or two assistant turns in a row (kept as given; gemma and mistral templates refuse it)",
    "assistant_first": "starts with an assistant turn (gemma and mistral templates refuse it)",
    "no_user": "no user turn (gemma and mistral templates refuse it)",
    "empty_user": "an empty user turn",
    "double_encoded": "tool-call arguments were JSON-encoded twice (decoded)",
    "loss_flag_ignored": "a loss flag on a non-assistant turn was ignored (only assistant turns are trained)",
    "reasoning_dropped": "dropped reasoning_content (no supported template renders it; put reasoning in the content to train it)",
    "name_dropped": "dropped `name` on non-tool turns (templates do not render it)",
    "json_string": "a turn list stored as JSON text was decoded",
    "media_tags": "<image>/<video>/<audio> tags without a media column, kept as literal text",
    "placeholders": "unreplaced template variables such as {{name}} - replace them before training",
    "system_dropped": "the chat template leaves out the system prompt (Mistral's writes it only before a final user turn)",
}
MAX_PLACES = 3  # file:line places named per kind
MAX_DETAILS = 6  # distinct details named per kind


@dataclass
class Entry:
    count: int = 0
    places: list[str] = field(default_factory=list)  # first MAX_PLACES "file:line" (with a detail when there is one)
    details: list[str] = field(default_factory=list)  # first MAX_DETAILS distinct details


class RowNotes:
    """The notes about one row while it is converted; the reader files them under the row's `file:line`."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, kind: str, detail: str = "") -> None:
        assert kind in MESSAGES, kind
        self.items.append((kind, detail))


class Diagnostics:
    """Counts per kind for one domain, plus the rows skipped per file (for `plan`)."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.skipped: dict[str, int] = {}  # file -> rows skipped
        self.rows_read = 0

    def note(self, kind: str, where: str, detail: str = "") -> None:
        assert kind in MESSAGES, kind
        entry = self.entries.setdefault(kind, Entry())
        entry.count += 1
        if len(entry.places) < MAX_PLACES:
            entry.places.append(f"{where} ({detail})" if detail and kind in ("bad_row", "template_error") else where)
        if detail and detail not in entry.details and len(entry.details) < MAX_DETAILS:
            entry.details.append(detail)

    def add_notes(self, where: str, notes: RowNotes) -> None:
        seen: set[str] = set()
        for kind, detail in notes.items:
            if kind in seen:  # one count per row and kind; extra details still listed
                entry = self.entries[kind]
                if detail and detail not in entry.details and len(entry.details) < MAX_DETAILS:
                    entry.details.append(detail)
                continue
            seen.add(kind)
            self.note(kind, where, detail)

    def skip(self, file: str, where: str, kind: str, detail: str = "") -> None:
        self.skipped[file] = self.skipped.get(file, 0) + 1
        self.note(kind, where, detail)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self, domain: str) -> str | None:
        """One multi-line warning for the domain, or None when there is nothing to say."""
        if not self.entries:
            return None
        noted = sum(e.count for k, e in self.entries.items() if not MESSAGES[k].startswith("skipped"))
        head = f"domain {domain}: {self.num_skipped} of {self.rows_read} rows skipped, {noted} notes on kept rows:"
        lines = [head]
        for kind, entry in self.entries.items():
            text = MESSAGES[kind]
            details = [d for d in entry.details if kind not in ("bad_row", "template_error")]
            if details:
                text += " (" + "; ".join(details) + (", ..." if len(entry.details) == MAX_DETAILS else "") + ")"
            places = ", ".join(entry.places) + (", ..." if entry.count > len(entry.places) else "")
            rows = "row" if entry.count == 1 else "rows"
            lines.append(f"  - {entry.count} {rows} {text}: {places}" if text.startswith("skipped") else
                         f"  - {entry.count} {rows}: {text}: {places}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": {k: {"count": e.count, "places": e.places, "details": e.details} for k, e in self.entries.items()},
            "skipped": dict(self.skipped),
            "rows_read": self.rows_read,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Diagnostics:
        out = cls()
        out.entries = {k: Entry(int(v["count"]), list(v["places"]), list(v["details"])) for k, v in data["entries"].items()}
        out.skipped = {str(k): int(v) for k, v in data["skipped"].items()}
        out.rows_read = int(data["rows_read"])
        return out

    def merge(self, other: Diagnostics) -> None:
        for kind, entry in other.entries.items():
            mine = self.entries.setdefault(kind, Entry())
            mine.count += entry.count
            mine.places.extend(entry.places[: MAX_PLACES - len(mine.places)])
            mine.details.extend(d for d in entry.details if d not in mine.details)
            del mine.details[MAX_DETAILS:]
        for file, count in other.skipped.items():
            self.skipped[file] = self.skipped.get(file, 0) + count
        self.rows_read += other.rows_read
