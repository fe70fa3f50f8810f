"""Load real third-party SFT files as a new user would, and check that nothing is lost in silence.

    PYTHONPATH=. .venv/bin/python bench/thirdparty_formats.py [FOLDER ...] [--expected policy.tsv]

Each data file under the folders (default /work/scratch/issue11/thirdparty: files from LLaMA-Factory, axolotl,
FastChat, ms-swift, xtuner, MedicalGPT and the OpenAI docs, fetched for trials; they are never committed) is read
as one domain's `train` with `format: auto` and the default `data.on_bad_row=error`, then rendered with the
`qwen2.5` catalogue template (it renders tools) on a small tokenizer trained on the spot. Outcome per file:

- loaded: every row became a conversation and renders; no warning;
- loaded with warnings: rows loaded, and the domain warning names what was changed or skipped, with file:line;
- refused: one error naming file:line and the reason.

Silent-loss check, on every loaded row: every non-empty text value of the raw row (JSON text inside it decoded,
speaker names, part types and bookkeeping columns such as `id` left out) must appear in the loaded conversation
(contents, system, tool calls, tools) - or the row must carry a warning. A row failing it is "silent loss"; a
file is "loaded correctly" when it loads (with or without warnings) with none. `--expected` compares the outcome
class with a survey's expectations (a TSV: file, load|warn|refuse, ...). Writes
bench/results/thirdparty_formats.md and .json; exits with a message when no folder exists.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, versions, write_results  # noqa: E402

DEFAULT_FOLDER = Path("/work/scratch/issue11/thirdparty")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
NOT_DATA = {"SOURCES.tsv"}  # the survey's list of where each file came from
STRUCTURAL_KEYS = {"role", "from", "type"}  # speaker names and part types: structure, not text to train


def _files(folders: list[Path]) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*")
                  if p.is_file() and p.suffix in DATA_SUFFIXES and p.name not in NOT_DATA and not any(part.startswith("_") for part in p.relative_to(folder).parts))


def _leaves(value: Any, key: str = "") -> list[str]:
    """Non-empty text values of a raw row (JSON text decoded), without structural values."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, str(k))]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v, key)]
    if not isinstance(value, str) or not value.strip() or key in STRUCTURAL_KEYS:
        return []
    if value.strip()[:1] in "[{":
        try:
            return _leaves(json.loads(value), key)
        except ValueError:
            pass
    return [value.strip()]


def _haystack(record: Any) -> str:
    parts = [m["content"] for m in record.messages]
    parts.append(json.dumps([m.get("tool_calls") for m in record.messages], ensure_ascii=False))
    parts.append(json.dumps(record.tools, ensure_ascii=False))
    parts.extend(str(m.get(k, "")) for m in record.messages for k in ("tool_call_id", "name"))
    return "\n".join(parts)


def _silent_losses(file: Path, records: list[Any], warned: set[str], bookkeeping: frozenset[str]) -> list[str]:
    from versatune_ds.data.sources import read_rows

    raw = {where: row for where, row, problem in read_rows(str(file)) if not problem}
    losses = []
    for record in records:
        row = raw[record.where]
        if isinstance(row, dict):
            row = {k: v for k, v in row.items() if k not in bookkeeping}
        haystack = _haystack(record)
        missing = [leaf for leaf in _leaves(row) if leaf not in haystack and json.dumps(leaf, ensure_ascii=False)[1:-1] not in haystack]
        if missing and record.where not in warned:
            losses.append(f"{record.where}: {missing[0][:60]!r}")
    return losses


def _load(file: Path, tokenizer: Any) -> dict[str, Any]:
    from versatune_ds.config.schema import DataConfig, DomainConfig
    from versatune_ds.data.conversation import RowError
    from versatune_ds.data.diagnostics import Diagnostics
    from versatune_ds.data.formats import BOOKKEEPING
    from versatune_ds.data.records import read_records
    from versatune_ds.data.sources import expand_source
    from versatune_ds.data.templates import render, resolve_template
    from versatune_ds.errors import UserError

    diagnostics = Diagnostics()
    try:
        records = read_records(expand_source(str(file), "train"), DomainConfig(name="d"), DataConfig(), "data.domains[0]", diagnostics)
        template = resolve_template(tokenizer, "qwen2.5")
        for record in records:
            try:
                render(record.messages, tokenizer, template, record.tools)
            except RowError as exc:
                raise UserError(f"{record.where}: {exc}") from None
    except UserError as exc:
        reason = str(exc).replace(str(file.parent) + "/", "")
        return {"outcome": "refused", "rows": 0, "reason": reason.split("; fix the row")[0][:300]}
    warned = {place.split(" (")[0] for entry in diagnostics.entries.values() for place in entry.places}
    # Rows past the few places a warning names carry the same note: count them as warned when the kind is row-level.
    noted_everywhere = any(e.count > len(e.places) for e in diagnostics.entries.values())
    if noted_everywhere:
        warned |= {r.where for r in records}
    losses = _silent_losses(file, records, warned, BOOKKEEPING)
    return {
        "outcome": "loaded with warnings" if diagnostics.entries else "loaded",
        "rows": len(records),
        "skipped": diagnostics.num_skipped,
        "warnings": {kind: entry.count for kind, entry in diagnostics.entries.items()},
        "silent_loss_rows": len(losses),
        "silent_loss_examples": losses[:3],
    }


