"""How long a stop signal takes to become a checkpoint and an exit (the budget `--signal=B:USR1@<s>` must cover).

    PYTHONPATH=. .venv/bin/python bench/stop_latency.py [--repeats 3] [--max-steps 400]

Runs `launchers/torchrun.sh` (2 CPU ranks, ZeRO-3, the tiny test model on data/sample), sends SIGTERM to the
launcher script once 20 steps are logged, and records the seconds until the script exits with 75, split into
"signal -> checkpoint complete" (the `latest` pointer moves) and "checkpoint -> exit", the step it stopped
at and the checkpoint's size (that the rerun resumes exactly is what tests/test_launchers.py checks).
For a real model the checkpoint write dominates: scale by your checkpoint size and file system speed.

Writes bench/results/stop_latency.json and bench/results/stop_latency.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, machine_info, versions, write_results  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from conftest import TOKENIZER_TEXTS  # noqa: E402
from dist_helpers import write_run_config  # noqa: E402

from versatune_ds.tiny_model import build_tiny_model_dir  # noqa: E402


def launcher_env(config: Path, run_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_"))}
    bin_dir = str(Path(sys.executable).parent)
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "PYTHON": sys.executable, "CONFIG": str(config), "RUN_DIR": str(run_dir),
            "DEVICE": "cpu", "NPROC": "2", "PYTHONPATH": str(REPO)}


def logged_steps(run_dir: Path) -> int:
    try:
        return sum('"train/loss"' in line for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def one_stop(folder: Path, model_dir: Path, max_steps: int) -> dict:
    run_dir = folder / "run"
    config = write_run_config(folder / "cfg", model_dir, run_dir, train={"max_steps": max_steps, "log_every": 50},
                              checkpoint={"every": 100000}, eval={"every": 100000}, export={"at_end": False})
    env = launcher_env(config, run_dir)
    argv = ["bash", str(REPO / "launchers" / "torchrun.sh"), "dist.timeout_s=120"]
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while logged_steps(run_dir) < 20:
            if proc.poll() is not None:
                raise SystemExit(f"the run ended before the signal (exit {proc.returncode}); see {run_dir / 'logs'}")
            time.sleep(0.02)
        latest = run_dir / "checkpoints" / "latest"
        signalled = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        while not latest.exists() and proc.poll() is None:
            time.sleep(0.005)
        checkpointed = time.perf_counter()
        code = proc.wait(timeout=600)
        exited = time.perf_counter()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    step = int(latest.read_text().split("_")[1])
    size = sum(p.stat().st_size for p in (run_dir / "checkpoints").rglob("*") if p.is_file())
    shutil.rmtree(folder, ignore_errors=True)
    return {"exit_code": code, "stop_step": step, "signal_to_checkpoint_s": round(checkpointed - signalled, 2),
            "checkpoint_to_exit_s": round(exited - checkpointed, 2), "signal_to_exit_s": round(exited - signalled, 2),
            "checkpoint_mib": round(size / 2**20, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=400)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model_dir(Path(tmp) / "model", TOKENIZER_TEXTS, seed=0)
        for repeat in range(args.repeats):
            row = one_stop(Path(tmp) / f"r{repeat}", model_dir, args.max_steps)
            print(json.dumps(row))
            rows.append(row)
    document = {"rows": rows, "machine": machine_info(), "versions": versions()}
    lines = [
        "# Stop signal -> checkpoint -> exit",
        "",
        f"`PYTHONPATH=. .venv/bin/python bench/stop_latency.py --repeats {args.repeats} --max-steps {args.max_steps}` "
        f"(load average at the end: {document['machine']['load_avg_at_end']}).",
        "SIGTERM to `launchers/torchrun.sh` (2 CPU ranks, ZeRO-3, tiny model) after 20 steps; the ranks agree at the next",
        "step boundary inside the step's token all_reduce (no extra collective), save, and exit 75.",
        "",
        "| run | exit | stopped at step | signal -> checkpoint s | checkpoint -> exit s | signal -> exit s | checkpoint MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {i + 1} | {r['exit_code']} | {r['stop_step']} | {r['signal_to_checkpoint_s']} | {r['checkpoint_to_exit_s']} | "
              f"{r['signal_to_exit_s']} | {r['checkpoint_mib']} |" for i, r in enumerate(rows)]
    write_results("stop_latency", document, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
