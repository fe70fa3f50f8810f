"""The training loop in one process, with a fake engine behind `protocols.TrainingEngine`.

`run_training` is driven through its whole cycle -- evaluate -> re-weight -> sample with the new weights ->
checkpoint -> crash -> resume -- in seconds, without DeepSpeed or a model. The fake engine's held-out loss
depends on how much of each domain it has been trained on, so the VersaTune policy really moves the
weights, and its state is saved and restored through the checkpoint like the real engine's.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
import torch
from dist_helpers import TEST_DOMAINS, read_metrics, read_trace, write_run_config

from versatune_ds import dist
from versatune_ds.config.loading import load_config
from versatune_ds.config.schema import RunConfig
from versatune_ds.data.packing import IGNORE_INDEX
from versatune_ds.protocols import Batch, StepResult
from versatune_ds.train import run_training


class SimulatedCrash(RuntimeError):
    """Raised by the fake engine to stand in for a killed job."""


class FakeEngine:
    """A `TrainingEngine` with one number of "knowledge" per token id bucket instead of a model.

    Training on a batch raises the knowledge of the buckets its label tokens fall in; the held-out loss of
    a row is lower the more its buckets are known. So training on one domain lowers that domain's loss most,
    and the policy's γ/φ see real, data-dependent changes.
    """

    BUCKETS = 4096  # more than the tiny tokenizer's vocabulary: one bucket per token id

    def __init__(self, *, crash_at_step: int | None = None) -> None:
        self.knowledge = np.zeros(self.BUCKETS)
        self.steps = 0
        self.skipped_steps = 0
        self.crash_at_step = crash_at_step
        self._module = torch.nn.Linear(1, 1)

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    def _label_buckets(self, batch: Batch) -> np.ndarray:
        labels = batch["labels"][:, 1:].numpy()
        return labels[labels != IGNORE_INDEX] % self.BUCKETS

    def train_step(self, micro_batches: Sequence[Batch]) -> StepResult:
        self.steps += 1
        if self.crash_at_step is not None and self.steps == self.crash_at_step:
            raise SimulatedCrash(f"simulated crash at step {self.steps} of this process")
        buckets = np.concatenate([self._label_buckets(b) for b in micro_batches])
        loss = float(np.mean(1.0 / (1.0 + self.knowledge[buckets]))) if buckets.size else 0.0
        np.add.at(self.knowledge, buckets, 0.05)
        return StepResult(loss=loss, loss_tokens=int(buckets.size), grad_norm=None, lr=1e-3, skipped=False)

    def forward_loss_sums(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"][:, 1:].numpy()
        mask = labels != IGNORE_INDEX
        per_token = np.where(mask, 2.0 / (1.0 + self.knowledge[labels % self.BUCKETS]), 0.0)
        return torch.from_numpy(per_token.sum(axis=1)).double(), torch.from_numpy(mask.sum(axis=1))

    def eval_mode(self) -> nullcontext[None]:
        return nullcontext()

    def save(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        folder = Path(directory) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_fake_states.json").write_text(json.dumps(
            {"knowledge": self.knowledge.tolist(), "client_state": client_state}
        ))

    def load(self, directory: str, tag: str) -> dict[str, Any]:
        state = json.loads((Path(directory) / tag / "mp_rank_00_fake_states.json").read_text())
        self.knowledge = np.asarray(state["knowledge"])
        return state["client_state"]


def _run(cfg: RunConfig, engine: FakeEngine, resume: str = "auto") -> None:
    run_training(cfg, resume=resume, engine_factory=lambda _cfg, _ds: engine)


@pytest.fixture()
def loop_config(tmp_path: Path, tiny_model_dir: Path):
    def make(name: str) -> RunConfig:
        path = write_run_config(
            tmp_path / name, tiny_model_dir, tmp_path / name / "run",
            checkpoint={"every": 4, "keep_last": 3}, export={"at_end": False},
            mixture={"eta": 5.0, "max_change": 0.3, "smoothing": 0.0, "reference_losses": {d: 0.3 for d in TEST_DOMAINS}},
            eval={"every": 4, "micro_batch_size": 4},
        )
        return load_config(path)

    yield make
    dist.destroy()


def test_evaluate_reweight_checkpoint_and_resume_in_one_process(loop_config) -> None:
    straight = loop_config("straight")
    _run(straight, FakeEngine())
    run_dir = Path(straight.train.run_dir)

    # Re-weighting happened, from the losses the engine reported, and reached the sampled rows.
    mixture = json.loads((run_dir / "mixture.json").read_text())
    assert [u["step"] for u in mixture["updates"]] == [0, 4, 8, 12]
    final = np.array([mixture["updates"][-1]["new_weights"][d] for d in TEST_DOMAINS])
    initial = np.array([mixture["initial_weights"][d] for d in TEST_DOMAINS])
    assert np.abs(final - initial).max() > 0.01
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics if "eval/law/loss" in m] == [0, 4, 8, 12]
    # Every held-out loss comes with its standard error, in metrics.jsonl and in mixture.json (0 at step 0 only:
    # the untrained fake engine gives every token the same loss).
    assert [m["eval/law/loss_se"] > 0 for m in metrics if "eval/law/loss" in m] == [False, True, True, True]
    assert all(0 < u["loss_se"][d] < u["losses"][d] for u in mixture["updates"][1:] for d in TEST_DOMAINS)
    assert {f"mixture/{d}/weight" for d in TEST_DOMAINS} <= set(metrics[-1])

    # Checkpoints at 4, 8, 12; the state holds the sampler (with its schedule) and the policy, once each.
    steps = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert steps == [4, 8, 12]
    state = json.loads((run_dir / "checkpoints" / "step_00000008" / "versatune_state.json").read_text())
    assert state["sampler"]["consumed_samples"] == 8 * 4 and "schedule" in state["sampler"] and "schedule" not in state
    assert state["policy"]["num_records"] == 3
    # ... and the weights reached the sampler: its schedule switched to each update's new weights, shares of
    # tokens that the sampler apportions as they are (unit tokens), no conversion in between.
    assert state["sampler"]["unit"] == "tokens"
    stages = state["sampler"]["schedule"]["stages"]
    assert len(stages) >= 2
    last_update = mixture["updates"][2]  # the one at step 8, the newest in this checkpoint
    assert stages[-1]["weights"] == [last_update["new_weights"][d] for d in TEST_DOMAINS]

    # A crash after step 9, then --resume auto from step 8: the same rows, losses and weights as without it.
    crashed = loop_config("crashed")
    with pytest.raises(SimulatedCrash):
        _run(crashed, FakeEngine(crash_at_step=10))
    resumed_engine = FakeEngine()
    _run(crashed, resumed_engine)
    assert resumed_engine.steps == 4  # steps 9..12 only: the checkpoint of step 8 was used
    crashed_dir = Path(crashed.train.run_dir)
    assert read_trace(crashed_dir, 0) == read_trace(run_dir, 0)
    loss = lambda rows: [(m["step"], m.get("train/loss"), m.get("eval/law/loss")) for m in rows]  # noqa: E731
    assert loss(read_metrics(crashed_dir)) == loss(metrics)
    assert json.loads((crashed_dir / "mixture.json").read_text())["updates"] == mixture["updates"]
    # provenance.jsonl: one record per start; the resumed start names its checkpoint.
    starts = [json.loads(line) for line in (crashed_dir / "provenance.jsonl").read_text().splitlines()]
    assert [s["resumed_from"] for s in starts] == [None, str(crashed_dir / "checkpoints" / "step_00000008")]
    assert len((run_dir / "provenance.jsonl").read_text().splitlines()) == 1
