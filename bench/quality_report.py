"""Summaries, verdicts, plots and tables of the controlled quality benchmarks (bench/quality_tiny.py).

    summarise(runs_of, docs, before, run_dirs, timings, baselines) -> {"strategies", "comparisons", "curves", "weights"}
    verdict(ci) -> "better" | "worse" | "not resolved"        for a G (or a difference) of LOSSES (negative = better)
    plot_bars / plot_weights / plot_forgetting / markdown

Inputs: `runs_of` maps a strategy to its run names, one per seed (the same seed order for every strategy, so
runs pair by position); `docs` maps a run name to bench/quality_common.evaluate_run's per-item scores; `before`
is the base's (ensure_base_eval). Every statistic comes from versatune_ds.eval.stats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import quality_common as qc
from domain_eval import from_json

from versatune_ds.eval import stats

PAPER_G_PCT = 35.21  # arXiv 2411.11266 v5: "+35.21 % in the overall multi-ability performances compared to uniform domain weights"
PAPER_R_PCT = 38.77  # same paper: "reduces the performance degradation in other domains by 38.77 %" (domain expansion)
METRICS = ("sft_test", "raw_test")  # the ability learnt, the knowledge kept
Z_FORGOTTEN = 3.0


def losses(doc: dict, name: str) -> np.ndarray:
    return np.array([doc[name][d]["loss"] for d in qc.DOMAINS])


def forgotten(doc: dict, before: dict) -> tuple[list[float], list[float]]:
    """Per domain: raw_test rise over the base (paired over passages) and its z = rise / SE."""
    rise, z = [], []
    for mine, base in zip(from_json(doc, "raw_test", qc.DOMAINS), from_json(before, "raw_test", qc.DOMAINS)):
        diff, se = stats.paired_ratio_difference(mine.sums, base.sums, base.counts)
        rise.append(diff)
        z.append(diff / se if se > 0 else 0.0)
    return rise, z


def loss_item_scores(docs: Sequence[dict], metric: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per domain, the per-item loss sums [seeds, items] of one model's runs (one domain_eval document per seed)
    and the items' scored tokens [items] (the same for every model: the same items, the same tokenizer)."""
    per_seed = [from_json(doc, metric, qc.DOMAINS) for doc in docs]
    sums, counts = [], []
    for d in range(len(qc.DOMAINS)):
        for seed in per_seed[1:]:
            if not np.array_equal(seed[d].counts, per_seed[0][d].counts):
                raise ValueError(f"{metric} {qc.DOMAINS[d]}: the runs were scored on different items; they cannot be paired")
        sums.append(np.array([seed[d].sums for seed in per_seed]))
        counts.append(per_seed[0][d].counts)
    return sums, counts


def item_level_replicates(models: dict[str, tuple[list[np.ndarray], list[np.ndarray]]], num_seeds: int, *,
                          num_bootstrap: int = 10_000) -> dict[str, np.ndarray]:
    """Per model (its per-domain item sums and counts), per-domain scores [B, D] in each bootstrap replicate, with
    draws of seeds and items shared by every model (versatune_ds.eval.stats.bootstrap_domain_scores). A model with
    one row per domain (the base) is not resampled over seeds."""
    first = next(iter(models.values()))
    draws = stats.seed_item_draws(num_seeds, [c.size for c in first[1]], num_bootstrap=num_bootstrap, seed=2411)
    return {name: stats.bootstrap_domain_scores(sums, counts, draws) for name, (sums, counts) in models.items()}


