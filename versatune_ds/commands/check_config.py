"""`versatune-ds check-config`: validate a run config (and data.seq_len against the model's positions) and print it
resolved, with the final DeepSpeed config."""

from __future__ import annotations

import argparse

HELP = "validate a run config and print it resolved, with the final DeepSpeed config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
    parser.add_argument(
        "--world-size", type=int, default=None, help="number of ranks to build the DeepSpeed config for (default: WORLD_SIZE or 1)"
    )


def run(args: argparse.Namespace) -> int:
    import json
    import logging

    from versatune_ds.config.identity import config_to_yaml
    from versatune_ds.config.loading import load_config
    from versatune_ds.dist import DistEnv
    from versatune_ds.engine.ds_config import build_ds_config, resolve_ds_config_path
    from versatune_ds.engine.models import check_position_limit
    from versatune_ds.log import emit

    cfg = load_config(args.config, args.overrides)
    check_position_limit(cfg.model, cfg.data.seq_len)  # reads the model's config.json, no weights
    world_size = args.world_size if args.world_size is not None else DistEnv.from_environ().world_size
    ds = build_ds_config(cfg, world_size)
    logging.getLogger(__name__).info(
        "config is valid; DeepSpeed config from %s for %d rank(s)", resolve_ds_config_path(cfg.deepspeed.config), world_size
    )
    emit("# run config (resolved)\n" + config_to_yaml(cfg))
    emit(f"# DeepSpeed config (world size {world_size})\n" + json.dumps(ds, indent=2, sort_keys=True))
    return 0
