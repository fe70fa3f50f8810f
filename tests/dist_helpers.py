"""Multi-process test helpers: launch 2 CPU ranks (torchrun / deepspeed launcher / one process), test configs,
and small worker programs that run under a launcher (`python tests/dist_helpers.py <worker> ...`).

Every launch gets its own free port, OMP_NUM_THREADS=1, DS_ACCELERATOR=cpu and a wall-clock timeout; test
configs set a short `dist.timeout_s`, so a rank that dies turns into an error on the others instead of a hang.
Other test files reuse `launch`, `write_run_config`, `tiny_ds_config` and `read_metrics`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SAMPLE_DATA = REPO / "data" / "sample"
THIS_FILE = Path(__file__).resolve()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONWARNINGS"] = "ignore::FutureWarning,ignore::UserWarning"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def launch_command(args: Sequence[str], *, nproc: int = 2, launcher: str = "torchrun", script: str | None = None) -> list[str]:
    """The command line that runs `versatune_ds <args>` (or `script <args>`) on `nproc` local ranks."""
    target = ["-m", "versatune_ds"] if script is None else [script]
    if launcher == "torchrun":
        port = free_port()
        return [str(BIN / "torchrun"), "--nnodes=1", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                f"--master_port={port}", *target, *args]
    if launcher == "deepspeed":
        port = free_port()
        ds_target = ["--module", "versatune_ds"] if script is None else [script]
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port), *ds_target, *args]
    if launcher == "single":
        return [sys.executable, *target, *args]
    raise ValueError(f"unknown launcher {launcher!r}")


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc): torchrun (torch >= 2.12) starts its workers in sessions of their
    own, so killing torchrun's process group alone leaves the ranks running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> list[int]:
    """SIGKILL `pid`'s process group and every process below it; returns the pids signalled."""
    targets = [pid, *_descendants(pid)]
    for target in targets:
        for kill in (os.killpg, os.kill):
            try:
                kill(target, signal.SIGKILL)
            except OSError:
                pass
    return targets


