"""Stopping on a signal with a checkpoint (preemption, time limits), and checkpoints by the wall clock.

The signal handlers (`train.stop_signals`, default SIGTERM and SIGUSR1) only set a flag: the process keeps
running until every rank can stop at the same place. At every step boundary the ranks agree with the
collective they make anyway -- `train.py` appends `StopControl.local_flags()` to the per-domain token
all_reduce, so there is no extra host sync -- and the sums decide:

- flag 0, "a stop signal reached this rank": summed over ranks, so a signal that reached any one rank (the
  launcher may reach only some of them) stops all of them after the same step;
- flag 1, "a checkpoint is due by the wall clock" (`checkpoint.every_minutes` since the last save): only
  rank 0 sets it, so the ranks never disagree about time.

On a stop the step's regular evaluation and checkpoint run first (so the run continues exactly as an
uninterrupted one would), a checkpoint is saved if the step has none, rank 0 writes `STOP_MARKER` in the run
directory (with the launch id the launcher exported in `LAUNCH_ID_VAR`), and every rank exits with
`EXIT_CHECKPOINTED` = 75 (EX_TEMPFAIL: "checkpointed; run the same command again"). torchrun and srun do not
pass a worker's exit code on; `versatune_ds.supervisor` reads the marker and exits 75 for them, and the
sbatch scripts then requeue the job, which continues with `--resume auto`.

A signal that arrives before the first step (data preparation, probing, model load) is acted on after the
first step; one that arrives after the last step is ignored (the run finishes normally).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

EXIT_CHECKPOINTED = 75  # EX_TEMPFAIL: stopped on a signal after a complete checkpoint; resume to continue
STOP_MARKER = "checkpointed_stop.json"
LAUNCH_ID_VAR = "VERSATUNE_LAUNCH_ID"
NUM_FLAGS = 2


@dataclass(frozen=True)
class StepDecision:
    stop: bool  # every rank saves (if this step has no checkpoint yet) and exits with EXIT_CHECKPOINTED
    checkpoint: bool  # every rank saves a checkpoint at this step (wall-clock checkpoint)


class StopControl:
    """Per-process stop flag (set by signal handlers) and rank 0's wall-clock checkpoint timer."""

    def __init__(
        self, signal_names: Sequence[str], every_minutes: float | None, *, is_main: bool,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.signals = [signal.Signals[name] for name in signal_names]
        self.every_s = None if every_minutes is None else every_minutes * 60.0
        self.is_main = is_main
        self.clock = clock or time.monotonic
        self.received: signal.Signals | None = None
        self._last_save = self.clock()
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        """Install the flag-setting handlers (main thread only; elsewhere signals cannot be handled)."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not on the main thread: train.stop_signals are not handled")
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the loop acts on it at the next step boundary. No logging here (not signal-safe).
        if self.received is None:
            self.received = signal.Signals(signum)

    def local_flags(self) -> list[float]:
        """This rank's two numbers for the step's all_reduce (see the module docstring)."""
        due = self.is_main and self.every_s is not None and self.clock() - self._last_save >= self.every_s
        return [1.0 if self.received is not None else 0.0, 1.0 if due else 0.0]

    def decide(self, summed: Sequence[float]) -> StepDecision:
        """The decision from the flags summed over ranks: identical on every rank."""
        return StepDecision(stop=summed[0] > 0, checkpoint=summed[1] > 0)

    def saved(self) -> None:
        """A checkpoint was written: the wall-clock interval starts again."""
        self._last_save = self.clock()

    @property
    def signal_name(self) -> str:
        return self.received.name if self.received is not None else "a stop signal (received by another rank)"


def write_stop_marker(run_dir: Path, *, step: int, signal_name: str, checkpoint: str | None) -> Path:
    """Rank 0, after the stop checkpoint: what the launcher reads to turn the run's exit into 'resume me'."""
    from versatune_ds.files import write_json_atomic

    document = {
        "exit_code": EXIT_CHECKPOINTED, "step": step, "signal": signal_name, "checkpoint": checkpoint,
        "launch_id": os.environ.get(LAUNCH_ID_VAR), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return write_json_atomic(run_dir / STOP_MARKER, document)


def clear_stop_marker(run_dir: Path) -> None:
    (run_dir / STOP_MARKER).unlink(missing_ok=True)


def read_stop_marker(run_dir: Path, launch_id: str | None) -> dict | None:
    """The marker, if it exists and was written under launch `launch_id` (None: any launch)."""
    try:
        document = json.loads((run_dir / STOP_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or (launch_id is not None and document.get("launch_id") != launch_id):
        return None
    return document
