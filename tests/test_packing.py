from __future__ import annotations

import numpy as np
import pytest
import torch

from versatune_ds.data.packing import (
    IGNORE_INDEX,
    Example,
    collate_rows,
    pack_examples,
    packing_efficiency,
    padding_efficiency,
    rows_without_packing,
)


def _example(index: int, n: int, domain_id: int = 0, vocab: int = 400, seed: int = 0) -> Example:
    rng = np.random.default_rng([seed, index])
    ids = rng.integers(10, vocab, size=n).astype(np.int64)
    labels = ids.copy()
    labels[: n // 2] = IGNORE_INDEX  # a prompt half with no loss
    return Example(index=index, domain_id=domain_id, input_ids=ids, labels=labels)


def test_pack_fits_every_example_once_and_restarts_positions() -> None:
    examples = [_example(i, n) for i, n in enumerate([30, 10, 25, 5, 40, 8, 3, 60, 12])]
    rows = pack_examples(examples, seq_len=64)
    assert all(r.num_tokens <= 64 for r in rows)
    assert sorted(i for r in rows for i in r.example_indices) == list(range(len(examples)))
    for row in rows:
        starts = np.flatnonzero(row.position_ids == 0)
        lengths = np.diff(np.append(starts, row.num_tokens))
        assert list(lengths) == [examples[i].num_tokens for i in row.example_indices]
        expected = np.concatenate([examples[i].input_ids for i in row.example_indices])
        assert np.array_equal(row.input_ids, expected)


def test_pack_is_deterministic_and_rejects_too_long() -> None:
    examples = [_example(i, 5 + (i * 7) % 50) for i in range(50)]
    a = pack_examples(examples, 64)
    b = pack_examples(examples, 64)
    assert [r.example_indices for r in a] == [r.example_indices for r in b]
    with pytest.raises(ValueError, match="longer than seq_len=16"):
        pack_examples([_example(0, 17)], 16)


def test_pack_refuses_mixed_domains() -> None:
    with pytest.raises(ValueError, match="one domain"):
        pack_examples([_example(0, 5, domain_id=0), _example(1, 5, domain_id=1)], 64)


def test_packing_beats_padding_on_skewed_lengths() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, size=400)
    examples = [_example(i, int(n)) for i, n in enumerate(lengths)]
    packed = pack_examples(examples, 1024)
    assert packing_efficiency(packed, 1024) >= 0.95
    assert padding_efficiency(rows_without_packing(examples), 8) < packing_efficiency(packed, 1024)


def test_collate_packed_has_no_mask_and_masks_padding() -> None:
    rows = pack_examples([_example(0, 6), _example(1, 3), _example(2, 9)], seq_len=9)
    batch = collate_rows(rows, pad_token_id=0, packed=True, pad_to=12)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (len(rows), 12)
    for b, row in enumerate(rows):
        assert (batch["labels"][b, row.num_tokens :] == IGNORE_INDEX).all()
    unpacked = collate_rows(rows_without_packing([_example(0, 6), _example(1, 3)]), pad_token_id=0, packed=False)
    assert unpacked["attention_mask"].tolist()[1] == [1, 1, 1, 0, 0, 0]


def test_packed_row_gives_same_logits_as_each_example_alone(tiny_model_dir) -> None:
    """The issue's equivalence proof: with sdpa, a packed row's per-token logits equal each example run alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    examples = [_example(i, n, vocab=vocab, seed=3) for i, n in enumerate([11, 7, 19, 4])]
    rows = pack_examples(examples, seq_len=64)
    assert len(rows) == 1 and len(rows[0].example_indices) == 4
    batch = collate_rows(rows, pad_token_id=0, packed=True, pad_to=48)
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        offset = 0
        for i in rows[0].example_indices:
            ids = torch.from_numpy(examples[i].input_ids)[None]
            alone = model(input_ids=ids, use_cache=False).logits[0]
            n = ids.shape[1]
            torch.testing.assert_close(packed_logits[offset : offset + n], alone, rtol=1e-5, atol=1e-5)
            offset += n
        # Control: without position restarts the examples would see each other and the logits would differ.
        plain = model(input_ids=batch["input_ids"][:, :offset], use_cache=False).logits[0]
        n0 = examples[rows[0].example_indices[0]].num_tokens
        assert not torch.allclose(plain[n0 : offset], packed_logits[n0:offset], atol=1e-4)
