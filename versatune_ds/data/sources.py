"""Reading data sources: files, folders and `hf:` data sets into rows that keep their `file:line`.

A source is a JSONL file, a JSON file holding a list of objects, a parquet file, a folder of such files
(read in sorted order), or a Hugging Face data set written `hf:<name>[:<split>]`. Rows are parsed one by
one so a bad one can be named by `file:line` and, with `data.on_bad_row=skip`, counted and skipped
without losing the rest. `read_records` also checks the row format (data.formats).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow.parquet
from datasets import load_dataset

from versatune_ds.config.schema import HF_SOURCE_PREFIX
from versatune_ds.data import formats
from versatune_ds.errors import UserError

SOURCE_SUFFIXES = (".jsonl", ".json", ".parquet")
SKIP_HINT = "fix the row, or set data.on_bad_row=skip to skip such rows (they are counted and reported per file)"


@dataclass(frozen=True)
class Record:
    """One parsed row: where it came from and its messages."""

    where: str  # file:line (or `file row N` for parquet / hf)
    file: str
    messages: list[dict[str, str]]



# ----------------------------------------------------------------------------------------------
# Reading sources


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


def read_rows(file: str) -> Iterator[tuple[str, Any, str]]:
    """(where, row, problem) for every row of a file; `problem` is "" for a row that parsed."""
    if file.startswith(HF_SOURCE_PREFIX):
        for number, row in enumerate(_hf_dataset(file), start=1):
            yield f"{file} row {number}", row, ""
    elif file.endswith(".parquet"):
        for number, row in enumerate(pyarrow.parquet.read_table(file).to_pylist(), start=1):
            yield f"{file} row {number}", row, ""
    elif file.endswith(".json"):
        yield from _json_list_rows(file)
    else:
        yield from _jsonl_rows(file)


def _jsonl_rows(file: str) -> Iterator[tuple[str, Any, str]]:
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{file}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, None, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); save the file as UTF-8"
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line), ""
            except json.JSONDecodeError as exc:
                yield where, None, f"not valid JSON ({exc.msg} at column {exc.colno})"


def _json_list_rows(file: str) -> Iterator[tuple[str, Any, str]]:
    """A JSON file holding a list of objects, read element by element so each keeps its line number."""
    data = Path(file).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{file}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None
    decoder = json.JSONDecoder()
    at = _skip_space(text, 0)
    if not text.startswith("[", at):
        raise UserError(f"{file}:1: a .json data file must hold a list of objects ([{{...}}, ...]); for one object per line use .jsonl")
    at = _skip_space(text, at + 1)
    line, counted_to = 1, 0
    while not text.startswith("]", at):
        line += text.count("\n", counted_to, at)
        counted_to = at
        try:
            row, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            raise UserError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); fix the file") from None
        yield f"{file}:{line}", row, ""
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


def _hf_dataset(source: str) -> Any:
    """`hf:<name>[:<split>]` through `datasets.load_dataset` (needs the hub or a local data set path)."""
    name, _, split = source[len(HF_SOURCE_PREFIX) :].partition(":")
    try:
        return load_dataset(name, split=split or "train")
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError, ...)
        raise UserError(f"{source}: cannot load the Hugging Face data set: {exc}") from None


# ----------------------------------------------------------------------------------------------
# Rows -> records


def read_records(files: Sequence[str], fmt: str, on_bad_row: str, key: str, skipped: dict[str, int]) -> list[Record]:
    """Parse every row of `files` into messages; bad rows raise or (on_bad_row=skip) are counted in `skipped`."""
    records: list[Record] = []
    for file in files:
        file_format = None if fmt == "auto" else fmt
        first = True
        for where, row, problem in read_rows(file):
            if not problem:
                detected = formats.detect_format(row)
                if first:
                    file_format = _check_first_row(where, row, detected, file_format, key)
                    first = False
                elif detected is not None and detected != file_format:  # (None: to_messages says what is missing)
                    problem = f"the row does not match the file's format {file_format} (it has keys {_keys(row)})"
            if not problem:
                try:
                    records.append(Record(where, file, formats.to_messages(row, file_format)))
                    continue
                except formats.RowError as exc:
                    problem = str(exc)
            if on_bad_row == "error":
                raise UserError(f"{where}: {problem}; {SKIP_HINT}")
            skipped[file] = skipped.get(file, 0) + 1
    return records


def _check_first_row(where: str, row: Any, detected: str | None, fmt: str | None, key: str) -> str:
    if fmt is not None and detected is None:
        return fmt  # a broken row of the configured format: to_messages reports what is missing
    if detected is None:
        raise UserError(
            f"{where}: cannot tell the row format (keys {_keys(row)}); expected {formats.describe_formats()}; "
            f"fix the file or set {key}.format"
        )
    if fmt is not None and detected != fmt:
        raise UserError(
            f"{where}: {key}.format is {fmt!r} but the rows look like {detected} (keys {_keys(row)}); "
            f"set {key}.format={detected} or auto"
        )
    return detected


def _keys(row: Any) -> str:
    return ", ".join(sorted(map(str, row))) if isinstance(row, dict) else type(row).__name__


def read_raw_texts(file: str, on_bad_row: str, skipped: dict[str, int]) -> list[str]:
    """The non-blank `text` fields of a raw-text file (for the probe classifier)."""
    out = []
    for where, row, problem in read_rows(file):
        if not problem and not (isinstance(row, dict) and isinstance(row.get("text"), str)):
            problem = f"a raw text row needs a string field 'text' (it has keys {_keys(row)})"
        if problem:
            if on_bad_row == "error":
                raise UserError(f"{where}: {problem}; {SKIP_HINT}")
            skipped[file] = skipped.get(file, 0) + 1
            continue
        if row["text"].strip():
            out.append(row["text"])
    return out
