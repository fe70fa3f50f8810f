"""Quality benchmark, tier 1: mixture strategies on a controlled base model whose knowledge is known.

1. Base: a tiny Llama pretrained from scratch on a known skewed mixture of ../shared/data raw/ + sft/
   text (bench/quality_common.py, reusing the loop in bench/probe_fidelity.py).
2. Probe: `versatune-ds probe` on the base; L1 of the measured distribution vs the truth.
3. Before: `versatune-ds eval --model <base>` on fixed held-out files (40 sft rows per domain, never trained on).
4. SFT from the same base, equal token budgets (same steps x micro-batch x packed seq_len), through
   `versatune-ds train`, for uniform, proportional, inverse, versatune_static, versatune (dynamic) and
   official (mixture.rule=official, strategy versatune); every run reads the same probe distribution
   (mixture.distribution). Several seeds (train.seed: sampler order; the base and the probe are fixed).
5. After: the per-domain held-out loss of the run's final evaluation (metrics.jsonl, step = max_steps).

Score (losses, lower is better): S = (1/6) * sum_d loss_d. Relative change vs uniform:
G = (S - S_uniform) / S_uniform * 100 (versatune_ds.stats.relative_gain); negative G = lower loss = better.
Also reported as an improvement, -G.

Run (one command, after the README's setup; ~25 min on 2 busy cores):
    OMP_NUM_THREADS=2 .venv/bin/python bench/quality_tiny.py
Writes bench/results/quality_tiny.{json,md,png} and bench/results/quality_tiny_weights.png; run dirs,
base model and logs under bench/out/ (git-ignored).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_common as qc  # noqa: E402
from common import write_results  # noqa: E402

from versatune_ds import stats  # noqa: E402

STRATEGIES = ("uniform", "proportional", "inverse", "versatune_static", "versatune", "official")
DYNAMIC = ("versatune", "official")
logger = logging.getLogger("quality_tiny")


def strategy_mixture(strategy: str, distribution: str) -> dict:
    if strategy == "official":
        return {"strategy": "versatune", "rule": "official", "distribution": distribution}
    return {"strategy": strategy, "distribution": distribution}


def build_jobs(base: qc.BaseSetup, work: Path, distribution: str, args: argparse.Namespace) -> tuple[list[qc.Job], dict]:
    jobs, run_dirs = [], {}
    port = 29700
    for seed in args.seeds:
        for strategy in STRATEGIES:
            name = f"{strategy}_s{seed}"
            run_dir = work / "runs" / name
            if (run_dir / "final" / "config.json").is_file() and not args.rerun:
                run_dirs[name] = run_dir  # finished earlier: reuse (delete bench/out/quality_tiny/runs to redo)
                continue
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)  # a half-finished run would resume; start clean instead
            # Static strategies are evaluated only at the start and the end: an evaluation does not change
            # their training (no randomness, weights fixed), and it costs wall time on a busy CPU.
            every = args.eval_every if strategy in DYNAMIC else args.steps
            config = qc.write_run_config(
                work / "configs" / f"{name}.yaml", base,
                mixture={**strategy_mixture(strategy, distribution), "unit": "tokens", "block_size": args.block_size, "floor": 0.02},
                train={"run_dir": str(run_dir), "seed": seed, "max_steps": args.steps, "micro_batch_size": args.micro_batch,
                       "learning_rate": args.lr, "lr_scheduler": "cosine", "warmup_steps": 5, "log_every": 10},
                eval={"every": every, "micro_batch_size": 20, "at_start": True},
                checkpoint={"every": 100_000, "keep_last": 1},
                dist={"master_port": port},
            )
            port += 1
            jobs.append(qc.Job(name, ("train", "--config", str(config)), work / "logs" / f"{name}.log"))
            run_dirs[name] = run_dir
    return jobs, run_dirs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per SFT run (equal for every strategy)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=10, help="re-weighting interval of the dynamic strategies")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=2, help="train processes at a time (1 thread each)")
    parser.add_argument("--probe-samples", type=int, default=300)
    parser.add_argument("--probe-tokens", type=int, default=48)
    parser.add_argument("--rerun", action="store_true", help="redo finished SFT runs")
    parser.add_argument("--results-name", default="quality_tiny")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not (qc.DATA / "sft").is_dir():
        print(f"quality_tiny: skipped, the data bundle is not at {qc.DATA} (set VERSATUNE_SHARED_DATA)")
        return 0
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    wall = time.perf_counter()
    work = qc.OUT / "quality_tiny"
    base = qc.ensure_base(qc.OUT / "tiny_base", qc.BaseSettings())
    probe = qc.ensure_probe(base, num_samples=args.probe_samples, max_new_tokens=args.probe_tokens)
    before = qc.ensure_base_eval(base)
    jobs, run_dirs = build_jobs(base, work, probe["distribution_path"], args)
    sft_started = time.perf_counter()
    job_seconds = qc.run_jobs(jobs, args.parallel)
    sft_wall = qc.record_sft_wall(work, jobs, job_seconds, time.perf_counter() - sft_started, args.parallel)

    names = qc.DOMAINS
    after: dict[str, list[np.ndarray]] = {s: [] for s in STRATEGIES}
    tokens: dict[str, list[np.ndarray]] = {s: [] for s in STRATEGIES}
    start_gap = 0.0
    for seed in args.seeds:
        for strategy in STRATEGIES:
            losses = qc.eval_losses(run_dirs[f"{strategy}_s{seed}"])
            start_gap = max(start_gap, float(np.abs(losses[0] - before["losses"]).max()))
            after[strategy].append(losses[args.steps])
            tokens[strategy].append(qc.trained_tokens(run_dirs[f"{strategy}_s{seed}"]))
    base_score = stats.multi_domain_score(before["losses"])
    table = {}
    for strategy in STRATEGIES:
        per_seed = np.array(after[strategy])
        scores = np.array([stats.multi_domain_score(x) for x in per_seed])
        uniform_scores = np.array([stats.multi_domain_score(x) for x in after["uniform"]])
        # Paired by seed (same sampler seed): the relative change of S vs uniform, then mean ± std over seeds.
        rel = np.array([stats.relative_gain(s, u) for s, u in zip(scores, uniform_scores)])
        mean, std = qc.mean_std(per_seed)
        table[strategy] = {
            "loss_mean": dict(zip(names, mean.tolist())), "loss_std": dict(zip(names, std.tolist())),
            "loss_per_seed": [dict(zip(names, x.tolist())) for x in per_seed],
            "score_mean": float(scores.mean()), "score_std": float(qc.mean_std(scores)[1]),
            "rel_change_vs_uniform_pct_mean": float(rel.mean()), "rel_change_vs_uniform_pct_std": float(qc.mean_std(rel)[1]),
            "improvement_vs_base_pct": dict(zip(names, stats.percent_change(mean, before["losses"], higher_is_better=False).tolist())),
            "trained_tokens_mean": dict(zip(names, np.mean(tokens[strategy], axis=0).tolist())),
            "trained_tokens_total_mean": float(np.sum(np.mean(tokens[strategy], axis=0))),
        }
    trajectories = {}
    for strategy in DYNAMIC + ("versatune_static", "uniform"):
        trajectories[strategy] = {}
        for seed in args.seeds:
            steps, weights = qc.weight_trajectory(run_dirs[f"{strategy}_s{seed}"])
            trajectories[strategy][str(seed)] = {"steps": steps, "weights": [dict(zip(names, w.tolist())) for w in weights]}

    out = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python bench/quality_tiny.py " + " ".join(sys.argv[1:]),
        "machine": qc.machine_info(), "versions": qc.versions(),
        "seeds": args.seeds, "strategies": list(STRATEGIES),
        "sft": {"steps": args.steps, "micro_batch_size": args.micro_batch, "seq_len": base.info["settings"]["sft_seq_len"],
                "packing": True, "lr": args.lr, "scheduler": "cosine, 5 warm-up steps", "eval_every_dynamic": args.eval_every,
                "block_size": args.block_size, "floor": 0.02, "zero_stage": 3, "processes": "single process per run",
                "parallel_runs": args.parallel, "reference_losses": "fallback: first eval loss x 0.8 (no reference model)"},
        "base": base.info, "probe": probe,
        "base_heldout_loss": dict(zip(names, before["losses"].tolist())), "base_score": base_score,
        "base_eval_vs_train_step0_max_abs_diff": start_gap,
        "score_formula": "S = mean over the 6 domains of the held-out loss (lower is better); "
                         "rel_change_vs_uniform = (S - S_uniform) / S_uniform * 100 per seed (negative = better)",
        "results": table, "weight_trajectories": trajectories,
        "sft_wall": sft_wall, "wall_seconds": time.perf_counter() - wall,
        "setup_seconds": {"base_pretraining_incl_tokenizer": base.info["seconds"], "probe": probe["seconds"], "base_eval": before["seconds"]},
    }
    qc.RESULTS.mkdir(parents=True, exist_ok=True)
    plot(out, qc.RESULTS / f"{args.results_name}.png", qc.RESULTS / f"{args.results_name}_weights.png")
    out["interpretation"] = interpret(out)
    md = markdown(out, args.results_name)
    write_results(args.results_name, out, md)
    print(md)
    return 0


def interpret(out: dict) -> str:
    """A factual sentence or two from the numbers (the md adds the hand-written reading)."""
    res = out["results"]
    order = sorted(res, key=lambda s: res[s]["score_mean"])
    best = order[0]
    parts = [f"Best mean score: {best} (S = {res[best]['score_mean']:.4f}); ranking "
             + " < ".join(f"{s} ({res[s]['score_mean']:.4f})" for s in order) + "."]
    for s in ("versatune", "versatune_static", "official"):
        parts.append(f"{s} vs uniform: {res[s]['rel_change_vs_uniform_pct_mean']:+.2f} % ± {res[s]['rel_change_vs_uniform_pct_std']:.2f} (S change; negative = better).")
    return " ".join(parts)


def plot(out: dict, bars_path: Path, weights_path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = qc.DOMAINS
    res = out["results"]
    strategies = out["strategies"]
    figure = Figure(figsize=(11, 4.8))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    width = 0.8 / (len(strategies) + 1)
    x = np.arange(len(names))
    ax.bar(x - 0.4 + width / 2, [out["base_heldout_loss"][d] for d in names], width, label="base (before SFT)", color="lightgray")
    for k, strategy in enumerate(strategies):
        ax.bar(x - 0.4 + width * (k + 1.5), [res[strategy]["loss_mean"][d] for d in names], width,
               yerr=[res[strategy]["loss_std"][d] for d in names], capsize=2, label=f"{strategy} (S={res[strategy]['score_mean']:.3f})")
    ax.set_xticks(x, [f"{d}\n(truth {out['base']['truth'][d]:.2f})" for d in names])
    ax.set_ylabel("held-out loss (lower is better)")
    low = min(min(res[s]["loss_mean"].values()) for s in strategies)
    ax.set_ylim(low * 0.9, max(out["base_heldout_loss"].values()) * 1.03)
    ax.set_title(f"Per-domain held-out loss after SFT, mean ± std over seeds {out['seeds']} (tiny controlled base)")
    ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(bars_path, dpi=110)

    dynamic = [s for s in DYNAMIC if s in out["weight_trajectories"]]
    figure = Figure(figsize=(5.5 * len(dynamic), 4))
    FigureCanvasAgg(figure)
    for k, strategy in enumerate(dynamic):
        ax = figure.add_subplot(1, len(dynamic), k + 1)
        for seed, traj in out["weight_trajectories"][strategy].items():
            for d, name in enumerate(names):
                ax.plot(traj["steps"], [w[name] for w in traj["weights"]], color=f"C{d}", marker="o", markersize=3,
                        alpha=0.8, label=name if seed == str(out["seeds"][0]) else None)
        ax.set_title(f"{strategy}: share weights (tokens) per update, all seeds")
        ax.set_xlabel("step")
        ax.set_ylabel("weight")
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(weights_path, dpi=110)


def markdown(out: dict, name: str) -> str:
    names = qc.DOMAINS
    res = out["results"]
    probe = out["probe"]
    pre = out["base"]["pretraining"]
    header = "| strategy | " + " | ".join(names) + " | S (mean) | vs uniform (S, %) |\n|---|" + "---|" * (len(names) + 2)
    rows = ["| base (before) | " + " | ".join(f"{out['base_heldout_loss'][d]:.4f}" for d in names) + f" | {out['base_score']:.4f} | |"]
    for s in out["strategies"]:
        r = res[s]
        rows.append(f"| {s} | " + " | ".join(f"{r['loss_mean'][d]:.4f} ± {r['loss_std'][d]:.4f}" for d in names)
                    + f" | {r['score_mean']:.4f} ± {r['score_std']:.4f} | {r['rel_change_vs_uniform_pct_mean']:+.2f} ± {r['rel_change_vs_uniform_pct_std']:.2f} |")
    tok_rows = [f"| {s} | " + " | ".join(f"{res[s]['trained_tokens_mean'][d] / res[s]['trained_tokens_total_mean']:.3f}" for d in names)
                + f" | {res[s]['trained_tokens_total_mean']:.0f} |" for s in out["strategies"]]
    probe_rows = " | ".join(f"{d} {probe['truth'][d]:.2f} → {probe['p'][d]:.3f}" for d in names)
    m = out["machine"]
    return f"""# Quality benchmark, tier 1: controlled tiny base ({name})

