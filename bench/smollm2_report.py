"""Summary, plots and table of bench/quality_smollm2.py (SmolLM2-135M-Instruct, MCQ + held-out losses).

Per strategy and seed: MCQ accuracy per domain on the fixed subset, per-item sft_test and raw_test losses
(bench/domain_eval.py). S per seed; G vs uniform and vs the tuned static mix with a paired bootstrap CI over seeds
(versatune_ds.eval.stats); the worst single-domain regression vs the base (MCQ: the largest accuracy drop in
points; raw_test: the largest % loss rise); forgotten domains (raw_test rise > 3 paired SE over passages).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import quality_common as qc
from domain_eval import from_json
from quality_report import PAPER_G_PCT, Z_FORGOTTEN, ci_dict, item_level_intervals, item_level_replicates, loss_item_scores

from versatune_ds.eval import stats
from versatune_ds.provenance import read_starts

SCORES = ("mcq", "sft_test", "raw_test")  # accuracy (higher = better), then two losses (lower = better)


def _mcq(path: Path, key: str = "acc") -> np.ndarray:
    doc = json.loads(path.read_text())
    return np.array([doc["domains"][d][key] for d in qc.DOMAINS], dtype=np.float64)


def _losses(doc: dict, name: str) -> np.ndarray:
    return np.array([doc[name][d]["loss"] for d in qc.DOMAINS])


def _item_scores(paths: list[Path], metric: str) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """Per domain, sums [seeds, items] and counts [items] of one model's runs (one path per seed): MCQ hits (1/0,
    counts 1) from `versatune-ds eval`'s per-item records, or bench/domain_eval.py's per-item loss sums and scored
    tokens. None when an MCQ file has no per-item records (written before they existed)."""
    docs = [json.loads(path.read_text()) for path in paths]
    if not metric.startswith("mcq"):
        return loss_item_scores(docs, metric)
    if any("mcq_items" not in doc for doc in docs):
        return None
    key = "pred_norm" if metric == "mcq_norm" else "pred"
    sums = [np.array([[float(r[key] == r["answer"]) for r in doc["mcq_items"][d]] for doc in docs]) for d in qc.DOMAINS]
    return sums, [np.ones(x.shape[1]) for x in sums]


def verdict(ci: stats.BootstrapCI, higher_is_better: bool) -> str:
    if ci.low > 0:
        return "better" if higher_is_better else "worse"
    if ci.high < 0:
        return "worse" if higher_is_better else "better"
    return "not resolved"


def summarise(runs: dict[str, list[str]], work: Path, args: argparse.Namespace, timings: dict, distribution: Path, selection: dict | None) -> dict:
    evals = work / "evals"
    base_losses = json.loads((evals / "losses_base.json").read_text())
    base = {"mcq": _mcq(evals / "mcq_base.json"), "mcq_norm": _mcq(evals / "mcq_base.json", "acc_norm"),
            "sft_test": _losses(base_losses, "sft_test"), "raw_test": _losses(base_losses, "raw_test")}
    n_items = json.loads((evals / "mcq_base.json").read_text())["domains"]
    strategies: dict[str, dict] = {}
    per_seed: dict[str, dict[str, np.ndarray]] = {}
    for strategy, names in runs.items():
        values = {"mcq": np.array([_mcq(evals / f"mcq_{n}.json") for n in names]),
                  "mcq_norm": np.array([_mcq(evals / f"mcq_{n}.json", "acc_norm") for n in names])}
        docs = [json.loads((evals / f"losses_{n}.json").read_text()) for n in names]
        for metric in ("sft_test", "raw_test"):
            values[metric] = np.array([_losses(doc, metric) for doc in docs])
        entry: dict = {"runs": names}
        per_seed[strategy] = {}
        for metric, array in values.items():
            higher = metric.startswith("mcq")
            change = (array - base[metric]) * 100 if higher else (array - base[metric]) / base[metric] * 100
            worst = change.min(axis=1) if higher else change.max(axis=1)  # MCQ: points lost; losses: % risen
            per_seed[strategy][metric] = array.mean(axis=1)
            per_seed[strategy][f"worst_{metric}"] = worst
            mean, std = qc.mean_std(array)
            entry[metric] = {"mean": dict(zip(qc.DOMAINS, mean.tolist())), "std_over_seeds": dict(zip(qc.DOMAINS, std.tolist())),
                             "per_seed": [dict(zip(qc.DOMAINS, v.tolist())) for v in array], "S_per_seed": array.mean(axis=1).tolist(),
                             "S_mean": float(array.mean()), "worst_vs_base_per_seed": worst.tolist(), "worst_vs_base_mean": float(worst.mean())}
        forgotten = []
        for doc in docs:
            pairs = zip(from_json(doc, "raw_test", qc.DOMAINS), from_json(base_losses, "raw_test", qc.DOMAINS))
            z = [(lambda diff, se: diff / se if se > 0 else 0.0)(*stats.paired_ratio_difference(m.sums, b.sums, b.counts)) for m, b in pairs]
            forgotten.append([d for d, v in zip(qc.DOMAINS, z) if v > Z_FORGOTTEN])
        entry["forgotten_per_seed"] = forgotten
        entry["train_wall_s"] = [timings.get(f"train_{n}") for n in names]
        tokens = np.array([qc.trained_tokens(work / "runs" / n) for n in names])
        entry["trained_tokens_total_mean"] = float(tokens.sum(axis=1).mean())
        entry["trained_token_share_mean"] = dict(zip(qc.DOMAINS, (tokens / tokens.sum(axis=1, keepdims=True)).mean(axis=0).tolist()))
        steps, weights = qc.weight_trajectory(work / "runs" / names[0])
        entry["weights_seed0"] = {"steps": steps, "weights": weights.tolist()}
        entry["sft_val_curve_seed0"] = {str(k): v.tolist() for k, v in qc.eval_losses(work / "runs" / names[0]).items()}
        strategies[strategy] = entry
    items = replicates_per_metric(runs, evals, len(args.seeds))
    comparisons: dict[str, dict] = {}
    for reference in ("uniform", "tuned_static"):
        if reference not in per_seed:
            continue
        comparisons[reference] = {}
        for strategy in per_seed:
            if strategy == reference:
                continue
            ref, mine = per_seed[reference], per_seed[strategy]
            entry = {}
            for metric in ("mcq", "mcq_norm", "sft_test", "raw_test"):
                higher = metric.startswith("mcq")
                gain = stats.paired_bootstrap_gain(mine[metric], ref[metric])
                diff = stats.paired_bootstrap_difference(mine[f"worst_{metric}"], ref[f"worst_{metric}"])
                entry[f"G_{metric}_over_seeds"] = {**ci_dict(gain), "verdict": verdict(gain, higher)}
                entry[f"worst_{metric}_diff_over_seeds"] = {**ci_dict(diff), "verdict": verdict(diff, higher)}
                if metric in items:
                    # The verdicts use the interval over seeds and items (see versatune_ds.eval.stats): it covers the item noise.
                    means = {k: np.array([strategies[k][metric]["mean"][d] for d in qc.DOMAINS]) for k in (strategy, reference)}
                    gain, diff = item_level_intervals(items[metric], strategy, reference, means, base[metric], gain.estimate, higher)
                entry[f"G_{metric}"] = {**ci_dict(gain), "verdict": verdict(gain, higher), "interval": "seeds and items" if metric in items else "seeds"}
                entry[f"worst_{metric}_diff"] = {**ci_dict(diff), "verdict": verdict(diff, higher),
                                                 "interval": "seeds and items" if metric in items else "seeds"}
            comparisons[reference][strategy] = entry
    doc = json.loads(distribution.read_text())
    order = [doc["domains"].index(d) for d in qc.DOMAINS]
    return {
        "command": "OMP_NUM_THREADS=1 python bench/quality_smollm2.py " + " ".join(_argv()),
        "settings": {k: v for k, v in vars(args).items()}, "domains": list(qc.DOMAINS), "seeds": args.seeds, "strategies": list(runs),
        "probe": {key: [doc[key][i] for i in order] for key in ("p", "ci_low", "ci_high") if key in doc},
        "base": {k: v.tolist() for k, v in base.items()}, "mcq_items_per_domain": {d: n_items[d]["n"] for d in qc.DOMAINS},
        "mcq_subset": "per domain file: sorted(np.random.default_rng(0).permutation(rows)[:N]) (versatune_ds.eval.mcq.load_mcq_file)",
        "results": strategies, "comparisons": comparisons, "tuned_static": selection,
        "timings": timings, "machine": qc.machine_info(), "versions": qc.versions(),
        # `versions` is this checkout, when the report is written; each run's own starts say what trained it.
        "run_provenance": {n: read_starts(work / "runs" / n) for names in runs.values() for n in names},
        "formulas": {"S": "S = (1/6) * sum_d s_d per seed", "G": "G = (S - S_ref) / S_ref * 100 of the seed means; paired bootstrap 95 % CI over seeds and items "
                          "(versatune_ds.eval.stats.bootstrap_domain_scores; the CI over seeds alone is kept as *_over_seeds)",
                     "paper": f"G = +{PAPER_G_PCT} % (VersaTune vs uniform domain weights, benchmark accuracy; arXiv 2411.11266)"},
    }


def replicates_per_metric(runs: dict[str, list[str]], evals: Path, num_seeds: int) -> dict[str, dict[str, np.ndarray]]:
    """{metric: {model: per-domain scores [B, D] per bootstrap replicate}}, paired by seed and item, the base model
    included; a metric whose per-item files are missing (MCQ results written before they had items) is left out."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for metric in ("mcq", "mcq_norm", "sft_test", "raw_test"):
        kind = "mcq" if metric.startswith("mcq") else "losses"
        models = {"base": _item_scores([evals / f"{kind}_base.json"], metric)}
        models.update({strategy: _item_scores([evals / f"{kind}_{n}.json" for n in names], metric) for strategy, names in runs.items()})
        if all(v is not None for v in models.values()):
            out[metric] = item_level_replicates(models, num_seeds)
    return out


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


