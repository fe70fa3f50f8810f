"""`versatune-ds estimate-memory`: per-GPU and per-node memory for ZeRO-2/3, with and without offload."""

from __future__ import annotations

import argparse

HELP = "per-GPU and per-node memory for ZeRO-2/3, with and without offload"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder or its config.json (no weights are read)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--offload", action="store_true", help="show only the CPU-offload setups")
    parser.add_argument("--buffer-factor", type=float, default=1.5, help="DeepSpeed's additional_buffer_factor")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from versatune_ds.engine.memory import count_parameters, estimate_memory, format_table
    from versatune_ds.log import emit

    size = count_parameters(args.model, trust_remote_code=args.trust_remote_code)
    estimates = estimate_memory(size, nodes=args.nodes, gpus_per_node=args.gpus_per_node, buffer_factor=args.buffer_factor)
    if args.offload:
        estimates = [e for e in estimates if e.offload_optimizer]
    if args.json:
        emit(json.dumps({"model": asdict(size), "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
                         "estimates": [{**asdict(e), "label": e.label} for e in estimates]}, indent=2))
    else:
        emit(format_table(size, estimates, nodes=args.nodes, gpus_per_node=args.gpus_per_node))
    return 0
