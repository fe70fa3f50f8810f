"""The controlled base of the quality benchmarks: pretrained until it knows its domains, and what that cost.

Builds (or resumes, or reuses) the base of bench/quality_common.py -- data splits, tokenizer, a small Llama
pretrained by bench/base_pretrain.py on the known skew until every domain's held-out raw-text loss is within
5 % of its fitted plateau, then a short decay -- scores it per item on the four held-out sets, and writes
bench/results/<name>.{json,md} and <name>.png (the per-domain curves).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/tiny_base.py            # hours on 2 busy cores; resumable
    OMP_NUM_THREADS=1 .venv/bin/python bench/tiny_base.py --work-dir /tmp/b --max-steps 10 --eval-every 5 --min-steps 10 \\
        --raw-val 10 --raw-test 15 --sft-val 8 --sft-test 15 --sft-train 100 --results-name tiny_base_smoke   # a smoke base

bench/quality_tiny.py and bench/expansion.py call the same `ensure_base` with the default settings, so they reuse
what this command built (bench/out/tiny_base); killing it loses at most one evaluation interval.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import base_pretrain  # noqa: E402
import quality_common as qc  # noqa: E402
from common import write_results  # noqa: E402


def settings_from_args(args: argparse.Namespace) -> qc.BaseSettings:
    defaults = qc.BaseSettings()
    pretrain = dataclasses.replace(defaults.pretrain, **{k: v for k, v in (
        ("max_steps", args.max_steps), ("min_steps", args.min_steps), ("eval_every", args.eval_every)) if v is not None})
    sizes = (("hidden", args.hidden), ("layers", args.layers), ("raw_val_per_domain", args.raw_val), ("raw_test_per_domain", args.raw_test),
             ("sft_val_per_domain", args.sft_val), ("sft_test_per_domain", args.sft_test), ("sft_train_per_domain", args.sft_train))
    return dataclasses.replace(defaults, pretrain=pretrain, **{k: v for k, v in sizes if v is not None})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=str(qc.OUT / "tiny_base"))
    parser.add_argument("--max-steps", type=int, default=None, help="budget cap (default: BaseSettings)")
    parser.add_argument("--min-steps", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    for flag in ("raw-val", "raw-test", "sft-val", "sft-test", "sft-train"):
        parser.add_argument(f"--{flag}", type=int, default=None, help="split size per domain (default: BaseSettings; smaller for smoke tests)")
    parser.add_argument("--results-name", default="tiny_base")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not (qc.DATA / "sft").is_dir():
        print(f"tiny_base: skipped, the data bundle is not at {qc.DATA} (set VERSATUNE_SHARED_DATA)")
        return 0
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    settings = settings_from_args(args)
    base = qc.ensure_base(Path(args.work_dir).resolve(), settings)
    before = qc.ensure_base_eval(base)
    record = base.info["pretraining"]
    out = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python bench/tiny_base.py " + " ".join(sys.argv[1:]),
        "machine": qc.machine_info(), "versions": qc.versions(), "seed": settings.seed,
        "settings": base.info["settings"], "parameters": base.info["parameters"], "truth": base.info["truth"], "split": base.info["split"],
        "pretraining": {k: v for k, v in record.items() if k != "evals"}, "curve": record["evals"],
        "base_scores": {name: {d: {k: before[name][d][k] for k in ("loss", "se", "tokens", "items")} for d in qc.DOMAINS}
                        for name in qc.EVAL_SETS},
        "wall_seconds_this_invocation": time.perf_counter() - started,
    }
    qc.RESULTS.mkdir(parents=True, exist_ok=True)
    base_pretrain.plot_curves(record, qc.DOMAINS, base.info["truth"], qc.RESULTS / f"{args.results_name}.png")
    write_results(args.results_name, out, markdown(out, args.results_name))
    return 0


def pace_text(curve: list[dict]) -> str:
    """Seconds per step over each evaluation interval: the budget above depends on the machine's load, so give its range."""
    paces = [(b["seconds"] - a["seconds"]) / (b["step"] - a["step"]) for a, b in zip(curve, curve[1:])
             if b["step"] > a["step"] and b["seconds"] > a["seconds"]]
    if not paces:
        return ""
    paces.sort()
    total = curve[-1]["step"]
    return (f"Pace per evaluation interval: median {paces[len(paces) // 2]:.2f} s/step, fastest {paces[0]:.2f}, slowest {paces[-1]:.2f} "
            f"(the load varied); at the fastest pace the whole budget is {total * paces[0] / 60:.0f} min.")


