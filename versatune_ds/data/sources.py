"""Reading data sources: files, folders and `hf:` data sets into rows that keep their `file:line`.

A source is a JSONL file, a JSON file (a list of rows, or one row), a CSV or TSV file (a header row, then
one row per record; every cell is text), a parquet file, a folder of such files (read in sorted order), or
a Hugging Face data set written `hf:<name>[:<split>]`. Rows are parsed one by one so a bad one can be named
by `file:line` and, with `data.on_bad_row=skip`, counted and skipped without losing the rest.

Hostile or broken input costs little: a row bigger than `data.max_row_bytes` is refused before it is parsed
(a JSONL line is not even kept in memory), JSON nested deeper than `MAX_NESTING_DEPTH` is refused, a UTF-8
byte-order mark is removed, and a file in another encoding is named (data.encoding).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from versatune_ds.config.schema import HF_SOURCE_PREFIX
from versatune_ds.data.encoding import decode_utf8, foreign_encoding, strip_utf8_bom, undecodable_reason
from versatune_ds.errors import UserError

SOURCE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
SKIP_HINT = "fix the row, or set data.on_bad_row=skip to skip such rows (they are counted and reported per file)"
MAX_NESTING_DEPTH = 100  # JSON nesting deeper than this is refused (real rows nest < 15 levels: tool schemas)

# (where, row, problem): `problem` is "" for a row that parsed; a row with a problem is None.
SourceRow = tuple[str, Any, str]


# ----------------------------------------------------------------------------------------------
# Files of a source


def expand_source(source: str, key: str) -> list[str]:
    """The files of a source: itself, the data files in a folder (sorted), or an `hf:` name."""
    if source.startswith(HF_SOURCE_PREFIX):
        return [source]
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)
        if not files:
            raise UserError(f"{key}: folder {source} holds no {', '.join(SOURCE_SUFFIXES)} files")
        return files
    if not path.is_file():
        raise UserError(f"{key}: file not found: {source}")
    if path.suffix == ".txt":
        raise UserError(
            f"{key}: {source}: plain text has no prompt/response structure, so .txt is not an SFT format; "
            "give rows with prompt and answer (README: Bring your own data), or list pre-training text as the "
            "domain's raw sources (JSONL rows with a 'text' field)"
        )
    if path.suffix not in SOURCE_SUFFIXES:
        raise UserError(f"{key}: {source} is not a {', '.join(SOURCE_SUFFIXES)} file; convert it to JSONL")
    return [source]


def file_hash(file: str) -> str:
    if file.startswith(HF_SOURCE_PREFIX):
        return "hf-" + _hf_dataset(file)._fingerprint
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Rows of a file


def read_rows(file: str, max_row_bytes: int = 4 * 1024 * 1024) -> Iterator[SourceRow]:
    """(where, row, problem) for every row of a file, in order; blank lines are not rows."""
    if file.startswith(HF_SOURCE_PREFIX):
        for number, row in enumerate(_hf_dataset(file), start=1):
            yield _checked(f"{file} row {number}", row, max_row_bytes)
    elif file.endswith(".parquet"):
        yield from _parquet_rows(file, max_row_bytes)
    elif file.endswith(".json"):
        yield from _json_rows(file, max_row_bytes)
    elif file.endswith((".csv", ".tsv")):
        yield from _table_rows(file, max_row_bytes)
    else:
        yield from _jsonl_rows(file, max_row_bytes)


def _too_big(size: int, limit: int) -> str:
    return (f"the row is {size:,} bytes, more than data.max_row_bytes={limit:,}; split it, or raise "
            "data.max_row_bytes if such rows are intended")


def _nesting_depth(value: Any, limit: int) -> int:
    """The nesting depth of a parsed JSON value, counted up to `limit + 1` (iterative: no recursion to overflow)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _too_deep_reason() -> str:
    return f"JSON nested more than {MAX_NESTING_DEPTH} levels deep; rows of prompts and answers never need that"


def _checked(where: str, row: Any, max_row_bytes: int, size: int | None = None) -> SourceRow:
    """A parsed row, or its problem when it is too deeply nested or too big."""
    if _nesting_depth(row, MAX_NESTING_DEPTH) > MAX_NESTING_DEPTH:
        return where, None, _too_deep_reason()
    if size is None:
        size = len(json.dumps(row, ensure_ascii=False, default=str).encode("utf-8"))
    if size > max_row_bytes:
        return where, None, _too_big(size, max_row_bytes)
    return where, row, ""


def _parse_line(where: str, line: bytes, max_row_bytes: int) -> SourceRow:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return where, None, f"{undecodable_reason(line, exc.start)} at column {exc.start + 1}; save the file as UTF-8"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return where, None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return where, None, _too_deep_reason()
    return _checked(where, row, max_row_bytes, size=len(line))


def _jsonl_rows(file: str, max_row_bytes: int) -> Iterator[SourceRow]:
    with open(file, "rb") as handle:
        head = handle.read(64)
        encoding = foreign_encoding(head)
        if encoding is not None:
            raise UserError(f"{file}: the file is {encoding} text, not UTF-8; save it as UTF-8")
        handle.seek(0)
        number = 0
        while True:
            raw = handle.readline(max_row_bytes + 2)  # a line of max_row_bytes plus "\r\n"
            if not raw:
                return
            number += 1
            where = f"{file}:{number}"
            if number == 1:
                raw = strip_utf8_bom(raw)
            if not raw.endswith(b"\n") and len(raw) == max_row_bytes + 2:
                # Too long: skip the rest of the line without keeping it in memory.
                size = len(raw)
                while (chunk := handle.readline(1 << 20)) and not chunk.endswith(b"\n"):
                    size += len(chunk)
                yield where, None, _too_big(size + len(chunk.rstrip(b"\r\n")), max_row_bytes)
                continue
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            if len(line) > max_row_bytes:
                yield where, None, _too_big(len(line), max_row_bytes)
                continue
            yield _parse_line(where, line, max_row_bytes)


