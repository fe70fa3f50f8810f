"""Faults the toolkit must survive: a rank killed mid-step, torn checkpoints, NaN/inf losses, a full disk,
and domains whose held-out set or reference loss is unusable.

The multi-process tests (marker `dist`) run 2 CPU ranks on the tiny model with dist.timeout_s=20 and compare
with one uninterrupted baseline run (module-scoped). "Survivor" tests launch the two ranks as plain processes
(RANK/WORLD_SIZE/MASTER_* set by hand) so nothing but our own collective timeout can stop the rank left alive;
torchrun's agent would kill it for us.

This file is also the test-side wrapper that injects a non-finite loss without any hook in product code:
`python tests/test_faults.py poison <step> <rank> <nan|inf> -- <versatune-ds args>` patches the loss of one
training step on one rank, then calls versatune_ds.cli.main.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_helpers import (  # noqa: E402
    REPO,
    eval_losses,
    free_port,
    latest_step,
    launch,
    launch_env,
    loss_curve,
    read_metrics,
    read_trace,
    write_run_config,
)

THIS_FILE = Path(__file__).resolve()
MAX_STEPS = 8
TIMEOUT_S = 20
# A survivor needs the collective timeout plus interpreter/DeepSpeed shutdown; generous for a loaded CI box.
SURVIVOR_SLACK_S = 60


# ----------------------------------------------------------------------------------------------
# Launch helpers


def _config(base: Path, name: str, model_dir: Path, **sections: dict) -> tuple[Path, Path]:
    run_dir = base / name / "run"
    values = {
        "train": {"max_steps": MAX_STEPS, **sections.pop("train", {})},
        "checkpoint": {"every": 2, "keep_last": 2, **sections.pop("checkpoint", {})},
        "dist": {"timeout_s": TIMEOUT_S},
        "export": {"at_end": False},
        "data": {"cache_dir": str(base / "data_cache")},  # tokenized once for every run of this module
        **sections,
    }
    return write_run_config(base / name, model_dir, run_dir, **values), run_dir


def _start_plain_ranks(args: list[str], log_dir: Path, *, script: list[str] | None = None) -> list[tuple[subprocess.Popen, Path]]:
    """Two ranks as separate processes (no launcher agent), each with its own log file."""
    port = free_port()
    started = []
    for rank in (0, 1):
        env = launch_env({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        log = log_dir / f"rank{rank}.log"
        command = [sys.executable, *(script or ["-m", "versatune_ds"]), *args]
        with open(log, "w") as handle:
            proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        started.append((proc, log))
    return started


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def _train(config: Path, *extra: str) -> str:
    result = launch(["train", "--config", str(config), *extra], timeout=300)
    assert result.returncode == 0, result.stdout[-6000:]
    return result.stdout


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    assert loss_curve(run_dir) == loss_curve(reference)
    assert eval_losses(run_dir) == eval_losses(reference)
    for rank in (0, 1):
        assert read_trace(run_dir, rank) == read_trace(reference, rank)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def baseline(base: Path, tiny_model_dir: Path) -> Path:
    """2 ranks, ZeRO-3, uninterrupted: the run every faulted one must reproduce."""
    config, run_dir = _config(base, "baseline", tiny_model_dir)
    _train(config)
    assert sorted(loss_curve(run_dir)) == list(range(1, MAX_STEPS + 1))
    return run_dir


# ----------------------------------------------------------------------------------------------
# A rank dies


def _kill_rank_mid_run(config: Path, run_dir: Path, logs: Path, victim_rank: int) -> tuple[int | None, float, str]:
    """Start 2 plain ranks, SIGKILL `victim_rank` in the middle of a step after the checkpoint of step 4;
    returns (survivor exit code, seconds from the kill to its exit, survivor log)."""
    ranks = _start_plain_ranks(["train", "--config", str(config)], logs)
    victim, _ = ranks[victim_rank]
    survivor, survivor_log = ranks[1 - victim_rank]
    trace = run_dir / "trace" / f"rank{victim_rank}.jsonl"
    deadline = time.monotonic() + 300
    try:
        # Past the checkpoint of step 4 and into step 6: the kill lands inside a training step.
        while latest_step(run_dir) < 4 or not trace.is_file() or trace.read_text().count("\n") < 5:
            assert victim.poll() is None and survivor.poll() is None, survivor_log.read_text()[-4000:]
            assert time.monotonic() < deadline, "the run did not reach step 5"
            time.sleep(0.02)
        os.killpg(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        code = _wait(survivor, TIMEOUT_S + SURVIVOR_SLACK_S)
        elapsed = time.monotonic() - killed_at
    finally:
        for proc, _ in ranks:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return code, elapsed, survivor_log.read_text(errors="replace")


@pytest.mark.dist
def test_sigkill_of_one_rank_stops_the_survivor_then_resume_is_exact(base: Path, tiny_model_dir: Path, baseline: Path) -> None:
    config, run_dir = _config(base, "sigkill", tiny_model_dir)
    code, elapsed, log = _kill_rank_mid_run(config, run_dir, base / "sigkill", victim_rank=1)
    assert code is not None, f"the surviving rank hung for {TIMEOUT_S + SURVIVOR_SLACK_S} s after its peer died:\n{log[-4000:]}"
    assert code == 2, log[-4000:]
    assert elapsed < TIMEOUT_S + SURVIVOR_SLACK_S
    assert "error (rank 0): lost contact with another rank" in log
    assert f"dist.timeout_s={TIMEOUT_S}" in log and "--resume auto" in log
    assert "Traceback" not in log  # one clear message, not a gloo/DeepSpeed stack
    assert 4 <= latest_step(run_dir) < MAX_STEPS
    # Relaunch (torchrun this time): continues from the last checkpoint as if nothing had happened.
    _train(config, "--resume", "auto")
    _assert_same_run(run_dir, baseline)


@pytest.mark.dist
def test_torchrun_ends_the_job_when_a_rank_is_killed(base: Path, tiny_model_dir: Path) -> None:
    """Under torchrun the agent tears the other rank down at once; the launch fails instead of hanging."""
    from dist_helpers import launch_command

    config, run_dir = _config(base, "torchrun_kill", tiny_model_dir, train={"max_steps": 200})
    log = base / "torchrun_kill.log"
    with open(log, "w") as handle:
        agent = subprocess.Popen(launch_command(["train", "--config", str(config)]), cwd=REPO, env=launch_env(),
                                 stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        trace = run_dir / "trace" / "rank1.jsonl"
        deadline = time.monotonic() + 300
        while not trace.is_file() or trace.read_text().count("\n") < 3:
            assert agent.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.02)
        children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
        workers = [int(pid) for pid in children if "versatune_ds" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 2, children
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.monotonic()
        code = _wait(agent, TIMEOUT_S + SURVIVOR_SLACK_S)
        elapsed = time.monotonic() - killed_at
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    assert code is not None and code != 0, log.read_text()[-4000:]
    assert elapsed < TIMEOUT_S + SURVIVOR_SLACK_S
    assert max(loss_curve(run_dir)) < 200


# ----------------------------------------------------------------------------------------------
# Torn checkpoints


@pytest.mark.dist
def test_torn_checkpoint_is_reported_and_the_previous_one_resumes_exactly(base: Path, baseline: Path, tiny_model_dir: Path) -> None:
    # The baseline's own config (same DeepSpeed JSON and distribution files), pointed at a copy of its run dir.
    config, run_dir = baseline.parent / "run.yaml", base / "torn" / "run"
    shutil.copytree(baseline, run_dir)
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000006", "step_00000008"]
    # step 8: complete but one shard truncated (a copy cut short, a disk error after the save).
    shard = sorted((root / "step_00000008").glob("*optim_states.pt"))[-1]
    written = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(written // 2)
    # step 10: a save killed while writing (shards, no state file), and `latest` already pointing at it.
    (root / "step_00000010").mkdir()
    (root / "step_00000010" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0" * 100)
    (root / "latest").write_text("step_00000010\n")
    # Resume must start from step 6, the newest intact checkpoint.
    out = _train(config, f"train.run_dir={run_dir}")
    assert f"{shard} has {written // 2} bytes, {written} were written" in out
    assert "latest names 'step_00000010', which is not a complete checkpoint" in out
    assert "resumed from" in out and "step_00000006 (step 6)" in out
    _assert_same_run(run_dir, baseline)
    # The half-written folder and the damaged one are replaced or cleared by the new saves.
    assert not (root / "step_00000010").exists()
    assert (root / "latest").read_text().strip() == "step_00000008"


class _FakeEngine:
    """Writes one shard per save, like DeepSpeed; `fail_at` makes that step's write fail like a full disk."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        folder = Path(directory) / tag
        folder.mkdir(parents=True, exist_ok=True)
        shard = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        if client_state["versatune_step"] == self.fail_at:
            shard.write_bytes(b"x" * 10)
            raise OSError(28, "No space left on device", str(shard))
        shard.write_bytes(b"x" * 64)