def plot(results: dict, path: Path, dynamic: tuple[str, ...]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(16, 8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    x = np.arange(len(qc.DOMAINS))
    names = ["base", *results["strategies"]]
    width = 0.8 / len(names)
    panels = (("mcq", "MCQ acc (fixed subset; higher is better)"),
              ("sft_test", "sft_test loss, % change vs base (the ability learnt; below 0 = better)"),
              ("raw_test", "raw_test loss, % change vs base (the knowledge kept; above 0 = forgetting)"))
    for ax, (metric, title) in zip(axes.flat, panels):
        base = np.array(results["base"][metric], dtype=np.float64)
        # Losses move by a few per cent: bars from zero would hide them, so the loss panels show the change vs the base.
        relative = metric != "mcq"
        for i, name in enumerate(names):
            if name == "base":
                if not relative:
                    ax.bar(x + i * width, base, width, label="base", color="lightgray")
                continue
            r = results["results"][name][metric]
            mean = np.array([r["mean"][d] for d in qc.DOMAINS])
            std = np.array([r["std_over_seeds"][d] for d in qc.DOMAINS])
            if relative:
                mean, std = (mean - base) / base * 100, std / base * 100
            ax.bar(x + i * width, mean, width, yerr=std, capsize=2, label=f"{name} (S={r['S_mean']:.3f})")
        if relative:
            ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(x + 0.4 - width / 2, qc.DOMAINS, rotation=20)
        ax.set_title(f"{title}, ± std over seeds", fontsize=9)
        ax.legend(fontsize=7)
    axes[0, 0].axhline(0.25, color="grey", linestyle=":", linewidth=1)
    ax = axes[1, 1]
    for name, run in results["results"].items():
        if name in dynamic:
            weights = np.array(run["weights_seed0"]["weights"])
            for d, domain in enumerate(qc.DOMAINS):
                ax.step(run["weights_seed0"]["steps"], weights[:, d], where="post", color=f"C{d}", label=f"{name}: {domain}")
    ax.set_title("dynamic strategies: token-share weights (first seed)", fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(str(path), dpi=90)


def provenance_line(starts_by_run: dict[str, list[dict]]) -> str:
    """Which code trained the runs, from their provenance.jsonl (runs made before it existed are named as such)."""
    by_source: dict[str, list[str]] = {}
    for name, starts in starts_by_run.items():
        for key in [_trained_by(start) for start in starts] or ["no record (trained before runs kept provenance.jsonl)"]:
            by_source.setdefault(key, []).append(name)
    parts = [f"{key}: {', '.join(sorted(set(names)))}" for key, names in sorted(by_source.items())]
    return "Trained by (each run's provenance.jsonl, one entry per start): " + ("; ".join(parts) if parts else "no runs") + "."


def _trained_by(start: dict) -> str:
    """One start's code: its git commit, or the installed version when it ran from a wheel."""
    source = start.get("source")
    if not isinstance(source, dict):
        return f"an installed versatune-ds {start.get('versatune_ds')}"
    return f"commit {str(source.get('commit'))[:10]}" + (" with uncommitted changes" if source.get("dirty") else "")


def _ci(c: dict, unit: str = "%") -> str:
    return f"{c['estimate']:+.2f} {unit} [{c['low']:+.2f}, {c['high']:+.2f}]"


def markdown(results: dict, name: str) -> str:
    s, res = results["settings"], results["results"]
    fmt = lambda values: " | ".join(f"{v:.3f}" for v in values)  # noqa: E731
    n = min(results["mcq_items_per_domain"].values())
    headline = []
    for reference in ("uniform", "tuned_static"):
        c = results["comparisons"].get(reference, {}).get("versatune")
        if c:
            headline.append(f"- **versatune vs {reference}**: MCQ S G = {_ci(c['G_mcq'])} → **{c['G_mcq']['verdict']}** (paper: +{PAPER_G_PCT} %); "
                            f"sft_test S G = {_ci(c['G_sft_test'])} → **{c['G_sft_test']['verdict']}**; raw_test S G = {_ci(c['G_raw_test'])} → "
                            f"**{c['G_raw_test']['verdict']}**; worst MCQ domain (of the seed means), versatune − {reference}: {_ci(c['worst_mcq_diff'], 'pp')} → "
                            f"**{c['worst_mcq_diff']['verdict']}**.")
    rows = []
    for strategy, r in res.items():
        cu = results["comparisons"].get("uniform", {}).get(strategy)
        ct = results["comparisons"].get("tuned_static", {}).get(strategy)
        cell = lambda c, k: _ci(c[k]) if c else "—"  # noqa: E731
        walls = [w for w in r["train_wall_s"] if w]
        rows.append(f"| {strategy} | {r['mcq']['S_mean']:.4f} | {cell(cu, 'G_mcq')} | {cell(ct, 'G_mcq')} | {r['sft_test']['S_mean']:.4f} | "
                    f"{cell(cu, 'G_sft_test')} | {r['raw_test']['S_mean']:.4f} | {cell(cu, 'G_raw_test')} | {r['mcq']['worst_vs_base_mean'] * 1:+.1f} pp | "
                    f"{r['raw_test']['worst_vs_base_mean']:+.2f} % | {sorted({d for x in r['forgotten_per_seed'] for d in x}) or '—'} | "
                    f"{r['trained_tokens_total_mean']:.0f} | {np.mean(walls) if walls else float('nan'):.0f} |")
    per_domain = [f"| base | {metric} | {fmt(results['base'][metric])} |" for metric in ("mcq", "sft_test", "raw_test")]
    for strategy, r in res.items():
        per_domain += [f"| {strategy} | {metric} | " + " | ".join(f"{r[metric]['mean'][d]:.3f} ± {r[metric]['std_over_seeds'][d]:.3f}" for d in qc.DOMAINS) + " |"
                       for metric in ("mcq", "sft_test", "raw_test")]
    tuned = results.get("tuned_static")
    tuned_text = (f"Tuned static mix: {len(tuned['mixtures'])} Dirichlet(α·1) mixtures, each trained {tuned['candidate_steps']} steps with seed "
                  f"{tuned['selection_seed']}; mean sft_val loss at the last step: {', '.join(f'{v:.4f}' for v in tuned['validation_scores'])}; "
                  f"chosen #{tuned['best']} ({', '.join(f'{d} {w:.2f}' for d, w in tuned['weights'].items())})." if tuned else "")
    walls = {k: v for k, v in results["timings"].items()}
    total = sum(walls.values())
    probe = results["probe"]
    return "\n".join([
        f"# Quality, tier 2: SmolLM2-135M-Instruct on ../shared/data ({name})", "",
        f"Command: `{results['command']}`; machine {results['machine']}; versions {results['versions']}; seeds {results['seeds']}.", "",
        provenance_line(results.get("run_provenance", {})), "",
        "## Does VersaTune beat uniform mixing, and the tuned static mix?", "",
        *(headline or ["- (versatune or a baseline was not run)"]), "",
        f"G = (S − S_ref) / S_ref × 100, S = mean over the 6 domains per seed. Intervals: paired bootstrap 95 % over the "
        f"{len(results['seeds'])} seeds **and** the items (every replicate draws one multiset of seeds and, per domain, one of items, "
        "the same for every model: `versatune_ds.eval.stats.bootstrap_domain_scores`); a CI over seeds alone would span only the "
        f"{len(results['seeds'])} seeds' values and ignore the item noise (it is kept in the JSON as `*_over_seeds`). MCQ accuracy: positive G = "
        f"better (the paper's sign; the paper reports G = +{PAPER_G_PCT} % vs uniform); losses: negative G = better. With {n} items per "
        f"domain the binomial SE of one domain's accuracy is ≈ {np.sqrt(0.1875 / n):.3f} and of S ≈ {np.sqrt(0.1875 / (6 * n)):.3f}.", "",
        "| strategy | S MCQ acc | G_mcq vs uniform | G_mcq vs tuned | S sft_test | G_sft vs uniform | S raw_test | G_raw vs uniform | worst MCQ domain vs base | worst raw_test rise vs base | forgotten (z > 3) | tokens | train wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "## Setup", "",
        f"SFT per run: {s['steps']} steps x micro-batch {s['micro_batch']} x {s['grad_accum']} accumulation x packed seq_len {s['seq_len']} "
        f"(one process, ZeRO-3, AdamW lr {s['lr']} cosine, warmup {s['warmup']}); dynamic strategies re-weight every {s['eval_every']} steps on "
        f"sft_val ({s['heldout']} rows per domain); sampler block {s['block_size']} rows. sft_test: {s['test_rows']} rows per domain (chat "
        f"template, response tokens); raw_test: {s['raw_test']} passages per domain (≤ {s['raw_max_tokens']} tokens). MCQ: {n} items per domain, "
        f"fixed subset ({results['mcq_subset']}), log-likelihood, lm-eval cloze prompt, `acc`.", "",
        f"Probe ({s['probe_samples']} generations x {s['probe_new_tokens']} tokens): p = {dict(zip(qc.DOMAINS, (round(v, 3) for v in probe['p'])))}.",
        tuned_text, "",
        "| model | metric | " + " | ".join(qc.DOMAINS) + " |", "|---|---|" + "---|" * len(qc.DOMAINS), *per_domain, "",
        f"Wall times (s; machine shared, {s['parallel']} tasks at a time), total {total:.0f} s = {total / 3600:.1f} h of task time: "
        + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()) + ".", "",
        f"![per-domain MCQ, losses, weights]({name}.png)", "",
    ])
