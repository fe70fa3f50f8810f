"""Training throughput: our 2-rank ZeRO-3 loop vs the HF Trainer with the same DeepSpeed config, model, data and batch.

    python bench/train_throughput.py [--models tiny smollm2] [--steps 12] [--warmup 3]

For each model both loops run under `torchrun --nproc_per_node 2` (gloo, CPU), on the same packed rows
of the multi-domain SFT data (../shared/data/sft when present, else data/sample), with micro-batch 4,
no accumulation, seq_len 256, the shipped ds_configs/zero3.json, fp32, AdamW lr 1e-4. Tokens/s counts
the non-pad tokens of all ranks per optimizer step, timed over the steps after `--warmup`.

- ours: `engine.TrainEngine.train_step` on batches from `MixtureSampler` (uniform weights);
- hf:   `transformers.Trainer` (TrainingArguments(use_cpu=True, deepspeed=<the same dict>); the process
        group is started first, the CPU trick in CPU_FACTS.md) on the same rows, same collator.

SmolLM2-135M comes from bench/get_smollm2.py (runs/smollm2). Results: bench/results/train_throughput.{json,md}.
Numbers on a shared 2-core machine are noisy: each configuration runs `--repeats` times, alternating the
order of the two loops, and the median is reported.
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

from common import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_SFT = REPO.parent / "shared" / "data" / "sft"
DOMAINS = ("law", "medicine", "finance", "science", "code", "general")
MICRO, SEQ_LEN, LR = 4, 256, 1e-4


def _config(model_dir: str, cache: Path):
    from versatune_ds.config.loading import load_config

    data_dir = SHARED_SFT if SHARED_SFT.is_dir() else REPO / "data" / "sample"
    return load_config(None, [
        f"model.path={model_dir}", "model.dtype=fp32", f"data.dir={data_dir}", f"data.domains={list(DOMAINS)}",
        f"data.seq_len={SEQ_LEN}", "data.truncation=truncate", "data.on_bad_row=skip", "data.max_examples_per_domain=200",
        f"data.cache_dir={cache}", f"train.micro_batch_size={MICRO}", "train.gradient_accumulation_steps=1",
        f"train.learning_rate={LR}", "train.lr_scheduler=constant", "deepspeed.config=zero3.json", "dist.timeout_s=600",
    ])


def _batches(cfg, data, env, steps: int):
    """This rank's rows for `steps` global batches, from the sampler with uniform weights."""
    from versatune_ds.mixture.sampler import MixtureSampler, MixtureSchedule

    sampler = MixtureSampler([len(d.train_rows) for d in data.per_domain], seed=0, block_size=64,
                             global_batch_size=MICRO * env.world_size, rank=env.rank, world_size=env.world_size,
                             schedule=MixtureSchedule.constant([1.0] * len(DOMAINS)))
    return [[data.per_domain[d].train_rows[i] for d, i in sampler.next_batch()] for _ in range(steps)]


def worker(mode: str, model_dir: str, out_file: str, steps: int, warmup: int) -> None:
    import numpy as np
    import torch

    from versatune_ds import dist
    from versatune_ds.data.packing import collate_rows
    from versatune_ds.data.prepare import prepare_data
    from versatune_ds.data.tokenizer import load_tokenizer
    from versatune_ds.dist import start_process_group
    from versatune_ds.engine.ds_config import build_ds_config
    from versatune_ds.engine.models import load_model
    from versatune_ds.engine.train_engine import TrainEngine

    env = dist.DistEnv.from_environ()
    cfg = _config(model_dir, REPO / "bench" / "out" / "cache")
    ds_config = build_ds_config(cfg, env.world_size)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer)
    start_process_group(env, backend="gloo", timeout_s=600)
    rows = _batches(cfg, data, env, steps)
    local_tokens = [sum(r.num_tokens for r in batch) for batch in rows]
    global_tokens = [float(x) for x in dist.all_reduce_sum(np.asarray(local_tokens, dtype=np.float64))]
    collate = lambda batch: collate_rows(batch, pad_token_id=data.pad_token_id, packed=True)  # noqa: E731
    step_ends: list[float] = []
    if mode == "ours":
        engine = TrainEngine(cfg.train, load_model(cfg.model, ds_config=ds_config), ds_config, total_steps=steps)
        dist.barrier()
        step_ends.append(time.perf_counter())
        for batch in rows:
            engine.train_step([collate(batch)])
            step_ends.append(time.perf_counter())
    else:
        step_ends = _hf_trainer(cfg, ds_config, rows, collate, steps)
    timed = range(warmup, steps)
    seconds = step_ends[steps] - step_ends[warmup]
    tokens = sum(global_tokens[s] for s in timed)
    if env.is_main:
        Path(out_file).write_text(json.dumps({
            "mode": mode, "steps_timed": len(timed), "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "s_per_step": seconds / len(timed),
            "torch_threads": torch.get_num_threads(),
        }))
    dist.destroy()


