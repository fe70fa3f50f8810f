"""The forgetting regime: how long and how hot must SFT be for `uniform` to forget what the base knew?

On the controlled base (bench/tiny_base.py), SFT with the `uniform` mixture through `versatune-ds train` at a
few learning rates (constant after a short warmup), keeping a DeepSpeed checkpoint every `--checkpoint-every`
steps. Every checkpoint is scored per item (bench/domain_eval.py) on

- raw_test: held-out raw passages (the knowledge kept): the rise of each domain's loss over the base's, as a
  *paired* difference over the same passages with its standard error (stats.paired_ratio_difference);
- sft_test: held-out SFT rows (the ability learnt).

A domain is *forgotten* at a checkpoint when its raw_test loss is above the base's by more than 3 standard
errors (z = rise / SE > 3). The table lists every (learning rate, step); the recommendation is the shortest
run at the lowest learning rate where uniform forgets at least one domain with margin (paired z > 5) **while it
learns**: the mean sft_test loss over the domains is below the base's. A run that makes every loss worse (a
learning rate that shocks the model: the first search chose lr 3e-3, where sft_test rose too) is not the regime
of a fine-tune that learns one thing and forgets another, so it is not chosen. The unpaired z (each mean's own SE,
the strict reading) is reported beside it. Train the strategies with the same constant schedule
(bench/quality_tiny.py --lr-scheduler constant): a cosine schedule of that length spends less learning rate.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/forgetting.py              # ~30-60 min on 2 busy cores
Writes bench/results/<name>.{json,md,png}; runs under bench/out/forgetting/ (finished runs are reused).
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
import domain_eval  # noqa: E402
import quality_common as qc  # noqa: E402
from common import write_results  # noqa: E402

from versatune_ds.eval import stats  # noqa: E402

logger = logging.getLogger("forgetting")
Z_FORGOTTEN = 3.0
Z_MARGIN = 5.0


def rises(base_doc: dict, doc: dict, name: str) -> list[tuple[float, float]]:
    """Per domain: (loss − base loss, its paired SE) on the set `name` (the same items in both)."""
    base = domain_eval.from_json(base_doc, name, qc.DOMAINS)
    mine = domain_eval.from_json(doc, name, qc.DOMAINS)
    return [stats.paired_ratio_difference(m.sums, b.sums, b.counts) for m, b in zip(mine, base)]


def unpaired_z(base_doc: dict, doc: dict, name: str) -> list[float]:
    """Per domain: (loss − base loss) / sqrt(SE_base² + SE²), the SEs of each mean on its own (the strict reading)."""
    out = []
    for m, b in zip(domain_eval.from_json(doc, name, qc.DOMAINS), domain_eval.from_json(base_doc, name, qc.DOMAINS)):
        (lm, sm), (lb, sb) = m.mean_se(), b.mean_se()
        out.append((lm - lb) / float(np.hypot(sm, sb)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--base-dir", default=str(qc.OUT / "tiny_base"))
    parser.add_argument("--work-dir", default=str(qc.OUT / "forgetting"))
    parser.add_argument("--results-name", default="forgetting_regime")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not (qc.DATA / "sft").is_dir():
        print(f"forgetting: skipped, the data bundle is not at {qc.DATA} (set VERSATUNE_SHARED_DATA)")
        return 0
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    work = Path(args.work_dir).resolve()
    base = qc.open_base(Path(args.base_dir).resolve())
    before = qc.ensure_base_eval(base)
    jobs, run_dirs = [], {}
    for k, lr in enumerate(args.lrs):
        name = f"uniform_lr{lr:g}_s{args.seed}_{args.steps}steps"
        run_dir = work / "runs" / name
        run_dirs[lr] = run_dir
        sections = {
            "mixture": {"strategy": "uniform", "unit": "tokens", "block_size": 32},
            "train": {"run_dir": str(run_dir), "seed": args.seed, "max_steps": args.steps, "micro_batch_size": args.micro_batch,
                      "learning_rate": lr, "lr_scheduler": "constant", "warmup_steps": 10, "log_every": 10},
            "eval": {"every": args.steps, "micro_batch_size": 20, "at_start": True},
            "checkpoint": {"every": args.checkpoint_every, "keep_last": 1000},
        }
        job = qc.train_job(work, base, name, sections, dist={"master_port": 29750 + k})
        if job is not None:  # None: finished earlier with the same flags, reused
            jobs.append(job)
    seconds = qc.run_jobs(jobs, args.parallel)
    timings_path = work / "timings.json"
    timings = {**(json.loads(timings_path.read_text()) if timings_path.is_file() else {}), **seconds}
    timings_path.parent.mkdir(parents=True, exist_ok=True)
    timings_path.write_text(json.dumps(timings, indent=1))

    table = []
    for lr, run_dir in run_dirs.items():
        doc = qc.evaluate_run(base, run_dir, curve_sets=("raw_test", "sft_test"))  # both: the table shows sft_test too
        for step_text, checkpoint in sorted(doc["checkpoints"].items(), key=lambda kv: int(kv[0])):
            raw = rises(before, checkpoint, "raw_test")
            sft = rises(before, checkpoint, "sft_test")
            z = [r / se if se > 0 else 0.0 for r, se in raw]
            table.append({
                "lr": lr, "step": int(step_text), "tokens_per_step": args.micro_batch * base.info["settings"]["sft_seq_len"],
                "raw_rise": dict(zip(qc.DOMAINS, (r for r, _ in raw))), "raw_se": dict(zip(qc.DOMAINS, (se for _, se in raw))),
                "raw_z": dict(zip(qc.DOMAINS, z)), "forgotten": [d for d, v in zip(qc.DOMAINS, z) if v > Z_FORGOTTEN],
                "raw_z_unpaired": dict(zip(qc.DOMAINS, unpaired_z(before, checkpoint, "raw_test"))),
                "sft_change": dict(zip(qc.DOMAINS, (r for r, _ in sft))), "sft_se": dict(zip(qc.DOMAINS, (se for _, se in sft))),
                "S_raw": float(np.mean([checkpoint["raw_test"][d]["loss"] for d in qc.DOMAINS])),
                "S_sft": float(np.mean([checkpoint["sft_test"][d]["loss"] for d in qc.DOMAINS])),
            })
    base_s_sft = float(np.mean([before["sft_test"][d]["loss"] for d in qc.DOMAINS]))
    candidates = [row for row in table if row["S_sft"] < base_s_sft and any(row["raw_z"][d] > Z_MARGIN for d in qc.DOMAINS)]
    choice = min(candidates, key=lambda row: (row["lr"], row["step"])) if candidates else None
    out = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python bench/forgetting.py " + " ".join(sys.argv[1:]),
        "machine": qc.machine_info(), "versions": qc.versions(), "seed": args.seed,
        "sft": {"strategy": "uniform", "lrs": args.lrs, "steps": args.steps, "checkpoint_every": args.checkpoint_every,
                "micro_batch_size": args.micro_batch, "seq_len": base.info["settings"]["sft_seq_len"], "schedule": "constant, 10 warm-up steps"},
        "base": {"settings": base.info["settings"], "parameters": base.info["parameters"]},
        "base_scores": {s: {d: {k: before[s][d][k] for k in ("loss", "se")} for d in qc.DOMAINS} for s in ("raw_test", "sft_test")},
        "table": table, "choice": choice, "train_seconds": timings, "wall_seconds_this_invocation": time.perf_counter() - started,
        "base_S_sft": base_s_sft,
        "rule": f"forgotten: raw_test loss above the base's by > {Z_FORGOTTEN} paired SE; choice: lowest lr, then fewest steps, where a "
                f"domain has paired z > {Z_MARGIN} while S_sft is below the base's ({base_s_sft:.3f}: the fine-tune learns)",
    }
    qc.RESULTS.mkdir(parents=True, exist_ok=True)
    plot(out, qc.RESULTS / f"{args.results_name}.png")
    write_results(args.results_name, out, markdown(out, args.results_name))
    return 0


def plot(out: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lrs = out["sft"]["lrs"]
    figure = Figure(figsize=(4.6 * len(lrs), 7.5))
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(lrs), squeeze=False)
    for k, lr in enumerate(lrs):
        rows = [r for r in out["table"] if r["lr"] == lr]
        steps = [0] + [r["step"] for r in rows]
        for d, name in enumerate(qc.DOMAINS):
            rise = np.array([0.0] + [r["raw_rise"][name] for r in rows])
            se = np.array([0.0] + [r["raw_se"][name] for r in rows])
            axes[0, k].plot(steps, rise, color=f"C{d}", marker="o", markersize=3, label=name)
            axes[0, k].fill_between(steps, rise - 3 * se, rise + 3 * se, color=f"C{d}", alpha=0.15)
            axes[1, k].plot(steps, [0.0] + [r["sft_change"][name] for r in rows], color=f"C{d}", marker="o", markersize=3)
        axes[0, k].axhline(0, color="black", linewidth=0.8)
        axes[1, k].axhline(0, color="black", linewidth=0.8)
        axes[0, k].set_title(f"uniform, lr {lr:g}: raw_test loss − base (±3 SE)")
        axes[1, k].set_title("sft_test loss − base")
        axes[1, k].set_xlabel("SFT step")
    axes[0, 0].set_ylabel("knowledge lost (nats/token; > 0 = forgotten)")
    axes[1, 0].set_ylabel("ability learnt (nats/token; < 0 = learnt)")
    axes[0, 0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def markdown(out: dict, name: str) -> str:
    names = qc.DOMAINS
    head = ("| lr | step | " + " | ".join(f"{d} raw rise (z paired / unpaired)" for d in names) + " | forgotten (paired z > 3) | "
            "forgotten (unpaired z > 3) | S_raw | S_sft |\n|---|---|" + "---|" * (len(names) + 4))
    rows = [f"| {r['lr']:g} | {r['step']} | " + " | ".join(f"{r['raw_rise'][d]:+.3f} ({r['raw_z'][d]:+.1f} / {r['raw_z_unpaired'][d]:+.1f})" for d in names)
            + f" | {', '.join(r['forgotten']) or '—'} | {', '.join(d for d in names if r['raw_z_unpaired'][d] > Z_FORGOTTEN) or '—'} | "
            f"{r['S_raw']:.3f} | {r['S_sft']:.3f} |" for r in out["table"]]
    base_raw = " | ".join(f"{out['base_scores']['raw_test'][d]['loss']:.3f}" for d in names)
    base_sft = " | ".join(f"{out['base_scores']['sft_test'][d]['loss']:.3f}" for d in names)
    choice = out["choice"]
    verdict = (f"**Choice: lr {choice['lr']:g}, {choice['step']} steps** ({choice['step'] * out['sft']['micro_batch_size']} packed rows of "
               f"{out['sft']['seq_len']} tokens): uniform forgets {', '.join(choice['forgotten'])} (z > 3) there."
               if choice else f"**No (lr, step) in this search made uniform forget a domain with paired z > {Z_MARGIN} while learning (S_sft below the base)**: the regime needs more "
               f"SFT than {out['sft']['steps']} steps at lr ≤ {max(out['sft']['lrs']):g}.")
    m = out["machine"]
    walls = ", ".join(f"{k} {v:.0f} s" for k, v in out["train_seconds"].items())
    return f"""# The forgetting regime on the controlled base ({name})

Command: `{out['command']}` on {m['nproc']} CPU cores (shared; load average at the end {m['load_avg_at_end']}); versions
{out['versions']}; SFT seed {out['seed']}. SFT: `uniform` through `versatune-ds train` (ZeRO-3, one process),
{out['sft']['micro_batch_size']} packed rows x {out['sft']['seq_len']} tokens per step, AdamW, learning rate constant after 10 warm-up steps,
a checkpoint every {out['sft']['checkpoint_every']} steps, each scored per item (bench/domain_eval.py). Train wall times: {walls}.

Base losses (raw_test | sft_test), {', '.join(names)}: {base_raw} | {base_sft}.

Cells: raw_test loss of the checkpoint minus the base's (nats/token, paired over the same {out['base']['settings']['raw_test_per_domain']}
passages per domain) and z = rise / SE: paired (the SE of the per-passage difference: item difficulty cancels) and unpaired
(rise / sqrt(SE_base² + SE_after²), each mean's own SE over passages: the strict reading). {out['rule']}.

{head}
{chr(10).join(rows)}

{verdict}

![forgetting curves]({name}.png)
"""


if __name__ == "__main__":
    raise SystemExit(main())
