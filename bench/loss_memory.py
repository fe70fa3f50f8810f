"""Memory and time of one training step with a 128 k vocabulary: the plain loss over full logits vs the chunked loss.

    python bench/loss_memory.py [--vocab 128256] [--seq-len 4096] [--hidden 64] [--layers 2] [--fractions 0.25 1.0]
                                [--steps 4] [--warmup 1] [--threads 1]

A Llama with the vocabulary of Llama 3 (128 256) and a small hidden size, so one step fits a CPU, trains on
one packed row of `--seq-len` tokens with a loss on `fraction` of the positions (0.25: assistant-only loss on a
chat row, answers being about a quarter of the tokens; 1.0: every position). Each (path, fraction) runs in
a fresh process (`TrainEngine`, DeepSpeed ZeRO-0, 1 rank, fp32):

- peak RSS of the process (the kernel's high-water mark), and of the training steps alone: the mark is reset
  (/proc/self/clear_refs) after the model, optimizer and a warm-up step exist, so the step's figure is its
  own high-water mark minus the resident memory just before it;
- the median seconds per optimizer step after `--warmup` steps, and tokens/s.

Results: bench/results/loss_memory.{json,md}. Timings need a quiet machine; the RSS figures do not.
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

from common import OUT, REPO, cpu_env, machine_info, versions, write_results


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(spec: dict) -> dict:
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from versatune_ds import dist
    from versatune_ds.config.loading import load_config
    from versatune_ds.engine.ds_config import build_ds_config
    from versatune_ds.engine.train_engine import TrainEngine

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=2 * spec["hidden"],
                         num_hidden_layers=spec["layers"], num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=spec["seq_len"], tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    folder = Path(spec["out"])
    (folder / "zero0.json").write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    cfg = load_config(None, [f"model.path={folder}", "model.dtype=fp32", f"data.domains=[{{name: a, train: [{__file__}]}}]",
                             "train.micro_batch_size=1", "train.gradient_accumulation_steps=1", "train.warmup_steps=0",
                             f"deepspeed.config={folder / 'zero0.json'}", f"train.run_dir={folder / 'run'}"], check_files=False)
    env = dist.DistEnv.from_environ()
    dist.start_process_group(env, backend="gloo", timeout_s=600)
    ds_config = build_ds_config(cfg, 1)
    engine = TrainEngine(cfg.train, model, ds_config, total_steps=100, chunked_loss=spec["path"] == "chunked")
    rng = np.random.default_rng(0)
    seq = spec["seq_len"]
    ids = torch.as_tensor(rng.integers(3, spec["vocab"], size=(1, seq)))
    labels = ids.clone()
    # Assistant-only loss: the answers (the last `fraction` of each of 8 examples packed in the row) bear loss.
    mask = np.zeros(seq, dtype=bool)
    for start in range(0, seq, seq // 8):
        end = start + seq // 8
        mask[end - int(round(spec["fraction"] * (seq // 8))) : end] = True
    labels[0, torch.as_tensor(~mask)] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(seq)[None, :]}
    for _ in range(spec["warmup"]):
        engine.train_step([batch])
    before_kib = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        result = engine.train_step([batch])
        times.append(time.perf_counter() - start)
    step_peak_kib = _rss_kib("VmHWM")
    loss_tokens = int((labels[0, 1:] != -100).sum())
    return {
        **{k: spec[k] for k in ("path", "fraction", "vocab", "seq_len", "hidden", "layers")},
        "chunked_active": engine.loss.chunked,
        "loss_tokens": loss_tokens,
        "loss": result.loss,
        "rss_before_steps_mib": before_kib / 1024,
        "step_peak_rss_mib": step_peak_kib / 1024,
        "step_peak_above_before_mib": (step_peak_kib - before_kib) / 1024,
        "seconds_per_step": statistics.median(times),
        "tokens_per_s": seq / statistics.median(times),
    }


def run(args: argparse.Namespace) -> None:
    out = OUT / "loss_memory"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for fraction in args.fractions:
        for path in ("plain", "chunked"):
            spec = {"path": path, "fraction": fraction, "vocab": args.vocab, "seq_len": args.seq_len, "hidden": args.hidden,
                    "layers": args.layers, "steps": args.steps, "warmup": args.warmup, "out": str(out)}
            result_file = out / f"{path}_{fraction}.json"
            env = {**cpu_env(args.threads), "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
            proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec), str(result_file)], cwd=REPO, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"worker {path} {fraction} failed")
            row = json.loads(result_file.read_text())
            row["process_peak_rss_mib"] = usage.ru_maxrss / 1024
            rows.append(row)
            print(json.dumps(row))
    by = {(r["path"], r["fraction"]): r for r in rows}
    lines = [
        "# Loss memory: plain (full logits) vs chunked (loss positions only)", "",
        f"`{' '.join(['python', 'bench/loss_memory.py', *sys.argv[1:]])}`", "",
        f"One training step (TrainEngine, DeepSpeed ZeRO-0, 1 rank, fp32, CPU, {args.threads} thread(s)) of a Llama with "
        f"vocabulary {args.vocab:,}, hidden {args.hidden}, {args.layers} layers, on one packed row of {args.seq_len} tokens; "
        "`fraction` of the positions bear loss (0.25: assistant-only loss). Step peak = the high-water mark of resident "
        "memory during the steps minus the resident memory before them.", "",
        "| loss on | path | loss tokens | step peak above before (MiB) | process peak RSS (MiB) | s / step | tokens/s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['fraction']:.2f} | {r['path']} | {r['loss_tokens']:,} | {r['step_peak_above_before_mib']:,.0f} | "
                     f"{r['process_peak_rss_mib']:,.0f} | {r['seconds_per_step']:.2f} | {r['tokens_per_s']:,.0f} |")
    lines.append("")
    for fraction in args.fractions:
        plain, chunked = by[("plain", fraction)], by[("chunked", fraction)]
        lines.append(f"- loss on {fraction:.2f} of the positions: the step's memory is "
                     f"{plain['step_peak_above_before_mib'] / max(chunked['step_peak_above_before_mib'], 1e-9):.1f}x smaller "
                     f"with the chunked loss, its time {plain['seconds_per_step'] / chunked['seconds_per_step']:.2f}x faster; "
                     f"loss {plain['loss']:.6f} (plain) vs {chunked['loss']:.6f} (chunked).")
    info = machine_info()
    lines += ["", f"Machine: {info['nproc']} CPUs, {info['ram_gib']} GiB, load at the end {info['load_avg_at_end']}. "
              "GPU figures (peak CUDA memory, tokens/s) were not measured: no GPU was available."]
    write_results("loss_memory", {"args": vars(args), "rows": rows, "machine": info, "versions": versions()}, "\n".join(lines))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(REPO))
        result = worker(json.loads(sys.argv[2]))
        Path(sys.argv[3]).write_text(json.dumps(result))
        sys.stdout.flush()
        os._exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
