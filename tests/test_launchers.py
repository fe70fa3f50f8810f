"""Every launcher in launchers/ runs on CPU with 2 ranks and leaves a complete run directory.

The Slurm scripts run with plain `bash` against small fake `srun` / `scontrol` / `sinfo` scripts put
first on PATH: the fake srun spawns the tasks on this machine with the SLURM_* variables a real one
sets, so what is tested is the script's own logic (hosts, ports, env, the command it builds). The
real-cluster versions of these runs are in test_slurm.py.

`test_launcher_trains` runs the real `versatune_ds train` on the tiny model. The GPU test runs the
launchers against a stand-in `versatune_ds` (tests/slurm_cluster.py) with NCCL, one rank per GPU:
it checks the launchers' GPU path where the real trainer's dependencies may be missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_helpers import write_run_config
from slurm_cluster import free_port, write_standin_package

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "launchers"
VENV_BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT_S = 300  # a hung launch is killed (with its process group) by `timeout`

SRUN_LAYOUT = {  # (tasks, nodes) of the one srun step each Slurm launcher makes here
    "slurm_single_node.sbatch": (2, 1),
    "slurm_multi_node.sbatch": (2, 2),
    "slurm_deepspeed.sbatch": (2, 1),
}
ALL_LAUNCHERS = (
    "local_deepspeed.sh",
    "torchrun.sh",
    "slurm_single_node.sbatch",
    "slurm_multi_node.sbatch",
    "slurm_deepspeed.sbatch",
)

FAKE_SRUN = """\
#!{python}
# Fake srun: run the tasks here, with the variables a real srun gives each task; like srun, pass the
# signals it gets on to every task.
import json, os, signal, subprocess, sys, time

args = sys.argv[1:]
opts = {{}}
while args and args[0].startswith("-"):
    arg = args.pop(0)
    name, _, value = arg.partition("=")
    if name in ("-n", "--ntasks", "-N", "--nodes", "--ntasks-per-node") and not value:
        value = args.pop(0)
    if name not in ("-n", "--ntasks", "-N", "--nodes", "--ntasks-per-node", "--kill-on-bad-exit", "--label",
                    "-l", "--export"):
        sys.exit(f"fake srun: unsupported option {{arg}}")
    opts[name] = value
hosts = os.environ["SLURM_JOB_NODELIST"].split(",")
num_nodes = int(opts.get("-N") or opts.get("--nodes") or os.environ.get("SLURM_NNODES", len(hosts)))
per_node = opts.get("--ntasks-per-node")
num_tasks = int(opts.get("-n") or opts.get("--ntasks") or
                (int(per_node) * num_nodes if per_node else os.environ["SLURM_NTASKS"]))
per_node = num_tasks // num_nodes
env = dict(os.environ)
for item in opts.get("--export", "ALL").split(","):
    if "=" in item:
        key, _, value = item.partition("=")
        env[key] = value
