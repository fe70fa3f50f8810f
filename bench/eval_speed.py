"""MCQ scoring speed: the shared-context scorer (`versatune_ds.eval.mcq.score_mcq`) against one whole row per
choice (what lm-eval runs, and what score_mcq did before), on ../shared/data/eval, single process, CPU.

Models: a tiny random Llama built here (tokenizer trained on data/sample), and SmolLM2-135M when a saved HF folder
exists at runs/smollm2 (or --smollm2 DIR). The two ways run interleaved on the same items and batch size (choices
per forward pass); the largest |difference| of their log-likelihoods is printed beside the times. Accuracy is
printed too, but the tiny model is random, so only its speed means anything. Writes bench/results/eval_speed.{json,md}.

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_speed.py [--items-per-domain 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from common import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("law", "medicine", "finance", "science", "code", "general")


def whole_row_scores(model, items, tokenizer, batch_size: int) -> list[list[float]]:
    """The reference: every choice's context + continuation as its own row, batches of `batch_size` rows."""
    import numpy as np

    from versatune_ds.data.packing import IGNORE_INDEX, Row, collate_rows
    from versatune_ds.eval.heldout import batch_loss_sums, hf_forward
    from versatune_ds.eval.mcq import PromptFormat, choice_request

    forward = hf_forward(model)
    rows = []
    for item in items:
        request = choice_request(item, tokenizer, PromptFormat(), 2048)
        for c, continuation in enumerate(request.continuations):
            ids = np.array(request.context + continuation, dtype=np.int64)
            labels = ids.copy()
            labels[: len(request.context)] = IGNORE_INDEX
            rows.append(Row(item.domain_id, ids, labels, np.arange(len(ids), dtype=np.int64), (item.index, c)))
    order = sorted(range(len(rows)), key=lambda k: -rows[k].num_tokens)
    sums = {}
    for start in range(0, len(order), batch_size):
        batch_rows = [rows[k] for k in order[start : start + batch_size]]
        loss, _ = batch_loss_sums(forward, collate_rows(batch_rows, pad_token_id=tokenizer.pad_token_id, packed=False))
        for row, value in zip(batch_rows, loss):
            sums[(row.domain_id, *row.example_indices)] = -float(value)
    return [[sums[(i.domain_id, i.index, c)] for c in range(len(i.choices))] for i in sorted(items, key=lambda i: (i.domain_id, i.index))]


def bench_model(name: str, model_dir: Path, items, batch_sizes, threads: int) -> list[dict]:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from versatune_ds.dist import DistEnv
    from versatune_ds.eval.mcq import mcq_accuracy, score_mcq

    torch.set_num_threads(threads)
    env = DistEnv(0, 1, 0, "127.0.0.1", 0, "single")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for batch_size in batch_sizes:
        score_mcq(model, items[:4], tokenizer, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, env=env)  # warm-up
        start = time.perf_counter()
        scores = score_mcq(model, items, tokenizer, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, env=env)
        shared = time.perf_counter() - start
        start = time.perf_counter()
        reference = whole_row_scores(model, items, tokenizer, batch_size)
        whole = time.perf_counter() - start
        accuracy = mcq_accuracy(scores, len(DOMAINS))
        row = {
            "model": name,
            "params": sum(p.numel() for p in model.parameters()),
            "batch_size": batch_size,
            "items": len(items),
            "choices": sum(len(i.choices) for i in items),
            "seconds_shared_context": round(shared, 3),
            "seconds_whole_rows": round(whole, 3),
            "speedup": round(whole / shared, 2),
            "items_per_s": round(len(items) / shared, 2),
            "max_abs_logprob_difference": float(np.max(np.abs(np.array([s.logprobs for s in scores]) - np.array(reference)))),
            "acc": round(float(accuracy.acc.mean()), 4),
            "acc_norm": round(float(accuracy.acc_norm.mean()), 4),
        }
        print(json.dumps(row))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "eval"))
    parser.add_argument("--items-per-domain", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smollm2", default=str(REPO / "runs" / "smollm2"))
    parser.add_argument("--work", default="/tmp/versatune_eval_speed")
    args = parser.parse_args()

    from versatune_ds.eval.mcq import load_mcq_file
    from versatune_ds.tiny_model import build_tiny_model_dir

    if not Path(args.data).is_dir():
        print(f"eval_speed: skipped, no MCQ files at {args.data} (the shared data bundle)")
        return
    items = []
    for domain_id, name in enumerate(DOMAINS):
        items.extend(load_mcq_file(Path(args.data) / f"{name}.jsonl", domain_id, max_items=args.items_per_domain, seed=0))
    texts = [line for f in sorted((REPO / "data" / "sample").glob("*.jsonl")) for line in f.read_text().splitlines() if line.strip()]
    tiny_dir = build_tiny_model_dir(Path(args.work) / "tiny", texts, vocab_size=1024, seed=0)
    rows = bench_model("tiny-llama (random, hidden 64, 2 layers)", tiny_dir, items, (4, 16), args.threads)
    smol = Path(args.smollm2)
    if (smol / "config.json").is_file():
        rows += bench_model("SmolLM2-135M-Instruct", smol, items, (4, 16), args.threads)
    else:
        print(f"SmolLM2 skipped: no HF folder at {smol}")
    load = os.getloadavg()
    meta = {"load_average_1_5_15": [round(v, 2) for v in load], "items_per_domain": args.items_per_domain, "domains": list(DOMAINS), "threads": args.threads,
            "machine": f"{platform.processor() or platform.machine()}, CPU only", "prompt": "Question: ...\\nAnswer: <choice>"}
    lines = [
        "# MCQ scoring speed (bench/eval_speed.py)",
        "",
        f"{args.items_per_domain} items per domain x {len(DOMAINS)} domains of shared/data/eval (4 choices each), one process, "
        f"{args.threads} CPU thread(s), fp32, lm-eval cloze prompt. Batch size = choices per forward pass. 'shared context' is "
        "`score_mcq` (each item's context once, its KV cache reused by every choice: two forward passes per batch); "
        "'whole rows' is one context + choice row per choice (lm-eval's way, and score_mcq's before), run right after on the "
        "same items. Tiny-model accuracy is chance level (random weights).",
        "",
        f"Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on 2 cores; the two ways ran back to back under "
        "the same load, so their ratio is the figure to read, not the absolute seconds.",
        "",
        "| model | batch size | items | shared context s | whole rows s | speed-up | max abs log-lik difference | acc | acc_norm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['model']} | {r['batch_size']} | {r['items']} | {r['seconds_shared_context']} | {r['seconds_whole_rows']} | "
              f"{r['speedup']}x | {r['max_abs_logprob_difference']:.1e} | {r['acc']} | {r['acc_norm']} |" for r in rows]
    if not (smol / "config.json").is_file():
        lines += ["", "SmolLM2-135M: not measured (no saved model folder at runs/smollm2 when this ran)."]
    write_results("eval_speed", {"meta": meta, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
