"""GPU throughput: our ZeRO-3 loop vs the HF Trainer (same DeepSpeed config, model, rows and batch) on one GPU.

    python bench/gpu_throughput.py [--hidden 1024 --layers 24 --seq-len 1024 --micro-batch 8 --steps 40]

Builds a randomly initialised Llama from a config on the spot (throughput needs no pretrained weights and
no download), packs the repo's sample data into `seq_len` rows, then, in one process run:
  1. a dense bf16 matmul (8192^3) to measure what this GPU delivers;
  2. `versatune-ds train` (uniform mixture, bf16, ZeRO-3, one rank) for `--steps` steps;
  3. `transformers.Trainer` with the same DeepSpeed JSON values, model, packed rows and batch size.
Tokens/s is measured over the steps after the first 5 (warm-up). Model FLOP/s = 6 * N * tokens/s with N the
non-embedding parameter count (the usual Kaplan/Chinchilla approximation, attention FLOPs left out).
Writes bench/results/gpu_throughput.{json,md}. Skips with a message when no CUDA GPU is present.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "gpu_throughput"
RESULTS = REPO / "bench" / "results"


def build_model_dir(path: Path, *, hidden: int, layers: int, vocab: int) -> tuple[Path, int, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from versatune_ds.tiny_model import train_tokenizer

    texts = [line for f in sorted((REPO / "data" / "sample").glob("*.jsonl")) for line in f.read_text().splitlines()]
    tokenizer = train_tokenizer(texts, vocab_size=2048)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3 // 64 * 64),
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    embed = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path, total, total - embed


def write_config(path: Path, model_dir: Path, run_dir: Path, args: argparse.Namespace) -> Path:
    config = {
        "model": {"path": str(model_dir), "dtype": "bf16", "attn_implementation": "auto",
                  "gradient_checkpointing": args.grad_ckpt},
        "data": {"dir": str(REPO / "data" / "sample"), "seq_len": args.seq_len, "packing": True,
                 "heldout_fraction": 0.05, "cache_dir": str(OUT / "cache")},
        "mixture": {"strategy": "uniform", "block_size": 256},
        "train": {"run_dir": str(run_dir), "max_steps": args.steps, "micro_batch_size": args.micro_batch,
                  "learning_rate": 1e-4, "warmup_steps": 2, "log_every": 1},
        "eval": {"every": 100000, "at_start": False},
        "checkpoint": {"every": 100000, "keep_last": 1},
        "export": {"at_end": False},
        "deepspeed": {"config": "zero3"},
        "dist": {"timeout_s": 600},
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def matmul_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def ours(config: Path, run_dir: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("DS_ACCELERATOR", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "versatune_ds", "train", "--config", str(config)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"versatune-ds train failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rates = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r][5:]
    return {"tokens_per_s": statistics.median(rates), "wall_s": wall, "steps_measured": len(rates)}


def hf_trainer(config_path: Path, args: argparse.Namespace) -> dict:
    """HF Trainer with the DeepSpeed values our loop resolved, on the same packed rows, one row per sample."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from versatune_ds.config.loading import load_config
    from versatune_ds.data.packing import collate_rows
    from versatune_ds.data.prepare import prepare_data
    from versatune_ds.data.tokenizer import load_tokenizer
    from versatune_ds.engine.ds_config import build_ds_config

    cfg = load_config(config_path)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer)
    rows = [row for d in data.per_domain for row in d.train_rows]
    ds_config = build_ds_config(cfg, 1)
    ds_config.pop("optimizer", None)
    ds_config.pop("scheduler", None)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10**6

        def __getitem__(self, i: int):
            return rows[i % len(rows)]

    def collator(batch):
        out = collate_rows(batch, pad_token_id=data.pad_token_id, packed=True, pad_to=cfg.data.seq_len)
        return out

    times: list[float] = []
    tokens_per_step = args.micro_batch * cfg.data.seq_len

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    training_args = TrainingArguments(
        output_dir=str(OUT / "hf_trainer"), per_device_train_batch_size=args.micro_batch, max_steps=args.steps,
        learning_rate=1e-4, warmup_steps=2, bf16=True, deepspeed=ds_config, logging_steps=1000, save_strategy="no",
        report_to=[], remove_unused_columns=False, dataloader_num_workers=0, gradient_checkpointing=args.grad_ckpt,
    )
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False  # as our loop does: a KV cache would also hide the packed-row mask
    trainer = Trainer(model=model, args=training_args, train_dataset=Rows(), data_collator=collator, callbacks=[Timer()])
    trainer.train()
    steady = times[5:]
    # Our loop's tokens/s counts the real (non-pad) tokens of the rows; count the same here.
    real = statistics.mean(r.num_tokens for r in rows) * args.micro_batch
    return {"tokens_per_s": real / statistics.median(steady), "padded_tokens_per_step": tokens_per_step,
            "steps_measured": len(steady)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--skip-trainer", action="store_true")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA GPU here; nothing measured")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    model_dir, total, non_embedding = build_model_dir(OUT / "model", hidden=args.hidden, layers=args.layers, vocab=args.vocab)
    config = write_config(OUT / "run.yaml", model_dir, OUT / "run", args)
    peak = matmul_tflops()
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "params": total,
              "non_embedding_params": non_embedding, "args": vars(args), "bf16_matmul_tflops": peak}
    result["ours"] = ours(config, OUT / "run")
    if not args.skip_trainer:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl")
        result["hf_trainer"] = hf_trainer(config, args)
        result["ours_over_trainer"] = result["ours"]["tokens_per_s"] / result["hf_trainer"]["tokens_per_s"]
    for key in ("ours", "hf_trainer"):
        if key in result:
            tflops = 6 * non_embedding * result[key]["tokens_per_s"] / 1e12
            result[key]["model_tflops"] = tflops
            result[key]["fraction_of_matmul"] = tflops / peak
    lines = [
        "# GPU throughput (one GPU, ZeRO-3, bf16)", "",
        f"Command: `python bench/gpu_throughput.py --hidden {args.hidden} --layers {args.layers} --seq-len {args.seq_len} "
        f"--micro-batch {args.micro_batch} --steps {args.steps}{' --grad-ckpt' if args.grad_ckpt else ''}`", "",
        f"GPU: {result['gpu']}, torch {torch.__version__}; random-init Llama, {total / 1e6:.0f} M parameters "
        f"({non_embedding / 1e6:.0f} M non-embedding); dense bf16 matmul: {peak:.0f} TFLOP/s.", "",
        "| loop | tokens/s | model TFLOP/s (6·N·tok/s) | share of matmul |", "|---|---:|---:|---:|",
    ]
    for key, name in (("ours", "versatune-ds train"), ("hf_trainer", "HF Trainer + same DeepSpeed config")):
        if key in result:
            r = result[key]
            lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['model_tflops']:.1f} | {r['fraction_of_matmul']:.1%} |")
    if "ours_over_trainer" in result:
        lines += ["", f"Ours / Trainer: {result['ours_over_trainer']:.3f}"]
    write_results("gpu_throughput", result, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
