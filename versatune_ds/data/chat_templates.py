"""The catalogue of named chat templates for `data.template` (llama3, qwen2.5, mistral, gemma, alpaca).

The default is the tokenizer's own template; a name here is for a tokenizer without one (a base model) or to
override it. Each entry renders like the official template of the model family it is named after, so a model
fine-tuned with it is prompted the way its family expects:

- `llama3`: Meta-Llama-3-8B-Instruct. Written here; renders like the official template (checked against
  LLaMA-Factory's test_llama3_template expectation): BOS, then per message a role header, the content trimmed,
  `<|eot_id|>`. No tools: the official template ignores them, so tool rows are refused (data.render).
- `qwen2.5` (alias `qwen`): the chat template of Qwen/Qwen2.5-7B-Instruct (Apache-2.0), verbatim, as published in
  huggingface/huggingface.js packages/jinja/test/e2e.test.js (identical to axolotl's qwen_25.jinja). ChatML with a
  default system prompt and tools.
- `mistral`: the v0.3 chat template of mistralai/Mistral-7B-Instruct-v0.3 (Apache-2.0), verbatim, as used by the
  axolotl test fixture (tests/prompt_strategies/conftest.py, with its local `loop.first` edit reverted to upstream's
  `loop.last`). Tools; tool-call ids must be 9 characters. It writes the system prompt only into the LAST user turn,
  so a training row that ends with an answer loses it: data.render warns with counts when that happens.
- `gemma`: gemma-2-9b-it. Written here; renders like the official template (checked against LLaMA-Factory's
  test_gemma2_template): `<start_of_turn>user|model` blocks, contents trimmed. Like the official one it has no
  system role and needs user/assistant turns to alternate; such rows are refused with the reason (not folded).
- `alpaca`: no model ships one. Written here after Stanford Alpaca's prompt (tatsu-lab/stanford_alpaca train.py,
  the no-input form), multi-turn like LLaMA-Factory's `alpaca` template: the system prompt (default: the Alpaca
  preamble), then `### Instruction:` / `### Response:` blocks, each answer followed by EOS.

The two built-in templates `simple` and `chatml` are rendered in Python (data.render), as before.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    source: str  # the Jinja text, rendered by transformers' apply_chat_template(chat_template=...)
    markers: tuple[str, ...]  # special tokens it writes, which should be single tokens of the tokenizer
    tools: bool  # renders `tools` and assistant `tool_calls` (else rows with them are refused)


# Written for versatune_ds (see the module docstring for what it matches).
LLAMA3 = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('gemma has no system role; fold the system text into the first user turn') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('gemma needs user and assistant turns to alternate, starting with the user') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '" + ALPACA_PREAMBLE + "' %}"
    "{% set loop_messages = messages %}{% endif %}{{ system + '\\n\\n' }}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\\n\\n' }}"
    "{% else %}{{ raise_exception('alpaca renders system, user and assistant turns only, not ' + message['role']) }}"
    "{% endif %}{% endfor %}"
)

# Qwen/Qwen2.5-7B-Instruct's chat template, verbatim (Apache-2.0; source in the module docstring).
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# mistralai/Mistral-7B-Instruct-v0.3's chat template, verbatim (Apache-2.0; source in the module docstring).
MISTRAL_V03 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""


CATALOGUE: dict[str, CatalogueEntry] = {
    "llama3": CatalogueEntry("llama3", LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), tools=False),
    "qwen2.5": CatalogueEntry("qwen2.5", QWEN25, ("<|im_start|>", "<|im_end|>"), tools=True),
    "mistral": CatalogueEntry("mistral", MISTRAL_V03, ("[INST]", "[/INST]"), tools=True),
    "gemma": CatalogueEntry("gemma", GEMMA, ("<start_of_turn>", "<end_of_turn>"), tools=False),
    "alpaca": CatalogueEntry("alpaca", ALPACA, (), tools=False),
}
ALIASES = {"qwen": "qwen2.5"}
BUILT_IN = ("simple", "chatml")  # rendered in Python by data.render


def catalogue_entry(name: str) -> CatalogueEntry | None:
    return CATALOGUE.get(ALIASES.get(name, name))
