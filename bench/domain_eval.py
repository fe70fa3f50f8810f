"""Per-domain held-out losses with standard errors over items, for the controlled quality benchmarks.

Two held-out measures per domain, both as token-weighted mean cross-entropy (nats per token):

- **raw-text loss** (the knowledge kept): raw/ passages no model ever trained on, each scored as
  BOS + passage + EOS cut at `max_tokens`, every token after BOS predicted (the passage and its EOS);
- **SFT loss** (the ability learnt): SFT rows rendered with the run's template (`simple`), only the response
  tokens scored -- the library's own tokenization and loss mask (`tokenize_sft_file`), as `versatune-ds eval`.

Every item's summed loss and token count are kept (`ItemLosses`), so two models scored on the same items
give a *paired* difference with its standard error (versatune_ds.eval.stats.paired_ratio_difference):
item-to-item difficulty cancels, which is what makes a small rise of the raw-text loss detectable.

`versatune-ds eval` reports only per-domain means; this module adds the per-item view the statistics need,
with the library's pieces (Example rows, collation, the one shifted loss). A model is an HF folder, or a
DeepSpeed checkpoint of a run on top of its base (`load_model(..., checkpoint=(root, tag))`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from versatune_ds.config.schema import DataConfig, ModelConfig
from versatune_ds.data.packing import Example, collate_rows, row_from_examples
from versatune_ds.data.prepare import tokenize_sft_file
from versatune_ds.dist import DistEnv
from versatune_ds.domains import Domains
from versatune_ds.engine.models import CheckpointRef, load_inference_model
from versatune_ds.eval import stats
from versatune_ds.eval.heldout import batch_loss_sums, hf_forward


@dataclass(frozen=True)
class ItemLosses:
    """One domain's held-out items: summed loss (nats) and scored tokens per item, in a fixed item order."""

    sums: np.ndarray
    counts: np.ndarray

    def mean_se(self) -> tuple[float, float]:
        return stats.ratio_mean_se(self.sums, self.counts)


def raw_examples(tokenizer: object, texts: Sequence[str], domain_id: int, max_tokens: int) -> list[Example]:
    """BOS + passage + EOS, cut to `max_tokens`; labels = the tokens after the first (nothing predicts it).
    A tokenizer without BOS starts at EOS (the probe's convention for a lone start token)."""
    out = []
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for index, text in enumerate(texts):
        ids = [start] + tokenizer.encode(text, add_special_tokens=False)[: max_tokens - 2] + [tokenizer.eos_token_id]
        array = np.asarray(ids, dtype=np.int64)
        labels = array.copy()
        labels[0] = -100
        out.append(Example(index=index, domain_id=domain_id, input_ids=array, labels=labels))
    return out


def sft_examples(tokenizer: object, path: str | Path, domains: Domains, domain_id: int, seq_len: int, *,
                 template: str = "simple", truncation: str = "skip") -> list[Example]:
    """An SFT file tokenized by the library exactly as training and `versatune-ds eval` do (the run's template)."""
    data_cfg = DataConfig(seq_len=seq_len, template=template, truncation=truncation, packing=False)
    return tokenize_sft_file(str(path), tokenizer, data_cfg, domains, domain_id)


def load_model(model_dir: str | Path, checkpoint: tuple[str, str] | None = None) -> torch.nn.Module:
    """An fp32 replica on the CPU: the HF folder, or a run's DeepSpeed checkpoint (root, tag) on top of it."""
    ref = CheckpointRef(*checkpoint) if checkpoint is not None else None
    cfg = ModelConfig(path=str(model_dir), dtype="fp32", attn_implementation="sdpa")
    return load_inference_model(cfg, DistEnv.from_environ({}), zero3=False, dtype=torch.float32, checkpoint=ref).module


def score(model: torch.nn.Module, examples: Sequence[Example], *, pad_token_id: int, batch_size: int = 32) -> ItemLosses:
    """Summed loss and token count of every example (one example per row, longest first, then put back in order)."""
    order = sorted(range(len(examples)), key=lambda i: -examples[i].num_tokens)
    sums = np.zeros(len(examples))
    counts = np.zeros(len(examples))
    forward = hf_forward(model, torch.device("cpu"))
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate_rows([row_from_examples([examples[i]]) for i in chunk], pad_token_id=pad_token_id, packed=False)
        row_sums, row_counts = batch_loss_sums(forward, batch)
        sums[chunk] = row_sums
        counts[chunk] = row_counts
    model.train(was_training)
    return ItemLosses(sums, counts)


