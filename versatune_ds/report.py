"""PNG plots and a Markdown summary of a run directory (`versatune-ds report`; rank 0 only).

Reads what a run leaves behind (DESIGN.md §5), each file optional: config.yaml, probe/distribution.json,
mixture.json, metrics.jsonl. Writes into <run_dir>/report/:

- weights.png            mixture weights (shares) over steps: mixture.json stages, else metrics `mixture/<d>/weight`
- eval_loss.png          per-domain held-out loss over steps (metrics `eval/<d>/loss`)
- train_loss.png         training loss over steps (metrics `train/loss`)
- probe_distribution.png the probed distribution with its bootstrap CI
- summary.md             config highlights, the probe table, initial vs final weights, first vs last eval loss,
                         and the software of every start of the run (provenance.jsonl)

Plots use matplotlib's object API with the Agg canvas (no pyplot, so no global backend state).
A plot whose data is missing is skipped and the summary says so. Also called by `train` at the end.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import yaml

from versatune_ds.files import read_json_objects, write_bytes_atomic, write_text_atomic
from versatune_ds.probe.distribution import DISTRIBUTION_FILE, PROBE_DIR
from versatune_ds.provenance import read_starts

logger = logging.getLogger(__name__)

REPORT_DIR = "report"


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records that have a step; a torn last line (run still writing / crashed) is ignored."""
    return [record for record in read_json_objects(path) if isinstance(record.get("step"), (int, float))]


def metric_series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric key, sorted by step, non-finite values dropped."""
    points = sorted(
        (float(r["step"]), float(r[key])) for r in records
        if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))
    )
    return [s for s, _ in points], [v for _, v in points]


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("skipping %s: %s", path, exc)
        return None
    return value if isinstance(value, dict) else None


def _read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        logger.warning("skipping %s: %s", path, exc)
        return {}
    return value if isinstance(value, dict) else {}


def domain_names(config: dict, mixture_doc: dict | None, distribution: dict | None, records: list[dict]) -> list[str]:
    """The run's domains in id order, from the first source that has them."""
    for document in (mixture_doc, distribution):
        if document and isinstance(document.get("domains"), list):
            return [str(n) for n in document["domains"]]
    domains = (config.get("data") or {}).get("domains") or []
    names = [d["name"] if isinstance(d, dict) else str(d) for d in domains]
    if names:
        return names
    found: list[str] = []
    for record in records:
        for key in record:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] in ("eval", "mixture") and parts[1] not in found:
                found.append(parts[1])
    return found


def weight_series(names: list[str], mixture_doc: dict | None, records: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Per-domain (steps, weights): mixture.json's initial weights then each update, else the metrics log."""
    if mixture_doc and isinstance(mixture_doc.get("initial_weights"), dict):
        steps = [0.0]
        rows = [mixture_doc["initial_weights"]]
        for update in mixture_doc.get("updates", []):
            if isinstance(update.get("new_weights"), dict):
                steps.append(float(update["step"]))
                rows.append(update["new_weights"])
        # Weights hold until the next update: draw the last ones up to the last logged step.
        last_step = max((float(r["step"]) for r in records), default=steps[-1])
        if last_step > steps[-1]:
            steps.append(last_step)
            rows.append(rows[-1])
        return {n: (steps, [float(row.get(n, float("nan"))) for row in rows]) for n in names}
    return {n: metric_series(records, f"mixture/{n}/weight") for n in names}


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    # matplotlib is imported only when a plot is drawn: it adds about a second to the start-up of every rank that
    # imports the training loop, and only rank 0 draws, at the end.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=110)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _save(figure: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_bytes_atomic(path, buffer.getvalue())


def plot_lines(series: dict[str, tuple[list[float], list[float]]], path: Path, title: str, ylabel: str, *, steps: bool = False) -> Path | None:
    """One line per domain; `steps=True` draws weights as a step function (they hold until the next update)."""
    if not any(len(xs) for xs, _ in series.values()):
        return None
    figure, axes = _figure(title, "step", ylabel)
    for name, (xs, ys) in series.items():
        if not xs:
            continue
        if steps:
            axes.step(xs, ys, where="post", label=name, marker="o", markersize=3)
        else:
            axes.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3)
    axes.legend(fontsize="small", ncol=min(3, len(series)))
    return _save(figure, path)


