"""Domain expansion benchmark (the paper's Table 5) on the controlled tiny base of bench/quality_tiny.py.

For each target domain (default: code, medicine), SFT from the same base with equal token budgets under
  - target_only           all tokens from the target;
  - target_plus_uniform   mixture.target_share on the target, the rest split evenly over the others;
  - versatune             mixture.target_domain + strategy versatune: the target's share ramps from its
                          probed value to target_share over target_ramp_steps, the others share the rest
                          by the γ/φ rule (re-weighted every --eval-every steps);
through `versatune-ds train`, and measure each domain's held-out loss before (base) and after.

Sign convention (losses): c_d = (base_d − after_d) / base_d × 100, so a POSITIVE % is an improvement (lower
loss) and a negative % a degradation (versatune_ds.stats.percent_change(higher_is_better=False)).
Non-target sum C_nt = Σ_{d≠t} c_d; degradation deg = max(0, −C_nt); reduction of non-target degradation
vs target_only R = (deg_target_only − deg_method) / deg_target_only × 100 (paper: 38.77 %); the target's
gain c_t is reported per method. All per seed, then mean ± std over seeds.

Run: OMP_NUM_THREADS=2 .venv/bin/python bench/expansion.py   (reuses bench/out/tiny_base and its probe
when bench/quality_tiny.py made them, else builds them: +~6 min)
Writes bench/results/expansion.{json,md,png}.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_common as qc  # noqa: E402
from common import write_results  # noqa: E402

from versatune_ds.eval import stats  # noqa: E402

METHODS = ("target_only", "target_plus_uniform", "versatune")
logger = logging.getLogger("expansion")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", nargs="+", default=["code", "medicine"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--target-share", type=float, default=0.5)
    parser.add_argument("--ramp-steps", type=int, default=45)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--results-name", default="expansion")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not (qc.DATA / "sft").is_dir():
        print(f"expansion: skipped, the data bundle is not at {qc.DATA} (set VERSATUNE_SHARED_DATA)")
        return 0
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    wall = time.perf_counter()
    work = qc.OUT / "expansion"
    base = qc.ensure_base(qc.OUT / "tiny_base", qc.BaseSettings())
    probe = qc.ensure_probe(base, num_samples=300, max_new_tokens=48)
    before = qc.ensure_base_eval(base)["losses"]

    jobs, run_dirs, port = [], {}, 29800
    for target in args.targets:
        for seed in args.seeds:
            for method in METHODS:
                name = f"{target}_{method}_s{seed}"
                run_dir = work / "runs" / name
                run_dirs[name] = run_dir
                if (run_dir / "final" / "config.json").is_file() and not args.rerun:
                    continue
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                dynamic = method == "versatune"
                mixture = {"strategy": method, "target_domain": target, "target_share": args.target_share, "unit": "tokens",
                           "block_size": args.block_size, "floor": 0.02, "distribution": probe["distribution_path"]}
                if dynamic:
                    mixture["target_ramp_steps"] = args.ramp_steps
                config = qc.write_run_config(
                    work / "configs" / f"{name}.yaml", base, mixture=mixture,
                    train={"run_dir": str(run_dir), "seed": seed, "max_steps": args.steps, "micro_batch_size": args.micro_batch,
                           "learning_rate": args.lr, "lr_scheduler": "cosine", "warmup_steps": 5, "log_every": 10},
                    eval={"every": args.eval_every if dynamic else args.steps, "micro_batch_size": 20, "at_start": True},
                    checkpoint={"every": 100_000, "keep_last": 1}, dist={"master_port": port},
                )
                port += 1
                jobs.append(qc.Job(name, ("train", "--config", str(config)), work / "logs" / f"{name}.log"))
    sft_started = time.perf_counter()
    job_seconds = qc.run_jobs(jobs, args.parallel)
    sft_wall = qc.record_sft_wall(work, jobs, job_seconds, time.perf_counter() - sft_started, args.parallel)

    names = list(qc.DOMAINS)
    results: dict = {}
    for target in args.targets:
        t = names.index(target)
        per_method: dict = {}
        for method in METHODS:
            changes, c_nt, deg, gain, shares = [], [], [], [], []
            for seed in args.seeds:
                run_dir = run_dirs[f"{target}_{method}_s{seed}"]
                after = qc.eval_losses(run_dir)[args.steps]
                c = stats.percent_change(after, before, higher_is_better=False)
                changes.append(c)
                c_nt.append(stats.non_target_change(c, t))
                deg.append(stats.non_target_degradation(c, t))
                gain.append(float(c[t]))
                tokens = qc.trained_tokens(run_dir)
                shares.append(tokens / tokens.sum())
            mean, std = qc.mean_std(changes)
            per_method[method] = {
                "change_pct_mean": dict(zip(names, mean.tolist())), "change_pct_std": dict(zip(names, std.tolist())),
                "change_pct_per_seed": [dict(zip(names, c.tolist())) for c in changes],
                "target_gain_pct_mean": float(np.mean(gain)), "target_gain_pct_std": float(qc.mean_std(gain)[1]),
                "non_target_sum_pct_mean": float(np.mean(c_nt)), "non_target_sum_pct_std": float(qc.mean_std(c_nt)[1]),
                "non_target_sum_pct_per_seed": c_nt, "degradation_per_seed": deg,
                "token_share_mean": dict(zip(names, np.mean(shares, axis=0).tolist())),
            }
        for method in METHODS:
            # R per seed (paired with target_only of the same seed), and R of the seed-mean degradations.
            ref = per_method["target_only"]["degradation_per_seed"]
            mine = per_method[method]["degradation_per_seed"]
            per_seed = [stats.degradation_reduction(a, b) for a, b in zip(ref, mine)]
            per_method[method]["degradation_reduction_pct_per_seed"] = [None if math.isnan(x) else x for x in per_seed]
            r_of_means = stats.degradation_reduction(float(np.mean(ref)), float(np.mean(mine)))
            per_method[method]["degradation_reduction_pct_of_means"] = None if math.isnan(r_of_means) else r_of_means
        results[target] = per_method

    out = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python bench/expansion.py " + " ".join(sys.argv[1:]),
        "machine": qc.machine_info(), "versions": qc.versions(), "seeds": args.seeds, "targets": args.targets,
        "methods": list(METHODS),
        "sft": {"steps": args.steps, "micro_batch_size": args.micro_batch, "seq_len": base.info["settings"]["sft_seq_len"],
                "lr": args.lr, "target_share": args.target_share, "ramp_steps": args.ramp_steps,
                "eval_every_dynamic": args.eval_every, "block_size": args.block_size, "floor": 0.02},
        "base": {"settings": base.info["settings"], "pretraining": base.info["pretraining"], "truth": base.info["truth"]},
        "probe_p": probe["p"], "base_heldout_loss": dict(zip(names, before.tolist())),
        "sign_convention": "c_d = (base_loss_d - after_loss_d) / base_loss_d * 100: positive = improvement (lower loss)",
        "results": results, "sft_wall": sft_wall, "wall_seconds_this_invocation": time.perf_counter() - wall,
    }
    qc.RESULTS.mkdir(parents=True, exist_ok=True)
    plot(out, qc.RESULTS / f"{args.results_name}.png")
    md = markdown(out, args.results_name)
    write_results(args.results_name, out, md)
    print(md)
    return 0


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def markdown(out: dict, name: str) -> str:
    names = list(qc.DOMAINS)
    sections = []
    for target in out["targets"]:
        res = out["results"][target]
        head = "| method | " + " | ".join(f"**{d}**" if d == target else d for d in names) + " | target gain | Σ non-target | R vs target_only (of seed means) | R per seed |\n|---|" + "---|" * (len(names) + 4)
        lines = []
        for method in out["methods"]:
            r = res[method]
            cells = " | ".join(f"{r['change_pct_mean'][d]:+.2f} ± {r['change_pct_std'][d]:.2f}" for d in names)
            per_seed = ", ".join(_fmt(x, 1) for x in r["degradation_reduction_pct_per_seed"])
            reduction = r["degradation_reduction_pct_of_means"]
            lines.append(f"| {method} | {cells} | {r['target_gain_pct_mean']:+.2f} ± {r['target_gain_pct_std']:.2f} | "
                         f"{r['non_target_sum_pct_mean']:+.2f} ± {r['non_target_sum_pct_std']:.2f} | "
                         f"{'n/a' if reduction is None else f'{reduction:+.1f} %'} | {per_seed} |")
        shares = " ; ".join(f"{m}: {res[m]['token_share_mean'][target]:.2f}" for m in out["methods"])
        sections.append(f"### target = {target}\n\n{head}\n" + "\n".join(lines)
                        + f"\n\nTarget's share of trained tokens: {shares}.\n")
    m = out["machine"]
    return f"""# Domain expansion (Table 5 style) on the controlled tiny base ({name})

