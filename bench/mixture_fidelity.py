"""Mixture fidelity: the shares a run's model saw, per domain, against the shares its weights asked for.

For each case, a real 2-rank run (torchrun, gloo, ZeRO-3) with `train.trace_samples=true` records every row
each rank trained on; the global order is rank 0's rows then rank 1's, step by step. Against the schedule in
the run's last checkpoint (the weights in force at every position, stage by stage, as broadcast by rank 0)
this script measures, per domain:

- intended vs realised share at the end: of tokens (mixture.unit tokens: the sampler apportions tokens) or
  of examples (mixture.unit examples, data.packing false: one example per row, the sampler's item rule);
- the largest error over every prefix of the order, R − T ("ahead") and T − R ("behind"), in rows or
  tokens, T = Σ over positions of (weight in force) × (the row's size), R what the domain got;
- the longest stretch of rows without the domain, against ⌈1/q⌉ and ⌈2/q⌉ (q: its smallest row share in
  force; for token shares the row share implied by the mean row length): apportion.py proves ⌈2/w⌉ for
  constant item weights and shows ⌈1/w⌉ impossible in general;
- whether a domain whose weight was at or above the floor got no row at all.

Cases: the tiny model on data/sample (configs/sample_tiny.yaml) and SmolLM2-135M-Instruct on ../shared/data
(configs/shared_data_smollm2.yaml with data.truncation=truncate, block_size 16 as in bench/quality_smollm2.py,
so weight updates take effect inside a short run, an evaluation every steps/3, and its global batch of 16 rows
in micro-batches of 1: the same order, less memory), each with mixture.unit=tokens (packed rows) and mixture.unit=examples
(data.packing=false). All use the probed SmolLM2 distribution recorded in bench/results/quality_smollm2.json
(finance 0.024, just above the 0.02 floor: the domain per-block rounding starved) as mixture.distribution.

    PYTHONPATH=. .venv/bin/python bench/mixture_fidelity.py [--models tiny smollm2] [--tiny-steps 60] [--smollm2-steps 12]

Smoke test: `--models tiny --tiny-steps 16 --out /tmp/fidelity`. SmolLM2 needs runs/smollm2 (bench/get_smollm2.py)
and takes ~10 s per step on the 2-core CPU. Writes bench/results/mixture_fidelity.{json,md}; runs under
bench/out/mixture_fidelity (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import numpy as np
from common import OUT, REPO, RESULTS, cpu_env, machine_info, read_jsonl, run_logged, smollm2_config, versions, write_results  # noqa: E402

DOMAINS = ("law", "medicine", "finance", "science", "code", "general")
logger = logging.getLogger("mixture_fidelity")


def distribution_file(work: Path) -> Path:
    """The probed SmolLM2 distribution (bench/results/quality_smollm2.json), else a fixed one with a small weight."""
    recorded = RESULTS / "quality_smollm2.json"
    p = json.loads(recorded.read_text())["probe"]["p"] if recorded.is_file() else [0.064, 0.040, 0.024, 0.062, 0.054, 0.756]
    path = work / "distribution.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"domains": list(DOMAINS), "p": p}))
    return path


def cases(args: argparse.Namespace) -> list[dict]:
    out = []
    if "tiny" in args.models:
        for unit in ("tokens", "examples"):
            out.append({"name": f"tiny_{unit}", "config": REPO / "configs" / "sample_tiny.yaml", "unit": unit,
                        "overrides": [f"train.max_steps={args.tiny_steps}", f"model.path={args.tiny_model}"]})
    if "smollm2" in args.models:
        for unit in ("tokens", "examples"):
            out.append({"name": f"smollm2_{unit}", "config": smollm2_config(args.work, args.smollm2), "unit": unit,
                        # The config's global batch (16 rows) in micro-batches of 1: the same sample order, a fraction of
                        # the memory (its micro-batch 4 x 512 tokens took ~10 GB per rank on CPU).
                        "overrides": [f"train.max_steps={args.smollm2_steps}", "mixture.block_size=16", "train.micro_batch_size=1",
                                      "train.gradient_accumulation_steps=8", "eval.micro_batch_size=2",
                                      f"eval.every={max(1, args.smollm2_steps // 3)}"]})
    return out


def train(case: dict, work: Path, distribution: Path, port: int) -> Path:
    run_dir = work / case["name"]
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [*case["overrides"], f"train.run_dir={run_dir}", "train.trace_samples=true", f"mixture.unit={case['unit']}",
                 f"mixture.distribution={distribution}", "export.at_end=false", f"dist.master_port={port}",
                 f"data.packing={'true' if case['unit'] == 'tokens' else 'false'}", "checkpoint.every=100000"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "versatune_ds",
               "train", "--config", str(case["config"]), *overrides]
    logger.info("training %s: %s", case["name"], " ".join(command[5:]))
    case["seconds"] = run_logged(command, work / "logs" / f"{case['name']}.log", env=cpu_env(1))
    case["command"] = "torchrun --standalone --nproc_per_node=2 -m versatune_ds " + " ".join(command[7:])
    return run_dir


def global_order(run_dir: Path) -> np.ndarray:
    """[n, 3] (domain, row index, examples in the row) in global order: per step, rank 0's rows then rank 1's."""
    traces = [read_jsonl(run_dir / "trace" / f"rank{r}.jsonl") for r in (0, 1)]
    assert len(traces[0]) == len(traces[1]), "the ranks traced different numbers of steps"
    rows = []
    for step0, step1 in zip(*traces):
        assert step0["step"] == step1["step"]
        rows += [(d, i, len(ex)) for d, i, ex in step0["rows"] + step1["rows"]]
    return np.asarray(rows, dtype=np.int64)


def analyse(run_dir: Path) -> dict:
    from versatune_ds.config.loading import load_config
    from versatune_ds.data.prepare import prepare_data
    from versatune_ds.data.tokenizer import load_tokenizer
    from versatune_ds.engine.checkpoint import find_latest, read_state
    from versatune_ds.mixture.apportion import MixtureSchedule

    cfg = load_config(run_dir / "config.yaml")
    data = prepare_data(cfg.data, load_tokenizer(cfg.model))  # the run's cache: no tokenizing
    state = read_state(find_latest(run_dir))["sampler"]
    schedule, block = MixtureSchedule.from_json(state["schedule"]), int(state["block_size"])
    order = global_order(run_dir)
    n, num_domains = len(order), len(data.per_domain)
    domains = order[:, 0]
    tokens = np.asarray([data.per_domain[d].train_rows[i].num_tokens for d, i, _ in order], dtype=np.float64)
    size = {"tokens": tokens, "examples": order[:, 2].astype(np.float64)}[cfg.mixture.unit]
    stage_weights = np.stack([np.asarray(s.weights) / np.sum(s.weights) for s in schedule.stages])
    stage_of = np.searchsorted(schedule.start_blocks(), np.arange(n) // block, side="right") - 1
    weights = stage_weights[stage_of]  # [n, D]: the weights in force at each position
    one_hot = np.zeros((n, num_domains))
    one_hot[np.arange(n), domains] = 1.0
    target = np.vstack([np.zeros(num_domains), np.cumsum(weights * size[:, None], axis=0)])
    got = np.vstack([np.zeros(num_domains), np.cumsum(one_hot * size[:, None], axis=0)])
    error = got - target
    mean_size = np.asarray([np.mean([r.num_tokens if cfg.mixture.unit == "tokens" else len(r.example_indices)
                                     for r in d.train_rows]) for d in data.per_domain])
    row_share = stage_weights / mean_size
    row_share /= row_share.sum(axis=1, keepdims=True)  # per stage: the long-run share of rows
    used = np.unique(stage_of)
    per_domain = []
    for d in range(num_domains):
        positions = np.concatenate([[-1], np.flatnonzero(domains == d), [n]])
        smallest_q = float(row_share[used, d].min())
        per_domain.append({
            "domain": data.domains.name_of(d),
            "weights": [round(float(w), 4) for w in stage_weights[used, d]],
            "intended_share": float(target[-1, d] / target[-1].sum()),
            "realised_share": float(got[-1, d] / got[-1].sum()),
            "rows": int(np.sum(domains == d)),
            "row_share": float(np.mean(domains == d)),
            "max_ahead": float(error[:, d].max()),
            "max_behind": float(-error[:, d].min()),
            "longest_row": float(size[domains == d].max()) if np.any(domains == d) else 0.0,
            "longest_gap_rows": int(np.max(np.diff(positions)) - 1),
            "window_1_over_q": math.ceil(1 / smallest_q) if smallest_q > 0 else None,
            "window_2_over_q": math.ceil(2 / smallest_q) if smallest_q > 0 else None,
            "at_or_above_floor": bool(stage_weights[used, d].max() >= cfg.mixture.floor - 1e-12),
        })
    return {
        "unit": cfg.mixture.unit, "sampler_unit": state["unit"], "block_size": block, "rows": n, "steps": len(read_jsonl(run_dir / "trace" / "rank0.jsonl")),
        "stages": [{"start_block": s.start_block, "weights": list(s.weights)} for s in schedule.stages],
        "stages_in_run": int(used.size), "floor": cfg.mixture.floor, "domains": per_domain,
        "zero_row_domains_at_or_above_floor": [p["domain"] for p in per_domain if p["at_or_above_floor"] and p["rows"] == 0],
        "max_abs_share_error_pct": 100 * max(abs(p["realised_share"] - p["intended_share"]) for p in per_domain),
    }


def markdown(results: dict) -> str:
    lines = ["# Mixture fidelity (bench/mixture_fidelity.py)", "",
             f"Command: `{results['command']}`", "",
             "Real 2-rank runs (torchrun, gloo, ZeRO-3, CPU) with `train.trace_samples=true`; the global order is read back "
             "from the traces and compared with the schedule in the run's last checkpoint (every stage's weights, from the "
             "block it starts at). Share = of tokens (unit tokens, packed rows) or of examples (unit examples, one example "
             "per row: the sampler's item rule). Ahead / behind: the largest R − T and T − R over every prefix of the "
             "order, in tokens or rows (the bounds: items R − T < 1 always and |R − T| < 1 inside a stage that starts with at "
             "most one domain ahead; tokens R − T < the domain's last row, T − R < its next row + w·(longest other row − 1) "
             "under constant weights; mixture/apportion.py). Longest gap: most consecutive rows without the domain, against "
             "⌈1/q⌉ and ⌈2/q⌉ for its smallest row share q in force (proved: ⌈2/w⌉ under constant item weights; ⌈1/w⌉ is not "
             "achievable in general).", "",
             f"Load average at the end: {results['machine'].get('load_avg_at_end')}.", ""]
    for case in results["cases"]:
        a = case["analysis"]
        lines += [f"## {case['name']}: {a['rows']} rows ({a['steps']} steps), unit {a['unit']} (sampler: {a['sampler_unit']}), "
                  f"block {a['block_size']}, {a['stages_in_run']} stage(s) in force", "",
                  f"`{case['command']}` ({case['seconds']:.0f} s)", "",
                  f"Largest |realised − intended| share: **{a['max_abs_share_error_pct']:.3f} points**; domains at or above the "
                  f"floor ({a['floor']}) with no row: **{', '.join(a['zero_row_domains_at_or_above_floor']) or 'none'}**.", "",
                  "| domain | weights in force | intended share | realised share | rows | max ahead | max behind | longest row | "
                  "longest gap (rows) | ⌈1/q⌉ | ⌈2/q⌉ |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p in a["domains"]:
            lines.append(
                f"| {p['domain']} | {' → '.join(f'{w:.3f}' for w in p['weights'])} | {p['intended_share']:.4f} | "
                f"{p['realised_share']:.4f} | {p['rows']} | {p['max_ahead']:.2f} | {p['max_behind']:.2f} | {p['longest_row']:.0f} | "
                f"{p['longest_gap_rows']} | {p['window_1_over_q']} | {p['window_2_over_q']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--tiny-steps", type=int, default=60)
    parser.add_argument("--smollm2-steps", type=int, default=12)
    parser.add_argument("--tiny-model", default=str(REPO / "runs" / "tiny-model"))
    parser.add_argument("--smollm2", default=str(REPO / "runs" / "smollm2"))
    parser.add_argument("--work", type=Path, default=OUT / "mixture_fidelity")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--port", type=int, default=29680)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    distribution = distribution_file(args.work)
    results: dict = {"command": "PYTHONPATH=. .venv/bin/python bench/mixture_fidelity.py " + " ".join(sys.argv[1:]), "cases": []}
    for index, case in enumerate(cases(args)):
        run_dir = train(case, args.work, distribution, args.port + index)
        case["analysis"] = analyse(run_dir)
        logger.info("%s: largest share error %.3f points", case["name"], case["analysis"]["max_abs_share_error_pct"])
        results["cases"].append({k: (str(v) if isinstance(v, Path) else v) for k, v in case.items()})
    results.update(machine=machine_info(), versions=versions(), distribution=json.loads(distribution.read_text()))
    write_results("mixture_fidelity", results, markdown(results), folder=args.out)
    print((args.out / "mixture_fidelity.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
