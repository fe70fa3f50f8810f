"""`versatune-ds train`: probe -> compose -> ZeRO training with re-weighting -> checkpoints -> export -> report."""

from __future__ import annotations

import argparse

HELP = "fine-tune with DeepSpeed (probe -> compose -> train with re-weighting -> export)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
    parser.add_argument(
        "--resume",
        default="auto",
        help="auto (default: continue from the run dir's latest complete checkpoint, if any) | none | <checkpoint or run dir>",
    )
    parser.add_argument(
        "--allow-config-change", action="store_true", help="resume even if result-changing config keys differ from the checkpoint's"
    )
    parser.add_argument(
        "--force-unlock", action="store_true",
        help="take over the run directory's lock (run.lock) from a run you know is dead, e.g. on a host that is gone",
    )


def run(args: argparse.Namespace) -> int:
    import logging
    import warnings

    from versatune_ds import dist
    from versatune_ds.config.loading import load_config
    from versatune_ds.errors import UserError
    from versatune_ds.preemption import EXIT_CHECKPOINTED
    from versatune_ds.train import EXIT_STOPPED_NONFINITE, run_training

    logger = logging.getLogger(__name__)
    # DeepSpeed calls torch.distributed functions torch has deprecated: one warning per call, per step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    cfg = load_config(args.config, args.overrides)
    try:
        summary = run_training(cfg, resume=args.resume, allow_config_change=args.allow_config_change, force_unlock=args.force_unlock)
    except RuntimeError as exc:
        if not dist.is_collective_failure(exc):
            raise
        # A dead or hung rank: the survivors' collectives fail (at once, or after dist.timeout_s). One clear
        # message instead of a DeepSpeed traceback; the process then exits instead of waiting.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"lost contact with another rank: a collective operation failed ({first}). Another rank has died or "
            f"stopped answering for dist.timeout_s={cfg.dist.timeout_s} s -- see its log. The last complete "
            f"checkpoint in {cfg.train.run_dir} is intact: relaunch all ranks with --resume auto to continue"
        ) from None
    dist.destroy()
    if summary.stopped_on_nonfinite:
        return EXIT_STOPPED_NONFINITE
    if summary.stopped_on_signal is not None:
        return EXIT_CHECKPOINTED  # checkpointed on a stop signal: run the same command again to continue
    logger.info("done: %d steps, %d skipped; run dir %s", summary.final_step, summary.skipped_steps, summary.run_dir)
    if summary.export_dir is not None:
        logger.info("model exported to %s", summary.export_dir)
    return 0
