"""The seams of the training loop, as Protocols: the engine, the weight policy and the sampler.

`train.run_training` talks to these three and nothing else of theirs, so a test can drive the whole loop
(evaluate -> re-weight -> checkpoint -> resume) in one process with a fake engine (tests/test_train_loop.py),
and the real implementations (engine.train_engine.TrainEngine, mixture.policy.MixturePolicy,
mixture.sampler.MixtureSampler) can change inside without touching the loop.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from versatune_ds.eval.heldout import DomainLosses

Batch = dict[str, torch.Tensor]  # input_ids, labels, position_ids[, attention_mask]: collated rows


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports (identical on every rank)."""

    loss: float  # token-mean cross-entropy over the global batch
    loss_tokens: int  # label tokens in the global batch (all ranks)
    grad_norm: float | None  # before clipping; None when not reported
    lr: float  # the learning rate this step used
    skipped: bool  # a non-finite loss or gradient: no rank updated anything


class TrainingEngine(Protocol):
    """A model with an optimizer: steps, evaluation forwards, and its share of a checkpoint."""

    skipped_steps: int

    @property
    def module(self) -> torch.nn.Module: ...

    def train_step(self, micro_batches: Sequence[Batch]) -> StepResult:
        """Forward + backward over this rank's accumulation micro-batches, then one optimizer step (all ranks)."""
        ...

    def forward_loss_sums(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (summed loss, scored tokens) without gradients (all ranks, same number of calls)."""
        ...

    def eval_mode(self) -> AbstractContextManager[None]: ...

    def save(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        """Write this rank's part of checkpoint `directory/tag` (all ranks)."""
        ...

    def load(self, directory: str, tag: str) -> dict[str, Any]:
        """Restore checkpoint `directory/tag`; returns the client state (all ranks)."""
        ...


class WeightPolicy(Protocol):
    """Decides the mixture: initial weights, and new ones after each evaluation (rank 0 decides).

    Weights are shares of mixture.unit (tokens or examples), which the sampler apportions as they are.
    """

    def initial_sampler_weights(self) -> np.ndarray: ...

    def after_eval(self, step: int, result: DomainLosses) -> np.ndarray | None:
        """New weights (identical on every rank), or None for no change, from the held-out evaluation."""
        ...

    def metrics(self) -> dict[str, float]:
        """`mixture/<domain>/weight` for the metrics log."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Sampler(Protocol):
    """The global sample order, read as this rank's slice of each global batch."""

    @property
    def consumed_samples(self) -> int: ...

    def next_batch(self) -> np.ndarray:
        """This rank's rows of the next global batch: int64 [rows, 2] of (domain id, row index)."""
        ...

    def set_weights(self, weights: np.ndarray) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
