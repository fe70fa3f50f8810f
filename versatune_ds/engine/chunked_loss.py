"""Cross-entropy through the output layer in chunks, at the positions that bear loss only.

The plain path (`losses.token_loss_sum`) takes the model's `[batch, seq, vocab]` logits: at a 128 k vocabulary
and 4 k tokens that is 0.5 G elements, plus an fp32 copy, plus the same again for the gradient, even where the
labels are -100 (with assistant-only loss most positions are). This path never builds that tensor:

1. The positions whose next token is scored are found on the CPU, from the collated labels (so no host sync
   on the accelerator): `LossPositions`, with their targets and rows.
2. The model runs as usual (so ZeRO-3's module hooks, gradient checkpointing and every launcher behave as
   before), but its output layer, for this one call, receives the last hidden states and returns the loss
   instead of logits: `install_chunked_head` swaps the `forward` of that one `nn.Linear` instance for one that
   computes the plain logits when no loss was requested (generation, export checks), and the chunked loss
   when one was (`LossRequest`). The layer's own parameters are used while its own ZeRO-3 hooks have gathered
   them, exactly as in the plain path, so partitioning, tied embeddings and gradient reduction are unchanged.
3. `_LinearCrossEntropySum` projects the selected hidden states `chunk_rows` at a time, takes the
   cross-entropy in fp32 and, when gradients are wanted, the gradients of that chunk at once (softmax minus
   one-hot, times the weight / the hidden states): the backward then only scales them by the incoming
   gradient, so nothing is recomputed and no chunk's logits outlive the chunk. The same idea as the "fused
   linear cross-entropy" of Liger-Kernel and of Apple's Cut Cross-Entropy; this is our own code.

Memory of the head: one chunk of logits (`chunk_rows x vocab`, fp32, worked on in place; plus its model-dtype
original while it is cast) and the weight's gradient (`vocab x hidden`, model dtype, which the plain path produces too), instead of
`batch x seq x vocab x (2 + 4 + 4 + 4)` bytes.

Models whose causal-LM forward is not exactly `lm_head(last hidden states)` (logit scaling or soft-capping,
e.g. Gemma 2, Cohere, Granite) or whose type we have not checked keep the plain path: `install_chunked_head`
returns False and the engine says so in a log line. `tests/test_chunked_loss.py` checks every type listed in
`CHUNKED_MODEL_TYPES` against the plain path.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from versatune_ds.data.packing import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Causal LMs whose forward computes `logits = lm_head(last_hidden_state)` and nothing after it (checked in
# transformers 5: no logit scaling, soft-capping or extra heads; MoE router losses are never used here).
CHUNKED_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "phi", "phi3", "olmo",
    "olmo2", "gpt2", "gpt_neox", "gpt_bigcode", "starcoder2", "stablelm", "smollm3", "falcon",
})

# Logits of one chunk stay around this size (fp32): large enough for efficient matmuls, small next to the model.
CHUNK_BYTES = 256 * 2**20
_REQUEST_ATTR = "_versatune_loss_request"
_ORIGINAL_FORWARD_ATTR = "_versatune_plain_forward"


def chunk_rows_for(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk of fp32 logits is about `chunk_bytes`."""
    return int(min(16384, max(16, chunk_bytes // (4 * max(1, vocab_size)))))


@dataclass(frozen=True)
class LossPositions:
    """Where a batch bears loss after the causal shift: position t of row b predicts labels[b, t+1].

    `flat_index` indexes the flattened `[batch * seq]` hidden states; `targets` are the token ids to
    predict; `rows` the row of each position (for per-row sums). Computed on the CPU from the labels.
    """

    flat_index: torch.Tensor  # int64 [N]
    targets: torch.Tensor  # int64 [N]
    rows: torch.Tensor  # int64 [N]
    num_rows: int

    @property
    def count(self) -> int:
        return int(self.flat_index.numel())

    def to(self, device: torch.device) -> LossPositions:
        move = {"device": device, "non_blocking": True}
        return LossPositions(self.flat_index.to(**move), self.targets.to(**move), self.rows.to(**move), self.num_rows)


def loss_positions(labels: torch.Tensor) -> LossPositions:
    """The positions of `labels` ([batch, seq], on the CPU) whose next label is scored."""
    labels = labels.cpu()
    batch, seq = labels.shape
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    flat = shifted.reshape(-1)
    index = torch.nonzero(flat != IGNORE_INDEX, as_tuple=False).reshape(-1)
    return LossPositions(index, flat[index], torch.div(index, seq, rounding_mode="floor"), batch)


@dataclass(frozen=True)
class LossRequest:
    """What the output layer computes on its next call instead of logits."""

    positions: LossPositions
    per_token: bool  # False: the summed loss (differentiable); True: fp32 loss per position (no gradients)
    chunk_rows: int
    grad_scale: float = 1.0  # the factor the summed loss will be multiplied by before backward


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i), in chunks; gradients computed chunk by chunk in forward.

    The gradients are computed for an incoming gradient of `grad_scale` (the factor the caller will multiply
    the loss by), in fp32 before the cast to the model dtype, as the plain path does; `backward` multiplies them
    by `incoming / grad_scale`, which is exactly 1 in training (or NaN for a poisoned step, see train_engine).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
        chunk_rows: int, grad_scale: float,
    ) -> torch.Tensor:
        want_bias = bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # Every rank must produce a weight gradient, even with no loss position (ZeRO reduces it collectively).
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if want_bias else None
        wants_grads = grad_hidden is not None or grad_weight is not None or grad_bias is not None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]
            t = targets[start : start + chunk_rows]
            exp_logits, sums, lse, picked = _exp_logits(h, weight, bias, t)
            total += (lse - picked).sum()
            if not wants_grads:
                continue
            probs = exp_logits.div_(sums[:, None])  # softmax, still in the one chunk buffer
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            g = probs.mul_(grad_scale).to(hidden.dtype)
            del probs, exp_logits
            if grad_hidden is not None:
                torch.mm(g, weight, out=grad_hidden[start : start + chunk_rows])
            if grad_weight is not None:
                grad_weight.addmm_(g.t(), h)
            if grad_bias is not None:
                grad_bias += g.sum(0)
            del g  # before the next chunk's logits exist: one chunk buffer at a time
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.grad_scale = grad_scale
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grads = ctx.grads
        del ctx.grads
        ratio = grad_total.float() / ctx.grad_scale  # a device tensor: no host sync
        scaled = [None if g is None else g.mul_(ratio.to(g.dtype)) for g in grads]
        return scaled[0], scaled[1], scaled[2], None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk_rows: int,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Differentiable fp32 sum of the cross-entropy of `hidden [N, H]` through `weight [V, H]` (+ bias).

    `grad_scale`: the gradient the caller will backpropagate into the result (exact for that value).
    """
    return _LinearCrossEntropySum.apply(hidden, weight, bias, targets, chunk_rows, grad_scale)


def linear_token_losses(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk_rows: int
) -> torch.Tensor:
    """fp32 cross-entropy per row of `hidden [N, H]` (no gradients), in chunks."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk_rows):
            _, _, lse, picked = _exp_logits(hidden[start : start + chunk_rows], weight, bias, targets[start : start + chunk_rows])
            out[start : start + chunk_rows] = lse - picked
    return out


