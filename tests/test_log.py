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


# ----------------------------------------------------------------------------------------------
# W&B: one run per run directory, also after a resume; nothing secret in its config

FAKE_WANDB = '''\
"""A stand-in for the wandb package: records init() calls, no network."""
import itertools
from types import SimpleNamespace

calls = []
_ids = itertools.count()


class _Run:
    def __init__(self):
        self.logged = []

    def log(self, data, step=None):
        self.logged.append((step, data))

    def finish(self):
        pass


def init(**kwargs):
    calls.append(kwargs)
    return _Run()


util = SimpleNamespace(generate_id=lambda: f"fakeid{next(_ids)}")
'''


@pytest.fixture()
def fake_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import sys

    folder = tmp_path / "fake_site"
    (folder / "wandb").mkdir(parents=True)
    (folder / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.syspath_prepend(str(folder))
    import wandb

    assert wandb.__file__.startswith(str(folder))
    return wandb


def test_wandb_resumes_the_same_run_from_the_id_in_the_run_dir(tmp_path: Path, fake_wandb, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "wandb-fake-SECRET-key-0123456789")
    run_dir = tmp_path / "run"
    config = {"model": {"path": "/m"}, "note": "key wandb-fake-SECRET-key-0123456789"}
    for _ in range(2):  # the first start, then a resume (or a requeued Slurm job) in the same run directory
        logger = MetricsLogger(run_dir, is_main=True, wandb=True, wandb_project="p", config=config)
        logger.log(1, {"train/loss": 1.0})
        logger.close()
    first, second = fake_wandb.calls
    assert first["id"] == second["id"] == (run_dir / "logging" / "wandb_run_id").read_text().strip() == "fakeid0"
    assert first["resume"] == second["resume"] == "allow"
    assert "SECRET" not in json.dumps(first["config"]) and first["config"]["model"] == {"path": "/m"}
    # another run directory is another W&B run
    MetricsLogger(tmp_path / "other", is_main=True, wandb=True).close()
    assert fake_wandb.calls[-1]["id"] == "fakeid1"


def test_only_rank_0_opens_a_wandb_run(tmp_path: Path, fake_wandb) -> None:
    MetricsLogger(tmp_path, is_main=False, wandb=True).close()
    assert fake_wandb.calls == [] and not (tmp_path / "logging").exists()


def test_eval_line(caplog: pytest.LogCaptureFixture) -> None:
    from versatune_ds.log import log_eval_line

    metrics = {"mixture/law/weight": 0.25, "mixture/code/weight": 0.75}
    with caplog.at_level(logging.INFO, logger="versatune_ds.log"):
        log_eval_line(200, ["law", "code"], [1.23456, 2.5], metrics)
        log_eval_line(400, ["law", "code"], [1.0, 2.0], metrics, stderrs=[0.01, 0.02])
    assert caplog.messages == [
        "eval step 200 | law 1.2346 (w 0.250) | code 2.5000 (w 0.750)",
        "eval step 400 | law 1.0000 ± 0.0100 (w 0.250) | code 2.0000 ± 0.0200 (w 0.750)",
    ]