Command: `{out['command']}` on {m['nproc']} CPU cores, {m['ram_gib']} GiB RAM. Wall time: base pretraining
{out['setup_seconds']['base_pretraining_incl_tokenizer']:.0f} s + probe {out['setup_seconds']['probe']:.0f} s + base eval
{out['setup_seconds']['base_eval']:.0f} s + {len(out['sft_wall']['jobs'])} SFT runs {out['sft_wall']['seconds']:.0f} s
({out['sft_wall']['parallel']} at a time) = {sum(out['setup_seconds'].values()) + out['sft_wall']['seconds']:.0f} s
(machine shared with other work; load average at the end {m['load_avg_at_end']}); versions {out['versions']}.
Seeds (SFT sampler order): {out['seeds']}; base model and probe are fixed (seed 0 / probe seed 42).

**Base**: tiny Llama (hidden {out['base']['settings']['hidden']}, {out['base']['settings']['layers']} layers, vocab
{out['base']['settings']['vocab']}) pretrained from scratch for {pre['steps']} steps ({pre['seconds']:.0f} s, batch
{out['base']['settings']['pretrain_batch_size']} x <= {out['base']['settings']['pretrain_seq_len']} tokens, final loss
{pre['final_loss']:.2f}) on raw/ passages + sft/ rows (not the SFT-train or held-out rows), documents drawn with the
truth shares. **Probe** (`versatune-ds probe`, {probe['num_samples']} generations x <= {probe['max_new_tokens']} tokens,
TF-IDF classifier, held-out accuracy {probe['classifier_heldout_accuracy']:.3f}): truth → measured p: {probe_rows};
**L1 = {probe['l1_vs_truth']:.3f}**, truth inside the 95 % CI for {probe['truth_inside_ci']}/6 domains.