def worst_change(scores: np.ndarray, base: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Per replicate, the worst domain's change vs the base: accuracy the largest drop in points (min of the
    change), a loss the largest rise in % (max)."""
    if higher_is_better:
        return ((scores - base) * 100).min(axis=1)
    return ((scores - base) / base * 100).max(axis=1)


def item_level_intervals(reps: dict[str, np.ndarray], strategy: str, reference: str, means: dict[str, np.ndarray], base: np.ndarray,
                         gain_estimate: float, higher_is_better: bool) -> tuple[stats.BootstrapCI, stats.BootstrapCI]:
    """G of S and the worst-domain difference of `strategy` vs `reference`, with intervals over seeds and items.

    `reps` are item_level_replicates' per-model scores (the base included), `means` the per-domain seed-mean scores
    of both models and `base` the base model's. The worst domain is that of the seed-mean scores, in the estimate
    and in every replicate alike (over seeds alone it is the mean of each seed's worst domain, which noise biases
    upward). A replicate whose reference S is 0 (it drew only misses) has no relative gain and is left out.
    """
    s_mine, s_ref = reps[strategy].mean(axis=1), reps[reference].mean(axis=1)
    usable = s_ref > 0
    gain = stats.percentile_ci(gain_estimate, (s_mine[usable] - s_ref[usable]) / s_ref[usable] * 100)
    estimate = float(worst_change(means[strategy][None, :], base[None, :], higher_is_better)[0]
                     - worst_change(means[reference][None, :], base[None, :], higher_is_better)[0])
    worst = worst_change(reps[strategy], reps["base"], higher_is_better) - worst_change(reps[reference], reps["base"], higher_is_better)
    return gain, stats.percentile_ci(estimate, worst)


def verdict(ci: stats.BootstrapCI) -> str:
    """For losses: the whole 95 % interval below 0 is better, above 0 is worse, else not resolved."""
    return "better" if ci.high < 0 else "worse" if ci.low > 0 else "not resolved"


def ci_dict(ci: stats.BootstrapCI) -> dict:
    return {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "confidence": ci.confidence, "verdict": verdict(ci)}


def summarise(runs_of: dict[str, list[str]], docs: dict[str, dict], before: dict, run_dirs: dict[str, Path],
              timings: dict[str, float], *, baselines: Sequence[str] = ("uniform",)) -> dict:
    base = {m: losses(before, m) for m in METRICS}
    table: dict[str, dict] = {}
    per_seed: dict[str, dict[str, np.ndarray]] = {}
    for strategy, names in runs_of.items():
        finals = [docs[n]["final"] for n in names]
        entry: dict = {"runs": names}
        per_seed[strategy] = {}
        for metric in METRICS:
            values = np.array([losses(f, metric) for f in finals])  # [seeds, domains]
            scores = values.mean(axis=1)
            worst = ((values - base[metric]) / base[metric] * 100).max(axis=1)
            per_seed[strategy][metric] = scores
            per_seed[strategy][f"worst_{metric}"] = worst
            mean, std = qc.mean_std(values)
            entry[metric] = {
                "loss_mean": dict(zip(qc.DOMAINS, mean.tolist())), "loss_std_over_seeds": dict(zip(qc.DOMAINS, std.tolist())),
                "item_se_mean": dict(zip(qc.DOMAINS, np.mean([[f[metric][d]["se"] for d in qc.DOMAINS] for f in finals], axis=0).tolist())),
                "loss_per_seed": [dict(zip(qc.DOMAINS, v.tolist())) for v in values],
                "S_per_seed": scores.tolist(), "S_mean": float(scores.mean()), "S_std": float(qc.mean_std(scores)[1]),
                "change_vs_base_pct_mean": dict(zip(qc.DOMAINS, ((mean - base[metric]) / base[metric] * 100).tolist())),
                "worst_regression_vs_base_pct_per_seed": worst.tolist(),
                "worst_regression_vs_base_pct_mean": float(worst.mean()),
                "worst_domain_per_seed": [qc.DOMAINS[int(np.argmax((v - base[metric]) / base[metric]))] for v in values],
            }
        checks = [forgotten(f, before) for f in finals]
        entry["forgetting"] = {
            "raw_rise_per_seed": [dict(zip(qc.DOMAINS, r)) for r, _ in checks],
            "raw_z_per_seed": [dict(zip(qc.DOMAINS, z)) for _, z in checks],
            "forgotten_per_seed": [[d for d, v in zip(qc.DOMAINS, z) if v > Z_FORGOTTEN] for _, z in checks],
        }
        entry["train_wall_s"] = [timings.get(n) for n in names]
        tokens = np.array([qc.trained_tokens(run_dirs[n]) for n in names])
        entry["trained_token_share_mean"] = dict(zip(qc.DOMAINS, (tokens / tokens.sum(axis=1, keepdims=True)).mean(axis=0).tolist()))
        entry["trained_tokens_total_mean"] = float(tokens.sum(axis=1).mean())
        table[strategy] = entry
    num_seeds = len(next(iter(runs_of.values())))
    replicates = {m: item_level_replicates({"base": loss_item_scores([before], m),
                                            **{s: loss_item_scores([docs[n]["final"] for n in names], m) for s, names in runs_of.items()}},
                                           num_seeds) for m in METRICS}
    comparisons: dict[str, dict] = {}
    for reference in baselines:
        if reference not in per_seed:
            continue
        comparisons[reference] = {}
        for strategy in per_seed:
            if strategy == reference:
                continue
            ref, mine = per_seed[reference], per_seed[strategy]
            entry = {}
            for m in METRICS:
                gain = stats.paired_bootstrap_gain(mine[m], ref[m])
                diff = stats.paired_bootstrap_difference(mine[f"worst_{m}"], ref[f"worst_{m}"])
                entry[f"G_{m}_over_seeds"] = ci_dict(gain)
                entry[f"worst_{m}_diff_pp_over_seeds"] = ci_dict(diff)
                # The verdicts use the interval over seeds and test items (see versatune_ds.eval.stats): the items are a
                # sample of the domain too, and every model was scored on the same ones (paired).
                means = {k: np.array([table[k][m]["loss_mean"][d] for d in qc.DOMAINS]) for k in (strategy, reference)}
                gain, diff = item_level_intervals(replicates[m], strategy, reference, means, base[m], gain.estimate, False)
                entry[f"G_{m}"] = {**ci_dict(gain), "interval": "seeds and items"}
                entry[f"worst_{m}_diff_pp"] = {**ci_dict(diff), "interval": "seeds and items"}
            comparisons[reference][strategy] = entry
    return {"strategies": table, "comparisons": comparisons, "curves": curves(runs_of, docs, before),
            "weights": {s: [weights_of(run_dirs[n]) for n in names] for s, names in runs_of.items()}}


def weights_of(run_dir: Path) -> dict:
    steps, weights = qc.weight_trajectory(run_dir)
    return {"steps": steps, "weights": [dict(zip(qc.DOMAINS, w.tolist())) for w in weights]}


def curves(runs_of: dict[str, list[str]], docs: dict[str, dict], before: dict, metric: str = "raw_test") -> dict:
    """Per strategy: steps (0 = the base) and per-domain `metric` loss, mean over the seeds that have that step."""
    out = {}
    for strategy, names in runs_of.items():
        points: dict[int, list[np.ndarray]] = {0: [losses(before, metric)]}
        for name in names:
            doc = docs[name]
            snapshots = {int(step): c for step, c in doc["checkpoints"].items() if metric in c}
            snapshots[int(doc["final_step"])] = doc["final"]  # the exported model
            for step, snapshot in snapshots.items():
                points.setdefault(step, []).append(losses(snapshot, metric))
        steps = sorted(points)
        out[strategy] = {"metric": metric, "steps": steps, "loss": [dict(zip(qc.DOMAINS, np.mean(points[s], axis=0).tolist())) for s in steps],
                         "seeds_per_step": [len(points[s]) for s in steps]}
    return out


# ----------------------------------------------------------------------------------------------
# Plots


def plot_bars(out: dict, path: Path, title: str) -> None:
    """Per-domain test losses (sft_test, raw_test) per strategy, error bars = std over seeds; the base in grey."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res, strategies, names = out["results"], out["strategies"], qc.DOMAINS
    figure = Figure(figsize=(13, 8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 1)
    width = 0.8 / (len(strategies) + 1)
    x = np.arange(len(names))
    for ax, metric, label in zip(axes, METRICS, ("sft_test loss: the ability learnt", "raw_test loss: the knowledge kept")):
        base = [out["base_scores"][metric][d]["loss"] for d in names]
        ax.bar(x - 0.4 + width / 2, base, width, label="base (before SFT)", color="lightgray")
        for k, strategy in enumerate(strategies):
            r = res[strategy][metric]
            ax.bar(x - 0.4 + width * (k + 1.5), [r["loss_mean"][d] for d in names], width,
                   yerr=[r["loss_std_over_seeds"][d] for d in names], capsize=2, label=f"{strategy} (S={r['S_mean']:.3f})")
        ax.set_xticks(x, [f"{d}\n(share {out['base']['truth'][d]:.2f})" for d in names])
        ax.set_ylabel(f"{label}\n(lower is better)")
        values = base + [res[s][metric]["loss_mean"][d] for s in strategies for d in names]
        ax.set_ylim(min(values) * 0.9, max(values) * 1.05)
        ax.legend(fontsize=7, ncol=3)
    axes[0].set_title(f"{title}: mean ± std over seeds {out['seeds']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def plot_weights(out: dict, path: Path, dynamic: Sequence[str]) -> None:
    """Token-share weights over SFT steps: every seed of the dynamic strategies; the static ones as flat lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [s for s in out["strategies"] if s in dynamic] + [s for s in out["strategies"] if s not in dynamic]
    figure = Figure(figsize=(4.2 * len(shown), 3.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(shown), squeeze=False)[0]
    last = out["sft"]["steps"]
    for ax, strategy in zip(axes, shown):
        for seed_index, trajectory in enumerate(out["weight_trajectories"][strategy]):
            steps = trajectory["steps"] + ([last] if trajectory["steps"][-1] < last else [])
            for d, name in enumerate(qc.DOMAINS):
                values = [w[name] for w in trajectory["weights"]]
                values += values[-1:] * (len(steps) - len(values))
                ax.step(steps, values, where="post", color=f"C{d}", alpha=0.7, label=name if seed_index == 0 else None)
        ax.set_title(strategy, fontsize=9)
        ax.set_xlabel("SFT step")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("token-share weight (all seeds)")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def plot_forgetting(out: dict, path: Path) -> None:
    """The forgetting curves: raw_test loss per domain over SFT steps, per strategy (mean over seeds); the base ± 3 SE."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.4 * len(qc.DOMAINS), 3.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(qc.DOMAINS), squeeze=False)[0]
    for ax, domain in zip(axes, qc.DOMAINS):
        for k, strategy in enumerate(out["strategies"]):
            curve = out["curves"][strategy]
            ax.plot(curve["steps"], [p[domain] for p in curve["loss"]], color=f"C{k}", marker="o", markersize=2.5, label=strategy)
        base = out["base_scores"]["raw_test"][domain]
        ax.axhline(base["loss"], color="black", linestyle=":", linewidth=0.8)
        ax.axhspan(base["loss"] - 3 * base["se"], base["loss"] + 3 * base["se"], color="grey", alpha=0.15)
        ax.set_title(f"{domain}: raw_test", fontsize=9)
        ax.set_xlabel("SFT step")
    axes[0].set_ylabel("raw_test loss (up = forgotten)")
    axes[0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


# ----------------------------------------------------------------------------------------------
# Tables


def _ci(c: dict, unit: str = "%") -> str:
    return f"{c['estimate']:+.2f} {unit} [{c['low']:+.2f}, {c['high']:+.2f}]"


def headline(out: dict) -> list[str]:
    """The answer to "does versatune beat uniform and the tuned static mix?", with the CIs (losses: negative G = better)."""
    lines = []
    for reference in ("uniform", "tuned_static"):
        if "versatune" not in out["strategies"] or reference not in out["comparisons"]:
            continue
        c = out["comparisons"][reference]["versatune"]
        parts = []
        for metric, what in (("sft_test", "S on sft_test (ability)"), ("raw_test", "S on raw_test (knowledge)")):
            g = c[f"G_{metric}"]
            parts.append(f"{what}: G = {_ci(g)} → **{g['verdict']}**")
        w = c["worst_raw_test_diff_pp"]
        parts.append(f"worst raw_test domain regression vs the base (of the seed-mean losses), versatune − {reference}: {_ci(w, 'pp')} → "
                     f"**{w['verdict']}**")
        lines.append(f"- **versatune vs {reference}**: " + "; ".join(parts) + ".")
    return lines


def markdown(out: dict, name: str, *, title: str) -> str:
    names, res, m = qc.DOMAINS, out["results"], out["machine"]
    pre, probe = out["base_pretraining"], out["probe"]
    rows = []
    for s in out["strategies"]:
        r = res[s]
        cmp_u = out["comparisons"].get("uniform", {}).get(s)
        cmp_t = out["comparisons"].get("tuned_static", {}).get(s)
        cell = lambda c, k: _ci(c[k]) if c else "—"  # noqa: E731
        walls = [w for w in r["train_wall_s"] if w is not None]
        lost = sorted({d for seed in r["forgetting"]["forgotten_per_seed"] for d in seed})
        n_lost = np.mean([len(x) for x in r["forgetting"]["forgotten_per_seed"]])
        rows.append(f"| {s} | {r['sft_test']['S_mean']:.4f} ± {r['sft_test']['S_std']:.4f} | {cell(cmp_u, 'G_sft_test')} | {cell(cmp_t, 'G_sft_test')} | "
                    f"{r['raw_test']['S_mean']:.4f} ± {r['raw_test']['S_std']:.4f} | {cell(cmp_u, 'G_raw_test')} | {cell(cmp_t, 'G_raw_test')} | "
                    f"{r['raw_test']['worst_regression_vs_base_pct_mean']:+.2f} % | {n_lost:.1f} ({', '.join(lost) or '—'}) | "
                    f"{np.mean(walls) if walls else float('nan'):.0f} |")
    domain_rows = []
    for metric in METRICS:
        domain_rows.append(f"| base (± SE over items) | {metric} | " + " | ".join(f"{out['base_scores'][metric][d]['loss']:.3f} ± {out['base_scores'][metric][d]['se']:.3f}" for d in names) + " |")
        for s in out["strategies"]:
            r = res[s][metric]
            domain_rows.append(f"| {s} | {metric} | " + " | ".join(f"{r['loss_mean'][d]:.3f} ± {r['loss_std_over_seeds'][d]:.3f} ({r['change_vs_base_pct_mean'][d]:+.1f} %)" for d in names) + " |")
    share_rows = [f"| {s} | " + " | ".join(f"{res[s]['trained_token_share_mean'][d]:.3f}" for d in names) + f" | {res[s]['trained_tokens_total_mean']:.0f} |"
                  for s in out["strategies"]]
    tuned = out.get("tuned_static")
    tuned_text = ""
    if tuned:
        cands = "; ".join(f"#{k} ({', '.join(f'{d} {w[d]:.2f}' for d in names)}): {v:.4f}" for k, (w, v) in enumerate(zip(tuned["mixtures"], tuned["validation_scores"])))
        tuned_text = (f"**Tuned static mix**: {len(tuned['mixtures'])} mixtures ~ Dirichlet(α·1) (fixed generator), each trained with seed "
                      f"{tuned['selection_seed']}; validation score = mean {tuned['select_on']}_val loss. Candidates: {cands}. "
                      f"Chosen: #{tuned['best']}; it is then trained with every seed and reported on the test splits.")
    sft = out["sft"]
    verdict_lines = headline(out)
    return f"""# {title} ({name})

Command: `{out['command']}` on {m['nproc']} CPU cores, {m['ram_gib']} GiB RAM, shared with other work (load average at the end
{m['load_avg_at_end']}); versions {out['versions']}; SFT seeds {out['seeds']} (sampler order; the base and the probe are fixed).

## Does VersaTune beat uniform mixing, and the tuned static mix?

{chr(10).join(verdict_lines) or '- (versatune or a baseline was not run)'}

G = (S − S_ref) / S_ref × 100 with S = mean over the 6 domains of a test loss, per seed; the estimate is G of the seed means and
the interval a paired bootstrap over seeds **and test items** (95 %; each replicate draws one multiset of seeds and, per domain,
one of items, the same for every model: versatune_ds.eval.stats.bootstrap_domain_scores). The test items are a sample of each
domain too, so an interval over seeds alone is too narrow; it is kept in the JSON as `*_over_seeds`. **For losses a negative G is
better**; "better"/"worse" = the whole interval on one side of 0. The paper reports G = **+{PAPER_G_PCT} %** for VersaTune vs uniform
domain weights (accuracy, so positive = better; arXiv 2411.11266); our G on losses compares in sign with −{PAPER_G_PCT} %.

| strategy | S sft_test | G_sft vs uniform [95 % CI] | G_sft vs tuned | S raw_test | G_raw vs uniform [95 % CI] | G_raw vs tuned | worst raw regression vs base | domains forgotten per seed (which) | train wall s (mean) |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Worst raw regression: max over domains of (raw_test loss − base) / base × 100, mean over seeds (positive = knowledge lost). Forgotten:
raw_test loss above the base's by more than {Z_FORGOTTEN:g} paired standard errors over passages.

## Setup

**Base** ({out['base']['parameters'] / 1e6:.2f} M parameters, bench/tiny_base.py): pretrained {pre['step']} steps ({pre['tokens'] / 1e6:.1f} M tokens,
{pre['seconds'] / 3600:.2f} h on this machine; stop: {pre.get('stop_reason')}) on the known shares {out['base']['truth']}.
**Probe** (`versatune-ds probe`, {probe['num_samples']} generations x ≤ {probe['max_new_tokens']} tokens): p =
{ {d: round(v, 3) for d, v in probe['p'].items()} }, L1 vs the truth **{probe['l1_vs_truth']:.3f}**, truth inside the 95 % CI for
{probe['truth_inside_ci']}/6 domains.
**SFT** through `versatune-ds train` (ZeRO-3, {sft['processes']}, {sft['parallel_runs']} at a time): {sft['steps']} steps x {sft['micro_batch_size']}
packed rows x {sft['seq_len']} tokens for every strategy (equal budgets), lr {sft['lr']} ({sft['scheduler']}); dynamic strategies re-weight every
{sft['eval_every_dynamic']} steps on sft_val (reference losses: {sft['reference_losses']}); sampler block {sft['block_size']} rows, floor {sft['floor']}.
{tuned_text}

## Per-domain test losses (mean ± std over seeds; in brackets: change vs the base, + = higher loss)

| strategy | set | {' | '.join(names)} |
|---|---|{'---|' * len(names)}
{chr(10).join(domain_rows)}

Share of trained tokens (mean over seeds) and total tokens per run:

| strategy | {' | '.join(names)} | tokens |
|---|{'---|' * (len(names) + 1)}
{chr(10).join(share_rows)}

![per-domain test losses]({name}.png)

![weights]({name}_weights.png)

![forgetting curves]({name}_forgetting.png)
"""