def score_domains(
    model: torch.nn.Module, sets: dict[str, Sequence[Sequence[Example]]], *, pad_token_id: int, batch_size: int = 32
) -> dict[str, list[ItemLosses]]:
    """{set name: [ItemLosses per domain]} for several held-out sets (e.g. raw_test, sft_test)."""
    with torch.no_grad():
        return {name: [score(model, examples, pad_token_id=pad_token_id, batch_size=batch_size) for examples in per_domain]
                for name, per_domain in sets.items()}


def to_json(scores: dict[str, list[ItemLosses]], domains: Sequence[str]) -> dict:
    """Per set and domain: loss, SE, tokens, items, and the per-item sums/counts (for paired differences)."""
    out: dict = {}
    for name, per_domain in scores.items():
        out[name] = {}
        for domain, items in zip(domains, per_domain):
            mean, se = items.mean_se()
            # JSON has no NaN: a domain with no scored item has no loss, one with a single item no standard error.
            mean, se = (value if np.isfinite(value) else None for value in (mean, se))
            out[name][domain] = {"loss": mean, "se": se, "tokens": float(items.counts.sum()), "items": int(items.sums.size),
                                 "sums": [round(float(x), 5) for x in items.sums], "counts": items.counts.astype(int).tolist()}
    return out


def from_json(doc: dict, name: str, domains: Sequence[str]) -> list[ItemLosses]:
    return [ItemLosses(np.asarray(doc[name][d]["sums"], dtype=np.float64), np.asarray(doc[name][d]["counts"], dtype=np.float64))
            for d in domains]


def read(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def main() -> int:
    """`python bench/domain_eval.py --model DIR --raw law=F ... --sft law=F ... --out X.json` (a job of quality_smollm2.py)."""
    parser = argparse.ArgumentParser(description="per-item held-out raw-text and SFT losses of one model")
    parser.add_argument("--model", required=True)
    parser.add_argument("--raw", nargs="*", default=[], metavar="DOMAIN=FILE", help="JSONL with a `text` field")
    parser.add_argument("--sft", nargs="*", default=[], metavar="DOMAIN=FILE", help="SFT rows (alpaca / sharegpt / messages)")
    parser.add_argument("--raw-name", default="raw_test")
    parser.add_argument("--sft-name", default="sft_test")
    parser.add_argument("--template", default="auto", help="the run's data.template")
    parser.add_argument("--seq-len", type=int, default=512, help="SFT rows: the run's data.seq_len (longer rows are cut)")
    parser.add_argument("--max-tokens", type=int, default=256, help="raw passages are cut to this many tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from versatune_ds.files import write_json_atomic

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    pairs = {kind: [item.split("=", 1) for item in getattr(args, kind)] for kind in ("raw", "sft")}
    names = list(dict.fromkeys(d for kind in pairs.values() for d, _ in kind))
    domains = Domains.from_names(names)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sets: dict[str, list[list[Example]]] = {}
    if pairs["raw"]:
        sets[args.raw_name] = [raw_examples(tokenizer, [json.loads(x)["text"] for x in Path(f).read_text(encoding="utf-8").splitlines() if x.strip()],
                                            domains.id_of(d, key="--raw"), args.max_tokens) for d, f in pairs["raw"]]
    if pairs["sft"]:
        sets[args.sft_name] = [sft_examples(tokenizer, f, domains, domains.id_of(d, key="--sft"), args.seq_len, template=args.template,
                                            truncation="truncate") for d, f in pairs["sft"]]
    model = load_model(args.model)
    scores = score_domains(model, sets, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                           batch_size=args.batch_size)
    doc: dict = {}
    for set_name, kind in ((args.raw_name, "raw"), (args.sft_name, "sft")):
        if set_name in scores:
            doc.update(to_json({set_name: scores[set_name]}, [d for d, _ in pairs[kind]]))
    doc["seconds"] = time.perf_counter() - started
    write_json_atomic(args.out, doc)
    print(json.dumps({s: {d: None if v["loss"] is None else round(v["loss"], 4) for d, v in doc[s].items()} for s in scores}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
