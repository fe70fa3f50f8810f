"""Multiple-choice log-likelihood scoring: hand-computed log-probs, token boundary, batch invariance, lockstep."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from versatune_ds.dist import DistEnv
from versatune_ds.errors import UserError
from versatune_ds.eval.mcq import (
    ItemScore,
    McqItem,
    PromptFormat,
    choice_request,
    encode_pair,
    load_mcq_file,
    mcq_accuracy,
    score_mcq,
)

torch = pytest.importorskip("torch")

SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0, launcher="single")
VOCAB = 128


class CharTokenizer:
    """One token per character (id = code point); enough to compute log-likelihoods by hand."""

    bos_token_id = 1
    eos_token_id = 2
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


# Every position predicts the same distribution: log p(token) = LOGP[token].
BIAS = torch.full((VOCAB,), -10.0)
BIAS[ord(" ")] = 2.0
BIAS[ord("a")] = 1.0
BIAS[ord("b")] = 0.5
LOGP = torch.log_softmax(BIAS, dim=0)


class Output(dict):
    """What a transformers ModelOutput offers here: `.logits` and `out["cache"]`."""

    logits = property(lambda self: self["logits"])


class ConstantLM(torch.nn.Module):
    """Every position predicts the same distribution (LOGP), whatever the context; counts its forward passes.

    It honours the interface `choice_logprobs` uses: `logits_to_keep`, a returned cache with
    `batch_select_indices`, and the cache handed back on the second pass."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False, logits_to_keep=0):
        self.calls.append(tuple(input_ids.shape))
        assert attention_mask.shape[1] == input_ids.shape[1] + (0 if cache is None else cache.length)
        logits = BIAS.expand(*input_ids.shape, VOCAB).clone()
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return Output(logits=logits, cache=FakeCache(input_ids.shape[1]))


class FakeCache:
    def __init__(self, length):
        self.length = length

    def batch_select_indices(self, indices):
        pass


def expected_loglik(continuation: str) -> float:
    return sum(float(LOGP[ord(c)]) for c in continuation)


def test_hand_computed_logprobs_acc_and_acc_norm():
    # " aa" vs " b": summed log-prob prefers " b" (one fewer token); per-character it prefers "aa".
    item = McqItem(domain_id=0, index=0, question="q?", choices=("aa", "b", "zzzz", "ab"), answer=0)
    [score] = score_mcq(ConstantLM(), [item], CharTokenizer(), batch_size=4, pad_token_id=0, env=SINGLE)
    for c, choice in enumerate(item.choices):
        assert score.logprobs[c] == pytest.approx(expected_loglik(" " + choice), abs=1e-5)
    assert score.pred == 1
    assert score.pred_norm == 0  # (lp(" ")+2 lp(a))/2 > (lp(" ")+lp(b))/1
    accuracy = mcq_accuracy([score], 2)
    assert accuracy.acc[0] == 0.0 and accuracy.acc_norm[0] == 1.0 and accuracy.n.tolist() == [1, 0]
    assert math.isnan(accuracy.acc[1])


def test_context_and_continuations_are_lm_eval_style():
    item = McqItem(0, 0, "Why?", ("ab", "b"), 1)
    request = choice_request(item, CharTokenizer(), PromptFormat(), max_length=2048)
    assert "".join(map(chr, request.context)) == "Question: Why?\nAnswer:"
    assert ["".join(map(chr, c)) for c in request.continuations] == [" ab", " b"]
    assert request.key == (0, 0)


def test_trailing_context_space_moves_to_the_continuation():
    ctx, cont = encode_pair(CharTokenizer(), "Answer: ", "x")
    assert "".join(map(chr, ctx)) == "Answer:" and "".join(map(chr, cont)) == " x"


