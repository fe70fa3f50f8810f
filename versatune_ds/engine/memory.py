"""Will the model states fit? Per-GPU and per-node host memory for ZeRO-2/3 (`versatune-ds estimate-memory`).

Parameters are counted from the model's config alone: the model is built on the meta device (no
weights are read or allocated), so a Llama-3-70B config.json works on a laptop. The memory numbers
are DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs` and
`estimate_zero3_model_states_mem_needs`, the functions behind DeepSpeed's `*_all_cold` tables) for
params + gradients + Adam states with its default 1.5x buffer factor. Activations are not included:
they depend on micro-batch size, sequence length and gradient checkpointing, and come on top.

`preflight_warning` runs the same estimate at the start of `train` and warns (never fails) when this
machine's GPU or host memory looks too small for the chosen DeepSpeed config.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from versatune_ds import dist
from versatune_ds.config.schema import RunConfig
from versatune_ds.engine.models import zero_stage
from versatune_ds.errors import UserError

logger = logging.getLogger(__name__)

GIB = 1024**3


@dataclass(frozen=True)
class ModelSize:
    total_params: int
    largest_layer_params: int  # the most parameters any one module owns directly (ZeRO-3 gathers it whole)


@dataclass(frozen=True)
class MemoryEstimate:
    stage: int
    offload_optimizer: bool
    offload_params: bool
    gpu_bytes_per_gpu: float
    host_bytes_per_node: float

    @property
    def label(self) -> str:
        if self.offload_params:
            return f"ZeRO-{self.stage} + offload params & optimizer to CPU"
        if self.offload_optimizer:
            return f"ZeRO-{self.stage} + offload optimizer to CPU"
        return f"ZeRO-{self.stage}"


def count_parameters(model: str, *, trust_remote_code: bool = False) -> ModelSize:
    """Count parameters from a model folder or a config.json, on the meta device (no weights)."""
    path = Path(model).expanduser()
    if not path.exists():
        raise UserError(f"--model: {model} not found; give a model folder or its config.json")
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"--model: cannot read a model config from {model}: {exc}") from None
    with torch.device("meta"):
        network = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in network.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in network.modules())
    return ModelSize(total_params=int(total), largest_layer_params=int(largest))


def estimate_memory(size: ModelSize, *, nodes: int, gpus_per_node: int, buffer_factor: float = 1.5) -> list[MemoryEstimate]:
    """Model-state memory for ZeRO-2 and ZeRO-3, with and without CPU offload (DeepSpeed's estimators)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if nodes < 1 or gpus_per_node < 1:
        raise UserError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    out: list[MemoryEstimate] = []
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            size.total_params, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=offload,
            additional_buffer_factor=buffer_factor,
        )
        out.append(MemoryEstimate(2, offload, False, float(gpu), float(cpu)))
    for offload_optimizer, offload_params in ((False, False), (True, False), (True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            size.total_params, size.largest_layer_params, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
            cpu_offload=offload_optimizer, cpu_offload_params=offload_params, zero_init=True,
            additional_buffer_factor=buffer_factor,
        )
        out.append(MemoryEstimate(3, offload_optimizer, offload_params, float(gpu), float(cpu)))
    return out


def format_table(size: ModelSize, estimates: list[MemoryEstimate], *, nodes: int, gpus_per_node: int) -> str:
    lines = [
        f"{size.total_params / 1e9:.3f}B parameters (largest layer {size.largest_layer_params / 1e6:.1f}M), "
        f"{nodes} node(s) x {gpus_per_node} GPU(s); model states only (params, grads, Adam), activations come on top",
        f"{'setup':<48} {'per GPU':>12} {'host per node':>15}",
    ]
    for e in estimates:
        lines.append(f"{e.label:<48} {e.gpu_bytes_per_gpu / GIB:>8.2f} GiB {e.host_bytes_per_node / GIB:>11.2f} GiB")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Preflight at the start of `train`


def host_memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def preflight_warning(cfg: RunConfig, ds_config: dict, env: dist.DistEnv) -> str | None:
    """Warn (rank 0, never fail) when this machine looks too small for the run's model states."""
    if env.rank != 0:
        return None
    model_dir = Path(cfg.model.path).expanduser()
    if not (model_dir / "config.json").is_file():
        return None  # a hub name or a GGUF folder: the loader reports problems itself
    try:
        size = count_parameters(str(model_dir), trust_remote_code=cfg.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 (a preflight estimate must never stop training)
        logger.debug("memory preflight skipped: %s", exc)
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or (torch.cuda.device_count() if torch.cuda.is_available() else env.world_size)
    local = max(1, min(local, env.world_size))
    nodes = max(1, env.world_size // local)
    zero = ds_config.get("zero_optimization", {})
    stage = max(2, zero_stage(ds_config))  # ZeRO-0/1 need at least ZeRO-2's per-GPU memory
    offload_optimizer = zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
    offload_params = zero.get("offload_param", {}).get("device", "none") in ("cpu", "nvme")
    estimate = next(
        (e for e in estimate_memory(size, nodes=nodes, gpus_per_node=local)
         if e.stage == stage and e.offload_optimizer == offload_optimizer and e.offload_params == (offload_params and stage == 3)),
        None,
    )
    if estimate is None:
        return None
    host_need = estimate.host_bytes_per_node
    problems = []
    if torch.cuda.is_available():
        gpu_total = torch.cuda.get_device_properties(env.local_rank).total_memory
        if estimate.gpu_bytes_per_gpu > gpu_total:
            problems.append(f"{estimate.gpu_bytes_per_gpu / GIB:.1f} GiB per GPU (this GPU has {gpu_total / GIB:.1f} GiB)")
    else:
        host_need += estimate.gpu_bytes_per_gpu * local  # on a CPU machine "GPU" memory is host memory too
    host_total = host_memory_bytes()
    if host_need > host_total:
        problems.append(f"{host_need / GIB:.1f} GiB of host memory per node (this node has {host_total / GIB:.1f} GiB)")
    if not problems:
        logger.info("memory preflight: %s needs ~%.1f GiB per GPU, ~%.1f GiB host per node for model states",
                    estimate.label, estimate.gpu_bytes_per_gpu / GIB, estimate.host_bytes_per_node / GIB)
        return None
    message = (
        f"this machine looks too small: {estimate.label} for {size.total_params / 1e9:.2f}B parameters on {nodes} node(s) x "
        f"{local} rank(s) needs about " + " and ".join(problems) + " for model states alone; consider more GPUs/nodes, "
        "ZeRO-3, or an offload config (zero3_offload.json); see `versatune-ds estimate-memory`"
    )
    logger.warning(message)
    return message
