"""`versatune-ds report`: PNG plots and a Markdown summary of a run directory."""

from __future__ import annotations

import argparse

HELP = "PNG plots and a Markdown summary of a run directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="the run directory to summarise")


def run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from versatune_ds.dist import DistEnv
    from versatune_ds.errors import UserError
    from versatune_ds.report import build_report

    if not DistEnv.from_environ().is_main:
        return 0  # one writer is enough; other ranks of a launcher have nothing to do
    if not Path(args.run_dir).is_dir():
        raise UserError(f"--run-dir: {args.run_dir} is not a directory")
    logging.getLogger(__name__).info("summary: %s", build_report(args.run_dir))
    return 0
