"""Distributed setup and the few collectives the toolkit needs.

`DistEnv.from_environ()` reads rank / world size / local rank from torchrun or the `deepspeed`
launcher (RANK, WORLD_SIZE, LOCAL_RANK), or, when those are absent, from Slurm's `srun`
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, with MASTER_ADDR = the job's first host). DeepSpeed does
not read SLURM_* itself (CPU_FACTS.md), so `start_process_group` exports the torch variables before it
starts the process group.

Every collective has the group's timeout (`dist.timeout_s`): a rank that dies or never arrives turns
into a `RuntimeError` on the others instead of a hang. The helpers below are the only way the rest
of the package talks to torch.distributed, and each works unchanged with world size 1 (no process group).
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist

from versatune_ds.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torch (torchrun / deepspeed launcher) | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, *, default_port: int = 29500) -> DistEnv:
        env = os.environ if environ is None else environ
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(
                rank=_int_var(env, "RANK"),
                world_size=_int_var(env, "WORLD_SIZE"),
                local_rank=_int_var(env, "LOCAL_RANK", 0),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=_int_var(env, "MASTER_PORT", default_port),
                launcher="torch",
            )
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            return cls(
                rank=_int_var(env, "SLURM_PROCID"),
                world_size=_int_var(env, "SLURM_NTASKS"),
                local_rank=_int_var(env, "SLURM_LOCALID", 0),
                master_addr=env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "")),
                master_port=_int_var(env, "MASTER_PORT", default_port),
                launcher="slurm",
            )
        return cls(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=default_port, launcher="single")


def _int_var(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise UserError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list (`node[01-04],gpu7` -> `node01`), via `scontrol` when available."""
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # Without scontrol: expand the first entry's first range by hand.
    first = nodelist.split(",")[0]
    if "[" in first:
        prefix, rest = first.split("[", 1)
        return prefix + rest.split("]")[0].split(",")[0].split("-")[0]
    return first


def resolve_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def start_process_group(env: DistEnv, *, backend: str = "auto", timeout_s: int = 1800) -> None:
    """Start the process group (through DeepSpeed, so its engines find it) with a collective timeout.

    Multi-rank: from the launcher's environment. One process: a private in-memory store (no port to collide
    on), because DeepSpeed needs a process group even for one rank. Does nothing if a group is up already.
    """
    import deepspeed

    if torch_dist.is_initialized():
        return
    backend = resolve_backend(backend)
    if backend == "gloo":
        # The shared-memory comm op is JIT-compiled on first use (30-60 s) and gives identical results.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    timeout = datetime.timedelta(seconds=timeout_s)
    if not env.is_distributed:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        torch_dist.init_process_group(backend=backend, store=torch_dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        return
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    if backend == "nccl":
        # Modulo: under `srun --gpus-per-task=1` each task sees one device, whatever its local rank.
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False)
    logger.info("process group up: %d ranks, backend %s, timeout %d s", env.world_size, backend, timeout_s)


def _is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def barrier() -> None:
    if _is_initialized():
        torch_dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank (JSON-like objects and numpy arrays)."""
    if not _is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_array(values: np.ndarray | None, size: int, src: int = 0) -> np.ndarray:
    """A float64 vector from rank `src` on every rank, bit-identical (used for mixture weights)."""
    if not _is_initialized():
        assert values is not None
        return np.asarray(values, dtype=np.float64).copy()
    device = _collective_device()
    tensor = torch.zeros(size, dtype=torch.float64, device=device)
    if torch_dist.get_rank() == src:
        assert values is not None and len(values) == size
        tensor.copy_(torch.as_tensor(np.asarray(values, dtype=np.float64)))
    torch_dist.broadcast(tensor, src=src)
    return tensor.cpu().numpy()


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks of a float64 array (e.g. per-domain loss sums and token counts)."""
    array = np.asarray(values, dtype=np.float64)
    if not _is_initialized():
        return array.copy()
    tensor = torch.as_tensor(array.copy(), device=_collective_device())
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank."""
    if not _is_initialized():
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def any_rank_true(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (for collective stop / skip decisions)."""
    return bool(all_reduce_sum(np.array([1.0 if flag else 0.0]))[0] > 0)


def even_shard(num_items: int, world_size: int, rank: int) -> range:
    """The contiguous share of `num_items` for `rank`; shares differ by at most one item."""
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _collective_device() -> torch.device:

    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Words in the errors torch raises when a peer dies or stops answering (gloo, NCCL, the c10d store).
_COLLECTIVE_FAILURE_MARKERS = ("gloo", "NCCL", "c10d", "Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out")


def is_collective_failure(exc: BaseException) -> bool:
    """True for the error a rank gets when another rank died or hung during a collective (or its timeout)."""
    if isinstance(exc, getattr(torch_dist, "DistError", ())):
        return True
    # gloo raises a plain RuntimeError ("...gloo/transport/tcp/pair.cc: Connection reset by peer",
    # "Timed out waiting 20000ms for send operation to complete").
    return isinstance(exc, RuntimeError) and _is_initialized() and any(m in str(exc) for m in _COLLECTIVE_FAILURE_MARKERS)


def destroy() -> None:
    """Leave a one-process group. A multi-rank group is left by ending the process (`cli._leave_process_group`):
    destroying a gloo group while peers finish at their own pace can abort a rank that has done all its work
    (`terminate called without an active exception`), so multi-rank groups are not torn down here."""
    if _is_initialized():
        if torch_dist.get_world_size() == 1:
            torch_dist.destroy_process_group()


def shard_sequence(items: Sequence[Any], world_size: int, rank: int) -> list[Any]:
    return [items[i] for i in even_shard(len(items), world_size, rank)]
