"""Domain expansion (the paper's Table 5) on the controlled tiny base of bench/quality_tiny.py.

For each target domain (default: code, medicine) and seed, SFT from the same base with equal token budgets under
  - target_only           all tokens from the target;
  - target_plus_uniform   mixture.target_share on the target, the rest split evenly over the others;
  - versatune             mixture.target_domain + strategy versatune: the target's share ramps from its probed
                          value to target_share over target_ramp_steps, the others share the rest by the γ/φ rule;
through `versatune-ds train`; every final model is scored per item on sft_test (the ability) and raw_test (the
knowledge) (bench/domain_eval.py).

Per domain, c_d = (base_d − after_d) / base_d × 100 on a test loss: POSITIVE = improvement (lower loss), negative =
degradation (versatune_ds.eval.stats.percent_change(higher_is_better=False)). Non-target sum C_nt = Σ_{d≠t} c_d;
degradation deg = max(0, −C_nt); reduction vs target_only R = (deg_target_only − deg) / deg_target_only × 100 (the
paper: R = 38.77 %), from the seed means, with a paired bootstrap 95 % CI over seeds and test items; target gain kept =
c_t / c_t(target_only) × 100. R is meaningful only in the paper's regime, where target_only gains on its target (c_t
above 0 with the whole 95 % interval) and degrades the others (C_nt below 0 with the whole interval); otherwise the
comparison is reported void, with the reason.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/expansion.py [--parallel 2]      # 60 steps -> expansion
    ... bench/expansion.py --steps 300 --work-dir bench/out/expansion --results-name expansion_300steps
    ... bench/expansion.py --ramp-steps 0 --results-name expansion_noramp     # VersaTune's target at the cap from step 0
Finished runs under the work dir made with the same flags are reused. Writes bench/results/<name>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_common as qc  # noqa: E402
from common import write_results  # noqa: E402
from quality_report import METRICS, PAPER_R_PCT, item_level_replicates, loss_item_scores, losses  # noqa: E402

from versatune_ds.eval import stats  # noqa: E402

METHODS = ("target_only", "target_plus_uniform", "versatune")
logger = logging.getLogger("expansion")


def ci(values_a: np.ndarray, values_b: np.ndarray | None = None) -> dict:
    c = stats.paired_bootstrap_difference(values_a, np.zeros_like(values_a) if values_b is None else values_b)
    return {"estimate": c.estimate, "low": c.low, "high": c.high}


def reduction(deg_method: np.ndarray, deg_target_only: np.ndarray) -> dict:
    """R of the seed means, with a paired bootstrap CI: R = −G(deg_method vs deg_target_only)."""
    if float(np.mean(deg_target_only)) <= 0:
        return {"estimate": None, "low": None, "high": None}
    try:
        g = stats.paired_bootstrap_gain(deg_method, deg_target_only)
        return {"estimate": -g.estimate, "low": -g.high, "high": -g.low}
    except ValueError:  # a resample with no target_only degradation: only the point estimate is defined
        return {"estimate": stats.degradation_reduction(float(np.mean(deg_target_only)), float(np.mean(deg_method))), "low": None, "high": None}


def replicate_changes(target: str, docs: dict[str, dict], before: dict, seeds: list[int], metric: str) -> dict[str, np.ndarray]:
    """Per method, the per-domain % change vs the base in every bootstrap replicate over seeds and test items, paired
    (the same draws for every method and the base; versatune_ds.eval.stats.bootstrap_domain_scores): [B, D]."""
    models = {"base": loss_item_scores([before], metric)}
    models.update({m: loss_item_scores([docs[f"{target}_{m}_s{seed}"]["final"] for seed in seeds], metric) for m in METHODS})
    reps = item_level_replicates(models, len(seeds))
    return {m: (reps["base"] - reps[m]) / reps["base"] * 100 for m in METHODS}


def interval(estimate: float, replicates: np.ndarray) -> dict:
    c = stats.percentile_ci(estimate, replicates[np.isfinite(replicates)])
    return {"estimate": c.estimate, "low": c.low, "high": c.high, "interval": "seeds and items"}


def summarise_target(target: str, docs: dict[str, dict], before: dict, seeds: list[int]) -> dict:
    t = qc.DOMAINS.index(target)
    out: dict = {}
    for metric in METRICS:
        base = losses(before, metric)
        reps = replicate_changes(target, docs, before, seeds, metric)
        deg_reps = {m: np.maximum(0.0, -(c.sum(axis=1) - c[:, t])) for m, c in reps.items()}
        per_method: dict = {}
        for method in METHODS:
            changes = np.array([stats.percent_change(losses(docs[f"{target}_{method}_s{seed}"]["final"], metric), base, higher_is_better=False)
                                for seed in seeds])
            c_nt = np.array([stats.non_target_change(c, t) for c in changes])
            mean, std = qc.mean_std(changes)
            c_rep = reps[method]
            per_method[method] = {
                "change_pct_mean": dict(zip(qc.DOMAINS, mean.tolist())), "change_pct_std": dict(zip(qc.DOMAINS, std.tolist())),
                "change_pct_per_seed": [dict(zip(qc.DOMAINS, c.tolist())) for c in changes],
                # Intervals over seeds and test items (the verdicts and the void rule use these); over seeds alone as *_over_seeds.
                "target_gain_pct": interval(float(changes[:, t].mean()), c_rep[:, t]),
                "non_target_sum_pct": interval(float(c_nt.mean()), c_rep.sum(axis=1) - c_rep[:, t]),
                "target_gain_pct_over_seeds": ci(changes[:, t]), "non_target_sum_pct_over_seeds": ci(c_nt),
                "degradation_per_seed": [stats.non_target_degradation(c, t) for c in changes],
            }
        ref = per_method["target_only"]
        for method in METHODS:
            r = per_method[method]
            r["degradation_reduction_pct_over_seeds"] = reduction(np.array(r["degradation_per_seed"]), np.array(ref["degradation_per_seed"]))
            estimate = r["degradation_reduction_pct_over_seeds"]["estimate"]
            usable = deg_reps["target_only"] > 0  # R is undefined in a replicate where target_only degrades nothing
            r["degradation_reduction_pct"] = ({"estimate": None, "low": None, "high": None} if estimate is None or not usable.any() else
                                              interval(estimate, (deg_reps["target_only"][usable] - deg_reps[method][usable])
                                                       / deg_reps["target_only"][usable] * 100))
            gain_ref = ref["target_gain_pct"]["estimate"]
            r["target_gain_kept_pct"] = r["target_gain_pct"]["estimate"] / gain_ref * 100 if gain_ref > 0 else None
        degrades = ref["non_target_sum_pct"]["high"] < 0
        gains = ref["target_gain_pct"]["low"] > 0
        nt, tg = ref["non_target_sum_pct"], ref["target_gain_pct"]
        void = None
        if not degrades:
            void = (f"target_only's non-target sum is {nt['estimate']:+.2f} % points [{nt['low']:+.2f}, {nt['high']:+.2f}]: it does not "
                    "degrade the other domains beyond the noise of seeds and items, so there is no degradation to reduce")
        elif not gains and tg["high"] < 0:
            void = (f"target_only loses on its own target too ({tg['estimate']:+.1f} % [{tg['low']:+.1f}, {tg['high']:+.1f}]): it overfits "
                    "the target's training rows, so every mix that dilutes the target looks better and R saturates; the paper's "
                    "regime (the target grows while the others are forgotten) needs a shorter run or a larger target set")
        elif not gains:
            void = (f"target_only's gain on its own target is within the noise ({tg['estimate']:+.1f} % [{tg['low']:+.1f}, {tg['high']:+.1f}]): "
                    "the paper's regime (the target grows while the others are forgotten) is not shown on this measure")
        out[metric] = {"methods": per_method, "target_only_degrades_others": degrades, "target_only_gains_target": gains,
                       "void_reason": void}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", nargs="+", default=["code", "medicine"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    # 60 steps: target_only then gains on its target and degrades the others (the paper's regime). At the tiny tier's
    # 300-step forgetting regime it makes ~8 passes over the target's 600 rows and loses on the target too.
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--lr-scheduler", default="constant", choices=("cosine", "constant", "linear"),
                        help="default: the schedule of the forgetting regime bench/forgetting.py chose (lr 1e-3, 300 steps)")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--target-share", type=float, default=0.5)
    parser.add_argument("--ramp-steps", type=int, default=None, help="default: 3/4 of --steps")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--base-dir", default=str(qc.OUT / "tiny_base"))
    parser.add_argument("--work-dir", default=None, help="default: bench/out/expansion_<steps>steps")
    parser.add_argument("--results-name", default="expansion")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not (qc.DATA / "sft").is_dir():
        print(f"expansion: skipped, the data bundle is not at {qc.DATA} (set VERSATUNE_SHARED_DATA)")
        return 0
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    default_ramp = args.steps * 3 // 4
    ramp = args.ramp_steps if args.ramp_steps is not None else default_ramp
    started = time.perf_counter()
    work = Path(args.work_dir or qc.OUT / f"expansion_{args.steps}steps").resolve()
    base = qc.open_base(Path(args.base_dir).resolve())
    probe = qc.ensure_probe(base, num_samples=300, max_new_tokens=48)
    before = qc.ensure_base_eval(base)
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    jobs, run_dirs, port = [], {}, 29800
    for target in args.targets:
        for seed in args.seeds:
            for method in METHODS:
                name = f"{target}_{method}_s{seed}"
                # A versatune run with another ramp than the default gets its own folder: the default's runs stay as
                # they are, and the other methods' runs (which a ramp does not change) are shared.
                folder = name if method != "versatune" or ramp == default_ramp else f"{target}_{method}_ramp{ramp}_s{seed}"
                run_dir = work / "runs" / folder
                run_dirs[name] = run_dir
                port += 1
                dynamic = method == "versatune"
                mixture = {"strategy": method, "target_domain": target, "target_share": args.target_share, "unit": "tokens",
                           "block_size": args.block_size, "floor": 0.02, "distribution": probe["distribution_path"]}
                if dynamic:
                    mixture["target_ramp_steps"] = ramp
                sections = {
                    "mixture": mixture,
                    "train": {"run_dir": str(run_dir), "seed": seed, "max_steps": args.steps, "micro_batch_size": args.micro_batch,
                              "learning_rate": args.lr, "lr_scheduler": args.lr_scheduler, "warmup_steps": args.warmup, "log_every": 10},
                    "eval": {"every": args.eval_every if dynamic else args.steps, "micro_batch_size": 20, "at_start": True},
                }
                job = qc.train_job(work, base, folder, sections, checkpoint={"every": 100_000, "keep_last": 1}, dist={"master_port": port})
                if job is not None:  # None: finished earlier with the same flags, reused
                    jobs.append(job)
    if jobs:
        timings.update(qc.run_jobs(jobs, args.parallel))
        timings_path.parent.mkdir(parents=True, exist_ok=True)
        timings_path.write_text(json.dumps(timings, indent=1))
    docs = {name: qc.evaluate_run(base, run_dir, curve_sets=()) for name, run_dir in run_dirs.items()}
    results = {target: summarise_target(target, docs, before, args.seeds) for target in args.targets}
    shares = {name: (lambda t: (t / t.sum()).tolist())(qc.trained_tokens(run_dir)) for name, run_dir in run_dirs.items()}
    out = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python bench/expansion.py " + " ".join(sys.argv[1:]),
        "machine": qc.machine_info(), "versions": qc.versions(), "seeds": args.seeds, "targets": args.targets, "methods": list(METHODS),
        "sft": {"steps": args.steps, "micro_batch_size": args.micro_batch, "seq_len": base.info["settings"]["sft_seq_len"], "lr": args.lr,
                "scheduler": f"{args.lr_scheduler}, {args.warmup} warm-up steps", "target_share": args.target_share, "ramp_steps": ramp,
                "eval_every_dynamic": args.eval_every, "block_size": args.block_size, "floor": 0.02},
        "base": {k: base.info[k] for k in ("settings", "truth", "parameters")}, "probe_p": probe["p"],
        "base_scores": {m: {d: {k: before[m][d][k] for k in ("loss", "se")} for d in qc.DOMAINS} for m in METRICS},
        "sign_convention": "c_d = (base_loss_d - after_loss_d) / base_loss_d * 100: positive = improvement (lower loss)",
        "results": results, "trained_token_shares": {n: dict(zip(qc.DOMAINS, s)) for n, s in shares.items()},
        "train_seconds": timings, "wall_seconds_this_invocation": time.perf_counter() - started,
    }
    qc.RESULTS.mkdir(parents=True, exist_ok=True)
    plot(out, qc.RESULTS / f"{args.results_name}.png")
    write_results(args.results_name, out, markdown(out, args.results_name))
    return 0


def _ci_text(c: dict, unit: str = "%") -> str:
    if c["estimate"] is None:
        return "n/a"
    interval = f" [{c['low']:+.1f}, {c['high']:+.1f}]" if c.get("low") is not None and not math.isnan(c["low"]) else ""
    return f"{c['estimate']:+.1f} {unit}{interval}"


def markdown(out: dict, name: str) -> str:
    names = qc.DOMAINS
    sections = []
    for target in out["targets"]:
        for metric in METRICS:
            res = out["results"][target][metric]
            head = ("| method | " + " | ".join(f"**{d}**" if d == target else d for d in names)
                    + " | target gain [95 % CI] | Σ non-target [95 % CI] | R vs target_only [95 % CI] (paper 38.77 %) | target gain kept |\n|---|"
                    + "---|" * (len(names) + 4))
            lines = []
            for method in out["methods"]:
                r = res["methods"][method]
                cells = " | ".join(f"{r['change_pct_mean'][d]:+.2f} ± {r['change_pct_std'][d]:.2f}" for d in names)
                kept = "n/a" if r["target_gain_kept_pct"] is None else f"{r['target_gain_kept_pct']:.0f} %"
                reduction_text = "(reference)" if method == "target_only" else _ci_text(r["degradation_reduction_pct"])
                lines.append(f"| {method} | {cells} | {_ci_text(r['target_gain_pct'], '%')} | {_ci_text(r['non_target_sum_pct'], 'pp')} | "
                             f"{reduction_text} | {kept} |")
            status = ("target_only gains on its target and degrades the other domains beyond the noise of seeds and items: R is meaningful."
                      if res["void_reason"] is None else f"**Comparison void**: {res['void_reason']}.")
            sections.append(f"### target = {target}, {metric} ({'the ability learnt' if metric == 'sft_test' else 'the knowledge kept'})\n\n"
                            f"{head}\n" + "\n".join(lines) + f"\n\n{status}\n")
    m, sft = out["machine"], out["sft"]
    walls = [v for v in out["train_seconds"].values() if v]
    return f"""# Domain expansion (Table 5 style) on the controlled tiny base ({name})