def plot_distribution(distribution: dict, path: Path) -> Path:
    names = [str(n) for n in distribution["domains"]]
    p = [float(x) for x in distribution["p"]]
    low = [float(x) for x in distribution.get("ci_low", p)]
    high = [float(x) for x in distribution.get("ci_high", p)]
    figure, axes = _figure(f"probed knowledge distribution ({distribution.get('num_texts', '?')} generations)", "domain", "share")
    errors = [[max(v - lo, 0.0) for v, lo in zip(p, low)], [max(hi - v, 0.0) for v, hi in zip(p, high)]]
    axes.bar(names, p, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    for x, value in enumerate(p):
        axes.annotate(f"{value:.3f}", (x, value), textcoords="offset points", xytext=(8, 3), fontsize="small")
    return _save(figure, path)


def build_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write the plots and report/summary.md for a run directory; returns the summary's path."""
    run = Path(run_dir)
    out = run / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    config = _read_config(run)
    distribution = _read_json(run / PROBE_DIR / DISTRIBUTION_FILE)
    mixture_doc = _read_json(run / "mixture.json")
    records = read_metrics(run / "metrics.jsonl")
    names = domain_names(config, mixture_doc, distribution, records)

    images: dict[str, Path | None] = {
        "Mixture weights": plot_lines(weight_series(names, mixture_doc, records), out / "weights.png",
                                      "mixture weights over training", "share", steps=True),
        "Held-out loss per domain": plot_lines({n: metric_series(records, f"eval/{n}/loss") for n in names},
                                               out / "eval_loss.png", "held-out loss per domain", "loss"),
        "Training loss": plot_lines({"train": metric_series(records, "train/loss")}, out / "train_loss.png",
                                    "training loss", "loss"),
        "Probed distribution": plot_distribution(distribution, out / "probe_distribution.png") if distribution else None,
    }
    summary = out / "summary.md"
    text = render_summary(run, config, distribution, mixture_doc, records, names, images)
    write_text_atomic(summary, text)
    logger.info("report written to %s", out)
    return summary


def render_summary(run: Path, config: dict, distribution: dict | None, mixture_doc: dict | None,
                   records: list[dict], names: list[str], images: dict[str, Path | None]) -> str:
    lines = [f"# Run report: `{run}`", ""]
    lines += ["## Configuration", ""]
    highlights = [
        ("model", ("model", "path")), ("mixture strategy", ("mixture", "strategy")), ("mixture unit", ("mixture", "unit")),
        ("update rule", ("mixture", "rule")), ("η / smoothing / floor / max change", None), ("max steps", ("train", "max_steps")),
        ("learning rate", ("train", "learning_rate")), ("seq len", ("data", "seq_len")), ("eval every", ("eval", "every")),
        ("DeepSpeed config", ("deepspeed", "config")), ("seed", ("train", "seed")),
    ]
    mix = config.get("mixture") or {}
    for label, key in highlights:
        if key is None:
            value: Any = " / ".join(str(mix.get(k, "?")) for k in ("eta", "smoothing", "floor", "max_change")) if mix else None
        else:
            value = (config.get(key[0]) or {}).get(key[1])
        if value is not None:
            lines.append(f"- {label}: `{value}`")
    if not config:
        lines.append("(no config.yaml in the run directory)")
    lines += ["", f"Domains: {', '.join(names) if names else '(none found)'}", ""]

    lines += ["## Probed knowledge distribution", ""]
    if distribution:
        lines += [f"{distribution.get('num_texts', '?')} generations from start token `{distribution.get('start_token', '?')}`, "
                  f"estimator `{distribution.get('estimator', '?')}`.", "", "| domain | p | 95% CI |", "|---|---|---|"]
        for n, p, lo, hi in zip(distribution["domains"], distribution["p"], distribution.get("ci_low", distribution["p"]),
                                distribution.get("ci_high", distribution["p"])):
            lines.append(f"| {n} | {p:.3f} | [{lo:.3f}, {hi:.3f}] |")
    else:
        lines.append("No probe/distribution.json (the probe did not run, or mixture.distribution was given).")
    lines.append("")

    lines += ["## Mixture weights", ""]
    weights = weight_series(names, mixture_doc, records)
    if any(ys for _, ys in weights.values()):
        count = len((mixture_doc or {}).get("updates", [])) if mixture_doc else None
        if count is not None:
            lines += [f"{count} update(s) recorded in mixture.json.", ""]
        lines += ["| domain | initial | final |", "|---|---|---|"]
        for n in names:
            _, ys = weights[n]
            lines.append(f"| {n} | {_fmt(ys[0] if ys else None)} | {_fmt(ys[-1] if ys else None)} |")
    else:
        lines.append("No mixture.json or mixture weights in metrics.jsonl.")
    lines.append("")

    lines += ["## Held-out loss per domain (first vs last evaluation)", ""]
    losses = {n: metric_series(records, f"eval/{n}/loss") for n in names}
    errors = {n: dict(zip(*metric_series(records, f"eval/{n}/loss_se"))) for n in names}
    if any(ys for _, ys in losses.values()):
        lines += ["Each loss ± its standard error over the domain's held-out examples, where the run recorded one.", "",
                  "| domain | first (step) | last (step) | change |", "|---|---|---|---|"]
        for n in names:
            xs, ys = losses[n]
            if ys:
                first, last = (f"{y:.4f}" + (f" ± {errors[n][x]:.4f}" if x in errors[n] else "") for x, y in ((xs[0], ys[0]), (xs[-1], ys[-1])))
                lines.append(f"| {n} | {first} ({xs[0]:g}) | {last} ({xs[-1]:g}) | {ys[-1] - ys[0]:+.4f} |")
            else:
                lines.append(f"| {n} | - | - | - |")
    else:
        lines.append("No `eval/<domain>/loss` entries in metrics.jsonl.")
    train_steps, train_losses = metric_series(records, "train/loss")
    if train_losses:
        lines += ["", f"Training loss: {train_losses[0]:.4f} at step {train_steps[0]:g} -> {train_losses[-1]:.4f} at step {train_steps[-1]:g}."]
    lines += ["", *software_section(read_starts(run))]
    lines += ["## Plots", ""]
    for title, path in images.items():
        lines.append(f"### {title}\n\n![{title}]({path.name})\n" if path else f"### {title}\n\n(no data)\n")
    return "\n".join(lines) + "\n"


def software_section(starts: list[dict]) -> list[str]:
    """One table row per start of `train` (provenance.jsonl): what made each segment of the run."""
    lines = ["## Software of each start (provenance.jsonl)", ""]
    if not starts:
        return lines + ["No provenance.jsonl (a run made before versatune-ds recorded it).", ""]
    lines += ["| started | resumed from | ranks | versatune-ds | torch | deepspeed | transformers | host | Slurm job |",
              "|---|---|---|---|---|---|---|---|---|"]
    for start in starts:
        source = start.get("source") if isinstance(start.get("source"), dict) else None
        version = str(start.get("versatune_ds", "?"))
        if source:
            version += f" ({str(source.get('commit', '?'))[:10]}{', uncommitted changes' if source.get('dirty') else ''})"
        resumed = Path(start["resumed_from"]).name if start.get("resumed_from") else "fresh start"
        cells = [start.get("started_at"), resumed, start.get("world_size"), version, start.get("torch"), start.get("deepspeed"),
                 start.get("transformers"), start.get("host"), start.get("slurm_job_id")]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return lines + [""]


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"
