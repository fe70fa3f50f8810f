"""`versatune-ds probe`: sample generations from the base model and estimate its knowledge distribution."""

from __future__ import annotations

import argparse

HELP = "sample generations from the base model and estimate its knowledge distribution"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--run-dir", default=None, help="output folder (default: train.run_dir)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. probe.num_samples=64")


def run(args: argparse.Namespace) -> int:
    import logging

    from rich.console import Console

    from versatune_ds import dist
    from versatune_ds.config.loading import load_config
    from versatune_ds.domains import Domains
    from versatune_ds.probe.pipeline import distribution_table, run_probe

    cfg = load_config(args.config, args.overrides)
    env = dist.DistEnv.from_environ(default_port=cfg.dist.master_port)
    dist.start_process_group(env, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s)
    try:
        result = run_probe(cfg, env, run_dir=args.run_dir)
        if env.is_main:
            Console().print(distribution_table(Domains(cfg.domain_names), result))
            logging.getLogger(__name__).info("wrote %s", result.distribution_path)
        dist.barrier()
    finally:
        dist.destroy()
    return 0