Command: `{out['command']}` on {m['nproc']} CPU cores (shared; load average at the end {m['load_avg_at_end']}); versions
{out['versions']}; seeds {out['seeds']}; {len(walls)} SFT runs trained in this folder, {np.mean(walls) if walls else float('nan'):.0f} s each on average.
Base: bench/tiny_base.py ({out['base']['parameters'] / 1e6:.2f} M parameters, truth {out['base']['truth']}), probed p
{ {k: round(v, 3) for k, v in out['probe_p'].items()} }. SFT: {sft['steps']} steps x {sft['micro_batch_size']} packed rows x {sft['seq_len']} tokens for
every method (equal budgets), lr {sft['lr']} ({sft['scheduler']}); target_plus_uniform and the VersaTune cap: target_share
{sft['target_share']}; VersaTune ramps the target from its probed share to the cap over {sft['ramp_steps']} steps and re-weights the others
every {sft['eval_every_dynamic']} steps on sft_val.

Cells: % change of each domain's test loss vs the base, **positive = improvement (lower loss)**, mean ± std over seeds. Σ non-target =
sum over the 5 other domains (% points). R = (deg_target_only − deg) / deg_target_only × 100 with deg = max(0, −Σ non-target), from the
seed means, paired bootstrap 95 % CI over seeds and test items (the same draws for every method) — the paper's formula and figure: **R = {PAPER_R_PCT} %** (arXiv 2411.11266, on benchmark
accuracy). Target gain kept = target gain / target_only's × 100.

{chr(10).join(sections)}
![expansion]({name}.png)
"""


def plot(out: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = qc.DOMAINS
    targets = out["targets"]
    figure = Figure(figsize=(6.5 * len(targets), 8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(METRICS), len(targets), squeeze=False)
    x = np.arange(len(names))
    width = 0.8 / len(out["methods"])
    for col, target in enumerate(targets):
        for row, metric in enumerate(METRICS):
            ax = axes[row, col]
            res = out["results"][target][metric]["methods"]
            for j, method in enumerate(out["methods"]):
                r = res[method]
                ax.bar(x - 0.4 + width * (j + 0.5), [r["change_pct_mean"][d] for d in names], width,
                       yerr=[r["change_pct_std"][d] for d in names], capsize=2,
                       label=f"{method} (Σ non-target {r['non_target_sum_pct']['estimate']:+.1f})")
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_xticks(x, [f"*{d}*" if d == target else d for d in names])
            ax.set_ylabel(f"% change of {metric} loss vs base (+ = better)")
            ax.set_title(f"target = {target}: {metric}")
            ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
