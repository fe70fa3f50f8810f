"""Metrics logging: JSONL always (rank 0), TensorBoard when enabled, truncation for resume, progress lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from versatune_ds.errors import UserError
from versatune_ds.log import MetricsLogger, TrainProgress, read_jsonl, truncate_jsonl


def test_metrics_jsonl_one_object_per_line_nan_as_null(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, is_main=True)
    logger.log(1, {"train/loss": 2.5, "train/lr": 0.1})
    logger.log(2, {"train/loss": float("nan")})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "train/loss": 2.5, "train/lr": 0.1}, {"step": 2, "train/loss": None}]


def test_only_rank_0_writes(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, is_main=False, tensorboard=True)
    logger.log(1, {"train/loss": 1.0})
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_writes_event_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    logger = MetricsLogger(tmp_path, is_main=True, tensorboard=True)
    logger.log(1, {"train/loss": 1.0, "eval/law/loss": float("inf")})
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(UserError, match="pip install wandb"):
        MetricsLogger(tmp_path, is_main=True, wandb=True)


def test_truncate_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(6)) + '{"step": 6, "x"')
    assert truncate_jsonl(path, 3) == 4
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2, 3]
    assert truncate_jsonl(tmp_path / "absent.jsonl", 3) == 0


def test_progress_logs_plain_lines_without_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    progress = TrainProgress(total_steps=10, start_step=0, log_every=5, is_main=True)
    with caplog.at_level(logging.INFO, logger="versatune_ds.log"):
        for step in range(1, 11):
            progress.update(step, 1.0 / step, 1000.0)
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("step 5/10  loss 0.2000  1000 tokens/s  eta")
