"""The one shifted cross-entropy, for the training loss and for every evaluation.

Causal LM loss: the logits at position t predict the token at t+1. The shift is applied to the labels (pad
one -100 on the right, drop the first), not to the logits, so no copy of the [batch, seq, vocab] tensor is
made in forward or backward (as Hugging Face's ForCausalLMLoss does). Cross-entropy runs in fp32 and
positions labelled -100 (prompt, padding, dummy rows) bear no loss.

- `token_loss_sum`: the summed loss of a batch (the training step scales it to the global token mean).
- `row_loss_sums`: per-row summed loss and scored-token counts (held-out loss, multiple-choice log-likelihood).
For one example, `row_loss_sums(...)[0] / count` is exactly `model(input_ids, labels=labels).loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from versatune_ds.data.packing import IGNORE_INDEX


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