def _exp_logits(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exp(logits - rowmax) fp32 [c, V], its row sums, logsumexp [c], target logits [c]) in one [c, V] fp32 buffer.

    The same numerics as the plain path: logits in the model dtype, then fp32; torch.logsumexp's max trick, done
    in place (logsumexp itself would allocate a second [c, V] buffer).
    """
    logits = F.linear(h, weight, bias).float()
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    rowmax = logits.amax(dim=-1, keepdim=True)
    exp_logits = logits.sub_(rowmax).exp_()
    sums = exp_logits.sum(-1)
    return exp_logits, sums, sums.log().add_(rowmax.squeeze(1)), picked


def _chunked_forward(self: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """`forward` of the patched output layer: plain logits, or the requested loss (see the module docstring)."""
    request: LossRequest | None = getattr(self, _REQUEST_ATTR, None)
    if request is None:
        return getattr(self, _ORIGINAL_FORWARD_ATTR)(hidden)
    positions = request.positions
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions.flat_index)
    if request.per_token:
        return linear_token_losses(selected, self.weight, self.bias, positions.targets, request.chunk_rows)
    return linear_cross_entropy_sum(
        selected, self.weight, self.bias, positions.targets, request.chunk_rows, request.grad_scale
    )


def output_layer(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's output layer when the chunked loss is known to be exact for it (see CHUNKED_MODEL_TYPES)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in CHUNKED_MODEL_TYPES:
        return None
    get = getattr(model, "get_output_embeddings", None)
    layer = get() if callable(get) else None
    return layer if type(layer) is torch.nn.Linear else None


def install_chunked_head(model: torch.nn.Module) -> bool:
    """Let the model's output layer compute the chunked loss on request; False (and a log line) if unknown.

    Call before DeepSpeed wraps the model or after, any number of times; only this instance is patched.
    """
    layer = output_layer(model)
    if layer is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        logger.info("loss: the plain path over full logits for model type %r (chunked loss not checked for it)", model_type)
        return False
    if _ORIGINAL_FORWARD_ATTR not in layer.__dict__:
        setattr(layer, _ORIGINAL_FORWARD_ATTR, layer.forward)
        layer.forward = types.MethodType(_chunked_forward, layer)  # this instance only
    return True


class requested_loss:  # noqa: N801 (a context manager, used like a function)
    """Inside: the next call of the patched output layer returns the requested loss instead of logits."""

    def __init__(self, layer: torch.nn.Module, request: LossRequest) -> None:
        self.layer, self.request = layer, request

    def __enter__(self) -> None:
        setattr(self.layer, _REQUEST_ATTR, self.request)

    def __exit__(self, *exc: object) -> None:
        self.layer.__dict__.pop(_REQUEST_ATTR, None)
