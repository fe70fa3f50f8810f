"""Chat templates: loss masks by character offsets, the built-in templates, the catalogue (rendered like each model
family's official template), template files, and rows a template cannot express (refused, never flattened)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from versatune_ds.config.schema import TEMPLATE_NAMES
from versatune_ds.data import chat_templates, templates
from versatune_ds.data.conversation import RowError
from versatune_ds.data.packing import IGNORE_INDEX
from versatune_ds.errors import UserError

ALPACA = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name the capital of France.\nAnswer in one word."},
          {"role": "assistant", "content": "Paris."}]
SHAREGPT = [
    {"role": "system", "content": "You help with law."},
    {"role": "user", "content": "What is a tort?"},
    {"role": "assistant", "content": "A civil wrong that causes harm."},
    {"role": "user", "content": "Give an example."},
    {"role": "assistant", "content": "Negligence, e.g. a careless driver."},
]
CODE = [
    {"role": "user", "content": "def add(a, b):"},
    {"role": "assistant", "content": "    return a + b"},
    {"role": "user", "content": "And subtraction?"},
    {"role": "assistant", "content": "def sub(a, b):\n    return a - b"},
]
CONVERSATIONS = {"alpaca": ALPACA, "sharegpt": SHAREGPT, "code": CODE}
TOOLS = [{"type": "function", "function": {"name": "get_tide", "description": "Tide.",
                                           "parameters": {"type": "object", "properties": {"port": {"type": "string"}}}}}]
TOOL_CHAT = [
    {"role": "user", "content": "Tide at Hull?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_tide", "arguments": {"port": "Hull"}},
                                                          "id": "abc123XYZ"}]},
    {"role": "tool", "content": "14:05", "tool_call_id": "abc123XYZ"},
    {"role": "assistant", "content": "At 14:05."},
]


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_model_dir_no_template):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir_no_template)


def _loss_runs(ids: list[int], labels) -> list[list[int]]:
    """Contiguous runs of loss tokens (one per trained assistant turn)."""
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


def _with_template(tokenizer, source: str):
    copy = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    copy.chat_template = source
    return copy


def _loss_texts(rendered: templates.Rendered) -> list[str]:
    return [rendered.text[s:e] for s, e in rendered.loss_spans]


# ----------------------------------------------------------------------------------------------
# Loss masks


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template", ["chat_template", "simple", "chatml"])
def test_masked_tokens_decode_to_assistant_text(name, template, chat_tokenizer, plain_tokenizer) -> None:
    tokenizer = chat_tokenizer if template == "chat_template" else plain_tokenizer
    messages = CONVERSATIONS[name]
    ids, labels = templates.tokenize_messages(messages, tokenizer, templates.resolve_template(tokenizer, template))
    eos = tokenizer.eos_token
    # Documented end markers: simple and the tiny chat template end with EOS; chatml with <|im_end|> then EOS.
    end = "<|im_end|>" + eos if template == "chatml" else eos
    expected = [m["content"] + end for m in messages if m["role"] == "assistant"]
    decoded = [tokenizer.decode(run) for run in _loss_runs(ids, labels)]
    assert len(decoded) == len(expected)
    for got, want in zip(decoded, expected):
        if want[0].isspace():
            # Documented boundary case: the template's newline merges with leading whitespace into one token.
            assert got.endswith(want) and not got[: len(got) - len(want)].strip()
        else:
            assert got == want
    assert tokenizer.decode(ids).count(eos) >= len(expected)


@pytest.mark.parametrize("template", ["chat_template", "simple", "chatml", "qwen2.5", "llama3"])
def test_an_assistant_turn_without_loss_is_context_only(template, chat_tokenizer) -> None:
    messages = [dict(m) for m in SHAREGPT]
    messages[2]["loss"] = False  # OpenAI weight 0 / ms-swift loss false on the first answer
    rendered = templates.render(messages, chat_tokenizer, templates.resolve_template(chat_tokenizer, template))
    assert len(rendered.loss_spans) == 1 and SHAREGPT[4]["content"] in _loss_texts(rendered)[0]
    assert SHAREGPT[2]["content"] in rendered.text and SHAREGPT[2]["content"] not in _loss_texts(rendered)[0]


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
    simple = templates.ChatTemplate("simple", None, True, "x")
    rendered = templates.render(messages, tokenizer, simple)
    ids, labels = templates.tokenize_rendered([rendered], tokenizer)
    assert "".join(map(chr, ids[0])) == rendered.text
    kept = np.array(labels[0])
    assert "".join(chr(c) for c in kept[kept != IGNORE_INDEX]) == "ab$"


# ----------------------------------------------------------------------------------------------
# Choosing a template


def test_auto_uses_the_tokenizers_template_or_falls_back_with_a_warning(chat_tokenizer, plain_tokenizer, caplog) -> None:
    assert templates.resolve_template(chat_tokenizer, "auto").name == "chat_template"
    with caplog.at_level(logging.WARNING, logger="versatune_ds.data"):
        assert templates.resolve_template(plain_tokenizer, "auto").name == "simple"
    assert "no chat template" in caplog.text and "built-in 'simple' template" in caplog.text and "llama3, qwen2.5" in caplog.text
    with pytest.raises(UserError, match="has no chat template; set data.template to"):
        templates.resolve_template(plain_tokenizer, "chat_template")


def test_catalogue_names_match_the_config_choices() -> None:
    names = set(chat_templates.CATALOGUE) | set(chat_templates.ALIASES) | set(chat_templates.BUILT_IN) | {"auto", "chat_template"}
    assert names == set(TEMPLATE_NAMES)


def test_a_catalogue_template_warns_about_markers_the_tokenizer_lacks(chat_tokenizer, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="versatune_ds.data"):
        template = templates.resolve_template(chat_tokenizer, "llama3")
    assert template.name == "llama3" and "<|eot_id|>" in caplog.text and "split into ordinary pieces" in caplog.text


def test_a_template_file(chat_tokenizer, tmp_path) -> None:
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}<END>{% endif %}"
                    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}", encoding="utf-8")
    template = templates.resolve_template(chat_tokenizer, str(path))
    rendered = templates.render(SHAREGPT[1:3], chat_tokenizer, template)
    assert rendered.text == "[user] What is a tort?\n[assistant] A civil wrong that causes harm.<END>\n"
    assert _loss_texts(rendered) == ["A civil wrong that causes harm.<END>"]
    other = templates.resolve_template(chat_tokenizer, str(path))
    assert other.fingerprint == template.fingerprint
    path.write_text("{% for m in messages %}{{ m['content'] }{% endfor %}", encoding="utf-8")
    with pytest.raises(UserError, match="mine.jinja does not render a user/assistant conversation"):
        templates.resolve_template(chat_tokenizer, str(path))


def test_simple_template_layout(plain_tokenizer) -> None:
    simple = templates.resolve_template(plain_tokenizer, "simple")
    rendered = templates.render(ALPACA, plain_tokenizer, simple)
    assert rendered.text == (
        "<s>### System:\nBe brief.\n\n### Instruction:\nName the capital of France.\nAnswer in one word."
        "\n\n### Response:\nParis.</s>"
    )
    assert _loss_texts(rendered) == ["Paris.</s>"]
    prompt = templates.render_prompt(ALPACA[:-1], plain_tokenizer, simple)
    assert rendered.text.startswith(prompt) and prompt.endswith("### Response:\n")


# ----------------------------------------------------------------------------------------------
# The catalogue renders like the official templates


def test_llama3(chat_tokenizer) -> None:
    rendered = templates.render(SHAREGPT[:3], chat_tokenizer, templates.resolve_template(chat_tokenizer, "llama3"))
    assert rendered.text == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nYou help with law.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is a tort?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA civil wrong that causes harm.<|eot_id|>"
    )
    assert _loss_texts(rendered) == ["A civil wrong that causes harm.<|eot_id|>"]


def test_qwen25_default_system_and_tools(chat_tokenizer) -> None:
    qwen = templates.resolve_template(chat_tokenizer, "qwen")
    rendered = templates.render(SHAREGPT[1:3], chat_tokenizer, qwen)
    assert rendered.text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is a tort?<|im_end|>\n<|im_start|>assistant\nA civil wrong that causes harm.<|im_end|>\n"
    )
    rendered = templates.render(TOOL_CHAT, chat_tokenizer, qwen, TOOLS)
    assert '<tools>\n{"type": "function", "function": {"name": "get_tide", "description": "Tide."' in rendered.text
    assert "<|im_start|>user\n<tool_response>\n14:05\n</tool_response><|im_end|>\n" in rendered.text
    assert _loss_texts(rendered) == [
        '<tool_call>\n{"name": "get_tide", "arguments": {"port": "Hull"}}\n</tool_call><|im_end|>', "At 14:05.<|im_end|>"]


def test_mistral_tools_and_its_dropped_system_prompt(chat_tokenizer) -> None:
    mistral = templates.resolve_template(chat_tokenizer, "mistral")
    rendered = templates.render(SHAREGPT, chat_tokenizer, mistral)
    # The official v0.3 template writes the system prompt only before a final user turn: training rows lose it.
    assert rendered.text == ("<s>[INST] What is a tort?[/INST] A civil wrong that causes harm.</s>"
                             "[INST] Give an example.[/INST] Negligence, e.g. a careless driver.</s>")
    assert rendered.notes == ("system_dropped",) and len(rendered.loss_spans) == 2
    rendered = templates.render(TOOL_CHAT, chat_tokenizer, mistral, TOOLS)
    assert rendered.text.startswith('<s>[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_tide"')
    assert _loss_texts(rendered) == ['[TOOL_CALLS] [{"name": "get_tide", "arguments": {"port": "Hull"}, "id": "abc123XYZ"}]</s>',
                                     "At 14:05.</s>"]
    # The tool list sits before the LAST user turn, so prefixes render differently: turns are found by search.
    longer = TOOL_CHAT + [{"role": "user", "content": "And Leith?"}, {"role": "assistant", "content": "At 15:10."}]
    rendered = templates.render(longer, chat_tokenizer, mistral, TOOLS)
    assert _loss_texts(rendered)[1:] == ["At 14:05.</s>", "At 15:10.</s>"]
    assert rendered.text.index("[AVAILABLE_TOOLS]") > rendered.text.index("At 14:05.")
    bad_id = [dict(m) for m in TOOL_CHAT]
    bad_id[1] = {**bad_id[1], "tool_calls": [{**bad_id[1]["tool_calls"][0], "id": "call_1"}]}
    with pytest.raises(RowError, match="rejected this conversation: Tool call IDs should be alphanumeric strings with length 9"):
        templates.render(bad_id, chat_tokenizer, mistral, TOOLS)


def test_gemma_refuses_system_and_broken_alternation(chat_tokenizer) -> None:
    gemma = templates.resolve_template(chat_tokenizer, "gemma")
    rendered = templates.render(SHAREGPT[1:3], chat_tokenizer, gemma)
    assert rendered.text == "<s><start_of_turn>user\nWhat is a tort?<end_of_turn>\n<start_of_turn>model\nA civil wrong that causes harm.<end_of_turn>\n"
    with pytest.raises(RowError, match="gemma has no system role; fold the system text into the first user turn"):
        templates.render(SHAREGPT, chat_tokenizer, gemma)
    with pytest.raises(RowError, match="alternate"):
        templates.render([SHAREGPT[1], SHAREGPT[3], SHAREGPT[2]], chat_tokenizer, gemma)


def test_alpaca(chat_tokenizer) -> None:
    alpaca = templates.resolve_template(chat_tokenizer, "alpaca")
    rendered = templates.render(SHAREGPT[1:3], chat_tokenizer, alpaca)
    assert rendered.text == (
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWhat is a tort?\n\n### Response:\nA civil wrong that causes harm.</s>\n\n"
    )
    assert _loss_texts(rendered) == ["A civil wrong that causes harm.</s>"]


# ----------------------------------------------------------------------------------------------
# What a template cannot express is refused


@pytest.mark.parametrize("template", ["chat_template", "llama3", "gemma", "alpaca", "chatml", "simple"])
def test_tool_rows_are_refused_by_templates_without_tools(template, chat_tokenizer) -> None:
    resolved = templates.resolve_template(chat_tokenizer, template)
    with pytest.raises(RowError, match="cannot express tools or tool calls|rejected this conversation"):
        templates.render(TOOL_CHAT, chat_tokenizer, resolved, TOOLS)
    with pytest.raises(RowError, match="cannot express tools or tool calls|rejected this conversation"):
        templates.render(TOOL_CHAT, chat_tokenizer, resolved)  # tool calls without a tool list


def test_a_template_that_leaves_out_a_turn_is_refused(chat_tokenizer) -> None:
    tokenizer = _with_template(chat_tokenizer, "{% for m in messages %}{% if m['role'] != 'user' %}{{ m['content'] }}{{ eos_token }}"
                                               "{% endif %}{% endfor %}")
    with pytest.raises(RowError, match="leaves out turn 2 \\(user: 'What is a tort\\?'\\)"):
        templates.render(SHAREGPT, tokenizer, templates.resolve_template(tokenizer, "auto"))


def test_chat_template_without_end_marker_gets_eos(chat_tokenizer) -> None:
    tokenizer = _with_template(chat_tokenizer, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    ids, labels = templates.tokenize_messages(SHAREGPT, tokenizer, templates.resolve_template(tokenizer, "auto"))
    expected = [m["content"] + tokenizer.eos_token for m in SHAREGPT if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in _loss_runs(ids, labels)] == expected


def test_chat_template_that_trims_content(chat_tokenizer) -> None:
    tokenizer = _with_template(chat_tokenizer, "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | trim }}{{ eos_token }}{% endfor %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  hello there \n"}]
    ids, labels = templates.tokenize_messages(messages, tokenizer, templates.resolve_template(tokenizer, "auto"))
    assert [tokenizer.decode(run) for run in _loss_runs(ids, labels)] == ["hello there</s>"]


def test_a_template_that_is_not_prefix_stable_is_located_by_search(chat_tokenizer) -> None:
    # Renders the message count first: a prefix of the conversation renders differently from the whole.
    tokenizer = _with_template(chat_tokenizer, "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    rendered = templates.render(CODE, tokenizer, templates.resolve_template(tokenizer, "auto"))
    assert rendered.text.startswith("4def add")
    assert _loss_texts(rendered) == ["    return a + b</s>", "def sub(a, b):\n    return a - b</s>"]


def test_a_template_whose_turns_cannot_be_located_is_refused(chat_tokenizer) -> None:
    # Upper-cases the conversation, and numbers turns by their position: nothing to find, neither way.
    tokenizer = _with_template(chat_tokenizer, "{{ messages | length }}{% for m in messages %}{{ loop.index }}{{ m['content'] | upper }}"
                                               "{{ eos_token }}{% endfor %}")
    with pytest.raises(RowError, match="leaves out turn 1|cannot be located"):
        templates.render(CODE, tokenizer, templates.resolve_template(tokenizer, "auto"))
    out = templates.tokenize_batch({"conversation": ['{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}']},
                                   tokenizer, templates.resolve_template(tokenizer, "auto"))
    assert out["error"][0] and out["input_ids"] == [[]]
