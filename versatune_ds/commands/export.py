"""`versatune-ds export`: write a Hugging Face model folder from a run's DeepSpeed checkpoint."""

from __future__ import annotations

import argparse

HELP = "write a Hugging Face model folder from a run's DeepSpeed checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="the run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint tag (e.g. step_00000100) or folder; default: the latest")
    parser.add_argument("--out", required=True, help="folder to write the Hugging Face model to")
    parser.add_argument("--dtype", default=None, choices=["auto", "bf16", "fp16", "fp32"], help="override export.dtype")


def run(args: argparse.Namespace) -> int:
    from versatune_ds.dist import DistEnv
    from versatune_ds.engine.export import export_run

    if DistEnv.from_environ().rank != 0:
        return 0  # consolidation reads files only; rank 0 does it alone
    export_run(args.run_dir, args.out, checkpoint_tag=args.checkpoint, dtype=args.dtype)
    return 0