def _wait_gone(pids: Sequence[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except OSError:
                pass
        if not alive:
            return
        time.sleep(0.05)


def launch(
    args: Sequence[str], *, nproc: int = 2, launcher: str = "torchrun", script: str | None = None,
    timeout: float = 300, cwd: str | Path | None = None, extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run to completion; returns the CompletedProcess (stdout+stderr merged in .stdout)."""
    cmd = launch_command(args, nproc=nproc, launcher=launcher, script=script)
    proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=launch_env(extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def run_until_killed(
    args: Sequence[str], kill_when: Callable[[], bool], *, nproc: int = 2, launcher: str = "torchrun",
    timeout: float = 300, poll_s: float = 0.02,
) -> tuple[bool, str]:
    """Start a run and SIGKILL its whole process group (launcher and every rank) once `kill_when()` is true.

    Returns (killed, output); killed is False when the run ended on its own first.
    """
    cmd = launch_command(args, nproc=nproc, launcher=launcher)
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"vt_kill_{os.getpid()}_{time.monotonic_ns()}.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        killed = False
        signalled: list[int] = []
        while proc.poll() is None and time.monotonic() < deadline:
            if kill_when():
                signalled = kill_tree(proc.pid)
                killed = True
                break
            time.sleep(poll_s)
        if proc.poll() is None and not killed:
            signalled = kill_tree(proc.pid)
        proc.wait()
        _wait_gone(signalled[1:])  # the ranks are gone before anything else starts
    out = log.read_text(errors="replace")
    log.unlink()
    return killed, out


def tiny_ds_config(folder: Path, stage: int = 3, **zero: object) -> Path:
    """A DeepSpeed JSON for the tiny model: ZeRO-3 really partitions (persistence threshold 0)."""
    zero_block: dict[str, object] = {"stage": stage}
    if stage == 3:
        zero_block.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    zero_block.update(zero)
    path = Path(folder) / f"zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": zero_block, "steps_per_print": 1000000}))
    return path


def write_distribution(path: Path, domains: Sequence[str], p: Sequence[float]) -> Path:
    path.write_text(json.dumps({"domains": list(domains), "p": list(p), "ci_low": list(p), "ci_high": list(p), "num_texts": 100}))
    return path


TEST_DOMAINS = ("law", "code", "general")


def write_run_config(folder: Path, model_dir: Path, run_dir: Path, *, stage: int = 3, data_dir: Path = SAMPLE_DATA,
                     **sections: dict) -> Path:
    """A small run config over the sample data: 3 domains, dynamic VersaTune weights from a given distribution."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    distribution = write_distribution(folder / "distribution.json", TEST_DOMAINS, [0.5, 0.3, 0.2])
    cfg: dict = {
        "model": {"path": str(model_dir), "dtype": "fp32"},
        "data": {"dir": str(data_dir), "domains": list(TEST_DOMAINS), "seq_len": 256, "truncation": "truncate", "heldout_fraction": 0.1,
                 "heldout_max_examples": 4, "cache_dir": str(folder / "cache")},
        "mixture": {"strategy": "versatune", "distribution": str(distribution), "block_size": 16, "floor": 0.05},
        "train": {"run_dir": str(run_dir), "seed": 7, "max_steps": 12, "micro_batch_size": 2,
                  "gradient_accumulation_steps": 2, "learning_rate": 0.003, "warmup_steps": 2, "log_every": 4,
                  "trace_samples": True},
        "eval": {"every": 4, "micro_batch_size": 4},
        "checkpoint": {"every": 6, "keep_last": 2},
        "deepspeed": {"config": str(tiny_ds_config(folder, stage))},
        "dist": {"timeout_s": 60},
        "export": {"at_end": True},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def loss_curve(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def eval_losses(run_dir: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in read_metrics(run_dir) if any(k.startswith("eval/") for k in r)}


def read_trace(run_dir: Path, rank: int) -> list[dict]:
    with open(Path(run_dir) / "trace" / f"rank{rank}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def latest_step(run_dir: Path) -> int:
    """Step of the run's `latest` checkpoint pointer (0 if none)."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    try:
        return int(latest.read_text().strip().split("_")[1])
    except (OSError, IndexError, ValueError):
        return 0


# ----------------------------------------------------------------------------------------------
# Workers (run under a launcher: `torchrun ... tests/dist_helpers.py <worker> <args>`)


def _tiny_engine_setup(model_dir: str, folder: Path, stage: int, env, *, lr: float = 0.01):
    """(cfg, ds_config) for a TrainEngine on the tiny model: 2 micro-batches of 2 rows per rank and step."""
    from versatune_ds.config.loading import load_config
    from versatune_ds.engine.ds_config import build_ds_config

    ds_path = tiny_ds_config(folder, stage)
    cfg = load_config(None, [
        f"model.path={model_dir}", "model.dtype=fp32", "data.domains=[{name: a, train: [" + str(THIS_FILE) + "]}]",
        "train.micro_batch_size=2", "train.gradient_accumulation_steps=2", f"train.learning_rate={lr}",
        "train.warmup_steps=0", "train.lr_scheduler=linear", f"deepspeed.config={ds_path}", "dist.timeout_s=60",
        f"train.run_dir={folder / 'run'}",
    ])
    return cfg, build_ds_config(cfg, env.world_size)


def _fixed_batches(rank: int, steps: int) -> list[list[dict]]:
    """Per step, this rank's 2 micro-batches (same on every run: seeded by rank and step)."""
    import numpy as np

    from versatune_ds.data.packing import Example, collate_rows, rows_without_packing

    out = []
    for step in range(steps):
        ids = np.random.default_rng([rank, step]).integers(5, 200, size=(4, 16))
        rows = rows_without_packing([Example(i, 0, row, row.copy()) for i, row in enumerate(ids)])
        out.append([collate_rows(rows[k * 2 : (k + 1) * 2], pad_token_id=0, packed=True) for k in range(2)])
    return out


def _check_broadcast(env, out_dir: Path) -> None:
    """Rank 0 draws new weights and broadcasts them; every rank sets them and records its schedule and draws."""
    import numpy as np

    from versatune_ds import dist
    from versatune_ds.mixture.sampler import MixtureSampler, MixtureSchedule

    sizes, block, world = [50, 7, 300, 23], 32, env.world_size
    sampler = MixtureSampler(sizes, seed=3, block_size=block, global_batch_size=4 * world, rank=env.rank, world_size=world,
                             schedule=MixtureSchedule.constant([0.25] * 4))
    draws = [sampler.next_batch().tolist() for _ in range(3)]  # 24 samples: inside block 0
    proposal = np.random.default_rng(11).dirichlet(np.ones(4)) if env.is_main else None
    weights = dist.broadcast_array(proposal, 4)
    sampler.set_weights(weights)
    draws += [sampler.next_batch().tolist() for _ in range(2 * block // 4 + 2)]
    record = {"weights": weights.tolist(), "schedule": sampler.schedule.to_json(), "draws": draws}
    Path(out_dir, f"broadcast_rank{env.rank}.json").write_text(json.dumps(record))


def _worker_engine_checks(model_dir: str, out_dir: str) -> None:
    """Weight broadcast; then ZeRO-0, 2 and 3 engines on the same batches, where step 2 has a NaN loss on rank 1 only.

    Writes per rank and stage: losses, skip flags, and (rank 0) whether the weights stayed exactly unchanged on
    the skipped step and changed on the next one.
    """
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from versatune_ds import dist
    from versatune_ds.dist import start_process_group
    from versatune_ds.engine.export import gather_state_dict
    from versatune_ds.engine.losses import row_loss_sums
    from versatune_ds.engine.models import load_inference_model, load_model
    from versatune_ds.engine.train_engine import TrainEngine
    from versatune_ds.eval.heldout import batch_loss_sums, hf_forward

    env = dist.DistEnv.from_environ()
    start_process_group(env, backend="gloo", timeout_s=60)
    _check_broadcast(env, Path(out_dir))
    batches = _fixed_batches(env.rank, 4)
    # Replica losses first: while a ZeRO-3 model is alive, transformers would partition this one too.
    replica = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        probe = batches[0][0]
        logits = replica(input_ids=probe["input_ids"], position_ids=probe["position_ids"], use_cache=False).logits
    replica_sums, replica_counts = row_loss_sums(logits, probe["labels"])
    del replica
    poison = {"on": False}

    def hook(_module, _inputs, output):
        if poison["on"] and env.rank == 1:
            output.logits = output.logits * float("nan")
        return output

    # ZeRO-3 last: its HfDeepSpeedConfig must not be alive while the other models load.
    for stage in (0, 2, 3):
        cfg, ds_config = _tiny_engine_setup(model_dir, Path(out_dir), stage, env)
        engine = TrainEngine(cfg.train, load_model(cfg.model, ds_config=ds_config), ds_config, total_steps=10)
        handle = engine.module.register_forward_hook(hook)
        snapshots, results = [], []
        for step, micro_batches in enumerate(batches):
            poison["on"] = step == 1
            results.append(engine.train_step(micro_batches))
            snapshots.append(gather_state_dict(engine.module, is_main=env.is_main, dtype=torch.float32))
        handle.remove()
        record = {"skipped": [r.skipped for r in results], "loss": [r.loss for r in results], "lr": [r.lr for r in results],
                  "skipped_steps": engine.skipped_steps}
        if env.is_main:
            first, skipped, after = snapshots[0], snapshots[1], snapshots[2]
            record["unchanged"] = all(torch.equal(first[k], skipped[k]) for k in first)
            record["finite"] = all(bool(torch.isfinite(v).all()) for v in skipped.values())
            record["changed_later"] = any(not torch.equal(skipped[k], after[k]) for k in skipped)
        Path(out_dir, f"stage{stage}_rank{env.rank}.json").write_text(json.dumps(record))
        del engine, snapshots
        gc.collect()
    # A reference model under ZeRO-3 without an optimizer (mixture.reference_model) scores like a plain replica.
    reference = load_inference_model(cfg.model, env, zero3=True)
    sums, counts = batch_loss_sums(hf_forward(reference.module, reference.device), probe)
    record = {"eval_sums": sums.tolist(), "replica_sums": replica_sums.double().tolist(),
              "eval_counts": counts.tolist(), "replica_counts": replica_counts.tolist()}
    Path(out_dir, f"eval_engine_rank{env.rank}.json").write_text(json.dumps(record))
    dist.destroy()


def _worker_export(model_dir: str, out_dir: str) -> None:
    """Train a ZeRO-3 engine 2 steps, checkpoint it like `train` does, export it, save the live engine's logits."""
    import numpy as np
    import torch

    from versatune_ds import dist
    from versatune_ds.config.identity import config_to_yaml
    from versatune_ds.data.tokenizer import load_tokenizer
    from versatune_ds.dist import start_process_group
    from versatune_ds.engine import checkpoint, resume_checks
    from versatune_ds.engine.export import export_from_engine
    from versatune_ds.engine.models import load_model
    from versatune_ds.engine.train_engine import TrainEngine

    env = dist.DistEnv.from_environ()
    cfg, ds_config = _tiny_engine_setup(model_dir, Path(out_dir), 3, env, lr=0.05)
    start_process_group(env, backend="gloo", timeout_s=60)
    engine = TrainEngine(cfg.train, load_model(cfg.model, ds_config=ds_config), ds_config, total_steps=10)
    for micro_batches in _fixed_batches(env.rank, 2):
        engine.train_step(micro_batches)
    run_dir = Path(cfg.train.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    checkpoint.save_checkpoint(engine, run_dir, step=2, state=resume_checks.config_state(cfg), keep_last=1, env=env)
    export_from_engine(engine, load_tokenizer(cfg.model), run_dir / "final", cfg=cfg, env=env)
    ids = torch.as_tensor(np.random.default_rng(0).integers(5, 200, size=(2, 24)))
    with engine.eval_mode():
        logits = engine.forward_logits({"input_ids": ids})
    if env.is_main:
        np.save(Path(out_dir, "engine_logits.npy"), logits.numpy())
        np.save(Path(out_dir, "ids.npy"), ids.numpy())
    dist.destroy()


WORKERS = {"engine_checks": _worker_engine_checks, "export": _worker_export}

if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    WORKERS[argv[0]](*argv[1:])
    # As versatune_ds.cli does: end without C++ static teardown, where gloo can abort a finished process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
