"""The run-directory lock: one `train` per run directory at a time.

Two runs in one directory overwrite each other's config, metrics and checkpoints, and one's rotation deletes
the other's finished checkpoint. So rank 0 holds `<run_dir>/run.lock` for the whole run and the other ranks
learn the outcome by broadcast (they never wait on the file).

The file says who holds it: pid, host, process start time, start time, command (secrets redacted), Slurm job
id and restart count, and a random token. Rank 0 touches it every `heartbeat_s` (a daemon thread, so long
evaluations and saves do not delay it) and removes it at the end, also after an error or a stop signal.

Taking it (rank 0): create it with O_EXCL. If it exists, the holder is judged:

- `flock` says a live process holds it -> refused (on a file system where flock works, that is certain;
  on shared cluster file systems flock may be unsupported or node-local, so it is only a first check);
- same host: its pid is gone (or is a newer process with the same pid) -> stale;
- the same Slurm job id with another restart count -> stale (a requeued job: Slurm runs one incarnation
  of a job at a time, so the earlier one is dead, even if it ran on another host and was SIGKILLed);
- another host, heartbeat older than `train.lock_stale_after_s` -> stale (that host is gone or the run hung
  for that long with its heartbeat thread);
- `--force-unlock` -> stale (you say the holder is dead; a live flock holder is still refused);
- otherwise refused, naming the holder and the ways out.

A stale lock is moved aside and taken over with a warning naming the old holder. Two processes taking over
the same stale lock in the same instant are resolved by O_EXCL; a take-over that finds it moved a lock
other than the one it judged puts it back and refuses.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from versatune_ds import dist
from versatune_ds.errors import UserError
from versatune_ds.redaction import redact

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    started: str  # local time, readable
    started_epoch: float
    command: str
    token: str
    process_start: int | None = None  # /proc/<pid>/stat start time (clock ticks since boot): tells pid reuse apart
    slurm_job_id: str | None = None
    slurm_restart_count: str | None = None

    @classmethod
    def of_this_process(cls) -> LockHolder:
        return cls(
            pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            started_epoch=time.time(), command=redact(" ".join(sys.argv)), token=uuid.uuid4().hex,
            process_start=_process_start(os.getpid()), slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            slurm_restart_count=os.environ.get("SLURM_RESTART_COUNT", "0") if "SLURM_JOB_ID" in os.environ else None,
        )

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"pid {self.pid} on host {self.host}{job}, started {self.started}, command: {self.command}"


def _process_start(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in (...) may contain spaces


def _pid_alive(pid: int, process_start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    return process_start is None or _process_start(pid) in (None, process_start)


class RunDirLock:
    """Rank 0's lock on a run directory; `acquire` on every rank right after the process group starts."""

    def __init__(self, run_dir: str | os.PathLike[str], *, stale_after_s: int, force: bool = False) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.stale_after_s = stale_after_s
        self.force = force
        self.heartbeat_s = max(1.0, min(30.0, stale_after_s / 4))
        self.holder: LockHolder | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, env: dist.DistEnv) -> None:
        """Rank 0 takes the lock (or finds why not) and broadcasts the outcome; every rank raises on refusal."""
        refusal = self._take() if env.is_main else None
        refusal = dist.broadcast_object(refusal) if env.is_distributed else refusal
        if refusal is not None:
            raise UserError(refusal)
        if env.is_main:
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()

    def release(self) -> None:
        """Remove the lock if it is still ours (rank 0; a no-op elsewhere and when never taken)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.holder is not None:
            current = _read(self.path)
            if current is not None and current.token == self.holder.token:
                self.path.unlink(missing_ok=True)
            self.holder = None
        if self._fd is not None:
            os.close(self._fd)  # also drops the flock
            self._fd = None

    # ------------------------------------------------------------------------------------------

    def _take(self) -> str | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = LockHolder.of_this_process()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                refusal = self._judge_existing()
                if refusal is not None:
                    return refusal
                continue  # moved aside: try to create it again
            os.write(fd, (json.dumps(asdict(me), indent=2) + "\n").encode("utf-8"))
            os.fsync(fd)
            _try_flock(fd, fcntl.LOCK_EX)
            self._fd, self.holder = fd, me
            return None
        return f"could not take {self.path}: other processes keep creating it; is another run starting in {self.path.parent}?"

    def _judge_existing(self) -> str | None:
        """None when the existing lock was stale and has been moved aside; else why it is refused."""
        holder = _read(self.path)
        if holder is None and _age_s(self.path) < 10:
            time.sleep(0.5)  # being written this moment
            holder = _read(self.path)
        if _held_by_a_live_process(self.path):
            return self._refusal(holder, "the file system's lock on it is held by a live process")
        reason = self._stale_reason(holder)
        if reason is None:
            return self._refusal(holder, None)
        aside = self.path.with_name(f".{LOCK_FILE}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None  # someone else moved it just now: look again
        moved = _read(aside)
        if holder is not None and (moved is None or moved.token != holder.token):
            with contextlib.suppress(OSError):
                os.link(aside, self.path)  # we moved a lock taken a moment ago: put it back
            aside.unlink(missing_ok=True)
            return self._refusal(moved, "another run took the lock at the same moment")
        aside.unlink(missing_ok=True)
        logger.warning("taking over the stale run-directory lock %s (%s): %s", self.path,
                       holder.describe() if holder else "unreadable", reason)
        return None

    def _stale_reason(self, holder: LockHolder | None) -> str | None:
        if self.force:
            return "--force-unlock"
        if holder is None:
            return "the lock file is unreadable (a crash while writing it)"
        if holder.host == socket.gethostname():
            if not _pid_alive(holder.pid, holder.process_start):
                return f"process {holder.pid} is no longer running on this host"
            return None
        job, restart = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
        if holder.slurm_job_id is not None and holder.slurm_job_id == job and holder.slurm_restart_count != restart:
            return f"it was held by an earlier run of this Slurm job ({job}, restart {holder.slurm_restart_count})"
        beat = _age_s(self.path)
        if beat > self.stale_after_s:
            return f"no heartbeat for {beat:.0f} s (train.lock_stale_after_s={self.stale_after_s})"
        return None

    def _refusal(self, holder: LockHolder | None, why: str | None) -> str:
        who = holder.describe() if holder else "an unreadable lock file"
        beat = _age_s(self.path)
        return (
            f"run directory {self.path.parent} is in use by another run: {self.path} is held by {who} "
            f"(last heartbeat {beat:.0f} s ago{'; ' + why if why else ''}). Two runs in one run directory overwrite "
            "each other's config, metrics and checkpoints. Wait for that run to end or choose another train.run_dir; "
            "if it is dead (its host is gone), pass --force-unlock, or wait until its heartbeat is older than "
            f"train.lock_stale_after_s={self.stale_after_s} s"
        )

    def _beat(self) -> None:
        warned = False
        while not self._stop.wait(self.heartbeat_s):
            current = _read(self.path)
            if self.holder is not None and (current is None or current.token != self.holder.token):
                if not warned:
                    logger.warning("the run-directory lock %s was removed or taken over by %s; this run goes on, but "
                                   "another run may now write into %s", self.path,
                                   current.describe() if current else "nobody", self.path.parent)
                    warned = True
                continue
            with contextlib.suppress(OSError):
                os.utime(self.path)


def _read(path: Path) -> LockHolder | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return LockHolder(**document)
    except (OSError, ValueError, TypeError):
        return None


def _age_s(path: Path) -> float:
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return 0.0


def _try_flock(fd: int, operation: int) -> bool:
    """flock without blocking; False only when another process holds a conflicting lock."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return True  # ENOLCK / EOPNOTSUPP / ENOSYS: no locks on this file system; the other checks decide
    return True


def _held_by_a_live_process(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return not _try_flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)  # drops the shared lock we may just have taken