def _expected(path: Path | None) -> dict[str, str]:
    if path is None or not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = line.split("\t")
        if len(cells) >= 2:
            out[cells[0]] = {"load": "loaded", "warn": "loaded with warnings", "refuse": "refused"}.get(cells[1], cells[1])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path, default=[DEFAULT_FOLDER], help="folders of third-party data files")
    parser.add_argument("--expected", type=Path, default=None,
                        help="TSV of expected outcomes (file relative to the folder, load|warn|refuse); default: "
                             "policy_thirdparty.tsv next to the folder when present")
    parser.add_argument("--name", default="thirdparty_formats", help="results name under bench/results/")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("versatune_ds").setLevel(logging.ERROR)  # the per-file warnings are in the results instead
    folders = [f for f in args.folders if f.is_dir()]
    if not folders:
        print(f"no third-party data folder found ({', '.join(map(str, args.folders))}); fetch the files listed in the "
              "survey's SOURCES.tsv into a folder and pass it - nothing was measured", file=sys.stderr)
        return 0
    from versatune_ds.tiny_model import train_tokenizer

    tokenizer = train_tokenizer(["The quick brown fox jumps over the lazy dog. {\"name\": \"x\"}"] * 50)
    expected = _expected(args.expected or folders[0].parent / "policy_thirdparty.tsv")
    results = {}
    for file in _files(folders):
        name = str(file.relative_to(next(f for f in folders if file.is_relative_to(f))))
        results[name] = _load(file, tokenizer)
        if name in expected:
            results[name]["expected"] = expected[name]
        logging.info("%-55s %s", name, results[name]["outcome"])
    document = _summary(results)
    document.update(folders=[str(f) for f in folders], machine=machine_info(), versions=versions())
    write_results(args.name, document, _markdown(document, sys.argv[1:]))
    print(json.dumps(document["counts"], indent=2))
    return 0


def _summary(results: dict[str, dict]) -> dict[str, Any]:
    outcomes = Counter(r["outcome"] for r in results.values())
    correct = [n for n, r in results.items() if r["outcome"] != "refused" and r["silent_loss_rows"] == 0]
    compared = {n: r for n, r in results.items() if "expected" in r}
    counts = {
        "files": len(results),
        "loaded": outcomes["loaded"],
        "loaded_with_warnings": outcomes["loaded with warnings"],
        "refused": outcomes["refused"],
        "loaded_correctly": len(correct),
        "files_with_silent_loss": sum(1 for r in results.values() if r.get("silent_loss_rows")),
        "rows_loaded": sum(r["rows"] for r in results.values()),
        "rows_with_silent_loss": sum(r.get("silent_loss_rows", 0) for r in results.values()),
        "outcome_as_expected": sum(1 for r in compared.values() if r["outcome"] == r["expected"]),
        "files_with_expectation": len(compared),
    }
    return {"counts": counts, "files": results}


def _markdown(document: dict, argv: list[str]) -> str:
    c = document["counts"]
    lines = [
        "# Third-party SFT files through the loader",
        "",
        f"`PYTHONPATH=. .venv/bin/python bench/thirdparty_formats.py {' '.join(argv)}`".replace("  ", " ").replace(" `", "`"),
        "",
        "Each file is one domain's `train`, `format: auto`, default `data.on_bad_row=error`, rendered with the `qwen2.5` "
        "template. Silent loss = a text value of a loaded row that is in neither the conversation nor a warning. "
        "The files are public samples from LLaMA-Factory, axolotl, FastChat, ms-swift, xtuner, MedicalGPT and the "
        "OpenAI docs, fetched for this trial and never committed.",
        "",
        f"**{c['loaded_correctly']} of {c['files']} files loaded correctly** ({c['loaded']} loaded, "
        f"{c['loaded_with_warnings']} loaded with warnings; silent loss in {c['files_with_silent_loss']} files, "
        f"{c['rows_with_silent_loss']} rows); {c['refused']} refused with a reason; {c['rows_loaded']} rows loaded. "
        f"Outcome as the survey expected: {c['outcome_as_expected']} of {c['files_with_expectation']}.",
        "",
        "| file | outcome | rows | warnings / reason | survey expected |",
        "|---|---|---:|---|---|",
    ]
    for name, r in document["files"].items():
        detail = r.get("reason") or ", ".join(f"{k} {v}" for k, v in r.get("warnings", {}).items())
        if r.get("silent_loss_rows"):
            detail += f"; SILENT LOSS in {r['silent_loss_rows']} rows, e.g. {r['silent_loss_examples'][0]}"
        lines.append(f"| {name} | {r['outcome']} | {r['rows']} | {detail.replace('|', '/')} | {r.get('expected', '')} |")
    m = document["machine"]
    lines += ["", f"Machine: {m['nproc']} CPUs, load {m['load_avg_at_end']}; versatune_ds {document['versions']['git_commit']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
