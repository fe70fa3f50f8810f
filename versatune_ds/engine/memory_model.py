"""How much memory a run needs: accelerator memory per rank, host memory per rank and per node, disk.

`estimate_run(cfg, nodes=..., gpus_per_node=..., device=...)` reads everything from a run config: the model's
shape from its config.json (built on the meta device, no weights), the DeepSpeed config (stage, offload,
buckets, live-parameter limits), `data.seq_len`, the micro-batch, gradient checkpointing, the loss path and the
export. The peak of a rank is the largest of three moments, each the sum of what is alive then:

- training step: model states (ZeRO-partitioned or not; offloaded ones on the host), the parameters ZeRO-3
  keeps gathered while a forward/backward runs, the gradient buckets, the activations, the loss path;
- model load: a process reads the whole checkpoint (memory-mapped safetensors pages) while partitioning;
- export at the end (rank 0): one shard in the export dtype plus the largest tensor in fp32, on the host.

Plus a fixed cost per process (Python, torch, transformers, DeepSpeed, gloo/NCCL; a CUDA context on GPUs) and,
on the host of a GPU run, the staging of each rank's largest optimizer sub-group when a checkpoint is written.
The activation model counts the tensors a Hugging Face decoder layer keeps for backward (Llama-style: norms,
q/k/v/o, rotary, attention output, gated MLP), with gradient checkpointing one input per layer plus one layer
recomputed. The fixed costs and the activation factor are calibrated on CPU runs (tiny model, SmolLM2-135M and a
128 k-vocabulary probe, bench/memory_estimate.py: every row within 25 % of the measured peak RSS per rank); the
GPU-only constants (CUDA context, allocator slack) are stated assumptions, not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from versatune_ds.config.schema import RunConfig
from versatune_ds.engine.chunked_loss import CHUNKED_MODEL_TYPES, chunk_rows_for
from versatune_ds.engine.ds_config import build_ds_config
from versatune_ds.engine.export_shards import DEFAULT_MAX_SHARD_BYTES
from versatune_ds.engine.models import TORCH_DTYPES, resolve_dtype_name, zero_stage
from versatune_ds.errors import UserError

GIB = 1024**3
MIB = 1024**2

# Calibrated on the 2-core CPU machine (bench/results/memory_estimate.md).
CPU_PROCESS_BYTES = 600 * MIB  # python + torch (CPU) + transformers + DeepSpeed + gloo + datasets, after a run's set-up
CPU_ACTIVATION_FACTOR = 1.3  # autograd and allocator overhead on the counted activations (CPU, fp32; fitted)
CPU_CHECKPOINTED_HIDDEN = 6  # hidden-size vectors a checkpointed layer keeps per token on the CPU (measured)
# Assumptions for GPU runs (not measured here: no GPU was available).
GPU_PROCESS_HOST_BYTES = 3 * GIB  # CUDA/NCCL libraries and pinned staging in a rank's host memory
GPU_CONTEXT_BYTES = 1 * GIB  # CUDA context + NCCL buffers on the device, outside torch's allocator
GPU_ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation on top of the live tensors
GPU_CHECKPOINTED_HIDDEN = 2  # the layer input and its residual copy per token, with flash / memory-efficient attention


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, from its config alone."""

    model_type: str
    total_params: int
    largest_layer_params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool


def model_shape(model: str, *, trust_remote_code: bool = False, gguf_file: str | None = None) -> ModelShape:
    """Count parameters and read the dimensions from a model folder or a config.json, on the meta device."""
    path = Path(model).expanduser()
    if not path.exists():
        raise UserError(f"model: {model} not found; give a model folder or its config.json (no weights are read)")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"model: cannot read a model config from {model}: {exc}") from None
    with torch.device("meta"):
        network = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in network.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in network.modules())
    text = getattr(config, "text_config", None) or config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
    heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 1))
    return ModelShape(
        model_type=str(getattr(config, "model_type", "")),
        total_params=int(total),
        largest_layer_params=int(largest),
        hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", 0) or getattr(text, "n_inner", 0) or 4 * hidden),
        layers=int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 1)),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", 0) or heads),
        vocab=int(getattr(text, "vocab_size", 0)),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