**SFT** through `versatune-ds train` (ZeRO-3, one process per run, {out['sft']['parallel_runs']} runs at a time),
equal budgets: {out['sft']['steps']} steps x {out['sft']['micro_batch_size']} packed rows x {out['sft']['seq_len']}
tokens, lr {out['sft']['lr']} cosine; dynamic strategies re-weight every {out['sft']['eval_every_dynamic']} steps
(reference = first eval loss x 0.8, the fallback); every run reads the same probe distribution. Held-out: 40 sft rows
per domain, never trained on (base eval via `versatune-ds eval` equals every run's step-0 eval to
{out['base_eval_vs_train_step0_max_abs_diff']:.1e}).

Per-domain held-out loss after SFT (mean ± std over seeds; lower is better). S = mean over the 6 domains of the loss;
"vs uniform" = (S − S_uniform) / S_uniform × 100 per seed, mean ± std (negative = lower loss than uniform).

{header}
{chr(10).join(rows)}

Share of trained tokens per domain (mean over seeds) and total tokens per run (the equal budget):

| strategy | {' | '.join(names)} | total tokens |
|---|{'---|' * (len(names) + 1)}
{chr(10).join(tok_rows)}

![per-domain loss]({name}.png) ![weights]({name}_weights.png)

{out['interpretation']}


"""


if __name__ == "__main__":
    raise SystemExit(main())