def markdown(out: dict, name: str) -> str:
    record, curve, s = out["pretraining"], out["curve"], out["settings"]
    p = s["pretrain"]
    names = qc.DOMAINS
    first = next(e for e in curve if e["step"] > 0)
    at_rule = next((e for e in curve if e["step"] == (record.get("cooldown") or [None])[0]), None)
    last = curve[-1]
    rows = []
    for d, domain in enumerate(names):
        gain = f"{at_rule['doubling_gain'][d] * 100:.1f} %" if at_rule is not None and "doubling_gain" in at_rule else "n/a"
        gap = f"{at_rule['gap'][d] * 100:.1f} % / {gain}" if at_rule is not None and "gap" in at_rule else "n/a"
        plateau = f"{at_rule['plateau'][d]:.3f}" if at_rule is not None and "plateau" in at_rule else "n/a"
        rows.append(f"| {domain} | {out['truth'][domain]:.2f} | {first['loss'][d]:.3f} | "
                    f"{at_rule['loss'][d] if at_rule else float('nan'):.3f} | {plateau} | {gap} | {last['loss'][d]:.3f} ± {last['se'][d]:.3f} | "
                    f"{out['base_scores']['raw_test'][domain]['loss']:.3f} ± {out['base_scores']['raw_test'][domain]['se']:.3f} | "
                    f"{out['base_scores']['sft_test'][domain]['loss']:.3f} ± {out['base_scores']['sft_test'][domain]['se']:.3f} |")
    plateau_at = record.get("plateau_step") or {}
    loads = [e["load_avg"][1] for e in curve if e.get("load_avg")]
    m = out["machine"]
    reason = {"plateau": "every domain within 5 % of its plateau", "budget": "step budget spent BEFORE every domain reached 5 %"}
    return f"""# The controlled tiny base ({name})

Command: `{out['command']}` on {m['nproc']} CPU cores ({m['platform']}), shared with other work: 5-minute load average
{min(loads):.1f}–{max(loads):.1f} during pretraining (median {sorted(loads)[len(loads) // 2]:.1f}); versions {out['versions']}; seed {out['seed']}.

**Model**: Llama, hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads, vocab {s['vocab']} (byte-level BPE on all raw + sft text),
{out['parameters'] / 1e6:.2f} M parameters. **Data**: BOS + document + EOS packed into {p['seq_len']}-token rows (block-diagonal
attention), documents drawn with the known shares below from the raw/ passages outside raw_val/raw_test plus the sft/ rows outside the
SFT splits (`simple`-template text). **Schedule**: AdamW (β 0.9/0.95, weight decay {p['weight_decay']}), {p['batch_rows']} rows x {p['seq_len']}
tokens per step, warmup {p['warmup_steps']} steps to lr {p['lr']}, constant, then a linear decay to 0 over {p['cooldown_fraction']:.0%} of the steps so far.

**Plateau rule** (bench/base_pretrain.py): every {p['eval_every']} steps the raw_val loss of each domain ({s['raw_val_per_domain']} passages
never trained on) is measured; the plateau is the asymptote c of L(t) = c + a·t^(−α) fitted per domain to every evaluation after the
warmup (or the lowest loss once the curve rises); the decay starts when, for every domain, (latest − plateau)/plateau ≤ {p['tolerance']:.0%}
**and** the measured gain over the last doubling of steps is ≤ {base_pretrain.doubling_bound(p['tolerance']):.2%} (≤ 5 % left under a power
law with exponent ≥ {base_pretrain.MIN_EXPONENT}), after at least {p['min_steps']} steps (cap {p['max_steps']}).

**Budget on this machine**: the rule fired at step {plateau_at.get('step')} ({plateau_at.get('tokens', 0) / 1e6:.1f} M tokens,
{plateau_at.get('seconds', 0) / 3600:.2f} h) — reason: {reason.get(record.get('stop_reason'), record.get('stop_reason'))};
with the decay: **{record['step']} steps, {record['tokens'] / 1e6:.1f} M tokens, {record['seconds'] / 3600:.2f} h** of wall time
({record['sessions']} session(s): killed and resumed runs add up). {pace_text(curve)}

| domain | share (truth) | raw_val loss, first eval (step {first['step']}) | at the rule | fitted plateau | gap / doubling gain at the rule | after the decay (± SE) | base raw_test loss ± SE | base sft_test loss ± SE |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

SE: standard error over passages / rows (ratio estimator, versatune_ds.eval.stats.ratio_mean_se). raw_test: {s['raw_test_per_domain']}
passages per domain; sft_test: {s['sft_test_per_domain']} rows per domain (response tokens only).

![per-domain held-out raw-text loss during pretraining]({name}.png)
"""


if __name__ == "__main__":
    raise SystemExit(main())
