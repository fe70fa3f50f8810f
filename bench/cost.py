"""Cost benchmarks, side by side in one run, reported mostly as ratios (absolute CPU times are noisy here).

1. Dynamic-weighting overhead, side by side in one run: `versatune-ds train` (run_training, ZeRO-3,
   mixture.strategy=versatune, eval.every at its default 200, every other eval.* key at its default, so the
   held-out budget is the automatic one) with timers wrapped around `versatune_ds.train.evaluate` (the
   per-domain held-out evaluation) and `MixturePolicy.after_eval` (the γ/φ update + broadcast) inside the
   worker, and each training step's time from metrics.jsonl. Overhead at the default cadence =
   (one evaluation + one update) / (200 × the median step). Models: the tiny Llama on ../shared/data sft/
   (one process, micro-batch 4 × 256 packed tokens; 400 steps: evaluations at 0, 200, 400) and
   SmolLM2-135M-Instruct with configs/shared_data_smollm2.yaml (2 ranks, its batch, data.truncation=truncate;
   eval.every=200 and a short run: the evaluations at the start and at the end, both with the default budget).
2. Probe generation throughput (probe_generation.generate_all, replica per rank): generations/s and new
   tokens/s at batch 1 (what the released VersaTune code does) vs the default probe.batch_size, with
   1 process and 2 ranks (torchrun), tiny model; SmolLM2-135M at 1 rank if runs/smollm2 exists.
3. Achieved training FLOP/s = 6 * N * tokens/s (N = all parameters, and N = non-embedding parameters;
   forward + backward ≈ 6 FLOPs per parameter per token, attention FLOPs ignored) as a fraction of a
   dense fp32 matmul's FLOP/s (torch.mm 1024 x 1024, same threads) measured in this run.
4. Our ZeRO-3 loop vs the HF Trainer: bench/train_throughput.py; its results file is read
   (bench/results/train_throughput.json), or the script is re-run with --rerun-train-throughput.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cost.py [--steps 400] [--smollm2-steps 12] [--smollm2-run-dir DIR]
    smoke test: ... bench/cost.py --steps 8 --eval-every 4 --skip probe flops --models tiny

Writes bench/results/cost.{json,md}. Work files under bench/out/cost (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import smollm2_config, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "cost"
RESULTS = REPO / "bench" / "results"
DATA = Path(os.environ.get("VERSATUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
DOMAINS = ("law", "medicine", "finance", "science", "code", "general")
logger = logging.getLogger("cost")


def shared_data_overrides() -> list[str]:
    out = []
    for i, name in enumerate(DOMAINS):
        out += [f"data.domains[{i}].name={name}", f"data.domains[{i}].train={DATA / 'sft' / f'{name}.jsonl'}"]
    return out


def base_config(work: Path) -> Path:
    """A run config for the tiny model on the shared SFT data; everything not named here is a config default."""
    import yaml

    config = {
        "model": {"path": str(REPO / "runs" / "tiny-model"), "dtype": "fp32"},
        "data": {"domains": [{"name": d, "train": str(DATA / "sft" / f"{d}.jsonl")} for d in DOMAINS],
                 "seq_len": 256, "packing": True, "truncation": "truncate"},
        "mixture": {"unit": "tokens", "floor": 0.02},
        "train": {"micro_batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 5, "log_every": 50},
        "checkpoint": {"every": 100000, "keep_last": 1},
        "deepspeed": {"config": "zero3"},
        "export": {"at_end": False},
    }
    path = work / "tiny_shared.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------
# Workers (run in their own processes)


def worker_overhead(config: str, overrides: list[str], out_file: str) -> None:
    """run_training with timers around the per-domain evaluation and the policy update (rank 0 writes them)."""
    from versatune_ds import train
    from versatune_ds.config.loading import load_config
    from versatune_ds.mixture import policy as weighting

    timers = {"eval_s": 0.0, "eval_calls": 0, "update_s": 0.0, "update_calls": 0}
    evaluate, after_eval = train.evaluate, weighting.MixturePolicy.after_eval

    def timed_evaluate(*args, **kwargs):
        start = time.perf_counter()
        try:
            result = evaluate(*args, **kwargs)
            timers["eval_examples_per_domain"] = [len(items.ids) for items in result.items]
            timers["eval_loss_tokens"] = float(result.tokens.sum())
            return result
        finally:
            timers["eval_s"] += time.perf_counter() - start
            timers["eval_calls"] += 1

    def timed_after_eval(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return after_eval(self, *args, **kwargs)
        finally:
            timers["update_s"] += time.perf_counter() - start
            timers["update_calls"] += 1

    train.evaluate = timed_evaluate
    weighting.MixturePolicy.after_eval = timed_after_eval
    cfg = load_config(config, overrides)
    start = time.perf_counter()
    train.run_training(cfg, resume="none")
    timers["run_s"] = time.perf_counter() - start
    if os.environ.get("RANK", "0") != "0":
        return
    records = [json.loads(line) for line in (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("train/tokens_per_s")]
    tokens = [sum(v for k, v in r.items() if k.startswith("train/domain_tokens/")) for r in steps]
    seconds = [n / r["train/tokens_per_s"] for n, r in zip(tokens, steps)]
    warm = max(1, len(seconds) // 10)  # the first steps (about 10 %, at least one) warm up
    timers.update(steps=len(seconds), train_s=sum(seconds), step_s_median=statistics.median(seconds[warm:] or seconds),
                  tokens_per_step=statistics.median(tokens), tokens_per_s_median=statistics.median(r["train/tokens_per_s"] for r in steps[warm:] or steps))
    Path(out_file).write_text(json.dumps(timers))


def worker_probe(config: str, overrides: list[str], out_file: str) -> None:
    """generate_all timed (model already loaded), replica per rank; rank 0 writes the result."""

    from versatune_ds import dist
    from versatune_ds.config.loading import load_config
    from versatune_ds.data.tokenizer import load_tokenizer
    from versatune_ds.dist import start_process_group
    from versatune_ds.engine.models import load_inference_model
    from versatune_ds.probe.generation import generate_all

    cfg = load_config(config, overrides)
    env = dist.DistEnv.from_environ(default_port=cfg.dist.master_port)
    start_process_group(env, backend="gloo", timeout_s=600)
    tokenizer = load_tokenizer(cfg.model)
    loaded = load_inference_model(cfg.model, env, zero3=False)  # keep it alive while `model` is used
    model = loaded.module
    probe_dir = Path(cfg.train.run_dir) / "probe"
    if env.is_main:
        shutil.rmtree(probe_dir, ignore_errors=True)
    dist.barrier()
    start = time.perf_counter()
    records = generate_all(cfg, env, model, tokenizer, probe_dir, zero3=False)
    dist.barrier()
    seconds = time.perf_counter() - start
    if env.is_main:
        tokens = sum(r["num_tokens"] for r in records)
        Path(out_file).write_text(json.dumps({"seconds": seconds, "generations": len(records), "new_tokens": tokens,
                                              "world_size": env.world_size, "batch_size": cfg.probe.batch_size}))
    dist.destroy()


# ----------------------------------------------------------------------------------------------
# Driver


def run_worker(kind: str, config: Path, overrides: list[str], out_file: Path, *, ranks: int = 1, log: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    script = [str(Path(__file__).resolve()), "--worker", kind, str(config), str(out_file), *overrides]
    if ranks == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *script]
    out_file.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        code = subprocess.run(command, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0 or not out_file.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"worker {kind} failed (exit {code}); log {log}:\n{tail}")
    return json.loads(out_file.read_text())


def matmul_flops(threads: int, size: int = 1024, seconds: float = 3.0) -> float:
    """Best-of-rounds dense fp32 matmul FLOP/s (2 * n^3 per product) at `threads` intra-op threads."""
    import torch

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    torch.mm(a, b)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def parameter_counts(model_dir: Path) -> dict:
    """All parameters and non-embedding parameters (input embedding; a tied lm_head is the same tensor)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"all": total, "non_embedding": total - embedding, "tied_lm_head": bool(getattr(config, "tie_word_embeddings", False))}


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def bench_overhead(config: Path, work: Path, args: argparse.Namespace, distribution: Path, smollm2: Path | None) -> dict:
    """One dynamic run per model at the default cadence; eval + update time vs training time, from the same run."""
    from versatune_ds.config.schema import EvalConfig
    from versatune_ds.eval.heldout import AUTO_EVAL_SHARE

    default_every = EvalConfig().every
    cases = []
    if "tiny" in args.models:
        cases.append(("tiny", config, 1, [f"train.max_steps={args.steps}", f"eval.every={args.eval_every}"]))
    if "smollm2" in args.models and smollm2 is not None:
        batch = [] if args.smollm2_micro_batch is None else [  # the same global batch of 16 rows, less memory
            f"train.micro_batch_size={args.smollm2_micro_batch}", f"train.gradient_accumulation_steps={8 // args.smollm2_micro_batch}"]
        cases.append(("smollm2", smollm2_config(work, smollm2), 2,
                      [f"train.max_steps={args.smollm2_steps}", f"eval.every={default_every}", *batch,
                       "checkpoint.every=100000", "export.at_end=false"]))
    # Untimed warm-up: the first run tokenizes the data for the tiny tokenizer (cached afterwards).
    warm = work / "overhead" / "warmup"
    shutil.rmtree(warm, ignore_errors=True)
    run_worker("overhead", config, [f"train.run_dir={warm}", "mixture.strategy=uniform", "train.max_steps=2", "eval.at_start=false"],
               work / "overhead_warmup.json", log=work / "logs" / "overhead_warmup.log")
    out: dict = {"default_eval_every": default_every, "auto_eval_share": AUTO_EVAL_SHARE, "models": {}}
    for name, model_config, ranks, extra in cases:
        run_dir = work / "overhead" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = [f"train.run_dir={run_dir}", "mixture.strategy=versatune", f"mixture.distribution={distribution}", *extra]
        result = run_worker("overhead", model_config, overrides, work / f"overhead_{name}.json", ranks=ranks,
                            log=work / "logs" / f"overhead_{name}.log")
        eval_per_call = result["eval_s"] / max(1, result["eval_calls"])
        update_per_call = result["update_s"] / max(1, result["update_calls"])
        step = result["step_s_median"]
        result.update(
            ranks=ranks, overrides=extra, load_avg=load_avg(), eval_s_per_call=eval_per_call, update_s_per_call=update_per_call,
            eval_in_steps=eval_per_call / step,
            overhead_pct_at_default=(eval_per_call + update_per_call) / (default_every * step) * 100,
            in_run_pct=(result["eval_s"] + result["update_s"]) / result["train_s"] * 100,
            projected_overhead_pct_by_eval_every={every: (eval_per_call + update_per_call) / (every * step) * 100
                                                  for every in (50, 100, 200, 500)},
        )
        out["models"][name] = result
        logger.info("overhead %s: eval %.2f s/call (%.1f steps), update %.1f ms, step %.3f s -> %.2f %% at every %d",
                    name, eval_per_call, result["eval_in_steps"], update_per_call * 1000, step,
                    result["overhead_pct_at_default"], default_every)
    return out