def _env():
    from versatune_ds.dist import DistEnv

    return DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=1, launcher="single")


def _save(run_dir: Path, step: int, engine: _FakeEngine | None = None, keep_last: int = 2) -> Path:
    from versatune_ds.engine import checkpoint

    return checkpoint.save_checkpoint(engine or _FakeEngine(), run_dir, step=step, state={}, keep_last=keep_last, env=_env())


def test_truncated_or_missing_shard_falls_back_to_the_previous_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from versatune_ds.engine import checkpoint
    from versatune_ds.errors import UserError

    first, second = _save(tmp_path, 2), _save(tmp_path, 4)
    state = checkpoint.read_state(second)
    assert state["files"]["zero_pp_rank_0_mp_rank_00_optim_states.pt"] == 64 and "rng_rank0.json" in state["files"]
    shard = second / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"x" * 10)
    with caplog.at_level("WARNING"):
        assert checkpoint.find_latest(tmp_path) == first
    assert f"{shard} has 10 bytes, 64 were written" in caplog.text
    shard.unlink()
    assert checkpoint.find_latest(tmp_path) == first
    assert f"{shard} is missing" in checkpoint.damage(second)
    # Asked for by name, a damaged checkpoint is refused naming the file (never silently replaced).
    with pytest.raises(UserError, match=f"damaged: {shard} is missing"):
        checkpoint.resolve_resume(tmp_path, str(second))
    (first / "rng_rank0.json").unlink()
    assert checkpoint.find_latest(tmp_path) is None


