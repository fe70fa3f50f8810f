"""The one shifted cross-entropy, for the training loss and for every evaluation.

Causal LM loss: the logits at position t predict the token at t+1. The shift is applied to the labels (pad
one -100 on the right, drop the first), not to the logits, so no copy of the [batch, seq, vocab] tensor is
made in forward or backward (as Hugging Face's ForCausalLMLoss does). Cross-entropy runs in fp32 and
positions labelled -100 (prompt, padding, dummy rows) bear no loss.

- `token_loss_sum`: the summed loss of a batch (the training step scales it to the global token mean).
- `row_loss_sums`: per-row summed loss and scored-token counts (held-out loss, multiple-choice log-likelihood).
For one example, `row_loss_sums(...)[0] / count` is exactly `model(input_ids, labels=labels).loss`.

Both take logits. `CausalLMLoss` is the entry from a model instead: for the model types in
`chunked_loss.CHUNKED_MODEL_TYPES` the output layer is applied in chunks at the positions that bear loss only
(`engine.chunked_loss`), so the `[batch, seq, vocab]` logits are never built; other models take the plain path
above over their logits. Training (`TrainEngine`) and evaluation (`forward_loss_sums`, `loss_sums_forward`) use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from versatune_ds.data.packing import IGNORE_INDEX
from versatune_ds.engine.chunked_loss import (
    LossRequest,
    chunk_rows_for,
    install_chunked_head,
    loss_positions,
    output_layer,
    requested_loss,
)


def shifted_labels(labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """labels[:, t+1] at position t, and -100 at the last position (nothing to predict there)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(device)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy (fp32) of a batch, causal shift included."""
    targets = shifted_labels(labels, logits.device)
    return F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def row_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed cross-entropy (fp32) and number of scored tokens, causal shift included."""
    targets = shifted_labels(labels, logits.device)
    per_token = F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    mask = targets != IGNORE_INDEX
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum(dim=1), mask.sum(dim=1)


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Label tokens of a collated batch after the causal shift (what the two functions above score)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# A model call: `call(**inputs, use_cache=False)` returns an output with `.logits` (an HF model, a DeepSpeed engine).
ModelCall = Callable[..., Any]


@dataclass(frozen=True)
class CausalLMLoss:
    """The shifted cross-entropy of a model on a collated batch: chunked through the output layer, or plain.

    `inputs` are the model inputs already on the model's device; `labels` stay on the CPU (the loss positions
    are found there, so the accelerator is never synchronised).
    """

    head: torch.nn.Module | None  # the patched output layer; None: the plain path over full logits
    chunk_rows: int = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, *, chunked: bool = True) -> CausalLMLoss:
        """The chunked path when `chunked` and the model's structure is known, else the plain one (logged)."""
        if chunked and install_chunked_head(model):
            head = output_layer(model)
            vocab = int(getattr(head.weight, "ds_shape", head.weight.shape)[0])  # ZeRO-3 keeps the full shape in ds_shape
            return cls(head, chunk_rows_for(vocab))
        return cls(None)

    @property
    def chunked(self) -> bool:
        return self.head is not None

    def loss_sum(self, call: ModelCall, inputs: dict[str, torch.Tensor], labels: torch.Tensor, *, grad_scale: float = 1.0) -> torch.Tensor:
        """Summed token cross-entropy (fp32 scalar, differentiable); `grad_scale`: the factor backward will use."""
        if self.head is None:
            return token_loss_sum(call(**inputs, use_cache=False).logits, labels)
        device = inputs["input_ids"].device
        request = LossRequest(loss_positions(labels).to(device), per_token=False, chunk_rows=self.chunk_rows, grad_scale=grad_scale)
        with requested_loss(self.head, request):
            return call(**inputs, use_cache=False).logits

    def row_sums(self, call: ModelCall, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (summed fp32 loss on the model's device, scored tokens on the CPU), without gradients."""
        with torch.no_grad():
            if self.head is None:
                sums, counts = row_loss_sums(call(**inputs, use_cache=False).logits, labels)
                return sums, counts.cpu()
            positions = loss_positions(labels)
            device = inputs["input_ids"].device
            on_device = positions.to(device)
            with requested_loss(self.head, LossRequest(on_device, per_token=True, chunk_rows=self.chunk_rows)):
                per_token = call(**inputs, use_cache=False).logits
            sums = torch.zeros(positions.num_rows, dtype=torch.float32, device=device).index_add_(0, on_device.rows, per_token)
            return sums, torch.bincount(positions.rows, minlength=positions.num_rows)


def loss_sums_forward(model: torch.nn.Module, device: torch.device | None = None, *, chunked: bool = True) -> Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """A forward function for `eval.heldout` / `eval.mcq`: batch -> per-row (loss sums, token counts), chunked."""
    loss = CausalLMLoss.for_model(model, chunked=chunked)

    def forward(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        target = device if device is not None else next(model.parameters()).device
        inputs = {k: v.to(target) for k, v in batch.items() if k != "labels"}
        return loss.row_sums(model, inputs, batch["labels"])

    return forward
