"""`versatune-ds init`: start a project folder from a shipped example (config, launchers, sample data)."""

from __future__ import annotations

import argparse

HELP = "copy an example run config, the launchers and the sample data into a folder to start from"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dest", help="folder to create (or fill)")
    parser.add_argument("--example", default="sample_tiny", help="shipped example config name (default: sample_tiny)")
    parser.add_argument("--force", action="store_true", help="overwrite files that already exist in DEST")


def run(args: argparse.Namespace) -> int:
    from versatune_ds.examples import copy_example
    from versatune_ds.log import emit

    written = copy_example(args.example, args.dest, force=args.force)
    emit(f"wrote {len(written)} files to {args.dest}; next:\n"
         f"  cd {args.dest}\n"
         "  versatune-ds tiny-model --out runs/tiny-model --text data/sample/*.jsonl\n"
         f"  versatune-ds train --config configs/{args.example}.yaml")
    return 0