def test_missing_or_dangling_latest_is_reported_and_the_newest_complete_one_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from versatune_ds.engine import checkpoint

    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    root = tmp_path / "checkpoints"
    (root / "latest").write_text("step_00000099\n")
    with caplog.at_level("WARNING"):
        assert checkpoint.find_latest(tmp_path) == newest
    assert "names 'step_00000099', which is not a complete checkpoint" in caplog.text
    (root / "latest").unlink()
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert checkpoint.find_latest(tmp_path) == newest
    assert f"{root / 'latest'} is missing" in caplog.text


def test_failed_save_keeps_the_previous_checkpoint_and_names_the_file(tmp_path: Path) -> None:
    from versatune_ds.engine import checkpoint
    from versatune_ds.errors import UserError

    previous = _save(tmp_path, 2, keep_last=1)
    with pytest.raises(UserError) as error:
        _save(tmp_path, 4, _FakeEngine(fail_at=4), keep_last=1)
    message = str(error.value)
    assert "could not write checkpoint" in message and "step_00000004" in message
    assert "No space left on device" in message and "MiB free there now" in message
    assert f"the previous checkpoint {previous} is intact" in message
    root = tmp_path / "checkpoints"
    assert not (root / "step_00000004").exists()  # the half-written folder is gone
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert checkpoint.find_latest(tmp_path) == previous and checkpoint.damage(previous) is None


