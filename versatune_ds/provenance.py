"""What produced a run: one line in `RUN_DIR/provenance.jsonl` per start of `train`.

A long run is often started, stopped and resumed several times (Slurm requeues, preemption, a fix between two
segments), maybe with another toolkit or library version each time. Rank 0 appends a record at every start: the
time, the checkpoint it resumed from (none for a fresh start), the number of ranks, this toolkit's version and, when
it runs from a git checkout, the commit and whether the checkout had uncommitted changes; the versions of Python,
torch, DeepSpeed and transformers, the CUDA build; the host and the Slurm job. The file is only ever appended to,
so a killed segment's line stays: that start happened.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from versatune_ds import __version__
from versatune_ds.files import read_json_objects

PROVENANCE_FILE = "provenance.jsonl"
LIBRARIES = ("torch", "deepspeed", "transformers")


def source_commit(source_dir: Path) -> dict[str, object] | None:
    """{"commit": sha, "dirty": bool} of the git checkout whose tracked files include `source_dir/__init__.py`;
    None for an installed wheel (also one in a virtual environment inside some checkout), a machine without git, or
    a checkout git refuses to read (another owner)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(source_dir), *args], capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        git("ls-files", "--error-unmatch", "__init__.py")  # fails unless this very file is tracked
        return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a run depends on (None where one is absent)."""
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def start_record(*, resumed_from: Path | None, world_size: int) -> dict[str, object]:
    """The record of one start of `train` on this machine, now."""
    import torch  # here, not at the top: the report reads PROVENANCE_FILE and must not pay for torch

    package_dir = Path(__file__).resolve().parent
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from": None if resumed_from is None else str(resumed_from),
        "world_size": world_size,
        "versatune_ds": __version__,
        "source": source_commit(package_dir),
        "python": platform.python_version(),
        **library_versions(),
        "cuda": torch.version.cuda,
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def read_starts(run_dir: Path) -> list[dict]:
    """The records of RUN_DIR/provenance.jsonl, oldest first; a torn or foreign line is left out."""
    return read_json_objects(run_dir / PROVENANCE_FILE)


def record_start(run_dir: Path, *, resumed_from: Path | None, world_size: int) -> dict[str, object]:
    """Append this start's record to RUN_DIR/provenance.jsonl (rank 0 only) and return it."""
    record = start_record(resumed_from=resumed_from, world_size=world_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / PROVENANCE_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
    return record
