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
import subprocess
import sys
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
# Fake srun: run the tasks here, with the variables a real srun gives each task.
import json, os, subprocess, sys, time

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
# Fake scontrol: only `scontrol show hostnames [a,b,...]` (comma lists, no bracket ranges).
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
