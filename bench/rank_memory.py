"""Peak resident memory of every rank of a `versatune-ds` command: the ranks run as plain processes (RANK,
WORLD_SIZE, MASTER_* set here, no launcher agent), and each one's peak comes from the kernel when it is reaped
(`os.wait4` -> ru_maxrss). Shared by bench/memory_estimate.py and bench/loss_memory.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from common import CLI, REPO, cpu_env


@dataclass(frozen=True)
class RankPeaks:
    peak_rss_bytes: list[int]  # per rank
    seconds: float
    exit_codes: list[int]

    @property
    def max_bytes(self) -> int:
        return max(self.peak_rss_bytes)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ranks(args: Sequence[str], *, nproc: int, log_dir: Path, threads: int = 1, extra_env: dict[str, str] | None = None,
              command: Sequence[str] | None = None) -> RankPeaks:
    """Run `versatune-ds <args>` (or `command + args`) on `nproc` ranks; every rank's peak RSS and exit code."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    start = time.perf_counter()
    for rank in range(nproc):
        env = {**cpu_env(threads), **(extra_env or {})}
        env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        handle = open(log_dir / f"rank{rank}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen([*(command or CLI), *args], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT), handle))
    peaks, codes = [0] * nproc, [0] * nproc
    for rank, (proc, handle) in enumerate(procs):
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        handle.close()
        peaks[rank] = int(usage.ru_maxrss) * 1024  # KiB on Linux
        codes[rank] = proc.returncode
    return RankPeaks(peaks, time.perf_counter() - start, codes)
