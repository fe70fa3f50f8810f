"""What every benchmark shares: paths, the CLI job runner, the results writer, machine and version records.

    REPO, RESULTS, OUT, DATA, CLI              paths (DATA honours VERSATUNE_SHARED_DATA)
    Job(name, args, log, threads) ; run_jobs(jobs, parallel) -> {name: seconds}
                                               `versatune-ds` subprocesses, N at a time, one log each
    run_logged(cmd, log, env=None) -> seconds  any one command, output to a log; a failure names the log
    write_results(name, document, markdown)    bench/results/<name>.json and .md, written atomically
    read_jsonl(path) ; machine_info() ; versions()

Benchmarks print and record numbers; they never assert timings. Every results document carries the
machine, its load and the versions, so a figure can be traced to where and how it was measured.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
OUT = REPO / "bench" / "out"
DATA = Path(os.environ.get("VERSATUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
CLI = [sys.executable, "-m", "versatune_ds"]

logger = logging.getLogger("bench")


def cpu_env(threads: int = 1) -> dict[str, str]:
    """The environment of a CPU job: `threads` BLAS threads per process, the CPU accelerator, no port inherited."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    env.pop("MASTER_PORT", None)  # each job sets dist.master_port itself (parallel single-process runs)
    return env


@dataclass(frozen=True)
class Job:
    name: str
    args: tuple[str, ...]  # after `versatune-ds`
    log: Path
    threads: int = 1


def _failure(name: str, code: int, log: Path) -> SystemExit:
    tail = log.read_text(errors="replace").splitlines()[-20:] if log.is_file() else []
    return SystemExit(f"{name} failed (exit {code}); log {log}:\n" + "\n".join(tail))


def run_jobs(jobs: Sequence[Job], parallel: int) -> dict[str, float]:
    """Run CLI jobs, `parallel` at a time; wall seconds per job. A failing job stops the benchmark (log named)."""
    pending = list(jobs)
    running: list[tuple[Job, subprocess.Popen, float, Any]] = []
    seconds: dict[str, float] = {}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            handle = open(job.log, "w", encoding="utf-8")  # noqa: SIM115 (closed when the job ends)
            process = subprocess.Popen(CLI + list(job.args), stdout=handle, stderr=subprocess.STDOUT, env=cpu_env(job.threads), cwd=REPO)
            running.append((job, process, time.perf_counter(), handle))
            logger.info("started %s", job.name)
        time.sleep(1.0)
        for item in list(running):
            job, process, start, handle = item
            if process.poll() is None:
                continue
            handle.close()
            running.remove(item)
            if process.returncode != 0:
                for _, other, _, _ in running:
                    other.kill()
                raise _failure(f"job {job.name}", process.returncode, job.log)
            seconds[job.name] = time.perf_counter() - start
            logger.info("finished %s in %.0f s", job.name, seconds[job.name])
    return seconds


def run_logged(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run one command with its output in `log`; wall seconds. A failure stops the benchmark naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        code = subprocess.run(list(cmd), env=env if env is not None else cpu_env(), cwd=REPO, stdout=handle,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise _failure(" ".join(map(str, cmd[:4])), code, log)
    return time.perf_counter() - start


# A results file's hand-written reading starts at this heading; a later run of the script keeps it and logs a warning
# (the reading was written for the numbers of an earlier run: check it against the new ones).
HAND_WRITTEN = "## What the numbers show (hand-written"


def write_results(name: str, document: dict, markdown: str, *, folder: Path = RESULTS) -> Path:
    """bench/results/<name>.json (the numbers) and <name>.md (the table people read), each written atomically.
    A hand-written reading already in <name>.md (from `HAND_WRITTEN` to the end) is carried over."""
    folder.mkdir(parents=True, exist_ok=True)
    previous = folder / f"{name}.md"
    if previous.is_file():
        old = previous.read_text(encoding="utf-8")
        if HAND_WRITTEN in old and HAND_WRITTEN not in markdown:
            reading = old[old.index(HAND_WRITTEN):]
            markdown = markdown.rstrip("\n") + "\n\n" + reading
            logger.warning("%s.md: kept its hand-written reading; check it against the new numbers", name)
    for suffix, text in ((".json", json.dumps(document, indent=2) + "\n"), (".md", markdown if markdown.endswith("\n") else markdown + "\n")):
        target = folder / f"{name}{suffix}"
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    logger.info("wrote %s.json and %s.md in %s", name, name, folder)
    return folder / f"{name}.md"


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


def machine_info() -> dict:
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"nproc": os.cpu_count(), "ram_gib": mem_gib, "platform": platform.platform(),
            "load_avg_at_end": None if load is None else [round(x, 2) for x in load]}


def versions() -> dict:
    from importlib.metadata import version

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"python": platform.python_version(), **{name: version(name) for name in ("torch", "deepspeed", "transformers")},
            "git_commit": commit}


def smollm2_config(work: Path, model_dir: str | Path) -> Path:
    """configs/shared_data_smollm2.yaml with absolute paths: the model, and the data at DATA (VERSATUNE_SHARED_DATA)."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "shared_data_smollm2.yaml").read_text())
    config["model"]["path"] = str(model_dir)
    config["data"]["truncation"] = "truncate"  # the shared data has examples longer than its seq_len 512
    for domain in config["data"]["domains"]:
        for key in ("train", "raw"):
            if key in domain:
                domain[key] = str(DATA / Path(domain[key]).relative_to("../../shared/data"))
    path = work / "smollm2.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
