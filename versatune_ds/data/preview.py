"""`versatune-ds preview`: a domain's rows exactly as training sees them.

The same reader, format conversion, template, tokenizer and row policies as `train` (data.records,
data.templates, data.tokenization), for the first N rows of the domain's training sources in file order (the
held-out split is not drawn here). Each row shows its `file:line`, the messages (role, content, whether it
bears loss), tools, token and loss-token counts, and the rendered text with the loss-bearing tokens marked.
Rows that are skipped are named with the reason in the warning summary on stderr (and, when the template or
the length policy skips them, also as rows with a `skipped` reason).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from versatune_ds.config.schema import DataConfig
from versatune_ds.data.conversation import RowError
from versatune_ds.data.diagnostics import Diagnostics
from versatune_ds.data.packing import IGNORE_INDEX
from versatune_ds.data.prepare import domain_files, log_diagnostics
from versatune_ds.data.records import Record, read_records
from versatune_ds.data.sources import SKIP_HINT
from versatune_ds.data.templates import ChatTemplate, render, resolve_template, tokenize_rendered
from versatune_ds.errors import UserError

LOSS_STYLE = "bold black on green"


@dataclass(frozen=True)
class PreviewRow:
    source: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    num_tokens: int
    num_loss_tokens: int
    text: str = ""  # the rendered text (what is tokenized)
    loss_spans: list[tuple[int, int]] = field(default_factory=list)  # character spans of the loss-bearing tokens
    truncated: bool = False
    skipped: str = ""  # why training skips this row ("" when it trains)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source, "messages": self.messages, "tools": self.tools, "num_tokens": self.num_tokens,
            "num_loss_tokens": self.num_loss_tokens, "truncated": self.truncated, "skipped": self.skipped or None,
            "text": self.text, "loss_text": [self.text[s:e] for s, e in self.loss_spans],
        }


def preview_domain(
    data_cfg: DataConfig, domain_name: str, tokenizer: PreTrainedTokenizerBase, rows: int | None
) -> tuple[list[PreviewRow], Diagnostics]:
    """The first `rows` rows of a domain (None: all) as training sees them, and what loading them noticed."""
    names = [d.name for d in data_cfg.domains]
    if domain_name not in names:
        raise UserError(f"--domain: unknown domain {domain_name!r}; known domains: {', '.join(names)}")
    domain_id = names.index(domain_name)
    domain = data_cfg.domains[domain_id]
    key = f"data.domains[{domain_id}]"
    template = resolve_template(tokenizer, data_cfg.template)
    diagnostics = Diagnostics()
    train_files, _ = domain_files(domain, key)
    records = read_records(train_files, domain, data_cfg, key, diagnostics, limit=rows)
    out = [_preview_row(record, tokenizer, template, data_cfg, diagnostics) for record in records]
    log_diagnostics(diagnostics, domain_name)
    return out, diagnostics


def _preview_row(record: Record, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, data_cfg: DataConfig,
                 diagnostics: Diagnostics) -> PreviewRow:
    base = PreviewRow(record.where, record.messages, record.tools, 0, 0)
    try:
        rendered = render(record.messages, tokenizer, template, record.tools)
    except RowError as exc:
        if data_cfg.on_bad_row == "error":
            raise UserError(f"{record.where}: {exc}; {SKIP_HINT}") from None
        diagnostics.skip(record.file, record.where, "template_error", str(exc))
        return _replace(base, skipped=str(exc))
    for kind in rendered.notes:
        diagnostics.note(kind, record.where)
    ids, labels = tokenize_rendered([rendered], tokenizer)
    ids_row, labels_row = list(ids[0]), [int(x) for x in labels[0]]
    spans = _loss_char_spans(rendered.text, ids_row, labels_row, rendered.loss_spans, tokenizer)
    row = _replace(base, num_tokens=len(ids_row), num_loss_tokens=sum(1 for x in labels_row if x != IGNORE_INDEX),
                   text=rendered.text, loss_spans=spans)
    if len(ids_row) <= data_cfg.seq_len:
        return row
    if data_cfg.truncation == "error":
        raise UserError(f"{record.where}: the example has {len(ids_row)} tokens, more than data.seq_len={data_cfg.seq_len}; "
                        "raise data.seq_len, or set data.truncation=truncate or skip")
    if data_cfg.truncation == "skip":
        diagnostics.skip(record.file, record.where, "too_long", f"{len(ids_row)} tokens")
        return _replace(row, skipped=f"{len(ids_row)} tokens, more than data.seq_len={data_cfg.seq_len} (data.truncation=skip)")
    kept_loss = sum(1 for x in labels_row[: data_cfg.seq_len] if x != IGNORE_INDEX)
    return _replace(row, num_tokens=data_cfg.seq_len, num_loss_tokens=kept_loss, truncated=True,
                    skipped="" if kept_loss else "data.truncation cut off every loss token")


def _replace(row: PreviewRow, **changes: Any) -> PreviewRow:
    return PreviewRow(**{**row.__dict__, **changes})


def _loss_char_spans(text: str, ids: list[int], labels: list[int], spans: Sequence[tuple[int, int]],
                     tokenizer: PreTrainedTokenizerBase) -> list[tuple[int, int]]:
    """Character spans of the tokens that bear loss (token boundaries, so a merged boundary token shows whole)."""
    if not getattr(tokenizer, "is_fast", False):
        return [tuple(s) for s in spans]
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out: list[tuple[int, int]] = []
    for (start, end), label in zip(offsets, labels):
        if label == IGNORE_INDEX or start == end:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


# ----------------------------------------------------------------------------------------------
# Printing


def print_json(rows: Sequence[PreviewRow], write: Any) -> None:
    """One JSON object per row (keys: source, messages, tools, num_tokens, num_loss_tokens, ...)."""
    for row in rows:
        write(json.dumps(row.to_json(), ensure_ascii=False))


def print_rows(rows: Sequence[PreviewRow], console: Console) -> None:
    """Readable rows: rich colours on a terminal; elsewhere the loss-bearing text is wrapped in [[ ]]."""
    terminal = console.is_terminal
    if not terminal:
        console.print("loss-bearing text is shown between [[ and ]]", markup=False, highlight=False)
    for row in rows:
        head = f"{row.source}: {row.num_tokens} tokens, {row.num_loss_tokens} loss tokens"
        head += " (truncated to data.seq_len)" if row.truncated else ""
        head += f" - SKIPPED: {row.skipped}" if row.skipped else ""
        console.rule(head, style="cyan")
        table = Table(show_header=True, header_style="bold", expand=False)
        for column in ("#", "role", "loss", "content"):
            table.add_column(column, overflow="fold")
        for number, message in enumerate(row.messages, start=1):
            content = message["content"]
            if message.get("tool_calls"):
                content += ("\n" if content else "") + "tool_calls: " + json.dumps(message["tool_calls"], ensure_ascii=False)
            if message.get("tool_call_id"):
                content = f"(tool_call_id {message['tool_call_id']}) {content}"
            table.add_row(str(number), message["role"], "yes" if message["loss"] else "-", Text(content))
        console.print(table)
        if row.tools:
            console.print(Text("tools: " + ", ".join(t["function"]["name"] for t in row.tools)))
        if row.text:
            console.print(_marked(row, terminal), soft_wrap=True)


def _marked(row: PreviewRow, terminal: bool) -> Text:
    text = Text()
    cursor = 0
    for start, end in row.loss_spans:
        text.append(row.text[cursor:start])
        piece = row.text[start:end]
        text.append(piece, style=LOSS_STYLE) if terminal else text.append(f"[[{piece}]]")
        cursor = end
    text.append(row.text[cursor:])
    return text