def _read_text(file: str) -> str:
    data = Path(file).read_bytes()
    text, reason = decode_utf8(data, file)
    if text is None:
        raise UserError(reason)
    return text


def _json_rows(file: str, max_row_bytes: int) -> Iterator[SourceRow]:
    """A JSON file holding a list of rows (read element by element, so each keeps its line number), or one row."""
    text = _read_text(file)
    decoder = json.JSONDecoder()
    at = _skip_space(text, 0)
    if at == len(text):
        return
    if not text.startswith("[", at):
        # One row (e.g. axolotl's single-conversation files); the format check names an object that holds rows.
        try:
            row, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            raise UserError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); fix the file") from None
        except RecursionError:
            raise UserError(f"{file}: {_too_deep_reason()}") from None
        if _skip_space(text, end) != len(text):
            raise UserError(f"{file}: more than one JSON value; a .json file holds one list of rows (or one row), "
                            "a .jsonl file one row per line")
        yield _checked(f"{file}:{text.count(chr(10), 0, at) + 1}", row, max_row_bytes, size=end - at)
        return
    at = _skip_space(text, at + 1)
    line, counted_to = 1, 0
    while not text.startswith("]", at):
        line += text.count("\n", counted_to, at)
        counted_to = at
        try:
            row, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            raise UserError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); fix the file") from None
        except RecursionError:
            raise UserError(f"{file}:{line}: {_too_deep_reason()}") from None
        yield _checked(f"{file}:{line}", row, max_row_bytes, size=end - at)
        at = _skip_space(text, end)
        if text.startswith(",", at):
            at = _skip_space(text, at + 1)
        elif not text.startswith("]", at):
            line += text.count("\n", counted_to, at)
            raise UserError(f"{file}:{line}: not valid JSON (expected ',' or ']' after a list element); fix the file")


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    # The csv module refuses cells over 128 KiB by default, and after that error it reads a quoted cell's
    # remaining lines as rows. Allow any cell the (already read) text can hold; rows are checked by size after.
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, min(limit, sys.maxsize)))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _table_rows(file: str, max_row_bytes: int) -> Iterator[SourceRow]:
    """CSV / TSV with a header row. Every cell stays text ('007' is not 7, 'NA' is not missing); an empty cell is
    an absent value."""
    text = _read_text(file)
    delimiter = "\t" if file.endswith(".tsv") else ","
    with _csv_field_limit(len(text) + 1):
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise UserError(f"{file}:1: not a valid header row ({exc}); fix the file") from None
        if header is None:
            return
        header = [name.strip() for name in header]
        if any(not name for name in header) or len(set(header)) != len(header):
            raise UserError(f"{file}:1: the header row must name every column once (got {header}); fix the file")
        line = reader.line_num
        while True:
            start = line + 1
            try:
                cells = next(reader, None)
            except csv.Error as exc:  # the reader cannot find the next row after this: the file is refused
                raise UserError(f"{file}:{start}: not a valid {delimiter!r}-separated row ({exc}); fix the file") from None
            if cells is None:
                return
            line = reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            where = f"{file}:{start}"
            size = sum(len(cell.encode("utf-8")) for cell in cells)
            if size > max_row_bytes:
                yield where, None, _too_big(size, max_row_bytes)
            elif len(cells) > len(header):
                yield where, None, f"{len(cells)} cells but the header names {len(header)} columns; quote cells that hold {delimiter!r}"
            else:
                yield where, {name: cell for name, cell in zip(header, cells) if cell != ""}, ""


def _parquet_rows(file: str, max_row_bytes: int) -> Iterator[SourceRow]:
    # pyarrow and datasets are imported where they are used: every rank imports this module, few read parquet.
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(file).to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        raise UserError(f"{file}: cannot read the parquet file ({exc}); check that it is a whole parquet file") from None
    for number, row in enumerate(rows, start=1):
        yield _checked(f"{file} row {number}", row, max_row_bytes)


def _hf_dataset(source: str) -> Any:
    """`hf:<name>[:<split>]` through `datasets.load_dataset` (needs the hub or a local data set path)."""
    from datasets import load_dataset

    name, _, split = source[len(HF_SOURCE_PREFIX) :].partition(":")
    try:
        return load_dataset(name, split=split or "train")
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError, ...)
        raise UserError(f"{source}: cannot load the Hugging Face data set: {exc}") from None


def read_raw_texts(file: str, on_bad_row: str, skipped: dict[str, int], max_row_bytes: int = 4 * 1024 * 1024) -> list[str]:
    """The non-blank `text` fields of a raw-text file (for the probe classifier)."""
    out = []
    for where, row, problem in read_rows(file, max_row_bytes):
        if not problem and not (isinstance(row, dict) and isinstance(row.get("text"), str)):
            keys = ", ".join(sorted(map(str, row))) if isinstance(row, dict) else type(row).__name__
            problem = f"a raw text row needs a string field 'text' (it has keys {keys})"
        if problem:
            if on_bad_row == "error":
                raise UserError(f"{where}: {problem}; {SKIP_HINT}")
            skipped[file] = skipped.get(file, 0) + 1
            continue
        if row["text"].strip():
            out.append(row["text"])
    return out