def bench_probe(config: Path, work: Path, args: argparse.Namespace, smollm2: Path | None) -> list[dict]:
    rows = []
    cases = [("tiny", REPO / "runs" / "tiny-model", args.probe_samples, args.probe_new_tokens, ranks, batch)
             for ranks in (1, 2) for batch in (1, args.probe_batch)]
    if smollm2 is not None:
        cases += [("smollm2", smollm2, 16, 32, 1, batch) for batch in (1, 16)]
    for name, model_dir, samples, new_tokens, ranks, batch in cases:
        overrides = [f"model.path={model_dir}", f"train.run_dir={work / 'probe' / f'{name}_{ranks}_{batch}'}",
                     f"probe.num_samples={samples}", f"probe.max_new_tokens={new_tokens}", f"probe.batch_size={batch}"]
        result = run_worker("probe", config, overrides, work / f"probe_{name}_{ranks}_{batch}.json", ranks=ranks,
                            log=work / "logs" / f"probe_{name}_{ranks}_{batch}.log")
        result.update(model=name, ranks=ranks, load_avg=load_avg(), max_new_tokens=new_tokens,
                      generations_per_s=result["generations"] / result["seconds"], tokens_per_s=result["new_tokens"] / result["seconds"])
        logger.info("probe %s ranks=%d batch=%d: %.2f gen/s, %.0f tokens/s", name, ranks, batch, result["generations_per_s"], result["tokens_per_s"])
        rows.append(result)
    return rows


