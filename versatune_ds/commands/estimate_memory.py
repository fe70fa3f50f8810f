"""`versatune-ds estimate-memory`: accelerator, host and disk memory a run needs, from its config (no weights read)."""

from __future__ import annotations

import argparse

HELP = "memory per GPU, host memory per node and disk a run needs, read from its run config (no weights are read)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="run config YAML: model, data.seq_len, micro-batch, checkpointing, DeepSpeed config")
    source.add_argument("--model", help="a model folder or its config.json alone (bf16, seq_len 4096, micro-batch 1, "
                                        "gradient checkpointing, ZeRO-3; change them with key=value overrides)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.seq_len=8192 deepspeed.config=zero3_offload")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: every rank's memory is host memory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import json

    from versatune_ds.config.loading import load_config
    from versatune_ds.engine.memory import build_report, default_run_config, format_report
    from versatune_ds.log import emit

    cfg = load_config(args.config, args.overrides, check_files=False) if args.config else default_run_config(args.model, args.overrides)
    report = build_report(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, device=args.device)
    emit(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
