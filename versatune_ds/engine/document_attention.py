"""Attention of padding-free batches: each document of a flattened micro-batch attends only to itself, with no mask.

A padding-free micro-batch (`data.padding_free`, see `data.packing.collate_flat`) is the micro-batch's rows laid
end to end as one sequence `[1, T]`, `T` = the sum of the rows' real lengths: the pad positions of the padded
layout are not computed at all (a micro-batch is padded to its longest row: on the peer benchmark's packed rows of
256 tokens ~7 % of the positions were pads, far more with short examples or without packing). `position_ids`
restart at 0 at every example, as in packed rows.

What each attention kernel needs for that layout:
- flash-attention 2/3 reads the example boundaries from the position restarts itself (transformers' own
  padding-free path); nothing here is involved.
- sdpa would get from transformers a dense `[T, T]` block-diagonal mask (built from the restarts), which grows
  with the square of the micro-batch's tokens and keeps sdpa off its fast causal kernels. `sdpa_documents`, an
  attention function registered with transformers under `DOCUMENT_SDPA`, replaces it: its mask function builds
  no mask when there is no padding mask to honour, and the attention cuts the sequence at the restarts and runs
  causal sdpa on each document alone -- what each example would compute if it were run by itself (the same
  exactness the packed layout promises, tests/test_document_attention.py). With a padding mask (evaluation
  batches, batched generation) or a KV cache it is exactly transformers' sdpa.
- eager attention has no padding-free path: `model_reads_documents` is False and batches stay padded.

Model types are allow-listed (`DOCUMENT_MODEL_TYPES`): their attention modules pass `position_ids` through to
the attention function and use plain causal attention, optionally with a sliding window (applied per document).
Others keep the padded layout, said in a log line. `flash_attn`'s varlen interface and HF's
`DataCollatorWithFlattening` are the same idea for GPUs; this is our own code for the sdpa case.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DOCUMENT_SDPA = "sdpa_documents"
_SPANS_ATTR = "_versatune_document_spans"
# `enable_gqa` (key/value heads shared by groups of query heads, without copies) came with torch 2.5.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
# Attention implementations that read example boundaries from position restarts without a dense mask.
DOCUMENT_IMPLEMENTATIONS = frozenset({DOCUMENT_SDPA, "flash_attention_2", "flash_attention_3"})
# Checked in transformers 5: the decoder layer hands `position_ids` to the attention function in **kwargs, and
# the attention is causal with at most a sliding window (passed as the `sliding_window` keyword). Every type is
# compared with the padded layout in tests/test_document_attention.py.
DOCUMENT_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo2", "smollm3"})


def register_document_sdpa() -> str:
    """Make `DOCUMENT_SDPA` a valid `attn_implementation` in transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(DOCUMENT_SDPA, document_sdpa_attention)
    AttentionMaskInterface.register(DOCUMENT_SDPA, document_sdpa_mask)
    return DOCUMENT_SDPA


def use_document_attention(model: torch.nn.Module) -> bool:
    """Switch an sdpa model of an allow-listed type to `DOCUMENT_SDPA`; True when the model now reads documents.

    flash-attention models read them already (True); eager models and unlisted types cannot (False, logged).
    """
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    model_type = getattr(config, "model_type", None)
    if implementation in DOCUMENT_IMPLEMENTATIONS:
        return True
    if implementation != "sdpa" or model_type not in DOCUMENT_MODEL_TYPES:
        logger.info(
            "padding-free batches off: attention %r of model type %r needs padded rows (supported: sdpa on %s, or flash-attention)",
            implementation, model_type, ", ".join(sorted(DOCUMENT_MODEL_TYPES)),
        )
        return False
    model.set_attn_implementation(register_document_sdpa())
    # One spans cache shared by the model's attention modules: the boundaries are found once per forward.
    shared = _SpansCache()
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            module.__dict__[_SPANS_ATTR] = shared
    return True


def model_reads_documents(model: torch.nn.Module) -> bool:
    """True when the model's attention keeps the examples of a padding-free batch apart."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in DOCUMENT_IMPLEMENTATIONS


def document_sdpa_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """transformers' sdpa mask where there is a padding mask to honour; otherwise none (the attention cuts documents)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


class _SpansCache:
    """The document spans of the last `position_ids` seen: every layer of one forward gets the same tensor, so
    the spans are computed (one host sync) once per forward; the cache keeps that tensor alive, so `is` is exact."""

    def __init__(self) -> None:
        self.position_ids: torch.Tensor | None = None
        self.spans: list[list[tuple[int, int]]] = []

    def spans_of(self, position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
        if position_ids is not self.position_ids:
            self.spans = document_spans(position_ids)
            self.position_ids = position_ids
        return self.spans


def document_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the `(start, end)` of every document: a document starts wherever the position is 0 (and at 0)."""
    rows = position_ids.reshape(-1, position_ids.shape[-1]).cpu()  # a host sync (once per forward, see _SpansCache)
    spans = []
    for row in rows:
        length = int(row.shape[0])
        starts = torch.nonzero(row == 0).flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        spans.append(list(zip(starts, [*starts[1:], length])))
    return spans


def _window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal mask of one document with a sliding window (transformers: key kept when q - k < window)."""
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    return (k <= q) & (q - k < window)


def _spans_to_cut(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                  is_causal: bool | None, kwargs: dict[str, Any]) -> list[list[tuple[int, int]]] | None:
    """Per batch row, the documents to attend within; None where the call is not one this function cuts (a padding
    mask, a KV cache, a single query, non-causal or soft-capped attention, positions that do not fit the batch)."""
    position_ids = kwargs.get("position_ids")
    q_length = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (attention_mask is not None or position_ids is None or q_length == 1 or key.shape[2] != q_length or not causal
            or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None):
        return None
    cache = module.__dict__.get(_SPANS_ATTR)
    if cache is None:  # a module that use_document_attention did not set up: a cache of its own
        cache = module.__dict__[_SPANS_ATTR] = _SpansCache()
    spans = cache.spans_of(position_ids)
    if len(spans) == query.shape[0]:
        return spans
    if len(spans) == 1:
        return spans * query.shape[0]  # one row of positions shared by the batch (transformers' default arange)
    return None


def document_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An attention function for transformers' `AttentionInterface` (query `[B, H, L, D]`, key/value `[B, KV, L, D]`).

    Without a mask and without a cache (training and scoring of unpadded batches): causal sdpa on each document
    alone. Otherwise transformers' sdpa, unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = _spans_to_cut(module, query, key, attention_mask, is_causal, kwargs)
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    window = kwargs.get("sliding_window")
    gqa: dict[str, bool] = {}
    if query.shape[1] != key.shape[1]:
        if _SDPA_HAS_GQA:
            gqa["enable_gqa"] = True
        else:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    outputs = []
    for b, row_spans in enumerate(spans):
        pieces = []
        for start, end in row_spans:
            q, k, v = query[b : b + 1, :, start:end], key[b : b + 1, :, start:end], value[b : b + 1, :, start:end]
            if window is not None and end - start > window:
                mask = _window_mask(end - start, int(window), query.device)
                pieces.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, **gqa))
            else:
                pieces.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, **gqa))
        outputs.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    out = torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]
    return out.transpose(1, 2).contiguous(), None
