"""`versatune-ds preview`: a domain's rows exactly as training sees them (messages, loss, tokens, rendered text)."""

from __future__ import annotations

import argparse

HELP = "show a domain's rows as training sees them: messages, loss placement, tokens, rendered text (--json for scripts)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--domain", required=True, help="the domain to show (a name from data.domains)")
    parser.add_argument("--rows", default="5", help="how many rows from the start of the domain's training files, or 'all' (default 5)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per row (source, messages with role/content/loss, tools, num_tokens, num_loss_tokens, ...)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. data.template=llama3")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from versatune_ds.config.loading import load_config
    from versatune_ds.data.preview import preview_domain, print_json, print_rows
    from versatune_ds.data.tokenizer import load_tokenizer
    from versatune_ds.errors import UserError
    from versatune_ds.log import emit

    if args.rows == "all":
        rows = None
    elif args.rows.isdigit() and int(args.rows) > 0:
        rows = int(args.rows)
    else:
        raise UserError(f"--rows: given {args.rows!r}; expected a positive number or 'all'")
    cfg = load_config(args.config, args.overrides)
    previewed, _ = preview_domain(cfg.data, args.domain, load_tokenizer(cfg.model), rows)
    if args.json:
        print_json(previewed, emit)
    else:
        console = Console()
        if not console.is_terminal:  # piped: keep long lines whole
            console = Console(width=200)
        print_rows(previewed, console)
    return 0
