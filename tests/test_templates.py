from __future__ import annotations

import numpy as np
import pytest

from versatune_ds.data import formats, templates
from versatune_ds.data.formats import RowError
from versatune_ds.data.packing import IGNORE_INDEX

ALPACA = {"instruction": "Name the capital of France.", "input": "Answer in one word.", "output": "Paris.", "system": "Be brief."}
SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "You help with law."},
        {"from": "human", "value": "What is a tort?"},
        {"from": "gpt", "value": "A civil wrong that causes harm."},
        {"from": "human", "value": "Give an example."},
        {"from": "gpt", "value": "Negligence, e.g. a careless driver."},
    ]
}
MESSAGES = {
    "messages": [
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "    return a + b"},
        {"role": "user", "content": "And subtraction?"},
        {"role": "assistant", "content": "def sub(a, b):\n    return a - b"},
    ]
}
ROWS = {"alpaca": ALPACA, "sharegpt": SHAREGPT, "messages": MESSAGES}


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_model_dir_no_template):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir_no_template)


def _loss_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Contiguous runs of loss tokens (one per assistant turn)."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _tokenize(messages, tokenizer, template):
    ids, labels = templates.tokenize_rendered([templates.render(messages, tokenizer, template)], tokenizer)
    return ids[0], labels[0]


@pytest.mark.parametrize("fmt", sorted(ROWS))
@pytest.mark.parametrize("template", ["chat_template", "simple", "chatml"])
def test_masked_tokens_decode_to_assistant_text(fmt, template, chat_tokenizer, plain_tokenizer) -> None:
    tokenizer = chat_tokenizer if template == "chat_template" else plain_tokenizer
    messages = formats.to_messages(ROWS[fmt], fmt)
    ids, labels = _tokenize(messages, tokenizer, templates.resolve_template(tokenizer, template))
    eos = tokenizer.eos_token
    # Documented end markers: simple and the tiny chat template end with EOS; chatml with <|im_end|> then EOS.
    end = "<|im_end|>" + eos if template == "chatml" else eos
    expected = [m["content"] + end for m in messages if m["role"] == "assistant"]
    runs = _loss_runs(ids, labels)
    decoded = [tokenizer.decode(run) for run in runs]
    assert len(decoded) == len(expected)
    for got, want in zip(decoded, expected):
        if want[0].isspace():
            # Documented boundary case: the template's newline merges with leading whitespace into one token.
            assert got.endswith(want) and not got[: len(got) - len(want)].strip()
        else:
            assert got == want
    # Everything else (system, user, headers) is masked.
    assert sum(len(r) for r in runs) == sum(1 for label in labels if label != IGNORE_INDEX)
    assert tokenizer.decode(ids).count(eos) >= len(expected)


def test_auto_template_picks_the_chat_template_only_when_present(chat_tokenizer, plain_tokenizer) -> None:
    assert templates.resolve_template(chat_tokenizer, "auto") == "chat_template"
    assert templates.resolve_template(plain_tokenizer, "auto") == "simple"
    with pytest.raises(ValueError, match="data.template=simple"):
        templates.resolve_template(plain_tokenizer, "chat_template")


def test_simple_template_layout(plain_tokenizer) -> None:
    rendered = templates.render(formats.to_messages(ALPACA, "alpaca"), plain_tokenizer, "simple")
    assert rendered.text == (
        "<s>### System:\nBe brief.\n\n### Instruction:\nName the capital of France.\n\nAnswer in one word."
        "\n\n### Response:\nParis.</s>"
    )
    assert [rendered.text[s:e] for s, e in rendered.loss_spans] == ["Paris.</s>"]
    prompt = templates.render_prompt(formats.to_messages(ALPACA, "alpaca")[:-1], plain_tokenizer, "simple")
    assert rendered.text.startswith(prompt) and prompt.endswith("### Response:\n")