def test_saving_never_deletes_before_the_newer_checkpoint_is_complete(tmp_path: Path) -> None:
    from versatune_ds.engine import checkpoint

    _save(tmp_path, 2, keep_last=1)
    with pytest.raises(Exception):
        _save(tmp_path, 4, _FakeEngine(fail_at=4), keep_last=1)
    assert checkpoint.find_latest(tmp_path).name == "step_00000002"
    _save(tmp_path, 4, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000004"]


def test_checkpoints_of_an_abandoned_future_are_dropped_once_a_new_one_is_complete(tmp_path: Path) -> None:
    """Resuming from an older checkpoint by name, then saving, must not let `--resume auto` jump back later."""
    from versatune_ds.engine import checkpoint

    for step in (2, 4, 6):
        _save(tmp_path, step, keep_last=5)
    _save(tmp_path, 3, keep_last=5)  # a run resumed from step 2 saves step 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000003"]
    assert checkpoint.find_latest(tmp_path).name == "step_00000003"


# ----------------------------------------------------------------------------------------------
# Non-finite losses (injected by this file's `poison` wrapper)


def _poison_and_run(poison_step: int, poison_rank: int, value: str, argv: list[str]) -> int:
    """Make the training loss of step `poison_step` (1-based, counted from this process's start) non-finite on one rank."""
    import torch

    import versatune_ds.engine.train_engine as engine_module
    from versatune_ds import cli

    rank = int(os.environ.get("RANK", "0"))
    original_step = engine_module.TrainEngine.train_step
    original_sum = engine_module.CausalLMLoss.loss_sum
    state = {"steps": 0, "active": False}

    def train_step(self, micro_batches):  # type: ignore[no-untyped-def]
        state["steps"] += 1
        state["active"] = state["steps"] == poison_step and rank == poison_rank
        try:
            return original_step(self, micro_batches)
        finally:
            state["active"] = False

    def loss_sum(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        loss_sum = original_sum(self, *args, **kwargs)
        if state["active"]:
            loss_sum = loss_sum + torch.tensor(float(value))  # keeps the graph: the backward sees it too
        return loss_sum

    engine_module.TrainEngine.train_step = train_step
    engine_module.CausalLMLoss.loss_sum = loss_sum
    return cli.main(argv)


def _poisoned_run(config: Path, logs: Path, *, step: int, value: str) -> tuple[list[int | None], str]:
    logs.mkdir(parents=True, exist_ok=True)
    script = [str(THIS_FILE), "poison", str(step), "1", value, "--"]
    ranks = _start_plain_ranks(["train", "--config", str(config)], logs, script=script)
    codes = [_wait(proc, 300) for proc, _ in ranks]
    return codes, "\n".join(log.read_text(errors="replace") for _, log in ranks)


def _weights(folder: Path) -> dict:
    from versatune_ds.engine.export import consolidate_checkpoint

    return consolidate_checkpoint(folder)


@pytest.mark.dist
def test_nan_loss_with_on_nonfinite_skip_skips_and_counts_the_step(base: Path, tiny_model_dir: Path) -> None:
    import torch

    config, run_dir = _config(base, "nan_skip", tiny_model_dir, train={"max_steps": 5, "on_nonfinite": "skip"},
                              checkpoint={"every": 1, "keep_last": 10})
    codes, out = _poisoned_run(config, base / "nan_skip", step=3, value="nan")
    assert codes == [0, 0], out[-4000:]
    assert "step 3: non-finite loss or gradient on some rank; optimizer step skipped" in out
    records = {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}
    assert records[3]["train/loss"] is None and records[3]["train/skipped_steps"] == 1
    assert records[2]["train/skipped_steps"] == 0 and records[5]["train/skipped_steps"] == 1
    assert all(math.isfinite(records[s]["train/loss"]) for s in (1, 2, 4, 5))
    root = run_dir / "checkpoints"
    before, skipped, after = (_weights(root / f"step_0000000{s}") for s in (2, 3, 4))
    assert all(bool(torch.isfinite(v).all()) for v in skipped.values())
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # the skipped step changed nothing
    assert any(not torch.equal(skipped[k], after[k]) for k in skipped)  # the next step trains again
    assert json.loads((root / "step_00000005" / "versatune_state.json").read_text())["skipped_steps"] == 1


@pytest.mark.dist
def test_inf_loss_with_on_nonfinite_stop_saves_and_exits_nonzero(base: Path, tiny_model_dir: Path) -> None:
    import torch

    config, run_dir = _config(base, "inf_stop", tiny_model_dir, train={"on_nonfinite": "stop"},
                              checkpoint={"every": 1, "keep_last": 10})
    codes, out = _poisoned_run(config, base / "inf_stop", step=3, value="inf")
    assert codes == [3, 3], out[-4000:]
    assert "stopped at step 3 on a non-finite loss (train.on_nonfinite=stop); checkpoint saved" in out
    assert latest_step(run_dir) == 3 and max(loss_curve(run_dir)) == 3
    before, stopped = _weights(run_dir / "checkpoints" / "step_00000002"), _weights(run_dir / "checkpoints" / "step_00000003")
    assert all(torch.equal(before[k], stopped[k]) and bool(torch.isfinite(stopped[k]).all()) for k in before)


# ----------------------------------------------------------------------------------------------
# A full disk during a save


@pytest.mark.dist
def test_full_disk_during_save_names_the_path_and_the_previous_checkpoint_resumes(base: Path, baseline: Path, tiny_model_dir: Path) -> None:
    config, run_dir = _config(base, "full_disk", tiny_model_dir, checkpoint={"every": 2, "keep_last": 2})
    mount_point = run_dir / "checkpoints"
    mount_point.mkdir(parents=True)
    # One checkpoint of the tiny model is ~1.7 MiB (both ranks' shards): the second save cannot fit.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        result = launch(["train", "--config", str(config)], timeout=300)
        assert result.returncode != 0, result.stdout[-4000:]
        out = result.stdout
        assert f"could not write checkpoint {mount_point / 'step_00000004'}" in out, out[-4000:]
        assert f"the previous checkpoint {mount_point / 'step_00000002'} is intact" in out
        assert out.count("versatune-ds train: error (rank") == 2  # both ranks stop with the message
        assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out  # (torchrun prints its own)
        assert sorted(p.name for p in mount_point.glob("step_*")) == ["step_00000002"]
        assert latest_step(run_dir) == 2
        # More space (the same tmpfs, grown in place), then continue: identical to the uninterrupted run.
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount_point)], check=True)
        _train(config, "--resume", "auto")
        _assert_same_run(run_dir, baseline)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