with open(os.environ["FAKE_SRUN_LOG"], "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "num_tasks": num_tasks, "num_nodes": num_nodes}}) + "\\n")
procs = []
for task in range(num_tasks):
    task_env = dict(env, SLURM_PROCID=str(task), SLURM_NTASKS=str(num_tasks), SLURM_LOCALID=str(task % per_node),
                    SLURM_NODEID=str(task // per_node), SLURM_NNODES=str(num_nodes),
                    SLURM_STEP_NUM_TASKS=str(num_tasks), SLURMD_NODENAME=hosts[task // per_node])
    procs.append(subprocess.Popen(args, env=task_env))


def forward(signum, frame):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)


for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, forward)
codes = [None] * num_tasks
while None in codes:
    codes = [p.poll() for p in procs]
    if "--kill-on-bad-exit" in opts and any(c not in (None, 0) for c in codes):
        for p in procs:
            if p.poll() is None:
                p.kill()
        codes = [p.wait() for p in procs]
    time.sleep(0.1)
sys.exit(next((c for c in codes if c != 0), 0))
"""

FAKE_SCONTROL = """\
#!/bin/sh
# Fake scontrol: `scontrol show hostnames [a,b,...]` (comma lists, no bracket ranges), and `scontrol requeue
# <job>`, which is recorded in $FAKE_SRUN_LOG.requeue.
if [ "$1" = requeue ]; then echo "$2" >> "$FAKE_SRUN_LOG.requeue"; exit 0; fi
[ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: unsupported: $*" >&2; exit 1; }
echo "${3:-$SLURM_JOB_NODELIST}" | tr , '\\n'
"""


def make_fake_slurm_bin(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    scripts = {
        "srun": FAKE_SRUN.format(python=sys.executable),
        "scontrol": FAKE_SCONTROL,
        "sinfo": "#!/bin/sh\nexit 0\n",  # the deepspeed launcher only checks that it exists
    }
    for name, text in scripts.items():
        (directory / name).write_text(text)
        (directory / name).chmod(0o755)
    return directory


def launcher_env(name: str, tmp_path: Path, repo_dir: Path, config: Path, run_dir: Path) -> dict[str, str]:
    """The environment a user (or sbatch + Slurm, for the .sbatch files) would give `name`."""
    fake_bin = make_fake_slurm_bin(tmp_path / "fake_bin")
    # nothing of an outer launcher (a CI job under Slurm or torchrun) may leak into the ranks
    outer = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_", "OMP_NUM_THREADS")
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith(outer)},
        "PATH": f"{fake_bin}:{VENV_BIN}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "REPO_DIR": str(repo_dir),
        "CONFIG": str(config),
        "RUN_DIR": str(run_dir),
        "DEVICE": "cpu",
        "FAKE_SRUN_LOG": str(tmp_path / "srun_calls.jsonl"),
    }
    job_id = str(1000 + os.getpid() % 1000)
    one_node = {"SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": "test", "SLURM_SUBMIT_DIR": str(repo_dir)}
    if name in ("local_deepspeed.sh", "torchrun.sh"):
        env |= {"NPROC": "2", "MASTER_PORT": str(free_port())}
    elif name in ("slurm_single_node.sbatch", "slurm_deepspeed.sbatch"):
        env |= one_node | {"SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_NTASKS": "2",
                           "SLURM_NTASKS_PER_NODE": "2", "MASTER_PORT": str(free_port())}  # fmt: skip
    elif name == "slurm_multi_node.sbatch":
        # two "nodes" that are both this machine: torchrun's c10d rendezvous lets the second agent
        # that finds the store port taken join as a client
        env |= one_node | {"SLURM_JOB_NODELIST": "localhost,127.0.0.1", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
                           "SLURM_NTASKS_PER_NODE": "1", "NPROC_PER_NODE": "1", "RDZV_PORT": str(free_port())}  # fmt: skip
    else:
        raise AssertionError(name)
    return env


def run_launcher(name: str, env: dict[str, str], cwd: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    # `timeout` signals its whole process group, so a hung rank cannot outlive the test.
    argv = ["timeout", "-k", "10", str(LAUNCH_TIMEOUT_S), "bash", str(LAUNCHERS / name), *args]
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    assert path.is_file(), f"{path} missing"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_complete_run(done: subprocess.CompletedProcess[str], run_dir: Path) -> list[dict]:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    losses = [row for row in read_metrics(run_dir) if "train/loss" in row]
    assert losses, f"no train/loss rows in {run_dir / 'metrics.jsonl'}"
    assert (run_dir / "final" / "config.json").is_file()
    assert (run_dir / "final" / "model.safetensors").is_file()
    logs = list((run_dir / "logs").glob("*.log"))
    assert logs and any(log.stat().st_size > 0 for log in logs), f"no launcher log in {run_dir / 'logs'}"
    return losses


@pytest.mark.parametrize("name", ALL_LAUNCHERS)
def test_launcher_trains(name: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    """The launcher runs the real `versatune_ds train` (ZeRO-3, 2 CPU ranks): loss rows, checkpoint, final/ export."""
    run_dir = tmp_path / "run"
    config = write_run_config(tmp_path / "cfg", tiny_model_dir, run_dir)
    env = launcher_env(name, tmp_path, REPO, config, run_dir)
    done = run_launcher(name, env, REPO, ["train.max_steps=4", "checkpoint.every=2", "dist.timeout_s=120"])
    losses = assert_complete_run(done, run_dir)
    assert max(row["step"] for row in losses) == 4
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert_srun_layout(name, tmp_path)


def assert_srun_layout(name: str, tmp_path: Path) -> None:
    """A Slurm launcher made one srun step: 2 rank tasks, or for multi-node one torchrun agent per node."""
    if name in SRUN_LAYOUT:
        calls = [json.loads(line) for line in (tmp_path / "srun_calls.jsonl").read_text().splitlines()]
        assert [(call["num_tasks"], call["num_nodes"]) for call in calls] == [SRUN_LAYOUT[name]]


def visible_gpu_count() -> int:
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    return len(done.stdout.splitlines()) if done and done.returncode == 0 else 0


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torchrun.sh", "slurm_single_node.sbatch", "local_deepspeed.sh"])
def test_launcher_standin_gpu(name: str, tmp_path: Path) -> None:
    """With DEVICE unset, a launcher on a GPU machine picks the GPU path: one rank per GPU, NCCL, no CPU knobs."""
    gpus = visible_gpu_count()
    if gpus == 0:
        pytest.skip("no GPU (nvidia-smi -L lists none)")
    if name == "local_deepspeed.sh" and shutil.which("deepspeed", path=f"{VENV_BIN}:{os.environ['PATH']}") is None:
        pytest.skip("deepspeed is not installed in this environment")
    repo_dir = write_standin_package(tmp_path / "standin")
    run_dir = tmp_path / "run"
    env = launcher_env(name, tmp_path, repo_dir, tmp_path / "unused.yaml", run_dir)
    for knob in ("DEVICE", "NPROC", "DS_ACCELERATOR"):  # let the launcher decide from nvidia-smi
        env.pop(knob, None)
    if name == "slurm_single_node.sbatch":  # the allocation: one task per GPU
        env |= {"SLURM_NTASKS": str(gpus), "SLURM_NTASKS_PER_NODE": str(gpus)}
    done = run_launcher(name, env, repo_dir, ["train.max_steps=3", "dist.timeout_s=60"])
    assert_complete_run(done, run_dir)
    start = read_metrics(run_dir)[0]
    assert (start["world_size"], start["backend"], start["accelerator"]) == (gpus, "nccl", None), start


# ----------------------------------------------------------------------------------------------
# Stop signals: a signal to the launcher script checkpoints, stops every rank (exit 75, nothing left
# running), and the same command then finishes exactly like an uninterrupted run.

STOP_ARGS = ["train.max_steps=60", "checkpoint.every=30", "eval.every=20", "train.log_every=10", "dist.timeout_s=120",
             "export.at_end=false"]


def launch_processes(launch_id_env: str, marker: str) -> list[int]:
    """PIDs of processes whose environment holds `launch_id_env` (every process of one launch)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def start_launcher(name: str, env: dict[str, str], args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(["bash", str(LAUNCHERS / name), *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def loss_rows(run_dir: Path) -> dict[int, float]:
    if not (run_dir / "metrics.jsonl").is_file():
        return {}
    return {row["step"]: row["train/loss"] for row in read_metrics(run_dir) if "train/loss" in row}


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    run_dir = tmp_path / "run"
    config = write_run_config(tmp_path / "cfg", tiny_model_dir, run_dir)
    done = run_launcher("torchrun.sh", launcher_env("torchrun.sh", tmp_path, REPO, config, run_dir), REPO, STOP_ARGS)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return run_dir


# torchrun.sh in CI; the other two in the slow tier (local_deepspeed.sh goes through the same supervisor, and the real
# Slurm cluster runs slurm_single_node.sbatch's signal path in tests/test_slurm.py): ~2 min less CI.
@pytest.mark.parametrize("name", ["torchrun.sh", pytest.param("local_deepspeed.sh", marks=pytest.mark.slow),
                                  pytest.param("slurm_single_node.sbatch", marks=pytest.mark.slow)])
def test_a_signal_to_the_launcher_checkpoints_stops_everything_and_the_rerun_is_exact(
    name: str, tmp_path: Path, tiny_model_dir: Path, uninterrupted_run: Path
) -> None:
    run_dir = tmp_path / "run"
    config = write_run_config(tmp_path / "cfg", tiny_model_dir, run_dir)
    env = launcher_env(name, tmp_path, REPO, config, run_dir)
    tag = f"VT_TEST_LAUNCH={tmp_path.name}"  # finds every process of this launch, whatever launched it
    env["VT_TEST_LAUNCH"] = tmp_path.name
    proc = start_launcher(name, env, STOP_ARGS)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while len(loss_rows(run_dir)) < 8:
            assert proc.poll() is None, f"the launch ended early:\n{proc.stdout.read()[-6000:] if proc.stdout else ''}"
            assert time.monotonic() < deadline, "no training steps"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # to the launcher script only, as `kill <pid>` or Slurm would
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, f"exit {proc.returncode}\n{out[-6000:]}"
    assert launch_processes("VT_TEST_LAUNCH", tag) == [], "processes of the launch are still running"
    stopped_at = max(loss_rows(run_dir))
    assert stopped_at < 60, "the run finished before the signal; nothing was tested"
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}").is_dir(), sorted(os.listdir(run_dir / "checkpoints"))
    assert "stopped at step" in out and "exit code 75" in out
    if name.endswith(".sbatch"):  # it asked Slurm to requeue the job
        assert (tmp_path / "srun_calls.jsonl.requeue").read_text().split() == [env["SLURM_JOB_ID"]]

    done = run_launcher(name, env, REPO, STOP_ARGS)  # the same command again: resumes
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    reference, resumed = read_metrics(uninterrupted_run), read_metrics(run_dir)
    pick = lambda rows: [(r["step"], r.get("train/loss"), r.get("eval/law/loss"), r.get("mixture/law/weight"))  # noqa: E731
                         for r in rows if "train/loss" in r or "eval/law/loss" in r]
    assert pick(resumed) == pick(reference)
    for rank in (0, 1):
        ref = (uninterrupted_run / "trace" / f"rank{rank}.jsonl").read_text()
        assert (run_dir / "trace" / f"rank{rank}.jsonl").read_text() == ref


# ----------------------------------------------------------------------------------------------
# More ranks than GPUs: the launchers refuse with a clear message, the quickstart uses fewer ranks

FAKE_NVIDIA_SMI = "#!/bin/sh\n[ \"$1\" = -L ] || exit 9\nfor i in $(seq 0 $((FAKE_GPUS - 1))); do echo \"GPU $i: Fake H100 (UUID: GPU-$i)\"; done\n"
FAKE_LAUNCHER = "#!/bin/sh\necho \"$0 $*\" >> \"$FAKE_SRUN_LOG.launched\"\nexit 0\n"


def gpu_env(name: str, tmp_path: Path, gpus: int, **extra: str) -> dict[str, str]:
    env = launcher_env(name, tmp_path, REPO, tmp_path / "unused.yaml", tmp_path / "run")
    fake = tmp_path / "fake_gpu_bin"
    fake.mkdir(exist_ok=True)
    for tool, text in (("nvidia-smi", FAKE_NVIDIA_SMI), ("torchrun", FAKE_LAUNCHER), ("deepspeed", FAKE_LAUNCHER),
                       ("srun", FAKE_LAUNCHER)):
        (fake / tool).write_text(text)
        (fake / tool).chmod(0o755)
    for knob in ("DEVICE", "NPROC", "CUDA_VISIBLE_DEVICES"):
        env.pop(knob, None)
    env.update(PATH=f"{fake}:{env['PATH']}", FAKE_GPUS=str(gpus), TORCHRUN=str(fake / "torchrun"),
               DEEPSPEED=str(fake / "deepspeed"), **extra)
    return env


@pytest.mark.parametrize(("name", "ranks"), [("torchrun.sh", {"NPROC": "2"}), ("local_deepspeed.sh", {"NPROC": "2"}),
                                             ("slurm_single_node.sbatch", {}), ("slurm_deepspeed.sbatch", {}),
                                             ("slurm_multi_node.sbatch", {"NPROC_PER_NODE": "2"})])
def test_more_ranks_than_gpus_is_refused_with_a_clear_message(name: str, ranks: dict[str, str], tmp_path: Path) -> None:
    env = gpu_env(name, tmp_path, gpus=1, **ranks)
    done = run_launcher(name, env, REPO, [])
    assert done.returncode == 2, done.stdout + done.stderr
    assert "ranks on this node, but only 1 GPU(s) are visible; NCCL cannot run two ranks on one GPU" in done.stderr
    assert not Path(env["FAKE_SRUN_LOG"] + ".launched").exists(), "it launched anyway"


@pytest.mark.parametrize(("extra", "launched"), [
    ({"NPROC": "1"}, "--nproc_per_node 1"),  # as many ranks as GPUs
    ({}, "--nproc_per_node 1"),  # the default: one rank per visible GPU
    ({"NPROC": "2", "ALLOW_GPU_SHARING": "1"}, "--nproc_per_node 2"),  # asked for explicitly
])
def test_ranks_that_fit_the_gpus_are_launched(extra: dict[str, str], launched: str, tmp_path: Path) -> None:
    env = gpu_env("torchrun.sh", tmp_path, gpus=1, **extra)
    done = run_launcher("torchrun.sh", env, REPO, [])
    assert done.returncode == 0, done.stdout + done.stderr
    assert launched in Path(env["FAKE_SRUN_LOG"] + ".launched").read_text()


def test_cuda_visible_devices_decides_what_is_visible(tmp_path: Path) -> None:
    env = gpu_env("torchrun.sh", tmp_path, gpus=8, NPROC="3", CUDA_VISIBLE_DEVICES="0,1")
    done = run_launcher("torchrun.sh", env, REPO, [])
    assert done.returncode == 2 and "only 2 GPU(s) are visible" in done.stderr
    env = gpu_env("torchrun.sh", tmp_path, gpus=8, DEVICE="gpu", CUDA_VISIBLE_DEVICES="")
    done = run_launcher("torchrun.sh", env, REPO, [])
    assert done.returncode == 2 and "DEVICE=gpu, but no GPU is visible here" in done.stderr


@pytest.mark.parametrize(("gpus", "asked", "used", "note"), [(1, 2, 1, True), (4, 2, 2, False), (0, 2, 2, False)])
def test_the_quickstart_uses_at_most_one_rank_per_gpu(gpus: int, asked: int, used: int, note: bool, tmp_path: Path) -> None:
    """scripts/quickstart.sh sets NPROC=$(fit_ranks_to_gpus $NPROC) from launchers/common.sh."""
    assert "NPROC=$(fit_ranks_to_gpus \"$NPROC\")" in (REPO / "scripts" / "quickstart.sh").read_text()
    env = gpu_env("torchrun.sh", tmp_path, gpus=gpus)
    done = subprocess.run(["bash", "-c", f"source {LAUNCHERS / 'common.sh'}; fit_ranks_to_gpus {asked}"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == str(used), done.stderr
    assert ("NCCL cannot put two ranks on one GPU: using 1" in done.stderr) == note


# ----------------------------------------------------------------------------------------------
# The supervisor every launcher runs its launch command under (versatune_ds.supervisor)

CHILD = """\
import os, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: (print("child got SIGUSR1", flush=True), sys.exit(0)))
print("ready", flush=True)
time.sleep(60)
sys.exit(3)
"""


def supervise(tmp_path: Path, command: list[str], *, forward: str = "child", env: dict[str, str] | None = None,
              signal_after_ready: int | None = None) -> tuple[int, str, str]:
    argv = [sys.executable, "-m", "versatune_ds.supervisor", "--log", str(tmp_path / "logs" / "x.log"),
            "--run-dir", str(tmp_path), "--forward", forward, "--", *command]
    proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if signal_after_ready is not None:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", line
        proc.send_signal(signal_after_ready)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_the_supervisor_redacts_the_output_and_the_log(tmp_path: Path) -> None:
    secret = "hf_SUPERVISORtestSECRET0123"
    program = "import os; print('token', os.environ['HF_TOKEN']); print('MLFLOW_TRACKING_PASSWORD=pw1,next'); raise SystemExit(4)"
    code, out, _ = supervise(tmp_path, [sys.executable, "-c", program],
                             env={"HF_TOKEN": secret, "MLFLOW_TRACKING_PASSWORD": "pw1"})
    assert code == 4
    log = (tmp_path / "logs" / "x.log").read_text()
    for text in (out, log):
        assert "token ***" in text and "MLFLOW_TRACKING_PASSWORD=***,next" in text and secret not in text and "pw1" not in text


@pytest.mark.parametrize("received", [signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP])
def test_the_supervisor_passes_a_stop_request_on_as_the_stop_signal(tmp_path: Path, received: signal.Signals) -> None:
    code, out, err = supervise(tmp_path, [sys.executable, "-u", "-c", CHILD], signal_after_ready=received)
    assert (code, "child got SIGUSR1" in out) == (0, True), out + err
    assert f"supervisor: got {received.name}; sending SIGUSR1 to the launcher" in err


def test_the_supervisor_reaches_every_process_under_a_launcher_that_would_die_of_the_signal(tmp_path: Path) -> None:
    """--forward tree: the launcher (here a shell without a handler) inherits 'ignore'; the rank catches it."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    launcher = f"{sys.executable} -u {script} & wait $!; echo launcher survived, rank exit $?"
    code, out, err = supervise(tmp_path, ["bash", "-c", launcher], forward="tree", signal_after_ready=signal.SIGTERM)
    assert code == 0 and "child got SIGUSR1" in out and "launcher survived, rank exit 0" in out, out + err


def test_the_supervisor_turns_a_checkpointed_stop_into_exit_75(tmp_path: Path) -> None:
    """torchrun and srun report a rank's exit 75 as a plain failure: the run's marker, under this launch's id, says 75."""
    write = ("import json, os, sys; json.dump({'launch_id': os.environ['VERSATUNE_LAUNCH_ID'], 'exit_code': 75}, "
             f"open({str(tmp_path / 'checkpointed_stop.json')!r}, 'w')); sys.exit(1)")
    assert supervise(tmp_path, [sys.executable, "-c", write])[0] == 75
    # a marker from another launch (an earlier run) does not count
    (tmp_path / "checkpointed_stop.json").write_text(json.dumps({"launch_id": "earlier", "exit_code": 75}))
    assert supervise(tmp_path, [sys.executable, "-c", "raise SystemExit(1)"])[0] == 1
    # a run that finished is a finished run, marker or not
    assert supervise(tmp_path, [sys.executable, "-c", write.replace("sys.exit(1)", "sys.exit(0)")])[0] == 0
