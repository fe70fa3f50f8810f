"""MCQ scoring speed: items/s on ../shared/data/eval at batch sizes 1 and 16 (single process, CPU).

Models: a tiny random Llama built here (tokenizer trained on data/sample), and SmolLM2-135M when a
saved HF folder exists at runs/smollm2 (or --smollm2 DIR). Accuracy is printed too, but the tiny model
is random, so only its speed means anything. Writes bench/results/eval_speed.{json,md}.

    OMP_NUM_THREADS=2 .venv/bin/python bench/eval_speed.py [--items-per-domain 40]
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


def bench_model(name: str, model_dir: Path, items, batch_sizes, threads: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from versatune_ds.dist import DistEnv
    from versatune_ds.eval.heldout import hf_forward
    from versatune_ds.eval.mcq import mcq_accuracy, score_mcq

    torch.set_num_threads(threads)
    env = DistEnv(0, 1, 0, "127.0.0.1", 0, "single")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    forward = hf_forward(model, torch.device("cpu"))
    rows = []
    for batch_size in batch_sizes:
        score_mcq(forward, items[:4], tokenizer, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, env=env)  # warm-up
        start = time.perf_counter()
        scores = score_mcq(forward, items, tokenizer, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, env=env)
        seconds = time.perf_counter() - start
        accuracy = mcq_accuracy(scores, len(DOMAINS))
        row = {
            "model": name,
            "params": sum(p.numel() for p in model.parameters()),
            "batch_size": batch_size,
            "items": len(items),
            "choices": sum(len(i.choices) for i in items),
            "seconds": round(seconds, 3),
            "items_per_s": round(len(items) / seconds, 2),
            "acc": round(float(accuracy.acc.mean()), 4),
            "acc_norm": round(float(accuracy.acc_norm.mean()), 4),
        }
        print(json.dumps(row))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "eval"))
    parser.add_argument("--items-per-domain", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smollm2", default=str(REPO / "runs" / "smollm2"))
    parser.add_argument("--work", default="/tmp/versatune_eval_speed")
    args = parser.parse_args()

    from versatune_ds.eval.mcq import load_mcq_file
    from versatune_ds.tiny_model import build_tiny_model_dir

    items = []
    for domain_id, name in enumerate(DOMAINS):
        items.extend(load_mcq_file(Path(args.data) / f"{name}.jsonl", domain_id, max_items=args.items_per_domain, seed=0))
    texts = [line for f in sorted((REPO / "data" / "sample").glob("*.jsonl")) for line in f.read_text().splitlines() if line.strip()]
    tiny_dir = build_tiny_model_dir(Path(args.work) / "tiny", texts, vocab_size=1024, seed=0)
    rows = bench_model("tiny-llama (random, hidden 64, 2 layers)", tiny_dir, items, (1, 16), args.threads)
    smol = Path(args.smollm2)
    if (smol / "config.json").is_file():
        rows += bench_model("SmolLM2-135M-Instruct", smol, items, (1, 16), args.threads)
    else:
        print(f"SmolLM2 skipped: no HF folder at {smol}")
    load = os.getloadavg()
    meta = {"load_average_1_5_15": [round(v, 2) for v in load], "items_per_domain": args.items_per_domain, "domains": list(DOMAINS), "threads": args.threads,
            "machine": f"{platform.processor() or platform.machine()}, CPU only", "prompt": "Question: ...\\nAnswer: <choice>"}
    lines = [
        "# MCQ scoring speed (bench/eval_speed.py)",
        "",
        f"{args.items_per_domain} items per domain x {len(DOMAINS)} domains of shared/data/eval (4 choices each), one process, "
        f"{args.threads} CPU threads, fp32, lm-eval cloze prompt. Tiny-model accuracy is chance level (random weights).",
        "",
        f"The 2-core machine was shared with other jobs (load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end); "
        "a profile shows the time is in the model's matmuls, so absolute numbers are contention-bound. The batch-1 vs "
        "batch-16 ratio is the useful figure.",
        "",
        "| model | batch size | items | seconds | items/s | acc | acc_norm |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['model']} | {r['batch_size']} | {r['items']} | {r['seconds']} | {r['items_per_s']} | {r['acc']} | {r['acc_norm']} |" for r in rows]
    if not (smol / "config.json").is_file():
        lines += ["", "SmolLM2-135M: not measured (no saved model folder at runs/smollm2 when this ran)."]
    write_results("eval_speed", {"meta": meta, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