# ----------------------------------------------------------------------------------------------
# Domains whose held-out set or reference loss is unusable: refused at start, naming the domain


def _write_sft(path: Path, rows: int) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."}) + "\n" for i in range(rows)))
    return path


def test_empty_heldout_file_is_refused_naming_the_domain(tmp_path: Path, tiny_model_dir: Path) -> None:
    from versatune_ds.config.loading import load_config
    from versatune_ds.data.prepare import prepare_data
    from versatune_ds.data.tokenizer import load_tokenizer
    from versatune_ds.errors import UserError

    empty = tmp_path / "code_heldout.jsonl"
    empty.write_text("")
    law, code = (_write_sft(tmp_path / f"{n}.jsonl", 12) for n in ("law", "code"))
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.cache_dir={tmp_path / 'cache'}",
                             f"data.domains=[{{name: law, train: [{law}]}}, {{name: code, train: [{code}], heldout: [{empty}]}}]"])
    with pytest.raises(UserError, match=r"domain 'code' has no held-out data"):
        prepare_data(cfg.data, load_tokenizer(cfg.model))


def test_too_few_rows_for_a_heldout_split_is_refused_naming_the_domain(tmp_path: Path, tiny_model_dir: Path) -> None:
    from versatune_ds.config.loading import load_config
    from versatune_ds.data.prepare import prepare_data
    from versatune_ds.data.tokenizer import load_tokenizer
    from versatune_ds.errors import UserError

    law, code = _write_sft(tmp_path / "law.jsonl", 12), _write_sft(tmp_path / "code.jsonl", 1)
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.cache_dir={tmp_path / 'cache'}",
                             f"data.domains=[{{name: law, train: [{law}]}}, {{name: code, train: [{code}]}}]"])
    with pytest.raises(UserError, match=r"domain 'code'"):
        prepare_data(cfg.data, load_tokenizer(cfg.model))


@pytest.mark.parametrize(("losses", "expected"), [
    ("{law: 2.0, code: 0.0}", r"mixture\.reference_losses\.code: given 0\.0; expected a number > 0"),
    ("{law: 2.0}", r"mixture\.reference_losses: missing domain\(s\) code"),
    ("{law: 2.0, code: -1}", r"mixture\.reference_losses\.code"),
])
def test_zero_or_missing_reference_loss_is_refused_naming_the_domain(tmp_path: Path, losses: str, expected: str) -> None:
    from versatune_ds.config.loading import load_config
    from versatune_ds.errors import UserError

    law, code = _write_sft(tmp_path / "law.jsonl", 4), _write_sft(tmp_path / "code.jsonl", 4)
    with pytest.raises(UserError, match=expected):
        load_config(None, [f"model.path={tmp_path}", f"data.domains=[{{name: law, train: [{law}]}}, {{name: code, train: [{code}]}}]",
                           "mixture.strategy=versatune", f"mixture.reference_losses={losses}"])


