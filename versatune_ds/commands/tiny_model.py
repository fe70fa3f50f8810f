"""`versatune-ds tiny-model`: a tiny random Llama and a tokenizer trained on local text (for CPU tries)."""

from __future__ import annotations

import argparse

HELP = "build a tiny random Llama and a tokenizer trained on local text (for CPU tries)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write the model and tokenizer to")
    parser.add_argument(
        "--text", nargs="+", required=True, help="JSONL/text files whose text trains the tokenizer (e.g. data/sample/*.jsonl)"
    )
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from versatune_ds.errors import UserError
    from versatune_ds.tiny_model import build_tiny_model_dir

    texts: list[str] = []
    for name in args.text:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--text: file not found: {name}")
        texts.extend(line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
    if not texts:
        raise UserError("--text: the files hold no text to train the tokenizer on")
    build_tiny_model_dir(
        args.out, texts, vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers, seed=args.seed
    )
    return 0
