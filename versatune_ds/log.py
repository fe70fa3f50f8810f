"""Metrics and progress for the training loop.

`MetricsLogger` writes one JSON object per line with a "step" key to `<run_dir>/metrics.jsonl` (always,
rank 0 only), and to TensorBoard / Weights & Biases when enabled. Both backends are imported lazily; a
missing package is a clear error at start, not a crash later. Nothing secret is written: W&B reads its
API key from its own environment/netrc, and every string we write (metric names, W&B's run config) goes
through `redaction.redact`. The W&B run id is kept in `<run_dir>/logging/wandb_run_id`, so a resumed run
(`--resume auto`, a requeued Slurm job) continues the same W&B run instead of opening a new one.

`log_eval_line` puts one line per evaluation on the console / Slurm log: every domain's held-out loss and
current weight.

`TrainProgress` shows a rich progress bar (step, loss, tokens/s, ETA) on rank 0 when stderr is a
terminal, and plain log lines every `log_every` steps otherwise (batch jobs, CI logs).

`truncate_jsonl` cuts a JSONL file back to the lines with step <= a given step; a resumed run calls it
so the metrics and sample traces after a kill -9 continue exactly where the checkpoint was taken.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from versatune_ds.errors import UserError
from versatune_ds.files import write_text_atomic
from versatune_ds.redaction import Redactor, redact

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WANDB_RUN_ID_FILE = "logging/wandb_run_id"


def emit(text: str) -> None:
    """Write a command's result (not a log line) to stdout, whole, on rank 0's terminal or pipe."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _json_value(value: Any) -> Any:
    """Floats that JSON cannot hold (NaN, inf) become null, so every line parses with any JSON reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _redacted_tree(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {redact(str(k)): _redacted_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted_tree(v) for v in value]
    return redact(value) if isinstance(value, str) else value


def wandb_run_id(run_dir: Path, generate: Any) -> str:
    """The run directory's W&B run id: read from WANDB_RUN_ID_FILE, or made with `generate()` and saved there."""
    path = run_dir / WANDB_RUN_ID_FILE
    if path.is_file():
        saved = path.read_text(encoding="utf-8").strip()
        if saved:
            return saved
    run_id = str(generate())
    write_text_atomic(path, run_id + "\n")
    return run_id


class JsonlWriter:
    """Append-only JSONL file, flushed after every line (a crash loses at most the line being written)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._redact = Redactor()  # keys and string values lose the environment's secrets

    def write(self, record: Mapping[str, Any]) -> None:
        clean = {self._redact(k): self._redact(v) if isinstance(v, str) else _json_value(v) for k, v in record.items()}
        self._file.write(json.dumps(clean, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_jsonl(path: str | os.PathLike[str], max_step: int) -> int:
    """Keep only the lines with "step" <= max_step (and drop a torn last line); returns lines kept."""
    path = Path(path)
    if not path.exists():
        return 0
    kept: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill -9
        if int(record.get("step", 0)) <= max_step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return len(kept)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


class MetricsLogger:
    """metrics.jsonl always; TensorBoard and W&B when enabled. Only rank 0 writes (pass is_main)."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        is_main: bool,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str | None = None,
        wandb_run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.is_main = is_main
        self._jsonl: JsonlWriter | None = None
        self._tb = None
        self._wandb = None
        if not is_main:
            return
        run_dir = Path(run_dir)
        self._jsonl = JsonlWriter(run_dir / METRICS_FILE)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise UserError("logging.wandb=true needs the wandb package: pip install wandb") from None
            # One W&B run per run directory: a resumed or requeued run continues it (resume="allow" also
            # opens it fresh when the id is new to W&B, e.g. the first start).
            run_id = wandb_run_id(run_dir, lambda: wandb_module.util.generate_id())
            self._wandb = wandb_module.init(
                project=wandb_project or "versatune-ds",
                name=wandb_run_name,
                dir=str(run_dir),
                config=_redacted_tree(dict(config or {})),
                id=run_id,
                resume="allow",
            )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.is_main or not metrics:
            return
        assert self._jsonl is not None
        self._jsonl.write({"step": step, **metrics})
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: _json_value(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def log_eval_line(
    step: int, names: Sequence[str], losses: Sequence[float], metrics: Mapping[str, float],
    stderrs: Sequence[float] | None = None,
) -> None:
    """One INFO line (rank 0's console and Slurm log) per evaluation: step, then per domain its held-out loss
    (± its standard error when given) and its current weight (`mixture/<d>/weight` in `metrics`)."""
    parts = []
    for index, name in enumerate(names):
        se = f" ± {stderrs[index]:.4f}" if stderrs is not None else ""
        weight = metrics.get(f"mixture/{name}/weight")
        parts.append(f"{name} {float(losses[index]):.4f}{se} (w {weight:.3f})" if weight is not None else f"{name} {float(losses[index]):.4f}{se}")
    logger.info("eval step %d | %s", step, " | ".join(parts))


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class TrainProgress:
    """Progress on rank 0: a rich bar on a terminal, else one log line every `log_every` steps."""

    def __init__(self, *, total_steps: int, start_step: int, log_every: int, is_main: bool) -> None:
        self.total_steps = total_steps
        self.start_step = start_step
        self.log_every = log_every
        self.is_main = is_main
        self._start_time = time.monotonic()
        self._progress = None
        self._task = None
        if is_main and sys.stderr.isatty():
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tokens_per_s]} tok/s"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, loss="-", tokens_per_s="-")

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.is_main:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=f"{loss:.4f}", tokens_per_s=f"{tokens_per_s:,.0f}")
            return
        if step % self.log_every == 0 or step == self.total_steps:
            elapsed = time.monotonic() - self._start_time
            done = step - self.start_step
            eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
            logger.info(
                "step %d/%d  loss %.4f  %.0f tokens/s  eta %s", step, self.total_steps, loss, tokens_per_s, _format_eta(eta)
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