class _Data:
    """The few PreparedData fields the weight policy reads."""

    def __init__(self, sizes: list[int]) -> None:
        from versatune_ds.data.packing import Example, rows_without_packing

        self.per_domain = []
        for domain_id, size in enumerate(sizes):
            rows = rows_without_packing([Example(i, domain_id, np.arange(8), np.arange(8)) for i in range(size)])
            self.per_domain.append(type("D", (), {"train_rows": rows, "train_tokens": 8 * size, "train_examples": size, "fingerprint": f"f{domain_id}"})())


def _policy(tmp_path: Path, *overrides: str, evaluate_model=None):  # type: ignore[no-untyped-def]
    from versatune_ds.config.loading import load_config
    from versatune_ds.dist import DistEnv
    from versatune_ds.domains import Domains
    from versatune_ds.mixture.build import build_weight_policy

    law, code = _write_sft(tmp_path / "law.jsonl", 4), _write_sft(tmp_path / "code.jsonl", 4)
    cfg = load_config(None, [f"model.path={tmp_path}", f"data.domains=[{{name: law, train: [{law}]}}, {{name: code, train: [{code}]}}]",
                             "mixture.strategy=versatune", *overrides])
    env = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=1, launcher="single")
    return build_weight_policy(cfg.mixture, Domains(("law", "code")), _Data([10, 10]), None, env,
                               initial_distribution=[0.5, 0.5], evaluate_model=evaluate_model)


def _losses(values: list[float]):
    """An evaluation result holding only per-domain losses (no per-example ones)."""
    from versatune_ds.eval.heldout import DomainLosses

    loss = np.asarray(values, dtype=np.float64)
    return DomainLosses(loss=loss, loss_sum=loss.copy(), tokens=np.ones_like(loss))


@pytest.mark.parametrize("bad", [float("nan"), 0.0, float("inf")])
def test_reference_model_with_unusable_loss_is_refused_naming_the_domain(tmp_path: Path, bad: float) -> None:
    from versatune_ds.errors import UserError

    with pytest.raises(UserError, match=r"reference loss of domain 'code' is"):
        _policy(tmp_path, f"mixture.reference_model={tmp_path}", evaluate_model=lambda _path: _losses([2.0, bad]))


def test_nan_heldout_loss_never_makes_nan_weights(tmp_path: Path) -> None:
    from versatune_ds.errors import UserError

    policy = _policy(tmp_path, "mixture.reference_losses={law: 2.0, code: 2.0}")
    policy.after_eval(0, _losses([3.0, 3.0]))
    kept = policy.weights.copy()
    assert policy.after_eval(4, _losses([2.5, float("nan")])) is None  # update skipped, a warning names the domain
    assert np.array_equal(policy.weights, kept) and np.all(np.isfinite(kept)) and abs(kept.sum() - 1) < 1e-12
    assert policy.after_eval(8, _losses([2.5, 2.4])) is not None  # the next valid evaluation updates again
    # With no reference at all, the first evaluation becomes the reference: a NaN there is refused by name.
    fallback = _policy(tmp_path)
    with pytest.raises(UserError, match=r"first held-out loss of domain 'code' is nan"):
        fallback.after_eval(0, _losses([2.0, float("nan")]))


if __name__ == "__main__":
    # The `poison` wrapper: tests/test_faults.py poison <step> <rank> <nan|inf> -- <versatune-ds args>
    if len(sys.argv) < 6 or sys.argv[1] != "poison" or sys.argv[5] != "--":
        raise SystemExit("usage: test_faults.py poison <step> <rank> <nan|inf> -- <versatune-ds args>")
    sys.path.insert(0, str(REPO))
    raise SystemExit(_poison_and_run(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[6:]))
