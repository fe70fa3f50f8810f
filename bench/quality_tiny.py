"""Quality benchmark, tier 1: every mixture strategy on a controlled base whose knowledge is known.

1. Base: a small Llama pretrained on the known skew until each domain's held-out raw-text loss is within 5 % of
   its plateau (bench/tiny_base.py; reused from bench/out/tiny_base).
2. Probe: `versatune-ds probe` on the base; L1 of the measured distribution vs the truth.
3. SFT from the same base through `versatune-ds train` (ZeRO-3, one process per run), equal token budgets
   (same steps x micro-batch x packed rows), for uniform, proportional, inverse, versatune_static, versatune,
   official (mixture.rule=official) and a **tuned static mix**: K random Dirichlet(α·1) mixtures are trained
   with the first seed, the one with the best validation score (mean sft_val loss by default: the held-out set
   the training loop evaluates, which VersaTune's dynamic rule also reads) is chosen, then trained with the
   other seeds; it is reported, like every strategy, on the test splits nobody chose on.
4. Scores per item (bench/domain_eval.py) of every final model on raw_test (the knowledge kept) and sft_test
   (the ability learnt), and of kept checkpoints on both (the forgetting curves).

Statistics (versatune_ds.eval.stats), losses: lower is better.
    S = (1/6) Σ_d loss_d (per seed);  G = (S − S_uniform) / S_uniform × 100 (the paper's formula; NEGATIVE = better
    for losses), paired bootstrap 95 % CI over seeds and test items; the paper reports G = +35.21 % on accuracy
    (positive = better).
    Worst single-domain regression vs the base: max_d (loss_d − base_d) / base_d × 100 per seed (positive = worse).
    Forgotten domain: raw_test loss above the base's by > 3 paired standard errors (over passages).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/quality_tiny.py [--parallel 2]
Finished runs under bench/out/quality_tiny/runs made with the same flags are reused (others are redone). Writes
bench/results/<name>.{json,md} and <name>.png (per-domain bars), <name>_weights.png, <name>_forgetting.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_common as qc  # noqa: E402
import quality_report as report  # noqa: E402
from common import write_results  # noqa: E402

STRATEGIES = ("uniform", "proportional", "inverse", "versatune_static", "versatune", "official", "tuned_static")
DYNAMIC = ("versatune", "official")
TEST_SETS = ("raw_test", "sft_test")
logger = logging.getLogger("quality_tiny")


def dirichlet_mixtures(k: int, alpha: float, seed: int) -> list[dict[str, float]]:
    """K mixtures drawn from Dirichlet(alpha·1) over the domains, from a generator of their own (fixed by `seed`)."""
    draws = np.random.default_rng([seed, 2411]).dirichlet(np.full(len(qc.DOMAINS), alpha), size=k)
    return [dict(zip(qc.DOMAINS, (round(float(x), 6) for x in row))) for row in draws]


def mixture_section(strategy: str, distribution: str, weights: dict[str, float] | None) -> dict:
    if weights is not None:
        return {"strategy": "fixed", "weights": weights}
    if strategy == "official":
        return {"strategy": "versatune", "rule": "official", "distribution": distribution}
    return {"strategy": strategy, "distribution": distribution}


class Runner:
    """Writes run configs, starts the unfinished runs, remembers every run's directory and train wall time."""

    def __init__(self, base: qc.BaseSetup, work: Path, distribution: str, args: argparse.Namespace) -> None:
        self.base, self.work, self.distribution, self.args = base, work, distribution, args
        self.run_dirs: dict[str, Path] = {}
        self.timings_path = work / "timings.json"
        self.timings: dict[str, float] = json.loads(self.timings_path.read_text()) if self.timings_path.is_file() else {}
        self.port = 29700
        self.loads: list[dict] = []  # the machine's load average when each batch of runs started and ended

    def job(self, name: str, strategy: str, seed: int, *, weights: dict[str, float] | None = None, curves: bool = True) -> qc.Job | None:
        args = self.args
        run_dir = self.work / "runs" / name
        self.run_dirs[name] = run_dir
        self.port += 1
        every = args.eval_every if strategy in DYNAMIC else args.steps  # static: weights fixed, an eval changes nothing
        curve_every = max(1, args.steps // args.curve_points) if curves else args.steps
        sections = {
            "mixture": {**mixture_section(strategy, self.distribution, weights), "unit": "tokens", "block_size": args.block_size,
                        "floor": 0.02},
            "train": {"run_dir": str(run_dir), "seed": seed, "max_steps": args.steps, "micro_batch_size": args.micro_batch,
                      "learning_rate": args.lr, "lr_scheduler": args.lr_scheduler, "warmup_steps": args.warmup, "log_every": 10},
            "eval": {"every": every, "micro_batch_size": 20, "at_start": True},
        }
        return qc.train_job(self.work, self.base, name, sections,
                            checkpoint={"every": curve_every, "keep_last": 1000}, dist={"master_port": self.port})

    def run(self, jobs: list[qc.Job | None]) -> None:
        todo = [j for j in jobs if j is not None]
        if todo:
            self.loads.append({"when": "start", "jobs": len(todo), "load_avg": list(os.getloadavg())})
            self.timings.update(qc.run_jobs(todo, self.args.parallel))
            self.loads.append({"when": "end", "jobs": len(todo), "load_avg": list(os.getloadavg())})
            self.timings_path.parent.mkdir(parents=True, exist_ok=True)
            self.timings_path.write_text(json.dumps(self.timings, indent=1))


def selection_score(doc: dict, select_on: str) -> float:
    """Mean validation loss over the domains: sft_val, raw_val, or their sum (lower is better)."""
    sets = {"sft": ("sft_val",), "raw": ("raw_val",), "both": ("sft_val", "raw_val")}[select_on]
    return float(sum(np.mean([doc["final"][s][d]["loss"] for d in qc.DOMAINS]) for s in sets))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per SFT run (equal for every strategy)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--lr-scheduler", default="constant", choices=("cosine", "constant", "linear"),
                        help="default: the schedule of the forgetting regime bench/forgetting.py chose (lr 1e-3, 300 steps)")
    parser.add_argument("--eval-every", type=int, default=20, help="re-weighting interval of the dynamic strategies")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--curve-points", type=int, default=3, help="the forgetting curve's points per run (checkpoints every steps/N)")
    parser.add_argument("--tuned-k", type=int, default=8, help="Dirichlet mixtures tried for the tuned static mix")
    parser.add_argument("--tuned-alpha", type=float, default=1.0)
    parser.add_argument("--select-on", choices=("sft", "raw", "both"), default="sft")
    parser.add_argument("--parallel", type=int, default=2, help="train processes at a time (1 thread each)")
    parser.add_argument("--probe-samples", type=int, default=300)
    parser.add_argument("--probe-tokens", type=int, default=48)
    parser.add_argument("--base-dir", default=str(qc.OUT / "tiny_base"))
    parser.add_argument("--work-dir", default=str(qc.OUT / "quality_tiny"))
    parser.add_argument("--results-name", default="quality_tiny")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not (qc.DATA / "sft").is_dir():
        print(f"quality_tiny: skipped, the data bundle is not at {qc.DATA} (set VERSATUNE_SHARED_DATA)")
        return 0
    if "uniform" not in args.strategies:
        raise SystemExit("quality_tiny: --strategies must include uniform (every G is relative to it)")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    work = Path(args.work_dir).resolve()
    base = qc.open_base(Path(args.base_dir).resolve())
    probe = qc.ensure_probe(base, num_samples=args.probe_samples, max_new_tokens=args.probe_tokens)
    before = qc.ensure_base_eval(base)
    runner = Runner(base, work, probe["distribution_path"], args)
    plain = [s for s in args.strategies if s != "tuned_static"]
    mixtures = dirichlet_mixtures(args.tuned_k, args.tuned_alpha, seed=0) if "tuned_static" in args.strategies else []
    first = args.seeds[0]
    # Phase 1: every plain strategy x seed, and the K candidate mixtures with the first seed.
    runner.run([runner.job(f"{s}_s{seed}", s, seed) for seed in args.seeds for s in plain]
               + [runner.job(f"mix{k}_s{first}", "fixed", first, weights=w, curves=False) for k, w in enumerate(mixtures)])
    val_sets = {"sft": ("sft_val",), "raw": ("raw_val",), "both": ("sft_val", "raw_val")}[args.select_on]
    docs = {name: qc.evaluate_run(base, run_dir, final_sets=TEST_SETS + (val_sets if name.startswith("mix") else ()))
            for name, run_dir in runner.run_dirs.items()}
    selection = None
    if mixtures:
        scores = [selection_score(docs[f"mix{k}_s{first}"], args.select_on) for k in range(len(mixtures))]
        best = int(np.argmin(scores))
        selection = {"mixtures": mixtures, "validation_scores": scores, "best": best, "weights": mixtures[best],
                     "select_on": args.select_on, "selection_seed": first}
        # Phase 2: the winner with the other seeds (its first-seed run is phase 1's; curves come from those runs).
        runner.run([runner.job(f"mix{best}_s{seed}", "fixed", seed, weights=mixtures[best]) for seed in args.seeds[1:]])
        for seed in args.seeds[1:]:
            docs[f"mix{best}_s{seed}"] = qc.evaluate_run(base, runner.run_dirs[f"mix{best}_s{seed}"], final_sets=TEST_SETS + val_sets)
    runs_of = {s: [f"{s}_s{seed}" for seed in args.seeds] for s in plain}
    if selection is not None:
        runs_of["tuned_static"] = [f"mix{selection['best']}_s{seed}" for seed in args.seeds]

    results = report.summarise(runs_of, docs, before, {n: runner.run_dirs[n] for names in runs_of.values() for n in names},
                               runner.timings, baselines=("uniform", "tuned_static"))
    out = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python bench/quality_tiny.py " + " ".join(sys.argv[1:]),
        "machine": qc.machine_info(), "versions": qc.versions(), "seeds": args.seeds, "strategies": list(runs_of),
        "sft": {"steps": args.steps, "micro_batch_size": args.micro_batch, "seq_len": base.info["settings"]["sft_seq_len"],
                "packing": True, "lr": args.lr, "scheduler": f"{args.lr_scheduler}, {args.warmup} warm-up steps",
                "eval_every_dynamic": args.eval_every, "block_size": args.block_size, "floor": 0.02, "zero_stage": 3,
                "processes": "one process per run", "parallel_runs": args.parallel,
                "reference_losses": "fallback: first eval loss x 0.8 (no reference model)"},
        "base": {k: base.info[k] for k in ("settings", "truth", "split", "parameters")},
        "base_pretraining": {k: v for k, v in base.info["pretraining"].items() if k != "evals"},
        "base_scores": {s: {d: {k: before[s][d][k] for k in ("loss", "se")} for d in qc.DOMAINS} for s in qc.EVAL_SETS},
        "probe": probe, "tuned_static": selection, "results": results["strategies"], "comparisons": results["comparisons"],
        "curves": results["curves"], "weight_trajectories": results["weights"],
        "wall_seconds_this_invocation": time.perf_counter() - started, "train_seconds": runner.timings, "load_samples": runner.loads,
    }
    qc.RESULTS.mkdir(parents=True, exist_ok=True)
    report.plot_bars(out, qc.RESULTS / f"{args.results_name}.png", "per-domain test loss after SFT (controlled tiny base)")
    report.plot_weights(out, qc.RESULTS / f"{args.results_name}_weights.png", DYNAMIC)
    report.plot_forgetting(out, qc.RESULTS / f"{args.results_name}_forgetting.png")
    write_results(args.results_name, out, report.markdown(out, args.results_name, title="Quality, tier 1: controlled tiny base"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
