"""`versatune-ds plan`: per-domain sizes, token counts and the sample / token budget of the mixture."""

from __future__ import annotations

import argparse

HELP = "per-domain sizes, token counts and the sample/token budget for the mixture"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--weights", default=None,
                        help="domain weights as shares of mixture.unit, e.g. law=0.3,medicine=0.2,... (default: the config's strategy)")
    parser.add_argument("--world-size", type=int, default=None, help="number of ranks (default: $WORLD_SIZE or 1)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers to this JSON file")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. data.seq_len=2048")


def run(args: argparse.Namespace) -> int:
    import os

    from rich.console import Console

    from versatune_ds.config.loading import load_config
    from versatune_ds.data.prepare import prepare_data
    from versatune_ds.data.tokenizer import load_tokenizer
    from versatune_ds.errors import UserError
    from versatune_ds.files import write_json_atomic
    from versatune_ds.plan import build_plan, config_weights, parse_weights, plan_table, plan_to_dict

    world_size = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size < 1:
        raise UserError(f"--world-size: given {world_size}; expected a positive integer")
    cfg = load_config(args.config, args.overrides)
    data = prepare_data(cfg.data, load_tokenizer(cfg.model))
    if args.weights is not None:
        weights, source = parse_weights(args.weights, data.domains), "--weights"
    else:
        weights, source = config_weights(cfg, data.domains, data)
    plan = build_plan(cfg, data, weights, source, world_size)
    console = Console()
    if not console.is_terminal:  # piped or redirected: rich would squeeze the table into 80 columns
        console = Console(width=200)
    console.print(plan_table(plan))
    if args.json:
        write_json_atomic(args.json, plan_to_dict(plan))
    return 0
