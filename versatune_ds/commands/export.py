"""`versatune-ds export`: write a Hugging Face model folder from a run's DeepSpeed checkpoint."""

from __future__ import annotations

import argparse

HELP = "write a Hugging Face model folder from a run's DeepSpeed checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="the run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint tag (e.g. step_00000100) or folder; default: the latest")
    parser.add_argument("--out", required=True, help="folder to write the Hugging Face model to")
    parser.add_argument("--dtype", default=None, choices=["auto", "bf16", "fp16", "fp32"], help="override export.dtype")
    parser.add_argument(
        "--max-shard-size", default="5GB",
        help="largest safetensors file, e.g. 5GB, 500MB (host memory needed: about one shard plus the largest tensor)",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="replace a non-empty --out folder that is not an earlier export (never the run directory or its checkpoints)",
    )


def run(args: argparse.Namespace) -> int:
    from versatune_ds.dist import DistEnv
    from versatune_ds.engine.export import export_run

    if DistEnv.from_environ().rank != 0:
        return 0  # consolidation reads files only; rank 0 does it alone
    export_run(
        args.run_dir, args.out, checkpoint_tag=args.checkpoint, dtype=args.dtype, max_shard_size=args.max_shard_size, force=args.force
    )
    return 0