def test_chat_template_without_end_marker_gets_eos(chat_tokenizer) -> None:
    tokenizer = chat_tokenizer.__class__.from_pretrained(chat_tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    messages = formats.to_messages(SHAREGPT, "sharegpt")
    ids, labels = _tokenize(messages, tokenizer, "chat_template")
    expected = [m["content"] + tokenizer.eos_token for m in messages if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in _loss_runs(ids, labels)] == expected


def test_chat_template_that_trims_content(chat_tokenizer) -> None:
    tokenizer = chat_tokenizer.__class__.from_pretrained(chat_tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | trim }}{{ eos_token }}{% endfor %}"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  hello there \n"}]
    ids, labels = _tokenize(messages, tokenizer, "chat_template")
    assert [tokenizer.decode(run) for run in _loss_runs(ids, labels)] == ["hello there</s>"]


def test_chat_template_that_is_not_prefix_stable_is_rejected(chat_tokenizer) -> None:
    tokenizer = chat_tokenizer.__class__.from_pretrained(chat_tokenizer.name_or_path)
    # Renders the message count first: a prefix of the conversation renders differently.
    tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    with pytest.raises(RowError, match="data.template=chatml"):
        templates.render(formats.to_messages(MESSAGES, "messages"), tokenizer, "chat_template")
    out = templates.tokenize_batch({"messages": [formats.to_messages(MESSAGES, "messages")]}, tokenizer, "chat_template")
    assert "differently from its prefixes" in out["error"][0]


def test_formats_and_row_errors() -> None:
    assert formats.detect_format(ALPACA) == "alpaca"
    assert formats.detect_format(SHAREGPT) == "sharegpt"
    assert formats.detect_format(MESSAGES) == "messages"
    assert formats.detect_format({"text": "x"}) is None
    assert formats.to_messages({"instruction": "a", "output": "b"}, "alpaca") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    with pytest.raises(RowError, match="missing required field 'output'"):
        formats.to_messages({"instruction": "a"}, "alpaca")
    with pytest.raises(RowError, match="expected one of human, user, gpt"):
        formats.to_messages({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt")
    with pytest.raises(RowError, match="no assistant turn"):
        formats.to_messages({"messages": [{"role": "user", "content": "x"}]}, "messages")
    with pytest.raises(RowError, match="must be a string"):
        formats.to_messages({"instruction": "a", "output": 3}, "alpaca")
    assert formats.plain_text(ALPACA, "alpaca") == "Be brief.\nName the capital of France.\n\nAnswer in one word.\nParis."


def test_labels_from_offsets_uses_overlap() -> None:
    ids = [10, 11, 12, 13, 14]
    offsets = [(0, 2), (2, 4), (4, 7), (7, 9), (9, 10)]
    # Span [3, 8): token 1 straddles its start and token 3 its end (both carry loss); tokens 0 and 4 are outside.
    assert templates.labels_from_offsets(ids, offsets, [(3, 8)]).tolist() == [IGNORE_INDEX, 11, 12, 13, IGNORE_INDEX]
    assert templates.labels_from_offsets(ids, offsets, [(4, 7)]).tolist() == [IGNORE_INDEX, IGNORE_INDEX, 12, IGNORE_INDEX, IGNORE_INDEX]
    assert templates.labels_from_offsets(ids, offsets, [(0, 2), (9, 10)]).tolist() == [10, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 14]
    # A zero-width token (special tokens can have empty offsets) inside a span counts; one at a span's end does not.
    assert templates.labels_from_offsets([1, 2], [(3, 3), (8, 8)], [(2, 8)]).tolist() == [1, IGNORE_INDEX]


class _CharTokenizer:
    """A slow tokenizer stand-in without offsets: one token per character."""

    is_fast = False
    eos_token = "$"
    bos_token = None
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_slow_tokenizer_path_masks_by_segments() -> None:
    tokenizer = _CharTokenizer()
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ab"}]
    rendered = templates.render(messages, tokenizer, "simple")
    ids, labels = templates.tokenize_rendered([rendered], tokenizer)
    assert "".join(map(chr, ids[0])) == rendered.text
    kept = np.array(labels[0])
    assert "".join(chr(c) for c in kept[kept != IGNORE_INDEX]) == "ab$"
