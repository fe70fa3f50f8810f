"""One training step before and after the performance work, profiled side by side (bench/profile_step.py at both).

    python bench/get_smollm2.py --out runs/smollm2
    python bench/profile_compare.py [--before db988cf] [--models tiny smollm2] [--warmup 3] [--profile-steps 2]

`--before` (default: the commit before the chunked loss, padding-free batches and the fused AdamW) is unpacked
with `git archive` into bench/out/profile_compare/before and its own bench/profile_step.py is run there, on this
checkout's model folders and data; then this checkout's profile_step runs on the same rows (each commit's own
sampler draws the batches). Results: bench/results/profile_compare.{json,md}. A measurement: quiet machine.

Row names are profile_step's. One difference in what a row holds: before, "loss (cross-entropy)" is the cross-entropy
over full logits and the output layer is its own row; after, "loss" holds the chunked loss (output-layer matmuls,
cross-entropy and their gradients at the loss positions), so the output-layer rows are near zero.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from common import DATA, OUT, REPO, machine_info, versions, write_results  # noqa: E402

BEFORE_COMMIT = "db988cf"  # main before the chunked loss (issue 14), padding-free batches and the fused AdamW (issue 13)
WORK = OUT / "profile_compare"


def profile_command(script: Path, args: argparse.Namespace, results_name: str) -> list[str]:
    """The same profile_step invocation for both trees: models, window, data and model folders."""
    return [sys.executable, str(script), "--models", *args.models, "--warmup", str(args.warmup),
            "--profile-steps", str(args.profile_steps), "--data-dir", args.data_dir, "--tiny-dir", args.tiny_dir,
            "--smollm2-dir", args.smollm2_dir, "--results-name", results_name]


def run_before(commit: str, args: argparse.Namespace) -> dict:
    """profile_step.py of `commit`, unpacked under bench/out, on this checkout's models and data."""
    tree = WORK / "before"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    cmd = profile_command(tree / "bench" / "profile_step.py", args, "profile_before")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with open(WORK / "before.log", "w", encoding="utf-8") as log:
        code = subprocess.run(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"the profile at {commit} failed (exit {code}); log {WORK / 'before.log'}")
    return json.loads((tree / "bench" / "results" / "profile_before.json").read_text())


def run_after(args: argparse.Namespace) -> dict:
    """This checkout's profile_step, the same way (its results go to bench/out, not bench/results)."""
    cmd = profile_command(REPO / "bench" / "profile_step.py", args, "profile_compare_after")
    with open(WORK / "after.log", "w", encoding="utf-8") as log:
        code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"the profile of this checkout failed (exit {code}); log {WORK / 'after.log'}")
    results = REPO / "bench" / "results"
    document = json.loads((results / "profile_compare_after.json").read_text())
    for suffix in (".json", ".md"):  # a part of this comparison, not a result of its own
        shutil.move(str(results / f"profile_compare_after{suffix}"), str(WORK / f"after{suffix}"))
    return document


def markdown(doc: dict) -> str:
    lines = ["# One training step before and after the performance work", "",
             f"bench/profile_step.py at `{doc['before_commit']}` (before) and at this checkout (after) on the same selected "
             f"rows, seq_len {doc['setup']['seq_len']}, micro-batch {doc['setup']['micro_batch_size']} per rank, 2 ranks x 1 "
             "thread, gloo, fp32, ZeRO-3 (`ds_configs/zero3.json`). Each commit's own sampler draws the batches, and the "
             "sampler changed in between, so the steps compared hold different rows (with their own token counts): a "
             "single row of the table moves with that, and the profiled window is short. Rank 0's self time per step by "
             "range; 'step' = wall time per step without the profiler (the warm-up steps) and with it (the profiled "
             "window). bench/peer_throughput.py is the steadier throughput figure.", ""]
    for name in doc["models"]:
        before, after = doc["models"][name]["before"], doc["models"][name]["after"]
        sb, sa = before["unprofiled_wall_s_per_step"], after["unprofiled_wall_s_per_step"]
        pb, pa = before["profiled_wall_s_per_step"], after["profiled_wall_s_per_step"]
        lines += [f"## {name}", "",
                  f"Step without the profiler: {1e3 * sb:.0f} ms → {1e3 * sa:.0f} ms (**{sb / sa:.2f}×**); "
                  f"profiled: {1e3 * pb:.0f} ms → {1e3 * pa:.0f} ms ({pb / pa:.2f}×).", "",
                  "| where | before ms / step | after ms / step | after − before |", "|---|---|---|---|"]
        after_rows = {r["what"]: r["ms_per_step"] for r in after["rows"]}
        names = [r["what"] for r in before["rows"]] + [w for w in after_rows if w not in {r["what"] for r in before["rows"]}]
        before_rows = {r["what"]: r["ms_per_step"] for r in before["rows"]}
        threshold = 0.002 * 1e3 * pb  # rows under 0.2 % of the step in both are left out
        for what in names:
            b, a = before_rows.get(what, 0.0), after_rows.get(what, 0.0)
            if max(a, b) >= threshold:
                lines.append(f"| {what} | {b:.1f} | {a:.1f} | {a - b:+.1f} |")
        lines.append("")
    lines += [f"Load average (1 min) at the end: {doc['load_avg_after']:.1f}; machine: {doc['machine']['nproc']} CPUs. "
              f"Versions: {json.dumps(doc['versions'])}.", "", f"Command: `{doc['command']}`"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE_COMMIT, help="the commit to compare with")
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--data-dir", default=str(DATA / "sft" if (DATA / "sft").is_dir() else REPO / "data" / "sample"))
    parser.add_argument("--tiny-dir", default=str(REPO / "runs" / "tiny-model"))
    parser.add_argument("--smollm2-dir", default=str(REPO / "runs" / "smollm2"))
    args = parser.parse_args()
    for option in ("data_dir", "tiny_dir", "smollm2_dir"):  # the archived tree runs elsewhere: absolute paths
        setattr(args, option, str(Path(getattr(args, option)).resolve()))
    WORK.mkdir(parents=True, exist_ok=True)
    before = run_before(args.before, args)
    after = run_after(args)
    doc = {"before_commit": args.before, "setup": after["setup"], "command": "python bench/profile_compare.py " + " ".join(sys.argv[1:]),
           "models": {name: {"before": before["models"][name]["ranks"][0], "after": after["models"][name]["ranks"][0]}
                      for name in args.models},
           "load_avg_after": os.getloadavg()[0], "machine": machine_info(), "versions": versions()}
    write_results("profile_compare", doc, markdown(doc))
    for name in args.models:
        b, a = doc["models"][name]["before"], doc["models"][name]["after"]
        print(f"{name}: {b['unprofiled_wall_s_per_step']:.3f} s -> {a['unprofiled_wall_s_per_step']:.3f} s per step", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
