"""Resume on another number of ranks: a run killed on 2 ranks continues on 1, is killed again and finishes on 2.

The global batch is kept (accumulation steps adjusted), so the global sample stream -- every step's rows over all
ranks, in rank order -- equals an uninterrupted 2-rank run's exactly, and the loss curve continues within float
summation noise (1 rank sums the same rows in another order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_helpers import eval_losses, latest_step, launch, loss_curve, read_trace, run_until_killed, write_run_config

MAX_STEPS = 12
# Measured: the largest relative difference of a train or eval loss after the resumes was 4e-8 (float32 sums in
# another order); 1e-5 leaves room, while a wrong weight, Adam moment, step count or LR shows at 1e-3 or more.
LOSS_RTOL = 1e-5


def _config(base: Path, name: str, model_dir: Path) -> tuple[Path, Path]:
    run_dir = base / name / "run"
    config = write_run_config(
        base / name, model_dir, run_dir,
        train={"max_steps": MAX_STEPS}, checkpoint={"every": 2, "keep_last": 2}, eval={"every": 4},
        export={"at_end": False}, data={"cache_dir": str(base / "cache")}, dist={"timeout_s": 120},
    )
    return config, run_dir


def global_samples(run_dir: Path) -> dict[int, list]:
    """Per step, the rows of the global batch: every rank's trace line of that step, in rank order."""
    steps: dict[int, list] = {}
    for trace in sorted((run_dir / "trace").glob("rank*.jsonl"), key=lambda p: int(p.stem[4:])):
        for record in read_trace(run_dir, int(trace.stem[4:])):
            steps.setdefault(record["step"], []).extend(record["rows"])
    return steps


@pytest.mark.dist
def test_two_ranks_then_one_then_two_continue_the_global_sample_stream(tmp_path: Path, tiny_model_dir: Path) -> None:
    reference_config, reference_dir = _config(tmp_path, "reference", tiny_model_dir)
    result = launch(["train", "--config", str(reference_config)], timeout=400)
    assert result.returncode == 0, result.stdout[-4000:]

    config, run_dir = _config(tmp_path, "elastic", tiny_model_dir)
    args = ["train", "--config", str(config)]
    killed, out = run_until_killed(args, lambda: latest_step(run_dir) >= 4, timeout=400)
    assert killed, out[-3000:]
    first = latest_step(run_dir)
    killed, out = run_until_killed(args, lambda: latest_step(run_dir) >= first + 4, nproc=1, launcher="single", timeout=400)
    assert killed, out[-3000:]
    assert "train.gradient_accumulation_steps 2 -> 4 keeps the global batch of 8 rows" in out, out[-3000:]
    assert "redistributed checkpoint" in out and "from 2 rank(s) to 1" in out
    second = latest_step(run_dir)
    assert first < second < MAX_STEPS
    result = launch(args, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "from 1 rank(s) to 2" in result.stdout

    expected = global_samples(reference_dir)
    assert sorted(expected) == list(range(1, MAX_STEPS + 1))
    assert global_samples(run_dir) == expected  # every step's rows, in order: the stream continued exactly
    reference_losses, losses = loss_curve(reference_dir), loss_curve(run_dir)
    assert sorted(losses) == sorted(reference_losses)
    for step, value in reference_losses.items():
        if step <= first:
            assert losses[step] == value  # before the first resume: the same run
        else:
            assert losses[step] == pytest.approx(value, rel=LOSS_RTOL), step
    for step, values in eval_losses(reference_dir).items():
        assert eval_losses(run_dir)[step] == pytest.approx(values, rel=LOSS_RTOL), step