def smollm2_tokens_per_s(run_dir: Path) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rates = [json.loads(line).get("train/tokens_per_s") for line in path.read_text().splitlines()]
    rates = [r for r in rates if r is not None][1:]  # step 1 includes warm-up
    return statistics.median(rates) if rates else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="tiny model: training steps of the overhead run")
    parser.add_argument("--eval-every", type=int, default=200, help="tiny model: the run's eval.every (config default: 200)")
    parser.add_argument("--smollm2-steps", type=int, default=12, help="SmolLM2: steps of the overhead run (2 ranks, ~10 s each here)")
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--smollm2-micro-batch", type=int, default=None, choices=[1, 2, 4, 8],
                        help="SmolLM2 micro-batch (accumulation keeps the global 16 rows); default: the config's 4, ~10 GB per rank")
    parser.add_argument("--probe-samples", type=int, default=64)
    parser.add_argument("--probe-new-tokens", type=int, default=32)
    parser.add_argument("--probe-batch", type=int, default=32, help="the default probe.batch_size")
    parser.add_argument("--smollm2", default=str(REPO / "runs" / "smollm2"))
    parser.add_argument("--smollm2-run-dir", default=None, help="a SmolLM2 train run dir whose train/tokens_per_s to convert to FLOP/s")
    parser.add_argument("--distribution", default=None, help="a distribution.json for the versatune runs (default: uniform)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["overhead", "probe", "flops"])
    parser.add_argument("--rerun-train-throughput", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where <results-name>.{json,md} go (a smoke test: elsewhere)")
    parser.add_argument("--results-name", default="cost", help="e.g. cost_overhead for a run with --skip probe flops")
    parser.add_argument("--work", type=Path, default=OUT)
    parser.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.worker:
        kind, config, out_file = args.worker
        {"overhead": worker_overhead, "probe": worker_probe}[kind](config, extra, out_file)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    config = base_config(work)
    distribution = Path(args.distribution) if args.distribution else work / "uniform_distribution.json"
    if not args.distribution:
        distribution.write_text(json.dumps({"domains": list(DOMAINS), "p": [1 / len(DOMAINS)] * len(DOMAINS)}))
    smollm2 = Path(args.smollm2) if (Path(args.smollm2) / "config.json").is_file() else None
    results: dict = {"load_avg_start": load_avg(), "nproc": os.cpu_count(), "torch_threads_per_process": 1}
    results["matmul_fp32_flops"] = {"1_thread": matmul_flops(1), "2_threads": matmul_flops(2)}
    if "overhead" not in args.skip:
        results["overhead"] = bench_overhead(config, work, args, distribution, smollm2)
    results["matmul_fp32_flops_mid"] = {"1_thread": matmul_flops(1)}
    if "probe" not in args.skip:
        results["probe"] = bench_probe(config, work, args, smollm2)
    if "flops" not in args.skip:
        results["flops"] = flops(results, args, smollm2)
    results["matmul_fp32_flops_end"] = {"1_thread": matmul_flops(1)}
    if args.rerun_train_throughput:
        subprocess.run([sys.executable, str(REPO / "bench" / "train_throughput.py"), "--models", "tiny"], cwd=REPO, check=True)
    throughput = RESULTS / "train_throughput.json"
    results["train_throughput"] = json.loads(throughput.read_text()) if throughput.is_file() else None
    results["load_avg_end"] = load_avg()
    results["versions"] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    write_results(args.results_name, results, markdown(results, args), folder=args.out)
    print((args.out / f"{args.results_name}.md").read_text())
    return 0


def flops(results: dict, args: argparse.Namespace, smollm2: Path | None) -> list[dict]:
    # The machine's load moves the matmul rate several-fold within minutes: use the median of the samples
    # taken before and after the training runs (each training process also ran 1 thread under that load).
    matmul = statistics.median([results["matmul_fp32_flops"]["1_thread"], results["matmul_fp32_flops_mid"]["1_thread"]])
    results["matmul_reference_flops"] = matmul
    rows = []
    cases = []
    if "tiny" in results.get("overhead", {}).get("models", {}):
        cases.append(("tiny (the overhead run, 1 process, 1 thread)", REPO / "runs" / "tiny-model",
                      results["overhead"]["models"]["tiny"]["tokens_per_s_median"]))
    if smollm2 is not None and args.smollm2_run_dir:
        rate = smollm2_tokens_per_s(Path(args.smollm2_run_dir))
        if rate is not None:
            cases.append((f"smollm2 ({args.smollm2_run_dir}, 1 process, 1 thread)", smollm2, rate))
    for name, model_dir, tokens_per_s in cases:
        counts = parameter_counts(model_dir)
        row = {"model": name, "tokens_per_s": tokens_per_s, **{f"params_{k}": v for k, v in counts.items()}}
        for key in ("all", "non_embedding"):
            achieved = 6 * counts[key] * tokens_per_s
            row[f"flops_{key}"] = achieved
            row[f"fraction_of_matmul_{key}"] = achieved / matmul
        rows.append(row)
    return rows


def markdown(r: dict, args: argparse.Namespace) -> str:
    mm = r["matmul_fp32_flops"]
    lines = ["# Cost benchmarks (bench/cost.py)", "",
             f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/cost.py --steps {args.steps} --eval-every {args.eval_every} "
             f"--smollm2-steps {args.smollm2_steps} --models {' '.join(args.models)}"
             + (f" --smollm2-micro-batch {args.smollm2_micro_batch}" if args.smollm2_micro_batch else "")
             + (f" --skip {' '.join(args.skip)}" if args.skip else "")
             + (f" --smollm2-run-dir {args.smollm2_run_dir}" if args.smollm2_run_dir else "")
             + (f" --results-name {args.results_name}" if args.results_name != "cost" else "") + "`", "",
             f"{r['nproc']} CPU cores shared with other jobs; load average at start {r['load_avg_start']}, at end {r['load_avg_end']} "
             "(a loaded machine: compare ratios, not absolute times). One torch thread per process. "
             f"Dense fp32 matmul (1024², best of rounds): {mm['1_thread'] / 1e9:.1f} GFLOP/s at 1 thread, {mm['2_threads'] / 1e9:.1f} at 2 threads "
             f"(1 thread after the overhead runs: {r['matmul_fp32_flops_mid']['1_thread'] / 1e9:.1f}; at the end: {r['matmul_fp32_flops_end']['1_thread'] / 1e9:.1f}).", ""]
    if "overhead" in r:
        o = r["overhead"]
        every = o["default_eval_every"]
        lines += ["## Overhead of dynamic re-weighting (eval + update vs training, one run per model)", "",
                  f"mixture.strategy=versatune, eval.every={every} (the default), eval.max_tokens_per_domain unset: each domain's held-out "
                  f"examples are a fixed subset within the automatic token budget (~{o['auto_eval_share']:.0%} of the training time between "
                  "evaluations, at least 8 examples; eval/heldout.py). Timers around train.evaluate and MixturePolicy.after_eval inside "
                  "the run; step time = median over the run's steps (first 10 % left out) from metrics.jsonl. Overhead at the default "
                  f"cadence = (one evaluation + one update) / ({every} × step). tiny: runs/tiny-model on ../shared/data sft/ (seq_len 256 "
                  "packed, micro-batch 4, one process, ZeRO-3). smollm2: configs/shared_data_smollm2.yaml (2 ranks, micro-batch 4 × "
                  "accumulation 2 × seq_len 512 packed, ZeRO-3), a short run evaluated at its start and end.", "",
                  "| model | ranks | steps | step s | evaluations | held-out examples per domain | eval s / call (steps' worth) | "
                  f"update ms / call | **overhead at every {every}** | eval + update / training in this run |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for name, m in o["models"].items():
            lines.append(f"| {name} | {m['ranks']} | {m['steps']} | {m['step_s_median']:.3f} | {m['eval_calls']} | "
                         f"{'/'.join(map(str, m.get('eval_examples_per_domain', [])))} | {m['eval_s_per_call']:.2f} ({m['eval_in_steps']:.1f}) | "
                         f"{m['update_s_per_call'] * 1000:.1f} | **{m['overhead_pct_at_default']:.2f} %** | {m['in_run_pct']:.1f} % |")
        lines += ["", "Projected at other cadences, (eval + update) / (eval.every × step), with the budget fixed at the one measured: " + "; ".join(
            f"{name}: " + ", ".join(f"every {k}: {v:.1f} %" for k, v in m["projected_overhead_pct_by_eval_every"].items())
            for name, m in o["models"].items()) + ". (With eval.max_tokens_per_domain unset the budget scales with eval.every, so "
            "the share stays near the target at any cadence.) Overrides per run: " + "; ".join(
            f"{name}: `{' '.join(m['overrides'])}`" for name, m in o["models"].items()) + ". Load average after each run: " + "; ".join(
            f"{name} {m['load_avg']}" for name, m in o["models"].items()) + ".", ""]
    if "probe" in r:
        lines += ["## Probe generation throughput (replica per rank, generate_all)", "",
                  "| model | ranks | batch | generations | new tokens | seconds | generations/s | tokens/s | load avg after |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for p in r["probe"]:
            lines.append(f"| {p['model']} | {p['ranks']} | {p['batch_size']} | {p['generations']} | {p['new_tokens']} | {p['seconds']:.1f} | "
                         f"{p['generations_per_s']:.2f} | {p['tokens_per_s']:.0f} | {p['load_avg'][0]} |")
        by = {(p["model"], p["ranks"], p["batch_size"]): p["tokens_per_s"] for p in r["probe"]}
        ratios = []
        for (model, ranks, batch), rate in by.items():
            if batch != 1 and (model, ranks, 1) in by:
                ratios.append(f"{model}, {ranks} rank(s): batch {batch} / batch 1 = {rate / by[(model, ranks, 1)]:.1f}x")
            if ranks == 2 and (model, 1, batch) in by:
                ratios.append(f"{model}, batch {batch}: 2 ranks / 1 rank = {rate / by[(model, 1, batch)]:.2f}x")
        lines += ["", "Ratios (tokens/s): " + "; ".join(ratios) + ".", ""]
    if r.get("flops"):
        lines += ["## Achieved training FLOP/s", "",
                  "FLOP/s = 6 · N · tokens/s (forward + backward ≈ 6 FLOPs per parameter per token; attention score FLOPs ignored), "
                  f"as a fraction of the 1-thread dense fp32 matmul (median of the samples at the start and after the overhead runs: {r['matmul_reference_flops'] / 1e9:.1f} GFLOP/s; "
                  "each training process ran 1 thread).", "",
                  "| model | tokens/s | N all | N non-embedding | GFLOP/s (all) | of matmul (all) | GFLOP/s (non-emb.) | of matmul (non-emb.) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for f in r["flops"]:
            lines.append(f"| {f['model']} | {f['tokens_per_s']:.0f} | {f['params_all'] / 1e6:.2f} M | {f['params_non_embedding'] / 1e6:.2f} M | "
                         f"{f['flops_all'] / 1e9:.2f} | {f['fraction_of_matmul_all'] * 100:.1f} % | {f['flops_non_embedding'] / 1e9:.2f} | "
                         f"{f['fraction_of_matmul_non_embedding'] * 100:.1f} % |")
        lines.append("")
    t = r.get("train_throughput")
    if t:
        lines += ["## Our ZeRO-3 loop vs HF Trainer (bench/train_throughput.py, read from bench/results/train_throughput.json)", "",
                  "| model | ours tokens/s | HF Trainer tokens/s | ours / HF |", "|---|---:|---:|---:|"]
        for name, s in t.get("models", {}).items():
            lines.append(f"| {name} | {s['ours']['tokens_per_s_median']:.0f} | {s['hf']['tokens_per_s_median']:.0f} | {s['ratio_ours_over_hf']:.2f} |")
        lines += ["", f"Setup: {t.get('setup')}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
