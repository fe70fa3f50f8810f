"""The run-directory lock (versatune_ds.run_lock): who holds it, when a lock is stale, refusals, heartbeat."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from versatune_ds.dist import DistEnv
from versatune_ds.errors import UserError
from versatune_ds.run_lock import LOCK_FILE, LockHolder, RunDirLock

ENV = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=1, launcher="single")


def write_holder(run_dir: Path, holder: LockHolder, age_s: float = 0.0) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps(asdict(holder)))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


@pytest.fixture()
def me() -> LockHolder:
    return LockHolder.of_this_process()


def test_the_lock_names_its_holder_and_is_removed_on_release(tmp_path: Path) -> None:
    lock = RunDirLock(tmp_path / "run", stale_after_s=600)
    lock.acquire(ENV)
    document = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert (document["pid"], document["host"]) == (os.getpid(), socket.gethostname())
    assert document["command"] == " ".join(sys.argv)  # this process's command line (nothing in it to redact)
    lock.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    lock.release()  # twice is harmless


def test_a_live_holder_on_this_host_is_refused_with_its_name(tmp_path: Path) -> None:
    first = RunDirLock(tmp_path, stale_after_s=600)
    first.acquire(ENV)
    try:
        with pytest.raises(UserError) as info:
            RunDirLock(tmp_path, stale_after_s=600).acquire(ENV)
        message = str(info.value)
        assert f"run directory {tmp_path} is in use by another run" in message
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
        assert "--force-unlock" in message and "train.lock_stale_after_s=600" in message
        # flock says so even with --force-unlock: the holder is certainly alive
        with pytest.raises(UserError, match="the file system's lock on it is held by a live process"):
            RunDirLock(tmp_path, stale_after_s=600, force=True).acquire(ENV)
    finally:
        first.release()


def test_a_dead_pid_on_this_host_is_stale_and_taken_over_with_a_warning(tmp_path: Path, me: LockHolder,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    pid = dead_pid()
    write_holder(tmp_path, replace(me, pid=pid, token="old"))
    lock = RunDirLock(tmp_path, stale_after_s=600)
    with caplog.at_level(logging.WARNING, logger="versatune_ds.run_lock"):
        lock.acquire(ENV)
    assert f"process {pid} is no longer running on this host" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE]  # the stale one moved aside was removed
    lock.release()


def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path: Path, me: LockHolder) -> None:
    if me.process_start is None:
        pytest.skip("no /proc/<pid>/stat here")
    write_holder(tmp_path, replace(me, process_start=me.process_start - 1, token="old"))  # same pid, an older process
    lock = RunDirLock(tmp_path, stale_after_s=600)
    lock.acquire(ENV)
    lock.release()


def test_another_host_is_refused_until_its_heartbeat_is_stale(tmp_path: Path, me: LockHolder) -> None:
    other = replace(me, host="some-other-node", pid=12345, token="other")
    write_holder(tmp_path, other, age_s=100)
    with pytest.raises(UserError, match=r"held by pid 12345 on host some-other-node.*last heartbeat 1\d\d s ago"):
        RunDirLock(tmp_path, stale_after_s=600).acquire(ENV)
    write_holder(tmp_path, other, age_s=700)
    lock = RunDirLock(tmp_path, stale_after_s=600)
    lock.acquire(ENV)
    lock.release()


def test_force_unlock_takes_over_from_another_host(tmp_path: Path, me: LockHolder) -> None:
    write_holder(tmp_path, replace(me, host="some-other-node", token="other"))
    lock = RunDirLock(tmp_path, stale_after_s=600, force=True)
    lock.acquire(ENV)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == socket.gethostname()
    lock.release()


def test_an_earlier_run_of_the_same_slurm_job_is_stale(tmp_path: Path, me: LockHolder, monkeypatch: pytest.MonkeyPatch) -> None:
    """A requeued job (same id, next restart count) on another node takes over at once."""
    write_holder(tmp_path, replace(me, host="node7", token="old", slurm_job_id="4242", slurm_restart_count="0"))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunDirLock(tmp_path, stale_after_s=600)
    lock.acquire(ENV)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["slurm_restart_count"] == "1"
    lock.release()
    # the same incarnation of another job on another host is refused
    write_holder(tmp_path, replace(me, host="node7", token="old", slurm_job_id="999", slurm_restart_count="1"))
    with pytest.raises(UserError, match="Slurm job 999"):
        RunDirLock(tmp_path, stale_after_s=600).acquire(ENV)


def test_an_unreadable_lock_file_is_stale(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).write_text('{"pid": 1')  # cut by a crash
    stamp = time.time() - 60
    os.utime(tmp_path / LOCK_FILE, (stamp, stamp))
    lock = RunDirLock(tmp_path, stale_after_s=600)
    lock.acquire(ENV)
    lock.release()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path: Path, me: LockHolder) -> None:
    lock = RunDirLock(tmp_path, stale_after_s=600)
    lock.acquire(ENV)
    write_holder(tmp_path, replace(me, token="someone-else"))
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "someone-else"


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path: Path) -> None:
    lock = RunDirLock(tmp_path, stale_after_s=4)  # heartbeat every 1 s
    lock.acquire(ENV)
    try:
        stamp = time.time() - 3600
        os.utime(tmp_path / LOCK_FILE, (stamp, stamp))
        deadline = time.monotonic() + 10
        while time.time() - (tmp_path / LOCK_FILE).stat().st_mtime > 60 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 60
    finally:
        lock.release()


def test_the_command_in_the_lock_has_no_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_lockTESTsecretVALUE123")
    monkeypatch.setattr(sys, "argv", ["versatune-ds", "train", "logging.x=hf_lockTESTsecretVALUE123"])
    lock = RunDirLock(tmp_path, stale_after_s=600)
    lock.acquire(ENV)
    try:
        assert "hf_lockTESTsecretVALUE123" not in (tmp_path / LOCK_FILE).read_text()
    finally:
        lock.release()
