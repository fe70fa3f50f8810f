"""Stopping on a signal with a checkpoint, wall-clock checkpoints, the run-directory lock, the per-eval line:
the training loop in one process with the fake engine of test_train_loop.py, then real processes.

In one process a signal is sent to the test process itself from inside the fake engine's step, so it
arrives mid-step like a Slurm signal would; the run must stop after that step with a checkpoint, exit code
75's summary and the launcher's marker, and `--resume auto` must then continue exactly like a run that was
never interrupted (per-step rows, losses, evaluations, weights).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from dist_helpers import TEST_DOMAINS, launch_env, read_metrics, read_trace, write_run_config
from test_train_loop import FakeEngine

from versatune_ds import dist, preemption
from versatune_ds.config.loading import load_config
from versatune_ds.config.schema import RunConfig
from versatune_ds.errors import UserError
from versatune_ds.run_lock import LOCK_FILE
from versatune_ds.train import run_training

REPO = Path(__file__).resolve().parents[1]


class SignallingEngine(FakeEngine):
    """Sends `sig` to this process during its step number `at_step` (counted from this engine's start)."""

    def __init__(self, sig: signal.Signals, at_step: int) -> None:
        super().__init__()
        self.sig, self.at_step = sig, at_step

    def train_step(self, micro_batches):  # type: ignore[no-untyped-def]
        result = super().train_step(micro_batches)
        if self.steps == self.at_step:
            os.kill(os.getpid(), self.sig)
        return result


@pytest.fixture()
def loop_config(tmp_path: Path, tiny_model_dir: Path):
    def make(name: str, **sections: dict) -> RunConfig:
        base = dict(
            checkpoint={"every": 4, "keep_last": 20}, export={"at_end": False},
            mixture={"eta": 5.0, "max_change": 0.3, "smoothing": 0.0, "reference_losses": {d: 0.3 for d in TEST_DOMAINS}},
            eval={"every": 4, "micro_batch_size": 4}, train={"max_steps": 12},
        )
        for key, values in sections.items():
            base[key] = {**base.get(key, {}), **values}
        return load_config(write_run_config(tmp_path / name, tiny_model_dir, tmp_path / name / "run", **base))

    yield make
    dist.destroy()


def _rows(run_dir: Path) -> list[tuple]:
    return [(m["step"], m.get("train/loss"), m.get("eval/law/loss"), m.get("mixture/law/weight")) for m in read_metrics(run_dir)]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_checkpoints_stops_and_the_resume_is_exact(loop_config, sig: signal.Signals) -> None:
    straight = loop_config("straight")
    run_training(straight, engine_factory=lambda _c, _d: FakeEngine())
    straight_dir = Path(straight.train.run_dir)

    stopped = loop_config("stopped")
    run_dir = Path(stopped.train.run_dir)
    before = signal.getsignal(sig)
    summary = run_training(stopped, engine_factory=lambda _c, _d: SignallingEngine(sig, at_step=6))
    # Stopped after step 6 (the step the signal arrived in), with a checkpoint of that step, not at the end.
    assert summary.stopped_on_signal == sig.name and summary.final_step == 6 and summary.export_dir is None
    assert _checkpoint_steps(run_dir) == [4, 6]
    marker = json.loads((run_dir / preemption.STOP_MARKER).read_text())
    assert (marker["exit_code"], marker["step"], marker["signal"]) == (75, 6, sig.name)
    assert marker["checkpoint"].endswith("step_00000006")
    assert not (run_dir / LOCK_FILE).exists(), "the run directory lock was not released"
    assert signal.getsignal(sig) is before, "the stop handler outlived the run"

    resumed = FakeEngine()
    summary = run_training(stopped, engine_factory=lambda _c, _d: resumed)
    assert summary.stopped_on_signal is None and summary.final_step == 12
    assert resumed.steps == 6  # steps 7..12 only
    assert not (run_dir / preemption.STOP_MARKER).exists()
    assert read_trace(run_dir, 0) == read_trace(straight_dir, 0)
    assert _rows(run_dir) == _rows(straight_dir)
    assert json.loads((run_dir / "mixture.json").read_text())["updates"] == json.loads((straight_dir / "mixture.json").read_text())["updates"]


def test_a_signal_on_an_evaluation_step_stops_after_that_evaluation(loop_config) -> None:
    """Arriving in step 8 (an eval and checkpoint step): evaluated and saved once, then stopped."""
    cfg = loop_config("eval_step")
    summary = run_training(cfg, engine_factory=lambda _c, _d: SignallingEngine(signal.SIGUSR1, at_step=8))
    run_dir = Path(cfg.train.run_dir)
    assert summary.final_step == 8 and _checkpoint_steps(run_dir) == [4, 8]
    assert [m["step"] for m in read_metrics(run_dir) if "eval/law/loss" in m] == [0, 4, 8]


def test_signals_not_in_stop_signals_keep_their_default(loop_config) -> None:
    cfg = loop_config("no_usr2", train={"stop_signals": ["SIGUSR1"]})
    previous = signal.signal(signal.SIGUSR2, lambda *_: None)  # the test's own handler: must not be replaced
    try:
        summary = run_training(cfg, engine_factory=lambda _c, _d: SignallingEngine(signal.SIGUSR2, at_step=3))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert summary.stopped_on_signal is None and summary.final_step == 12


def test_wall_clock_checkpoints(loop_config, monkeypatch: pytest.MonkeyPatch) -> None:
    """checkpoint.every_minutes=2 with 40 s per step (a fake clock): saves at 3, 6, 9 besides checkpoint.every."""
    now = [0.0]
    monkeypatch.setattr(preemption, "time", SimpleNamespace(monotonic=lambda: now[0], strftime=time.strftime))

    class SlowEngine(FakeEngine):
        def train_step(self, micro_batches):  # type: ignore[no-untyped-def]
            now[0] += 40.0
            return super().train_step(micro_batches)

    cfg = loop_config("clock", checkpoint={"every": 100, "every_minutes": 2.0}, train={"max_steps": 10})
    run_training(cfg, engine_factory=lambda _c, _d: SlowEngine())
    assert _checkpoint_steps(Path(cfg.train.run_dir)) == [3, 6, 9, 10]


def test_each_evaluation_prints_one_line_with_every_domain_loss_and_se(loop_config, caplog: pytest.LogCaptureFixture) -> None:
    cfg = loop_config("eval_line", train={"max_steps": 4})
    with caplog.at_level(logging.INFO, logger="versatune_ds.log"):
        run_training(cfg, engine_factory=lambda _c, _d: FakeEngine())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval step")]
    assert [line.split(" |")[0] for line in lines] == ["eval step 0", "eval step 4"]
    metrics = {m["step"]: m for m in read_metrics(Path(cfg.train.run_dir)) if "eval/law/loss" in m}
    for line, step in zip(lines, (0, 4)):
        for domain in TEST_DOMAINS:
            loss, weight = metrics[step][f"eval/{domain}/loss"], metrics[step][f"mixture/{domain}/weight"]
            se = metrics[step][f"eval/{domain}/loss_se"]
            assert f"{domain} {loss:.4f} ± {se:.4f} (w {weight:.3f})" in line, line


def test_a_second_run_on_a_locked_run_dir_is_refused_and_writes_nothing(loop_config) -> None:
    """In one process: the lock is held while the first run trains (its engine tries a second run mid-way)."""
    cfg = loop_config("locked", train={"max_steps": 4})
    run_dir = Path(cfg.train.run_dir)
    seen: list[str] = []

    class Intruding(FakeEngine):
        def train_step(self, micro_batches):  # type: ignore[no-untyped-def]
            if self.steps == 1:
                config_before = (run_dir / "config.yaml").read_bytes()
                with pytest.raises(UserError) as info:
                    run_training(cfg, engine_factory=lambda _c, _d: FakeEngine())
                seen.append(str(info.value))
                assert (run_dir / "config.yaml").read_bytes() == config_before
            return super().train_step(micro_batches)

    summary = run_training(cfg, engine_factory=lambda _c, _d: Intruding())
    assert summary.final_step == 4
    assert seen and f"run directory {run_dir} is in use by another run" in seen[0] and f"pid {os.getpid()}" in seen[0]
    assert not (run_dir / LOCK_FILE).exists()


# ----------------------------------------------------------------------------------------------
# Real processes


def _train_process(config: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "versatune_ds", "train", "--config", str(config), *extra],
        cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def _wait_for(predicate, timeout_s: float, proc: subprocess.Popen[str], what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{proc.stdout.read()[-4000:] if proc.stdout else ''}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.dist
def test_two_train_commands_on_one_run_dir(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The second is refused (exit 2, naming the first's pid and host) and changes nothing; SIGTERM then
    stops the first with a checkpoint (exit 75), and the lock is gone."""
    run_dir = tmp_path / "run"
    config = write_run_config(tmp_path / "cfg", tiny_model_dir, run_dir, stage=0, train={"max_steps": 100000, "log_every": 1},
                              checkpoint={"every": 100000}, eval={"every": 100000}, export={"at_end": False})
    first = _train_process(config)
    try:
        _wait_for(lambda: any("train/loss" in m for m in read_metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() else False,
                  240, first, "the first run's first step")
        config_before = (run_dir / "config.yaml").read_bytes()
        second = subprocess.run([sys.executable, "-m", "versatune_ds", "train", "--config", str(config)], cwd=REPO,
                                env=launch_env(), capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by another run: {run_dir / LOCK_FILE} is held by pid {first.pid} on host" in second.stderr
        assert "Traceback" not in second.stderr
        assert (run_dir / "config.yaml").read_bytes() == config_before
        assert first.poll() is None, "the first run stopped"
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 75, out[-4000:]
    assert "exit code 75" in out
    assert (run_dir / "checkpoints" / "latest").is_file() and not (run_dir / LOCK_FILE).exists()
    marker = json.loads((run_dir / preemption.STOP_MARKER).read_text())
    assert marker["signal"] == "SIGTERM" and marker["step"] >= 1


@pytest.mark.dist
def test_every_rank_learns_of_a_refused_lock_and_exits(tmp_path: Path, tiny_model_dir: Path) -> None:
    """2 ranks under torchrun on a run directory this test process holds: rank 0 is refused, rank 1 learns it
    by broadcast, both exit 2 with the message instead of waiting."""
    from dist_helpers import launch

    from versatune_ds.dist import DistEnv
    from versatune_ds.run_lock import RunDirLock

    run_dir = tmp_path / "run"
    config = write_run_config(tmp_path / "cfg", tiny_model_dir, run_dir, stage=0, dist={"timeout_s": 60})
    holder = RunDirLock(run_dir, stale_after_s=600)
    holder.acquire(DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=1, launcher="single"))
    try:
        result = launch(["train", "--config", str(config)], nproc=2, launcher="torchrun", timeout=300)
    finally:
        holder.release()
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"versatune-ds train: error (rank {rank}): run directory {run_dir} is in use by another run" in result.stdout
    assert not (run_dir / "config.yaml").exists()
