"""`versatune-ds eval`: per-domain held-out loss and multiple-choice accuracy of a model or checkpoint."""

from __future__ import annotations

import argparse

HELP = "per-domain held-out loss and multiple-choice accuracy of a model or checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("model (one of)")
    source.add_argument("--model", default=None, help="Hugging Face model folder to evaluate")
    source.add_argument("--run-dir", default=None, help="a run directory: evaluates its final/ model, or --checkpoint")
    source.add_argument("--checkpoint", default=None, help="with --run-dir: a DeepSpeed checkpoint tag under checkpoints/")
    parser.add_argument("--config", default=None, help="run config: model.path and the held-out sets of data.domains")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (with --config)")
    parser.add_argument("--heldout", nargs="+", default=[], metavar="DOMAIN=PATH", help="SFT files for held-out loss")
    parser.add_argument("--mcq", nargs="+", default=[], metavar="DOMAIN=PATH", help="multiple-choice JSONL files")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward: held-out examples, or MCQ choices (whole items, at least one; default: eval.micro_batch_size)")
    parser.add_argument("--max-items", type=int, default=None, help="per domain, a fixed-seed subset of this size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-items subset")
    parser.add_argument("--max-length", type=int, default=2048, help="MCQ: longest scored sequence (context cut)")
    parser.add_argument("--chat-template", action="store_true", help="MCQ: wrap the prompt in the chat template")
    parser.add_argument("--zero3", action="store_true", help="partition the model with ZeRO-3 instead of a replica per rank")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")


def run(args: argparse.Namespace) -> int:
    from versatune_ds.eval.runner import EvalRequest, run_eval

    run_eval(EvalRequest(
        model=args.model, run_dir=args.run_dir, checkpoint=args.checkpoint, config=args.config,
        overrides=tuple(args.overrides), heldout=tuple(args.heldout), mcq=tuple(args.mcq), batch_size=args.batch_size,
        max_items=args.max_items, seed=args.seed, max_length=args.max_length, chat_template=args.chat_template,
        zero3=args.zero3, dtype=args.dtype, out=args.out,
    ))
    return 0
