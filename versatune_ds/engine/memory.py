"""Will the run fit? The `estimate-memory` report and the preflight at the start of `train`.

The counting is in `engine.memory_model` (accelerator memory per rank, host memory per rank and per node, disk
per checkpoint and per export, from a run config and the model's config.json alone). This module turns it into
a report: the run's own DeepSpeed setup part by part, the shipped alternatives side by side (so offload is used
only where the plain setup does not fit), and the disk a run's checkpoints take. `preflight_warning` runs the
same estimate at the start of `train` and warns (never fails) when this machine looks too small.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from versatune_ds import dist
from versatune_ds.config.loading import load_config
from versatune_ds.config.schema import RunConfig
from versatune_ds.engine.memory_model import GIB, MemoryEstimate, estimate_run, format_bytes, model_shape
from versatune_ds.errors import UserError

logger = logging.getLogger(__name__)

# The shipped DeepSpeed configs compared in the report, from least to most offload (NVMe needs a path: left out).
SETUPS = (
    ("ZeRO-2", "zero2"),
    ("ZeRO-3", "zero3"),
    ("ZeRO-3 + optimizer offload", "zero3_offload_optimizer"),
    ("ZeRO-3 + optimizer and parameter offload", "zero3_offload"),
)


def default_run_config(model: str, overrides: Sequence[str] = ()) -> RunConfig:
    """A run config for `--model` alone: bf16, data.seq_len 4096, micro-batch 1, gradient checkpointing, ZeRO-3."""
    path = Path(model).expanduser()
    folder = path.parent if path.name == "config.json" else path
    if not folder.exists():
        raise UserError(f"--model: {model} not found; give a model folder or its config.json (no weights are read)")
    defaults = [f"model.path={folder}", "model.dtype=bf16", "model.gradient_checkpointing=true", "data.seq_len=4096",
                "data.domains=[{name: any, train: [none.jsonl]}]", "train.micro_batch_size=1", "deepspeed.config=zero3"]
    return load_config(None, [*defaults, *overrides], check_files=False)


def build_report(cfg: RunConfig, *, nodes: int, gpus_per_node: int, device: str = "cuda") -> dict[str, Any]:
    """The estimate of `cfg` on `nodes` x `gpus_per_node` ranks, with the shipped setups for comparison."""
    shape = model_shape(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code, gguf_file=cfg.model.gguf_file)
    own = estimate_run(cfg, nodes=nodes, gpus_per_node=gpus_per_node, device=device, model=shape)
    alternatives = []
    for label, name in SETUPS:
        other = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, config=name))
        try:
            estimate = estimate_run(other, nodes=nodes, gpus_per_node=gpus_per_node, device=device, model=shape)
        except UserError:
            continue
        alternatives.append({"setup": label, "deepspeed.config": name, **_totals(estimate)})
    keep = cfg.checkpoint.keep_last
    return {
        "model": dataclasses.asdict(shape),
        "nodes": nodes, "gpus_per_node": gpus_per_node, "device": device,
        "deepspeed.config": cfg.deepspeed.config,
        "run": {"seq_len": cfg.data.seq_len, "micro_batch_size": cfg.train.micro_batch_size,
                "gradient_checkpointing": cfg.model.gradient_checkpointing, "dtype": cfg.model.dtype},
        **_totals(own),
        "device_parts": own.device_parts, "host_parts_per_rank": own.host_parts, "host_node_shared_parts": own.node_shared_parts,
        "disk_per_checkpoint_bytes": own.checkpoint_disk_bytes,
        "disk_checkpoints_peak_bytes": own.checkpoint_disk_bytes * (keep + 1),  # a new one is written before an old goes
        "disk_export_bytes": own.export_disk_bytes,
        "alternatives": alternatives,
    }


def _totals(estimate: MemoryEstimate) -> dict[str, float]:
    return {"device_per_rank_bytes": estimate.device_per_rank_bytes, "host_per_rank_bytes": estimate.host_per_rank_bytes,
            "host_per_node_bytes": estimate.host_per_node_bytes}


def format_report(report: dict[str, Any]) -> str:
    m = report["model"]
    run = report["run"]
    where = "rank" if report["device"] == "cuda" else "rank (CPU: all host memory)"
    lines = [
        f"{m['model_type']}: {m['total_params'] / 1e9:.3f}B parameters (largest tensor {m['largest_layer_params'] / 1e6:.1f}M, "
        f"vocabulary {m['vocab']:,}); {report['nodes']} node(s) x {report['gpus_per_node']} rank(s) on {report['device']}",
        f"run: data.seq_len {run['seq_len']} x micro-batch {run['micro_batch_size']}, gradient checkpointing "
        f"{'on' if run['gradient_checkpointing'] else 'off'}, dtype {run['dtype']}, deepspeed.config {report['deepspeed.config']}",
        "",
    ]
    if report["device_parts"]:
        lines.append(f"per GPU at its peak: {format_bytes(report['device_per_rank_bytes'])}")
        lines += [f"  {k:<48} {format_bytes(v):>12}" for k, v in report["device_parts"].items() if v]
    lines.append(f"host per {where}: {format_bytes(report['host_per_rank_bytes'])}")
    lines += [f"  {k:<48} {format_bytes(v):>12}" for k, v in report["host_parts_per_rank"].items() if v]
    if report["device_parts"]:
        lines.append(f"host per node: {format_bytes(report['host_per_node_bytes'])} "
                     f"({report['gpus_per_node']} ranks, plus once per node:)")
        lines += [f"  {k:<48} {format_bytes(v):>12}" for k, v in report["host_node_shared_parts"].items() if v]
    lines += [
        f"disk: {format_bytes(report['disk_per_checkpoint_bytes'])} per checkpoint "
        f"({format_bytes(report['disk_checkpoints_peak_bytes'])} with checkpoint.keep_last + the one being written), "
        f"{format_bytes(report['disk_export_bytes'])} per export",
        "",
        f"{'shipped setup':<44} {'per GPU' if report['device_parts'] else 'per rank':>12} {'host per node':>15}",
    ]
    for alt in report["alternatives"]:
        per_rank = alt["device_per_rank_bytes"] if report["device_parts"] else alt["host_per_rank_bytes"]
        lines.append(f"{alt['setup']:<44} {format_bytes(per_rank):>12} {format_bytes(alt['host_per_node_bytes']):>15}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Preflight at the start of `train`


def host_memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def preflight_warning(cfg: RunConfig, ds_config: dict, env: dist.DistEnv) -> str | None:
    """Warn (rank 0, never fail) when this machine looks too small for the run."""
    if env.rank != 0:
        return None
    if not (Path(cfg.model.path).expanduser() / "config.json").is_file():
        return None  # a hub name or a GGUF folder: the loader reports problems itself
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or (torch.cuda.device_count() if torch.cuda.is_available() else env.world_size)
    local = max(1, min(local, env.world_size))
    nodes = max(1, env.world_size // local)
    cuda = torch.cuda.is_available()
    try:
        estimate = estimate_run(cfg, nodes=nodes, gpus_per_node=local, device="cuda" if cuda else "cpu")
    except Exception as exc:  # noqa: BLE001 (a preflight estimate must never stop training)
        logger.debug("memory preflight skipped: %s", exc)
        return None
    problems = []
    if cuda:
        gpu_total = torch.cuda.get_device_properties(env.local_rank).total_memory
        if estimate.device_per_rank_bytes > gpu_total:
            problems.append(f"{format_bytes(estimate.device_per_rank_bytes)} per GPU (this GPU has {format_bytes(gpu_total)})")
    host_total = host_memory_bytes()
    if estimate.host_per_node_bytes > host_total:
        problems.append(f"{format_bytes(estimate.host_per_node_bytes)} of host memory per node (this node has {format_bytes(host_total)})")
    if not problems:
        logger.info("memory preflight: ~%s per %s, ~%s host per node",
                    format_bytes(estimate.device_per_rank_bytes or estimate.host_per_rank_bytes), "GPU" if cuda else "rank",
                    format_bytes(estimate.host_per_node_bytes))
        return None
    message = (
        f"this machine looks too small: deepspeed.config {cfg.deepspeed.config} on {nodes} node(s) x {local} rank(s) needs about "
        + " and ".join(problems) + "; see `versatune-ds estimate-memory --config <this config>` for the parts and the "
        "setups that fit (more GPUs or nodes, offload, gradient checkpointing, a shorter data.seq_len)"
    )
    logger.warning(message)
    return message


__all__ = ["GIB", "build_report", "default_run_config", "format_report", "preflight_warning"]