def _hf_trainer(cfg, ds_config: dict, rows, collate, steps: int) -> list[float]:
    """HF Trainer + DeepSpeed on the same rows; returns the wall-clock time at the start and after every step."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from versatune_ds.engine.models import resolve_attn_implementation

    class Rows(torch.utils.data.Dataset):
        """This rank's rows in training order; one batch of MICRO rows per step."""

        def __init__(self) -> None:
            self.items = [row for batch in rows for row in batch]

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, index: int):
            return self.items[index]

    class PerRankOrder(Trainer):
        # Each rank already holds its own slice (like our sampler): read it in order, no re-sharding.
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(self.train_dataset, batch_size=MICRO, shuffle=False, collate_fn=collate)

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(REPO / "bench" / "out" / "hf_trainer"), use_cpu=True, deepspeed=ds_config,
        per_device_train_batch_size=MICRO, gradient_accumulation_steps=1, max_steps=steps, learning_rate=LR,
        lr_scheduler_type="constant", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        max_grad_norm=1.0, logging_steps=10**6, save_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32,
                                                 attn_implementation=resolve_attn_implementation("auto"))
    model.config.use_cache = False
    trainer = PerRankOrder(model=model, args=args, train_dataset=Rows(), callbacks=[Clock()])
    trainer.train()
    return ends


def run(kind: str, model_dir: str, steps: int, warmup: int, out_dir: Path, threads: int) -> dict:
    out_file = out_dir / f"{kind}_{Path(model_dir).name}_{time.monotonic_ns()}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", __file__, "--worker", kind, model_dir, str(out_file), str(steps), str(warmup)]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0 and not out_file.exists():
        raise SystemExit(f"{kind} on {model_dir} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    if result.returncode != 0:  # gloo sometimes aborts at process exit, after the numbers were written
        print(f"note: {kind} on {model_dir} exited {result.returncode} after writing its result", file=sys.stderr)
    return json.loads(out_file.read_text())


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: 40 tiny, 8 smollm2)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed first steps (default: 10 tiny, 2 smollm2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--note", default="", help="a line added to the Markdown (where and how it ran)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (OMP_NUM_THREADS)")
    parser.add_argument("--tiny-dir", default=str(REPO / "runs" / "tiny-model"))
    parser.add_argument("--smollm2-dir", default=str(REPO / "runs" / "smollm2"), help="from bench/get_smollm2.py")
    parser.add_argument("--worker", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, model_dir, out_file, steps, warmup = args.worker
        worker(mode, model_dir, out_file, int(steps), int(warmup))
        return 0
    out_dir = REPO / "bench" / "out" / "train_throughput"
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {"tiny": args.tiny_dir, "smollm2": args.smollm2_dir}
    results = {"setup": {"ranks": 2, "backend": "gloo (CPU)", "micro_batch_size": MICRO, "seq_len": SEQ_LEN, "packed": True,
                         "ds_config": "ds_configs/zero3.json", "dtype": "fp32", "cpu_cores": os.cpu_count(),
                         "threads_per_rank": args.threads, "torch": _version("torch"), "deepspeed": _version("deepspeed"),
                         "transformers": _version("transformers"),
                         "data": str(SHARED_SFT if SHARED_SFT.is_dir() else REPO / "data" / "sample")}, "models": {}}
    for name in args.models:
        model_dir = models[name]
        if not (Path(model_dir) / "config.json").is_file():
            hint = "python bench/get_smollm2.py" if name == "smollm2" else "versatune-ds tiny-model --out runs/tiny-model --text data/sample/*.jsonl"
            raise SystemExit(f"{model_dir} not found; make it first: {hint}")
        steps = args.steps or (40 if name == "tiny" else 8)
        warmup = args.warmup or (10 if name == "tiny" else 2)
        runs: dict[str, list[dict]] = {"ours": [], "hf": []}
        for repeat in range(args.repeats):
            for kind in (("ours", "hf") if repeat % 2 == 0 else ("hf", "ours")):
                runs[kind].append(run(kind, model_dir, steps, warmup, out_dir, args.threads))
                print(f"{name} {kind}: {runs[kind][-1]['tokens_per_s']:.0f} tokens/s ({runs[kind][-1]['s_per_step']:.3f} s/step)", flush=True)
        summary = {kind: {"tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rs),
                          "s_per_step_median": statistics.median(r["s_per_step"] for r in rs),
                          "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in rs]} for kind, rs in runs.items()}
        summary["ratio_ours_over_hf"] = summary["ours"]["tokens_per_s_median"] / summary["hf"]["tokens_per_s_median"]
        summary["steps"], summary["warmup"] = steps, warmup
        results["models"][name] = summary
    lines = ["# Training throughput: our ZeRO-3 loop vs HF Trainer (same DeepSpeed config, model, data, batch)", "",
             f"2 ranks x {args.threads} thread(s), gloo on a {os.cpu_count()}-core CPU machine, micro-batch {MICRO} x {SEQ_LEN}-token packed rows, fp32, "
             "shipped ds_configs/zero3.json; tokens/s = non-pad tokens of both ranks per step, median of repeats.", "",
             "| model | ours tokens/s | HF Trainer tokens/s | ours / HF | ours s/step | HF s/step |", "|---|---|---|---|---|---|"]
    for name, s in results["models"].items():
        lines.append(f"| {name} | {s['ours']['tokens_per_s_median']:.0f} | {s['hf']['tokens_per_s_median']:.0f} | "
                     f"{s['ratio_ours_over_hf']:.2f} | {s['ours']['s_per_step_median']:.3f} | {s['hf']['s_per_step_median']:.3f} |")
    if args.note:
        lines += ["", args.note]
    results["note"] = args.note
    write_results("train_throughput", results, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
