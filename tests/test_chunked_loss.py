"""The chunked loss (engine.chunked_loss) against the plain path over full logits: loss and gradients, every model
type it is enabled for, masked and empty batches, bf16, the per-row sums evaluation uses, and 2 ranks under ZeRO-3
(also with tied embeddings).

This file is also the worker of the 2-rank test: `python tests/test_chunked_loss.py zero3 <model_dir> <out_dir>`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_helpers import THIS_FILE as _HELPERS  # noqa: E402
from dist_helpers import launch

from versatune_ds.engine.chunked_loss import CHUNKED_MODEL_TYPES, loss_positions  # noqa: E402
from versatune_ds.engine.losses import CausalLMLoss, row_loss_sums, token_loss_sum  # noqa: E402

THIS_FILE = Path(__file__).resolve()
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_local_experts=2, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16)


def _tiny(model_type: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **SMALL)
    for key, value in MOE.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def _batch(seed: int = 0, vocab: int = 97) -> tuple[torch.Tensor, torch.Tensor]:
    """3 rows of 24 tokens: a prompt masked out, one row with no loss at all, one cut short (assistant-only loss)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 24), generator=generator)
    labels = ids.clone()
    labels[:, :9] = -100
    labels[1] = -100
    labels[2, 17:] = -100
    return ids, labels


def _loss_and_grads(model: torch.nn.Module, loss: CausalLMLoss | None, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict]:
    model.zero_grad()
    if loss is None:
        value = token_loss_sum(model(input_ids=ids, use_cache=False).logits, labels)
    else:
        value = loss.loss_sum(model, {"input_ids": ids}, labels, grad_scale=0.5)
    (value * 0.5).backward()
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(value.detach()), grads


@pytest.mark.parametrize("model_type", sorted(CHUNKED_MODEL_TYPES))
def test_loss_and_gradients_equal_the_plain_path_for_every_enabled_model_type(model_type: str) -> None:
    plain = _tiny(model_type)
    chunked = copy.deepcopy(plain)
    loss = CausalLMLoss.for_model(chunked)
    assert loss.chunked, model_type
    loss = CausalLMLoss(loss.head, chunk_rows=5)  # several chunks, the last one partial
    ids, labels = _batch()
    reference, reference_grads = _loss_and_grads(plain, None, ids, labels)
    value, grads = _loss_and_grads(chunked, loss, ids, labels)
    assert value == pytest.approx(reference, rel=1e-6)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-6, msg=f"{model_type}: {name}")