Command: `{out['command']}` on {m['nproc']} CPU cores, {m['ram_gib']} GiB RAM; wall of the {len(out['sft_wall']['jobs'])} SFT
runs {out['sft_wall']['seconds']:.0f} s ({out['sft_wall']['parallel']} at a time; base model and probe reused from quality_tiny)
(shared machine, load average at the end {m['load_avg_at_end']}); versions {out['versions']}; seeds {out['seeds']}.
Base: the tiny base of bench/quality_tiny.py (truth mixture {out['base']['truth']}), probed p
{ {k: round(v, 3) for k, v in out['probe_p'].items()} }.
SFT: {out['sft']['steps']} steps x {out['sft']['micro_batch_size']} packed rows x {out['sft']['seq_len']} tokens for
every method (equal budgets), lr {out['sft']['lr']}; target_plus_uniform and the VersaTune cap: target_share
{out['sft']['target_share']}; VersaTune ramps the target from its probed share to the cap over {out['sft']['ramp_steps']}
steps and re-weights the others every {out['sft']['eval_every_dynamic']} steps.

Cells: % change of each domain's held-out loss vs the base model, **positive = improvement (lower loss)**,
negative = degradation; mean ± std over seeds. Σ non-target = sum over the 5 other domains. R = reduction of
non-target degradation relative to target_only, R = (deg_target_only − deg) / deg_target_only × 100 with
deg = max(0, −Σ non-target) (paper: 38.77 %); n/a when target_only degraded nothing.

{chr(10).join(sections)}
![expansion]({name}.png)


"""


def plot(out: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(qc.DOMAINS)
    targets = out["targets"]
    figure = Figure(figsize=(6.5 * len(targets), 4.5))
    FigureCanvasAgg(figure)
    for k, target in enumerate(targets):
        ax = figure.add_subplot(1, len(targets), k + 1)
        res = out["results"][target]
        x = np.arange(len(names))
        width = 0.8 / len(out["methods"])
        for j, method in enumerate(out["methods"]):
            r = res[method]
            ax.bar(x - 0.4 + width * (j + 0.5), [r["change_pct_mean"][d] for d in names], width,
                   yerr=[r["change_pct_std"][d] for d in names], capsize=2,
                   label=f"{method} (Σ non-target {r['non_target_sum_pct_mean']:+.1f})")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, [f"*{d}*" if d == target else d for d in names])
        ax.set_ylabel("% change of held-out loss vs base (+ = better)")
        ax.set_title(f"target = {target}")
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
