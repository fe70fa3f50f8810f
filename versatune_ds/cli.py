"""`versatune-ds <command>`: argument parsing and dispatch only.

Each command is a thin module in `versatune_ds.commands` with `HELP`, `add_arguments(parser)` and
`run(args) -> int`; it imports the library inside `run`, so building the parser (and `--help`) imports
no torch or deepspeed.

A `UserError` (bad config, data, flag) is printed as one message on stderr with exit code 2; any other
exception is a bug and keeps its traceback. Log lines and error messages have the environment's secrets
redacted (`versatune_ds.redaction`, standard library only, so `--help` stays light).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import socket
import sys
from typing import Sequence

from versatune_ds import __version__
from versatune_ds.errors import UserError
from versatune_ds.redaction import RedactingFormatter, redact

# command name -> module under versatune_ds.commands
COMMANDS: dict[str, str] = {
    "init": "init",
    "check-config": "check_config",
    "plan": "plan",
    "preview": "preview",
    "probe": "probe",
    "classify": "classify",
    "train": "train",
    "eval": "eval",
    "export": "export",
    "report": "report",
    "estimate-memory": "estimate_memory",
    "tiny-model": "tiny_model",
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
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"versatune_ds.commands.{module_name}")
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        # The deepspeed launcher passes --local_rank=N to every process; the rank comes from the environment.
        command_parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        command_parser.set_defaults(_run=module.run)
        module.add_arguments(command_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(args.log_level)
    try:
        code = int(args._run(args) or 0)
    except UserError as exc:
        sys.stderr.write(redact(f"versatune-ds {args.command}: error{_rank_prefix()}: {exc}") + "\n")
        code = 2
    except KeyboardInterrupt:
        sys.stderr.write(f"versatune-ds {args.command}: interrupted\n")
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


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)
    if world <= 1:
        return ""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "?"))
    return f" (rank {rank})"


def _setup_logging(level: str) -> None:
    """INFO from rank 0 only; warnings and errors from every rank, tagged with host:rank."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    tag = f"{socket.gethostname()}:{rank}"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(f"%(asctime)s %(levelname)s [{tag}] %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level) if rank == 0 else max(logging.WARNING, getattr(logging, level)))
    for noisy in ("urllib3", "filelock", "datasets", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    raise SystemExit(main())
