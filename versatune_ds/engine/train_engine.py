"""The DeepSpeed training engine: optimizer + LR schedule, one training step, evaluation forwards.

The model comes from `engine.models.load_model` (partitioned at load under ZeRO-3); the losses from
`engine.losses` (`CausalLMLoss`: the output layer in chunks at the loss positions only, see
`engine.chunked_loss`; the plain path over full logits for model types it is not checked for, or with
`chunked_loss=False`); every DeepSpeed call from `engine.zero`.

Loss. The loss of a step is the token mean over the whole global batch (all ranks, all accumulation
micro-batches): sum of per-token cross-entropy / number of label tokens. Each micro-batch backwards
`loss_sum * world / global_tokens` without DeepSpeed's division by the accumulation steps; DeepSpeed
averages gradients over ranks, which divides by `world` again. So the gradient is that of the global
token mean whatever the split into ranks and micro-batches, and ZeRO-0/2/3, 1 or 2 ranks, and any
accumulation give the same updates for the same global batch (up to float summation order).

Non-finite steps. A micro-batch whose loss is not finite has its backward poisoned with NaN so the
gradients of every rank turn non-finite (the reduction spreads them); the ranks then agree (a summed flag, like
`dist.any_rank_true`) before the optimizer step. ZeRO-1/2/3 and the bf16 optimizer refuse a step with a
non-finite gradient norm (they clear the gradients and do not touch weights, moments or the LR
schedule); without a ZeRO optimizer (stage 0) we clear the gradients ourselves and do not step.
`was_step_applied()` is checked afterwards, so a DeepSpeed that did step anyway is an error, not a
silently corrupted model.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from versatune_ds import dist
from versatune_ds.config.schema import TrainConfig
from versatune_ds.engine import reshard, zero
from versatune_ds.engine.ds_config import offloads_optimizer
from versatune_ds.engine.losses import CausalLMLoss, count_loss_tokens
from versatune_ds.engine.models import zero_stage
from versatune_ds.errors import UserError
from versatune_ds.protocols import Batch, StepResult

logger = logging.getLogger(__name__)


def lr_factor(step: int, train: TrainConfig, total_steps: int) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup, then cosine/linear/constant to min_lr_ratio."""
    warmup = train.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if train.lr_scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = train.min_lr_ratio
    if train.lr_scheduler == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, train: TrainConfig, ds_config: dict) -> torch.optim.Optimizer:
    """AdamW over the model's parameters; no weight decay on biases and norm weights (1-D tensors).

    With optimizer offload on a GPU machine DeepSpeedCPUAdam does the update on the CPU (fast, vectorised);
    on a CPU-only machine the parameters already live on the CPU and torch's AdamW avoids its 30-60 s build.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitioned params keep their shape here
        (decay if len(shape) >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = {"lr": train.learning_rate, "betas": (train.adam_beta1, train.adam_beta2), "eps": train.adam_eps}
    if offloads_optimizer(ds_config) and torch.cuda.is_available():
        return zero.cpu_adam(groups, **kwargs)
    # The fused kernel does the whole update in one pass over the parameters: on SmolLM2's ZeRO-3 partition (67 M
    # fp32 values, one CPU thread) 0.11 s per step against 0.82 s for the default loop (BENCHMARKS.md, profile).
    # It is also what the Hugging Face Trainer picks by default (`adamw_torch_fused`).
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, **kwargs, fused=fused or None)


@dataclass(frozen=True)
class Accumulated:
    """What `TrainEngine.backward` leaves for the optimizer step."""

    flags: torch.Tensor  # float64 [2] on the device: this rank's finite loss sum, its non-finite micro-batch count
    global_tokens: float  # label tokens of the global batch (all ranks, all micro-batches)


class TrainEngine:
    """`deepspeed.initialize` around an HF model, with a client AdamW and our LR schedule."""

    def __init__(
        self, train: TrainConfig, model: torch.nn.Module, ds_config: dict, *, total_steps: int, chunked_loss: bool = True
    ) -> None:
        self.ds_config = ds_config
        self.stage = zero_stage(ds_config)
        self.loss = CausalLMLoss.for_model(model, chunked=chunked_loss)
        optimizer = build_optimizer(model, train, ds_config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train, total_steps))
        self.engine = zero.initialize_training(model, optimizer, scheduler, ds_config)
        # DeepSpeed averages gradients over the data-parallel group: the loss scale must use its size.
        self.world_size = int(self.engine.dp_world_size)
        self.skipped_steps = 0

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device) for k, v in batch.items()}

    def train_step(self, micro_batches: Sequence[Batch]) -> StepResult:
        """Forward + backward over this rank's accumulation micro-batches, then one optimizer step.

        Every rank must call this with the same number of micro-batches (ZeRO-3 lockstep).
        """
        lr = self.lr
        accumulated = self.backward(micro_batches)
        flags = accumulated.flags.cpu().numpy()  # the one host sync of the step
        if self.stage == 0 and flags[1] == 0 and _grads_nonfinite(self.module):
            flags[1] = 1.0
        # One collective for both: the loss sum for the log, and whether any rank saw a non-finite value.
        totals = dist.all_reduce_sum(flags)
        skipped = bool(totals[1] > 0)
        if skipped and self.stage == 0:
            self.engine.zero_grad()
        else:
            self.engine.step()
            if skipped and self.engine.was_step_applied():
                raise RuntimeError("DeepSpeed applied an optimizer step with a non-finite loss; weights may be corrupt")
            # DeepSpeed may also refuse a step on its own (non-finite gradients with a finite loss).
            skipped = skipped or not self.engine.was_step_applied()
        if skipped:
            self.skipped_steps += 1
        global_tokens = accumulated.global_tokens
        grad_norm = None if skipped else _as_float(self.engine.get_global_grad_norm())
        loss = float("nan") if skipped else float(totals[0] / max(global_tokens, 1.0))
        return StepResult(loss=loss, loss_tokens=int(global_tokens), grad_norm=grad_norm, lr=lr, skipped=skipped)

    def backward(self, micro_batches: Sequence[Batch]) -> Accumulated:
        """Forward + backward of every micro-batch, gradients scaled to the global token mean (no optimizer step).

        `train_step` is this followed by the optimizer step; tests call it alone to compare gradients.
        """
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch")
        local_tokens = float(sum(count_loss_tokens(b) for b in micro_batches))
        global_tokens = float(dist.all_reduce_sum(np.array([local_tokens]))[0])
        scale = self.world_size / max(global_tokens, 1.0)
        self.engine.train()
        local_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        local_nonfinite = torch.zeros((), dtype=torch.float64, device=self.device)
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            self.engine.set_gradient_accumulation_boundary(i == last)
            inputs = self._to_device({k: v for k, v in batch.items() if k != "labels"})
            loss_sum = self.loss.loss_sum(self.engine, inputs, batch["labels"], grad_scale=scale)
            # Decided on the device, without a host sync: a non-finite loss multiplies the backward by NaN,
            # so every gradient of every rank turns non-finite (see the module docstring).
            finite = torch.isfinite(loss_sum.detach())
            factor = torch.where(finite, torch.tensor(scale, device=finite.device), torch.tensor(float("nan"), device=finite.device))
            self.engine.backward(loss_sum * factor.detach(), scale_wrt_gas=False)
            local_sum += torch.where(finite, loss_sum.detach().double(), torch.zeros_like(local_sum))
            local_nonfinite += (~finite).double()
        return Accumulated(torch.stack([local_sum, local_nonfinite]), global_tokens)

    def forward_loss_sums(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (loss sum, label tokens) without gradients; for evaluation (every rank, same number of calls)."""
        inputs = self._to_device({k: v for k, v in batch.items() if k != "labels"})
        sums, counts = self.loss.row_sums(self.engine, inputs, batch["labels"])
        return sums.double().cpu(), counts

    def forward_logits(self, batch: Batch) -> torch.Tensor:
        """Logits of a batch (fp32, on the CPU), without gradients; used by export checks."""
        inputs = self._to_device(batch)
        inputs.pop("labels", None)
        with torch.no_grad():
            return self.engine(**inputs, use_cache=False).logits.float().cpu()

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        self.engine.eval()
        try:
            yield
        finally:
            self.engine.train()

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        """DeepSpeed checkpoint of model, optimizer and LR schedule (call on every rank)."""
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)

    def load(self, directory: str, tag: str) -> dict:
        """Restore a checkpoint saved by `save`; returns the client state (call on every rank).

        A ZeRO-3 checkpoint written by another number of ranks is redistributed (`engine.reshard`); ZeRO-0
        checkpoints hold no per-rank state and load on any number of ranks as they are.
        """
        folder = Path(directory) / tag
        saved = reshard.saved_world_size(folder) if folder.is_dir() else None
        if saved is not None and saved != self.world_size:
            return reshard.load_resharded(self.engine, folder)
        path, client_state = self.engine.load_checkpoint(
            directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise UserError(f"could not load the DeepSpeed checkpoint {directory}/{tag}: files are missing or unreadable")
        return client_state or {}


def _grads_nonfinite(module: torch.nn.Module) -> bool:
    for param in module.parameters():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            return True
    return False


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value.item() if hasattr(value, "item") else value)
    return value if math.isfinite(value) else None