def test_per_row_sums_match_the_plain_path_and_logits_are_untouched() -> None:
    plain = _tiny("llama")
    chunked = copy.deepcopy(plain)
    loss = CausalLMLoss.for_model(chunked)
    ids, labels = _batch(1)
    with torch.no_grad():
        reference_sums, reference_counts = row_loss_sums(plain(input_ids=ids).logits, labels)
    sums, counts = loss.row_sums(chunked, {"input_ids": ids}, labels)
    torch.testing.assert_close(sums, reference_sums, rtol=1e-6, atol=1e-6)
    assert counts.tolist() == reference_counts.tolist() == [15, 0, 8]
    # Without a loss request the patched output layer still gives logits (generation, export checks).
    with torch.no_grad():
        torch.testing.assert_close(chunked(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)


def test_a_batch_without_loss_positions_gives_zero_loss_and_zero_gradients() -> None:
    model = _tiny("llama")
    loss = CausalLMLoss.for_model(model)
    ids, labels = _batch(2)
    value, grads = _loss_and_grads(model, loss, ids, torch.full_like(labels, -100))
    assert value == 0.0
    head = model.get_output_embeddings().weight
    assert head.grad is not None and float(head.grad.abs().sum()) == 0.0  # present: ZeRO reduces it on every rank
    assert all(float(g.abs().sum()) == 0.0 for g in grads.values())


def test_bf16_stays_close_to_the_plain_path() -> None:
    plain = _tiny("llama", torch.bfloat16)
    chunked = copy.deepcopy(plain)
    loss = CausalLMLoss(CausalLMLoss.for_model(chunked).head, chunk_rows=4)
    ids, labels = _batch(3)
    reference, reference_grads = _loss_and_grads(plain, None, ids, labels)
    value, grads = _loss_and_grads(chunked, loss, ids, labels)
    assert value == pytest.approx(reference, rel=1e-3)
    for name, grad in grads.items():
        scale = float(reference_grads[name].abs().max())
        assert float((grad - reference_grads[name]).abs().max()) <= 2e-2 * scale, name


def test_unknown_model_types_keep_the_plain_path_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    model = _tiny("gemma2")  # final-logit soft-capping: the chunked loss would not be exact
    with caplog.at_level(logging.INFO, logger="versatune_ds.engine.chunked_loss"):
        loss = CausalLMLoss.for_model(model)
    assert not loss.chunked
    assert "plain path over full logits for model type 'gemma2'" in caplog.text
    ids, labels = _batch(4)
    value, _ = _loss_and_grads(model, loss, ids, labels)
    with torch.no_grad():
        expected = float(token_loss_sum(model(input_ids=ids).logits, labels))
    assert value == pytest.approx(expected, rel=1e-6)
    assert not CausalLMLoss.for_model(_tiny("llama"), chunked=False).chunked


def test_loss_positions_follow_the_causal_shift() -> None:
    labels = torch.tensor([[-100, 5, 6, -100], [7, -100, -100, 8]])
    positions = loss_positions(labels)
    assert positions.flat_index.tolist() == [0, 1, 6]  # row 0 predicts 5 at t=0 and 6 at t=1; row 1 predicts 8 at t=2
    assert positions.targets.tolist() == [5, 6, 8]
    assert positions.rows.tolist() == [0, 0, 1] and positions.num_rows == 2


# ----------------------------------------------------------------------------------------------
# 2 ranks, ZeRO-3


@pytest.mark.dist
@pytest.mark.parametrize("tied", [False, True])
def test_zero3_on_two_ranks_gives_the_plain_paths_loss_and_gradients(tied: bool, tmp_path: Path, tiny_model_dir: Path) -> None:
    model_dir = tiny_model_dir
    if tied:
        from test_export import _tied_model

        model_dir = _tied_model(tiny_model_dir, tmp_path / "tied")
    result = launch(["zero3", str(model_dir), str(tmp_path)], script=str(THIS_FILE), timeout=300)
    assert result.returncode == 0, result.stdout[-6000:]
    record = json.loads((tmp_path / "zero3_rank0.json").read_text())
    other = json.loads((tmp_path / "zero3_rank1.json").read_text())
    assert record["chunked"] and not record["plain_chunked"]
    assert record["loss"] == pytest.approx(record["plain_loss"], rel=1e-6)
    assert other["loss"] == record["loss"]  # the same global value on every rank
    assert record["eval"] == pytest.approx(record["plain_eval"], rel=1e-6)
    grads = np.load(tmp_path / "grads_chunked.npz")
    reference = np.load(tmp_path / "grads_plain.npz")
    assert sorted(grads.files) == sorted(reference.files) and len(grads.files) >= 10
    for name in grads.files:
        np.testing.assert_allclose(grads[name], reference[name], rtol=1e-4, atol=1e-7, err_msg=name)
    assert record["step_loss"] == pytest.approx(record["plain_step_loss"], rel=1e-5)


def _worker_zero3(model_dir: str, out_dir: str) -> None:
    """Plain and chunked engines (ZeRO-3, 2 ranks) on the same masked batches: loss, full gradients, one step."""
    import gc

    from dist_helpers import _fixed_batches, _tiny_engine_setup

    from versatune_ds import dist
    from versatune_ds.engine import zero
    from versatune_ds.engine.models import load_model
    from versatune_ds.engine.train_engine import TrainEngine

    env = dist.DistEnv.from_environ()
    dist.start_process_group(env, backend="gloo", timeout_s=60)
    batches = _fixed_batches(env.rank, 2)
    for step in batches:  # assistant-only loss: a prompt of 6 tokens without loss, rank-dependent lengths
        for micro in step:
            micro["labels"][:, : 6 + env.rank] = -100
    record: dict = {}
    for name, chunked in (("plain", False), ("chunked", True)):
        folder = Path(out_dir) / f"{name}_rank{env.rank}"  # each rank writes its own copy of the configs
        folder.mkdir(parents=True, exist_ok=True)
        cfg, ds_config = _tiny_engine_setup(model_dir, folder, 3, env)
        engine = TrainEngine(cfg.train, load_model(cfg.model, ds_config=ds_config), ds_config, total_steps=10, chunked_loss=chunked)
        accumulated = engine.backward(batches[0])
        totals = dist.all_reduce_sum(accumulated.flags.cpu().numpy())
        grads = zero.full_gradients(engine.module)
        engine.engine.step()
        result = engine.train_step(batches[1])
        with engine.eval_mode():
            sums, _ = engine.forward_loss_sums(batches[0][0])
        prefix = "plain_" if name == "plain" else ""
        record[f"{prefix}chunked"] = engine.loss.chunked
        record[f"{prefix}loss"] = float(totals[0] / accumulated.global_tokens)
        record[f"{prefix}step_loss"] = result.loss
        record[f"{prefix}eval"] = float(dist.all_reduce_sum(sums.numpy()).sum())
        if env.is_main:
            np.savez(Path(out_dir, f"grads_{name}.npz"), **{k: v.numpy() for k, v in grads.items()})
        del engine
        gc.collect()
    Path(out_dir, f"zero3_rank{env.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    sys.path.insert(0, str(_HELPERS.parents[1]))
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    {"zero3": _worker_zero3}[argv[0]](*argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
