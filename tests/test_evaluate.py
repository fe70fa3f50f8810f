"""Per-domain held-out loss: equality with HF's loss, token weighting, lockstep sharding and dummy rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from versatune_ds.data.packing import IGNORE_INDEX, Example
from versatune_ds.dist import DistEnv
from versatune_ds.engine.losses import row_loss_sums
from versatune_ds.eval.heldout import (
    AUTO_MIN_EXAMPLES,
    DomainLosses,
    auto_tokens_per_domain,
    budget_subset,
    evaluate_domain_losses,
    hf_forward,
    lockstep_num_batches,
    rank_rows,
    ratio_se,
)

torch = pytest.importorskip("torch")

SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0, launcher="single")

TEXTS = [
    "The court held that the contract clause was unenforceable.",
    "The patient presented with fever.",
    "Revenue increased by 12 percent to 4.5 million dollars in the fiscal year.",
    "def add(a, b):\n    return a + b",
    "Photosynthesis converts light energy.",
    "Write a short poem about the sea.",
    "Summarize the text. A summary.",
]


def env_of(rank: int, world: int) -> DistEnv:
    return DistEnv(rank=rank, world_size=world, local_rank=rank, master_addr="127.0.0.1", master_port=0, launcher="torch")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer


def make_example(tokenizer, text: str, index: int, domain_id: int, prompt_share: float = 0.4) -> Example:
    ids = np.array(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    labels = ids.copy()
    labels[: max(1, int(len(ids) * prompt_share))] = IGNORE_INDEX  # the "prompt" part carries no loss
    return Example(index=index, domain_id=domain_id, input_ids=ids, labels=labels)


def make_heldout(tokenizer, sizes: list[int]) -> list[list[Example]]:
    out, k = [], 0
    for domain_id, size in enumerate(sizes):
        out.append([make_example(tokenizer, TEXTS[(k + i) % len(TEXTS)] * (1 + i % 2), i, domain_id) for i in range(size)])
        k += size
    return out


def hf_loss(model, example: Example) -> float:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(example.input_ids)[None], labels=torch.from_numpy(example.labels)[None], use_cache=False
        )
    return float(out.loss)


def test_single_example_equals_hf_loss(tiny):
    model, tokenizer = tiny
    example = make_example(tokenizer, TEXTS[2], 0, 0)
    result = evaluate_domain_losses(hf_forward(model), [[example]], micro_batch_size=4, pad_token_id=0, env=SINGLE)
    # labels[0] is masked, so the shift drops no response token: every labelled token is scored
    assert result.tokens[0] == example.num_loss_tokens
    assert result.loss[0] == pytest.approx(hf_loss(model, example), abs=1e-6)


def test_token_weighted_mean_over_examples_and_domains(tiny):
    model, tokenizer = tiny
    heldout = make_heldout(tokenizer, [3, 5, 2])
    result = evaluate_domain_losses(
        hf_forward(model), heldout, micro_batch_size=2, pad_token_id=tokenizer.pad_token_id, env=SINGLE
    )
    for d, examples in enumerate(heldout):
        counts = [e.num_loss_tokens for e in examples]
        expected = sum(hf_loss(model, e) * n for e, n in zip(examples, counts)) / sum(counts)
        assert result.tokens[d] == sum(counts)
        assert result.loss[d] == pytest.approx(expected, abs=1e-5)
    assert result.macro_mean == pytest.approx(float(np.mean(result.loss)))


def test_batch_size_and_simulated_ranks_change_nothing(tiny):
    """World 1 vs 3 simulated ranks (sums added by hand, as all_reduce would) and micro-batch 1 vs 8."""
    model, tokenizer = tiny
    heldout = make_heldout(tokenizer, [4, 1, 6])  # uneven: some ranks need dummy rows
    pad = tokenizer.pad_token_id
    reference = evaluate_domain_losses(hf_forward(model), heldout, micro_batch_size=1, pad_token_id=pad, env=SINGLE)
    batched = evaluate_domain_losses(hf_forward(model), heldout, micro_batch_size=8, pad_token_id=pad, env=SINGLE)
    np.testing.assert_allclose(batched.loss, reference.loss, atol=1e-5)
    world = 3
    sums, tokens, calls = np.zeros(3), np.zeros(3), []
    per_item = [np.zeros(len(examples)) for examples in heldout]
    for rank in range(world):
        counter = []

        def counting(batch, counter=counter):
            counter.append(batch["input_ids"].shape[0])
            return hf_forward(model)(batch)

        part = evaluate_domain_losses(counting, heldout, micro_batch_size=2, pad_token_id=pad, env=env_of(rank, world))
        sums += part.loss_sum
        tokens += part.tokens
        calls.append(len(counter))
        per_item = [a + b.sums for a, b in zip(per_item, part.items)]
    assert len(set(calls)) == 1, f"ranks ran different numbers of forward passes: {calls}"
    assert calls[0] == math.ceil(max(len(rank_rows(heldout, env_of(r, world))[0]) for r in range(world)) / 2)
    np.testing.assert_array_equal(tokens, reference.tokens)
    np.testing.assert_allclose(sums / tokens, reference.loss, atol=1e-5)
    # every example is scored on exactly one rank: the ranks' per-example sums add up to one rank's
    for summed, alone in zip(per_item, reference.items):
        np.testing.assert_allclose(summed, alone.sums, atol=1e-4)


def test_each_example_is_kept_with_its_loss_and_the_standard_error(tiny):
    model, tokenizer = tiny
    heldout = make_heldout(tokenizer, [5, 1])
    result = evaluate_domain_losses(hf_forward(model), heldout, micro_batch_size=3, pad_token_id=tokenizer.pad_token_id, env=SINGLE)
    items = result.items[0]
    assert items.ids.tolist() == [e.index for e in heldout[0]]
    for example, loss_sum, tokens in zip(heldout[0], items.sums, items.tokens):
        assert tokens == example.num_loss_tokens
        assert loss_sum / tokens == pytest.approx(hf_loss(model, example), abs=1e-5)
    assert result.loss[0] == pytest.approx(items.sums.sum() / items.tokens.sum())
    assert result.se[0] == pytest.approx(ratio_se(items.sums, items.tokens)) and result.se[0] > 0
    assert math.isnan(result.se[1])  # one example: no error estimate


def test_the_evaluation_subset_is_fixed_and_within_the_token_budget(tiny):
    _, tokenizer = tiny
    examples = make_heldout(tokenizer, [40])[0]
    sizes = {e.index: e.num_tokens for e in examples}
    subset = budget_subset(examples, 120, domain_id=0)
    assert sum(sizes[e.index] for e in subset) <= 120 and len(subset) >= 2
    assert [e.index for e in subset] == sorted(e.index for e in subset)  # in the held-out list's order
    assert subset == budget_subset(examples, 120, domain_id=0)  # the same examples at every evaluation
    assert [e.index for e in subset] != [e.index for e in budget_subset(examples, 120, domain_id=1)]  # seeded per domain
    assert budget_subset(examples, None, domain_id=0) == examples
    assert len(budget_subset(examples, 1, domain_id=0)) == 2  # always two examples, for a standard error
    assert len(budget_subset(examples, 1, domain_id=0, min_examples=AUTO_MIN_EXAMPLES)) == AUTO_MIN_EXAMPLES
    # The automatic budget: 2 % of the training time between evaluations, a forward pass ~1/3 of a training token.
    assert auto_tokens_per_domain(200, 1024, 6) == int(0.02 * 200 * 1024 * 3 / 6)


def test_dummy_rows_fill_short_ranks():
    """4 ranks, 1 example: ranks 1-3 run one forward pass on a dummy row and score nothing."""
    example = Example(0, 0, np.array([5, 6, 7], dtype=np.int64), np.array([-100, 6, 7], dtype=np.int64))
    seen = []

    def uniform_logits(batch):
        seen.append(batch["labels"].clone())
        return torch.zeros(*batch["input_ids"].shape, 10)

    for rank in range(4):
        result = evaluate_domain_losses(uniform_logits, [[example]], micro_batch_size=2, pad_token_id=0, env=env_of(rank, 4))
        assert result.tokens[0] == (2 if rank == 0 else 0)
    assert len(seen) == 4
    assert all((labels == IGNORE_INDEX).all() for labels in seen[1:])


def test_hand_computed_loss_with_controlled_logits():
    """Uniform logits over V tokens give log(V) per token; a confident correct logit gives ~0."""
    vocab = 7
    example = Example(0, 0, np.array([1, 2, 3, 4], dtype=np.int64), np.array([-100, -100, 3, 4], dtype=np.int64))
    result = evaluate_domain_losses(
        lambda b: torch.zeros(*b["input_ids"].shape, vocab), [[example]], micro_batch_size=1, pad_token_id=0, env=SINGLE
    )
    assert result.tokens[0] == 2
    assert result.loss[0] == pytest.approx(math.log(vocab))

    def peaked(batch):  # position t puts logit 50 on input_ids[t+1]
        ids = batch["input_ids"]
        logits = torch.zeros(*ids.shape, vocab)
        logits[0, torch.arange(ids.shape[1] - 1), ids[0, 1:]] = 50.0
        return logits

    result = evaluate_domain_losses(peaked, [[example]], micro_batch_size=1, pad_token_id=0, env=SINGLE)
    assert result.loss[0] == pytest.approx(6 * math.exp(-50), abs=1e-12)


def test_forward_returning_row_sums_is_accepted():
    example = Example(0, 0, np.array([1, 2, 3], dtype=np.int64), np.array([-100, 2, 3], dtype=np.int64))

    def sums_fn(batch):
        return row_loss_sums(torch.zeros(*batch["input_ids"].shape, 4), batch["labels"])

    result = evaluate_domain_losses(sums_fn, [[example], []], micro_batch_size=3, pad_token_id=0, env=SINGLE)
    assert isinstance(result, DomainLosses)
    assert result.loss[0] == pytest.approx(math.log(4))
    assert math.isnan(result.loss[1]) and result.tokens[1] == 0
    assert result.macro_mean == pytest.approx(math.log(4))


def test_wrong_domain_id_is_rejected():
    example = Example(0, 1, np.array([1, 2], dtype=np.int64), np.array([1, 2], dtype=np.int64))
    with pytest.raises(ValueError, match="domain_id 1"):
        evaluate_domain_losses(lambda b: None, [[example]], micro_batch_size=1, pad_token_id=0, env=SINGLE)


def test_lockstep_count():
    assert lockstep_num_batches([5, 4], 2) == 3
    assert lockstep_num_batches([0, 0], 2) == 0


# ----------------------------------------------------------------------------------------------
# The `eval` command (single process)


def run_eval(argv: list[str]) -> int:
    import argparse

    from versatune_ds.commands import eval as eval_command

    parser = argparse.ArgumentParser()
    eval_command.add_arguments(parser)
    return eval_command.run(parser.parse_args(argv))


SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def write_mcq(path: Path, n: int) -> Path:
    import json

    rows = [{"question": f"What did the court hold in case {i}?", "choices": ["void", "valid", "moot", "remanded"], "answer": i % 4} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_command_writes_results(tmp_path, tiny_model_dir, tiny):
    import json

    from versatune_ds.eval.mcq import load_mcq_file, mcq_accuracy, score_mcq

    if not (SAMPLE / "law.jsonl").is_file():
        pytest.skip("data/sample/law.jsonl not in the repo yet")
    mcq_file = write_mcq(tmp_path / "law_mcq.jsonl", 5)
    out = tmp_path / "res" / "results.json"
    code = run_eval(
        ["--model", str(tiny_model_dir), "--heldout", f"law={SAMPLE / 'law.jsonl'}", "--mcq", f"law={mcq_file}",
         f"science={mcq_file}", "--max-items", "4", "--batch-size", "3", "--out", str(out)]
    )
    assert code == 0
    results = json.loads(out.read_text())
    assert list(results["domains"]) == ["law", "science"]
    law, science = results["domains"]["law"], results["domains"]["science"]
    assert law["n"] == 4 and law["tokens"] > 0 and law["loss"] > 0
    assert science["loss"] is None and science["tokens"] == 0 and science["n"] == 4
    # The command's accuracy equals scoring the same subset directly.
    model, tokenizer = tiny
    items = load_mcq_file(mcq_file, 0, max_items=4, seed=0)
    scores = score_mcq(model, items, tokenizer, batch_size=2, pad_token_id=tokenizer.pad_token_id, env=SINGLE)
    direct = mcq_accuracy(scores, 1)
    assert law["acc"] == pytest.approx(direct.acc[0]) and law["acc_norm"] == pytest.approx(direct.acc_norm[0])
    acc = law["acc"]
    assert law["acc_se"] == pytest.approx((acc * (1 - acc) / 3) ** 0.5)  # n = 4 items
    # Per-item records, in item order: what a paired comparison of two models needs.
    records = results["mcq_items"]["law"]
    assert [r["index"] for r in records] == [0, 1, 2, 3] == [s.index for s in scores]
    assert [r["pred"] for r in records] == [s.pred for s in scores] and [r["answer"] for r in records] == [i.answer for i in items]
    assert sum(r["pred"] == r["answer"] for r in records) / 4 == pytest.approx(acc)
    assert records[0]["logprobs"] == pytest.approx(list(scores[0].logprobs), abs=1e-5)
    assert results["macro"]["acc"] == pytest.approx((law["acc"] + science["acc"]) / 2)
    assert results["macro"]["loss"] == pytest.approx(law["loss"])


def test_eval_command_run_dir_final(tmp_path, tiny_model_dir):
    import json
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "run" / "final")
    out = tmp_path / "r.json"
    assert run_eval(["--run-dir", str(tmp_path / "run"), "--mcq", f"x={write_mcq(tmp_path / 'm.jsonl', 3)}", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["domains"]["x"]["n"] == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mcq", "law"], "expected DOMAIN=PATH"),
        (["--mcq", "law=/no/such.jsonl"], "file not found"),
        (["--mcq", "law={mcq}"], "no model given"),
        (["--model", "M", "--checkpoint", "t", "--mcq", "law={mcq}"], "--checkpoint needs --run-dir"),
        (["--run-dir", "{tmp}", "--mcq", "law={mcq}"], "no exported model"),
        (["--run-dir", "{tmp}", "--checkpoint", "step9", "--mcq", "law={mcq}"], "no such checkpoint"),
        (["--model", "M"], "nothing to evaluate"),
        (["--model", "M", "--mcq", "law={mcq}", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_eval_command_user_errors(tmp_path, argv, message):
    from versatune_ds.errors import UserError

    mcq = write_mcq(tmp_path / "m.jsonl", 2)
    argv = [a.format(mcq=mcq, tmp=tmp_path) for a in argv]
    with pytest.raises(UserError, match=message):
        run_eval(argv)


