"""`versatune-ds <command>`: argument parsing and dispatch only.

Each command lives in the module that owns its work, which exposes `add_arguments(parser)` and
`run_command(args) -> int`. The module is imported only when its command runs, so `versatune-ds --help`
stays fast and `import versatune_ds` never pulls in torch or deepspeed.

A `UserError` (bad config, data, flag) is printed as one message on stderr with exit code 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from versatune_ds import __version__
from versatune_ds.errors import UserError

# command -> (module that owns it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "check-config": ("versatune_ds.ds_config", "validate a run config and print it resolved, with the final DeepSpeed config"),
    "plan": ("versatune_ds.plan", "per-domain sizes, token counts and the sample/token budget for the mixture"),
    "probe": ("versatune_ds.probe", "sample generations from the base model and estimate its knowledge distribution"),
    "train": ("versatune_ds.train", "fine-tune with DeepSpeed (probe -> compose -> train with re-weighting -> export)"),
    "eval": ("versatune_ds.evaluate", "per-domain held-out loss and multiple-choice accuracy of a model or checkpoint"),
    "export": ("versatune_ds.export", "write a Hugging Face model folder from a run's DeepSpeed checkpoint"),
    "report": ("versatune_ds.report", "PNG plots and a Markdown summary of a run directory"),
    "estimate-memory": ("versatune_ds.memory", "per-GPU and per-node memory for ZeRO-2/3, with and without offload"),
    "tiny-model": ("versatune_ds.tiny_model", "build a tiny random Llama and a tokenizer trained on local text (for CPU tries)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="versatune-ds",
        description="Multi-domain fine-tuning of causal LMs with DeepSpeed ZeRO-3 and the VersaTune method.",
    )
    parser.add_argument("--version", action="version", version=f"versatune-ds {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    # `deepspeed --module versatune_ds train ...` puts --local_rank=N before the command name.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        # The deepspeed launcher passes --local_rank=N to every process; the rank comes from the environment.
        command_parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        command_parser.set_defaults(_module=module_name)
        _module_add_arguments(module_name, command_parser)
    return parser


def _module_add_arguments(module_name: str, parser: argparse.ArgumentParser) -> None:
    """Let the owning module declare its arguments; a module not written yet leaves the command without any."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        parser.set_defaults(_missing=True)
        return
    module.add_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"versatune-ds: the '{args.command}' command is not available in this version", file=sys.stderr)
        return 2
    _setup_logging(args.log_level)
    try:
        module = importlib.import_module(args._module)
        code = int(module.run_command(args) or 0)
    except UserError as exc:
        prefix = _rank_prefix()
        print(f"versatune-ds {args.command}: error{prefix}: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"versatune-ds {args.command}: interrupted", file=sys.stderr)
        code = 130
    return _leave_process_group(code)


def _leave_process_group(code: int) -> int:
    """Exit a multi-rank command without tripping gloo at interpreter shutdown.

    Tearing down a multi-rank gloo group (destroy_process_group, or C++ static teardown at interpreter exit)
    while the peers finish at their own pace can abort a rank that has done all its work, with
    `terminate called without an active exception` (SIGABRT) instead of our exit code — seen both after clean
    runs and after a peer died. Every collective is complete when a command returns, and files and loggers
    are closed by then, so: flush and end the process with `os._exit(code)`. Single-process runs (and
    in-process callers such as the tests) return normally.
    """
    torch_dist = sys.modules.get("torch.distributed")
    if torch_dist is None or not (torch_dist.is_available() and torch_dist.is_initialized()):
        return code
    if torch_dist.get_world_size() <= 1:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def emit(text: str) -> None:
    """Write a command's result (not a log line) to stdout; commands call this instead of print."""
    print(text, flush=True)


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)
    if world <= 1:
        return ""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "?"))
    return f" (rank {rank})"


def _setup_logging(level: str) -> None:
    """INFO from rank 0 only; warnings and errors from every rank, tagged with host:rank."""
    import socket

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    tag = f"{socket.gethostname()}:{rank}"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{tag}] %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level) if rank == 0 else max(logging.WARNING, getattr(logging, level)))
    for noisy in ("urllib3", "filelock", "datasets", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    raise SystemExit(main())
