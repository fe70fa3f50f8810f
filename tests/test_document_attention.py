"""Padding-free batches (data.packing.collate_flat) with per-document sdpa (engine.document_attention) against the
padded layout: logits, loss and gradients for every allow-listed model type, sliding windows, the fallbacks, and
the training loop's choice of layout."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from versatune_ds.data.packing import IGNORE_INDEX, Example, collate_flat, collate_rows, pack_examples
from versatune_ds.engine.document_attention import (
    DOCUMENT_MODEL_TYPES,
    DOCUMENT_SDPA,
    document_spans,
    model_reads_documents,
    use_document_attention,
)
from versatune_ds.engine.losses import CausalLMLoss

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _tiny(model_type: str, attn: str = "sdpa", **extra: object) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**SMALL, **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).float().eval()


def _example(index: int, n: int, seed: int = 0) -> Example:
    rng = np.random.default_rng([seed, index])
    ids = rng.integers(3, 97, size=n).astype(np.int64)
    labels = ids.copy()
    labels[: n // 3] = IGNORE_INDEX
    return Example(index=index, domain_id=0, input_ids=ids, labels=labels)


def _rows(lengths: list[int], seq_len: int = 40):
    return pack_examples([_example(i, n) for i, n in enumerate(lengths)], seq_len)


def _padded_token_logits(model: torch.nn.Module, rows) -> torch.Tensor:
    """Logits of every real token, from the padded packed layout (transformers' block-diagonal mask), in row order."""
    batch = collate_rows(rows, pad_token_id=0, packed=True)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return torch.cat([logits[b, : r.num_tokens] for b, r in enumerate(rows)])


@pytest.mark.parametrize("model_type", sorted(DOCUMENT_MODEL_TYPES))
def test_flat_batch_gives_the_padded_layouts_logits(model_type: str) -> None:
    model = _tiny(model_type)
    rows = _rows([23, 9, 17, 31, 5, 12, 40])
    assert len(rows) >= 3 and any(len(r.example_indices) > 1 for r in rows)
    expected = _padded_token_logits(model, rows)
    assert use_document_attention(model) and model.config._attn_implementation == DOCUMENT_SDPA
    flat = collate_flat(rows)
    assert flat["input_ids"].shape == (1, sum(r.num_tokens for r in rows))
    with torch.no_grad():
        got = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False).logits[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Control: the same sequence read as one document (plain sdpa, no restarts honoured) is different.
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        across = model(input_ids=flat["input_ids"], use_cache=False).logits[0]
    assert not torch.allclose(across, expected, atol=1e-4)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_flat_batch_gives_the_same_loss_and_gradients_through_the_chunked_loss(checkpointing: bool) -> None:
    rows = _rows([23, 9, 17, 31, 5, 12, 40, 3])
    results = []
    for flat in (False, True):
        model = _tiny("llama")
        if checkpointing:  # the recomputed forward must cut the documents as the first one did
            model.train()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if flat:
            use_document_attention(model)
        batch = collate_flat(rows) if flat else collate_rows(rows, pad_token_id=0, packed=True)
        loss = CausalLMLoss.for_model(model)
        assert loss.chunked
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        value = loss.loss_sum(model, inputs, batch["labels"])
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (padded_loss, padded_grads), (flat_loss, flat_grads) = results
    torch.testing.assert_close(flat_loss, padded_loss, rtol=1e-5, atol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(flat_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sliding_window_is_applied_inside_each_document() -> None:
    # Mistral with a window shorter than the documents: the window must cut inside documents as well.
    model = _tiny("mistral", sliding_window=6)
    rows = _rows([23, 9, 17, 31])
    expected = _padded_token_logits(model, rows)
    use_document_attention(model)
    flat = collate_flat(rows)
    with torch.no_grad():
        got = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False).logits[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_padding_masks_and_generation_are_plain_sdpa() -> None:
    # Evaluation batches carry a padding mask and generation a cache: there the function is transformers' sdpa.
    reference = _tiny("llama")
    model = _tiny("llama")
    use_document_attention(model)
    ids = torch.randint(3, 97, (3, 14), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[2, 10:] = 0  # right padding
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, reference(input_ids=ids, attention_mask=mask).logits)
        # No mask and no positions: transformers passes one shared row of positions for the whole batch.
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
        a = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        b = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


def test_models_that_cannot_read_documents_keep_padded_rows(caplog: pytest.LogCaptureFixture) -> None:
    eager = _tiny("llama", attn="eager")
    with caplog.at_level(logging.INFO, logger="versatune_ds.engine.document_attention"):
        assert not use_document_attention(eager)
    assert "padding-free batches off" in caplog.text and "'eager'" in caplog.text
    assert eager.config._attn_implementation == "eager" and not model_reads_documents(eager)
    unlisted = _tiny("gpt2", n_embd=32, n_layer=2, n_head=4)
    assert not use_document_attention(unlisted) and not model_reads_documents(unlisted)


def test_document_spans_cut_at_every_restart() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [3, 4, 0, 1, 2, 3, 4, 5]])
    assert document_spans(positions) == [[(0, 3), (3, 5), (5, 6), (6, 8)], [(0, 2), (2, 8)]]


def test_collate_flat_keeps_rows_whole_and_in_order() -> None:
    rows = _rows([23, 9, 17, 31, 5])
    flat = collate_flat(rows)
    padded = collate_rows(rows, pad_token_id=0, packed=True)
    real = torch.cat([padded["labels"][b, : r.num_tokens] for b, r in enumerate(rows)])
    assert torch.equal(flat["labels"][0], real)
    assert torch.equal(flat["position_ids"][0], torch.from_numpy(np.concatenate([r.position_ids for r in rows])))
    assert "attention_mask" not in flat


def test_document_boundaries_are_found_once_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    import versatune_ds.engine.document_attention as document_attention

    calls = []
    real = document_attention.document_spans
    monkeypatch.setattr(document_attention, "document_spans", lambda positions: calls.append(1) or real(positions))
    model = _tiny("llama")
    assert model.config.num_hidden_layers == 2
    use_document_attention(model)
    flat = collate_flat(_rows([23, 9, 17]))
    with torch.no_grad():
        model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False)
        assert len(calls) == 1  # not once per layer
        model(input_ids=flat["input_ids"], position_ids=flat["position_ids"].clone(), use_cache=False)
    assert len(calls) == 2  # a new batch's positions are read again