def test_continuation_is_the_token_difference(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    context, continuation = "Question: Which clause?\nAnswer:", " The contract clause"
    ctx, cont = encode_pair(tokenizer, context, continuation)
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    assert ctx == tokenizer(context, add_special_tokens=False)["input_ids"]
    assert cont == whole[len(ctx) :] and len(cont) > 0
    assert tokenizer.decode(ctx + cont) == context + continuation


def test_truncation_cuts_the_oldest_context_tokens_and_keeps_the_continuations():
    item = McqItem(0, 0, "x" * 100, ("ab", "b"), 0)
    request = choice_request(item, CharTokenizer(), PromptFormat(), max_length=10)
    assert len(request.context) == 7 and "".join(map(chr, request.context)) == "Answer:"  # 10 - len(" ab")
    assert ["".join(map(chr, c)) for c in request.continuations] == [" ab", " b"]
    with pytest.raises(UserError, match=r"item 0 of domain id 0: choice 0 is 3 tokens, at least --max-length \(3\)"):
        choice_request(item, CharTokenizer(), PromptFormat(), max_length=3)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def make_items(n: int, domains: int = 2) -> list[McqItem]:
    words = ["contract", "fever", "revenue", "glucose", "return a + b", "the sea", "a summary", "seven days"]
    items = []
    for k in range(n):
        choices = tuple(words[(k + j) % len(words)] * (1 + (k + j) % 3) for j in range(4))
        items.append(McqItem(k % domains, k // domains, f"Question number {k} about the court?", choices, k % 4))
    return items


def test_shared_context_scores_equal_whole_rows_at_any_batch_size(tiny):
    model, tokenizer = tiny
    items = make_items(6)
    # Contexts of very different lengths in one batch (left padding) and items with 2, 3 and 5 choices.
    items.append(McqItem(0, 3, "Why? " * 40, ("yes", "no"), 0))
    items.append(McqItem(1, 3, "A", ("fever", "cough", "a long answer about the sea and the court", "x", "y"), 2))
    items.append(McqItem(0, 4, "What did the court hold in the contract dispute?", ("void", "valid", "moot"), 1))
    one = score_mcq(model, items, tokenizer, batch_size=1, pad_token_id=tokenizer.pad_token_id, env=SINGLE)
    twenty = score_mcq(model, items, tokenizer, batch_size=20, pad_token_id=tokenizer.pad_token_id, env=SINGLE)
    assert [(s.domain_id, s.index) for s in one] == sorted((i.domain_id, i.index) for i in items)
    # Manual: one forward of each whole context+choice row alone, log_softmax, sum over the continuation positions.
    for item in items:
        context = "Question: " + item.question + "\nAnswer:"
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        scores = [next(s for s in run if (s.domain_id, s.index) == (item.domain_id, item.index)) for run in (one, twenty)]
        for c, choice in enumerate(item.choices):
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
            manual = sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))
            for score in scores:
                assert score.logprobs[c] == pytest.approx(manual, abs=1e-4)


def test_simulated_ranks_run_equal_forward_passes():
    items = [McqItem(0, i, "q", ("a", "b", "ab", "ba"), 0) for i in range(5)]
    counts = []
    for rank in range(3):
        env = DistEnv(rank, 3, rank, "127.0.0.1", 0, "torch")
        model = ConstantLM()
        scores = score_mcq(model, items, CharTokenizer(), batch_size=8, pad_token_id=0, env=env)
        assert len(scores) == len(dist_share(5, 3, rank))  # no process group: only the local share comes back
        assert all(s.logprobs[0] == pytest.approx(expected_loglik(" a"), abs=1e-5) for s in scores)
        counts.append(len(model.calls))
    # 8 choices per batch = 2 items; shares 2, 2, 1 -> one batch of two forward passes everywhere
    assert counts == [2, 2, 2]
    counts = []
    for rank in range(3):
        model = ConstantLM()
        score_mcq(model, items, CharTokenizer(), batch_size=3, pad_token_id=0, env=DistEnv(rank, 3, rank, "127.0.0.1", 0, "torch"))
        counts.append(len(model.calls))
    assert counts == [4, 4, 4]  # one item per batch (4 choices > 3): 2 batches; rank 2 adds a filler


def dist_share(n, world, rank):
    from versatune_ds.dist import even_shard

    return even_shard(n, world, rank)


def test_chat_template_format(tiny):
    _, tokenizer = tiny
    item = McqItem(0, 0, "Why?", ("yes", "no"), 0)
    request = choice_request(item, tokenizer, PromptFormat.chat(), max_length=2048)
    text = tokenizer.decode(list(request.context) + list(request.continuations[0]))
    assert text.startswith("<s><|user|>\nQuestion: Why?\nAnswer:") and text.endswith("<|assistant|>\nyes")
    with pytest.raises(UserError, match="no chat template"):
        choice_request(item, CharTokenizer(), PromptFormat.chat(), max_length=2048)


def test_load_mcq_file_subset_and_errors(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "choices": ["a", "b", "c", "d"], "answer": i % 4}) + "\n" for i in range(10)))
    items = load_mcq_file(path, 3)
    assert len(items) == 10 and items[2].answer == 2 and items[0].domain_id == 3
    subset = load_mcq_file(path, 3, max_items=4, seed=7)
    assert len(subset) == 4 and subset == load_mcq_file(path, 3, max_items=4, seed=7)
    assert [s.index for s in subset] == [0, 1, 2, 3]
    assert all(s.source == f"{path}:{int(s.question[1:]) + 1}" for s in subset)  # file:line, for error messages
    questions = [s.question for s in subset]
    assert questions == sorted(questions, key=lambda q: int(q[1:]))  # file order kept
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: 'choices'"):
        load_mcq_file(bad, 0)
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 5}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: 'answer'"):
        load_mcq_file(bad, 0)


def test_item_score_predictions():
    score = ItemScore(0, 0, 1, (-3.0, -2.0, -5.0), (1, 1, 10))
    assert score.pred == 1 and score.pred_norm == 2


def test_real_eval_files_load(shared_data):
    for name in ("law", "code"):
        items = load_mcq_file(shared_data / "eval" / f"{name}.jsonl", 0, max_items=20)
        assert len(items) == 20 and all(len(i.choices) == 4 for i in items)


def test_mcq_files_in_other_encodings_are_one_clear_error(tmp_path):
    row = {"question": "Café or thé?", "choices": ["café", "thé"], "answer": 0}
    text = json.dumps(row, ensure_ascii=False) + "\n"
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_mcq_file(bom, 0)[0].question == "Café or thé?"  # a UTF-8 byte-order mark is fine
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError, match=r"--mcq: \S*latin.jsonl:1: not UTF-8 text \(byte 0xe9; the file looks like Latin-1 / "
                                        r"Windows-1252\); save it as UTF-8 \(e.g. iconv -f latin1 -t UTF-8"):
        load_mcq_file(latin, 0)
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes(text.encode("utf-16"))  # with its byte-order mark
    with pytest.raises(UserError, match=r"--mcq: \S*utf16.jsonl: the file is UTF-16 text, not UTF-8; save it as UTF-8 \(e.g. iconv -f UTF-16"):
        load_mcq_file(utf16, 0)
    no_bom = tmp_path / "utf16le.jsonl"
    no_bom.write_bytes(text.encode("utf-16-le"))
    with pytest.raises(UserError, match="is UTF-16 text"):
        load_mcq_file(no_bom, 0)