@dataclass(frozen=True)
class RunShape:
    """What the estimate needs of a run (all read from a run config by `run_shape`)."""

    seq_len: int
    micro_batch: int
    eval_micro_batch: int
    gradient_checkpointing: bool
    param_bytes: int  # 2 (bf16/fp16) or 4 (fp32)
    export_bytes: int
    stage: int
    offload_optimizer: bool
    offload_params: bool
    nodes: int
    gpus_per_node: int
    device: str  # cuda | cpu
    chunked_loss: bool
    max_live_parameters: float = 1e9
    prefetch_bucket: float = 5e7
    reduce_bucket: float = 5e8
    sub_group_size: float = 1e9
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    export_at_end: bool = True

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank on the accelerator and on the host, per node on the host, and on disk."""

    device_parts: dict[str, float]  # per rank, at its peak (empty on a CPU run: everything is host memory)
    host_parts: dict[str, float]  # per rank, at its peak
    ranks_per_node: int
    node_shared_parts: dict[str, float] = field(default_factory=dict)  # per node, once (page cache, export)
    checkpoint_disk_bytes: float = 0.0
    export_disk_bytes: float = 0.0

    @property
    def device_per_rank_bytes(self) -> float:
        return float(sum(self.device_parts.values()))

    @property
    def host_per_rank_bytes(self) -> float:
        return float(sum(self.host_parts.values()))

    @property
    def host_per_node_bytes(self) -> float:
        return self.host_per_rank_bytes * self.ranks_per_node + float(sum(self.node_shared_parts.values()))


# ----------------------------------------------------------------------------------------------
# The parts


def _activation_bytes(model: ModelShape, run: RunShape, element: int) -> float:
    """Tensors kept for backward by one micro-batch (Llama-style decoder layers, sdpa attention).

    Per token and layer, measured on SmolLM2's shapes (bench: 2 vs 8 layers, fresh processes): 8 x hidden for the
    norms, projections, rotary and attention output, 4 x intermediate for the gated MLP; with gradient
    checkpointing 6 x hidden per layer (the layer input and what the checkpoint wrapper keeps) plus one layer
    recomputed during backward. No attention weights: sdpa's fused kernels keep none, on GPUs and, since torch
    2.3, on the CPU too, also with the block-diagonal mask of packed rows (torch 2.13, counted with
    saved_tensors_hooks: a 4096-token row saves q, k, v, the output and the mask, not heads x 4096 x 4096); the
    mask itself is counted once per micro-batch.
    """
    tokens = run.seq_len * run.micro_batch
    cpu = run.device == "cpu"
    per_layer = (8 * model.hidden + 4 * model.intermediate) * tokens * element
    if run.gradient_checkpointing:
        kept_hidden = CPU_CHECKPOINTED_HIDDEN if cpu else GPU_CHECKPOINTED_HIDDEN
        kept = model.layers * kept_hidden * model.hidden * tokens * element + per_layer  # + one layer recomputed
    else:
        kept = model.layers * per_layer
    mask = run.micro_batch * run.seq_len * run.seq_len  # packed rows: one block-diagonal bool mask per forward
    return (CPU_ACTIVATION_FACTOR if cpu else 1.0) * kept + mask + 3 * model.hidden * tokens * element


def _loss_bytes(model: ModelShape, run: RunShape, element: int) -> float:
    """The loss path at its peak (backward of the output layer)."""
    tokens = run.seq_len * run.micro_batch
    if not run.chunked_loss:
        # logits (model dtype), their fp32 copy (not for fp32), log-softmax saved (fp32), its gradient (fp32, then model dtype)
        per_logit = element + (4 if element != 4 else 0) + 4 + 4 + (element if element != 4 else 0)
        return float(tokens * model.vocab * per_logit)
    rows = min(chunk_rows_for(model.vocab), tokens)
    chunk = rows * model.vocab * (4 + (element if element != 4 else 0))
    head_grad = model.vocab * model.hidden * element  # the output layer's gradient, built chunk by chunk
    selected = 2 * tokens * model.hidden * element  # loss positions' hidden states and their gradient (at most all)
    return float(chunk + head_grad + selected)


def _states(model: ModelShape, run: RunShape) -> tuple[dict[str, float], dict[str, float]]:
    """(on the device, on the host) model states per rank.

    Parameters and their gradients in the model dtype (ZeRO-3 partitions both; ZeRO-2 the gradients), the fp32
    master copy and Adam's two moments (12 bytes per parameter, partitioned from ZeRO-1 on; DeepSpeed keeps the
    master copy also when training in fp32), and the fp32 gradient of the optimizer sub-group being stepped.
    """
    p, w, e = float(model.total_params), float(run.world_size), run.param_bytes
    device: dict[str, float] = {}
    host: dict[str, float] = {}
    if run.stage >= 3:
        params, grads, optimizer = e * p / w, e * p / w, 12 * p / w
    elif run.stage in (1, 2):
        params, grads, optimizer = e * p, e * p if run.stage == 1 else e * p / w, 12 * p / w
    else:
        params, grads, optimizer = e * p, e * p, (8 if e == 4 else 12) * p
    fp32_grad = min(run.sub_group_size, optimizer / 12) * 4 if run.stage >= 1 else (0.0 if e == 4 else 4 * p)
    (host if run.offload_params and run.stage >= 3 else device)["parameters"] = params
    device["gradients"] = grads
    optimizer_side = host if run.offload_optimizer else device
    optimizer_side["fp32 master + Adam moments"] = optimizer
    if fp32_grad:
        optimizer_side["fp32 gradient of a sub-group"] = fp32_grad
    return device, host


def _gathered_bytes(model: ModelShape, run: RunShape) -> float:
    """Parameters ZeRO-3 holds gathered during a step, plus gradient buckets (ZeRO-1/2: buckets only)."""
    e = run.param_bytes
    buckets = 2 * min(run.reduce_bucket, model.total_params) * e
    if run.stage < 3:
        return buckets
    # With stage3_max_reuse_distance larger than the model, parameters are kept between their forward and backward
    # use; stage3_max_live_parameters caps them; the prefetch bucket and the largest layer come on top.
    live = min(float(model.total_params), run.max_live_parameters)
    return (live + min(run.prefetch_bucket, model.total_params) + model.largest_layer_params) * e + buckets


def estimate(model: ModelShape, run: RunShape) -> MemoryEstimate:
    """Peak memory per rank and per node for `run` on `model` (see the module docstring)."""
    activation_element = run.param_bytes
    state_device, state_host = _states(model, run)
    step = {
        **state_device,
        "ZeRO-3 gathered parameters + gradient buckets": _gathered_bytes(model, run),
        "activations": _activation_bytes(model, run, activation_element),
        "loss path": _loss_bytes(model, run, activation_element),
    }
    export = 0.0
    if run.export_at_end:
        shard = min(float(run.max_shard_bytes), model.total_params * run.export_bytes)
        export = shard + model.largest_layer_params * 4
    load = model.total_params * run.param_bytes  # the checkpoint's pages, read by every process while partitioning
    states_total = sum(state_device.values()) + sum(state_host.values())
    per_node = max(1, run.gpus_per_node)
    # ZeRO-3 saves the fp32 master and Adam moments (12 bytes per parameter); ZeRO-0/1/2 also the module's weights.
    checkpoint_disk = model.total_params * (12 if run.stage >= 3 else run.param_bytes + 12)
    if run.device == "cpu":
        peak_moment = max(sum(step.values()) + sum(state_host.values()), states_total + export, load)
        host = {"process": float(CPU_PROCESS_BYTES)}
        if peak_moment == sum(step.values()) + sum(state_host.values()):
            host.update(step)
            host.update(state_host)
        elif peak_moment == load:
            host["model load"] = float(load)
        else:
            host["model states"] = float(states_total)
            host["export (rank 0)"] = float(export)
        return MemoryEstimate({}, host, per_node, checkpoint_disk_bytes=checkpoint_disk,
                              export_disk_bytes=model.total_params * run.export_bytes)
    device = {"CUDA context": float(GPU_CONTEXT_BYTES), **step}
    device["allocator slack"] = GPU_ALLOCATOR_SLACK * sum(v for k, v in step.items())
    staging = min(run.sub_group_size, model.total_params / run.world_size) * 4  # a checkpoint save stages a sub-group
    host = {"process": float(GPU_PROCESS_HOST_BYTES), **state_host, "checkpoint staging": staging}
    if run.offload_optimizer or run.offload_params:
        host["pinned transfer buffers"] = 2 * min(run.sub_group_size, model.total_params / run.world_size) * 4 * 0.25
    shared = {"export (rank 0's node)": float(export)}  # loading reads the checkpoint through the (reclaimable) page cache
    return MemoryEstimate(device, host, per_node, shared, checkpoint_disk, model.total_params * run.export_bytes)


# ----------------------------------------------------------------------------------------------
# From a run config


def run_shape(cfg: RunConfig, *, nodes: int, gpus_per_node: int, device: str, chunked_loss: bool | None = None,
              model_type: str = "", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> RunShape:
    """The RunShape of a run config on `nodes` x `gpus_per_node` ranks (`device`: cuda | cpu)."""
    if nodes < 1 or gpus_per_node < 1:
        raise UserError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    cuda = device == "cuda"
    ds = build_ds_config(cfg, nodes * gpus_per_node, cuda=cuda)
    zero: dict[str, Any] = ds.get("zero_optimization", {})
    dtype = resolve_dtype_name(cfg.model.dtype, cuda=cuda)
    export = resolve_dtype_name(cfg.export.dtype if cfg.export.dtype != "auto" else dtype, cuda=cuda)
    return RunShape(
        seq_len=cfg.data.seq_len,
        micro_batch=cfg.train.micro_batch_size,
        eval_micro_batch=cfg.eval.micro_batch_size,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        param_bytes=TORCH_DTYPES[dtype].itemsize,
        export_bytes=TORCH_DTYPES[export].itemsize,
        stage=zero_stage(ds),
        offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme"),
        offload_params=zero.get("offload_param", {}).get("device", "none") in ("cpu", "nvme"),
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        device=device,
        chunked_loss=(model_type in CHUNKED_MODEL_TYPES) if chunked_loss is None else chunked_loss,
        max_live_parameters=float(zero.get("stage3_max_live_parameters", 1e9)),
        prefetch_bucket=float(zero.get("stage3_prefetch_bucket_size", 5e7)),
        reduce_bucket=float(zero.get("reduce_bucket_size", 5e8)),
        sub_group_size=float(zero.get("sub_group_size", 1e9)),
        max_shard_bytes=max_shard_bytes,
        export_at_end=cfg.export.at_end,
    )


def estimate_run(
    cfg: RunConfig, *, nodes: int, gpus_per_node: int, device: str = "cuda", chunked_loss: bool | None = None,
    model: ModelShape | None = None,
) -> MemoryEstimate:
    """The memory a run config needs on `nodes` x `gpus_per_node` ranks (`model`: its shape, if already read)."""
    if model is None:
        model = model_shape(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code, gguf_file=cfg.model.gguf_file)
    run = run_shape(cfg, nodes=nodes, gpus_per_node=gpus_per_node, device=device, chunked_loss=chunked_loss,
                    model_type=model.model_type)
    return estimate(model, run)


def format_bytes(value: float) -> str:
    return f"{value / GIB:,.1f} GiB" if value >= GIB else f"{value / MIB:,.0f} MiB"

