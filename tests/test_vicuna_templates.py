"""vicuna.cpp's prompt templates against transformers and prompt.py.

Where a template comes from (tools/vicuna.cpp/prompt.h, resolve_template): --prompt-type, else the
GGUF's vicuna.prompt_type, else its tokenizer.chat_template; `run` stays a raw completion unless
--prompt-type is given. Chat templates are recognised by their markers (as llama.cpp does), not
interpreted, so each family is checked here with the real template of a model of that family:

- ChatML: SmolLM2-135M-Instruct (the embedded model's own, with its default system message),
  Qwen2-Instruct, Qwen2.5-Instruct (tools branch and default system message);
- Llama-3: Meta-Llama-3-8B-Instruct, Llama-3.1-8B-Instruct (its dated system turn, always written);
- Llama-2: Llama-2-chat (`.strip()`) and CodeLlama-instruct (`| trim`);
- Mistral: Mistral-7B-Instruct v0.1 and v0.2 (no system role), mistralai's "v1" template with a
  system prompt, Mistral-Large-2407's "v3" (system before the last question);
- ours: the instruct and chat templates tools/convert_gguf.py writes (prompt.py's layout).

The template strings are copied from the models' tokenizer_config.json files (as collected in
ollama's template/index.json and llama.cpp's tests/test-chat-template.cpp), written here as the
JSON string values they are there. Each fixture is a tokenizer-only GGUF (the embedded SmolLM2
tokenizer with the family's special tokens added, or the SentencePiece fixture of conftest.py)
carrying the template; `vicuna chat --dry-run` prints the ids each turn would feed, which must equal
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` for 1, 2 and 3 turns, with and
without a system message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import NEEDS_CPP  # noqa: E402
from test_vicuna_cpp import _tokenizer_kvs, gguf_spec, run, write_gguf  # noqa: E402

pytestmark = NEEDS_CPP



# The chat_template values of the models' tokenizer_config.json, as JSON string bodies.
TEMPLATES_JSON = r'''{
"qwen2": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",

"qwen2.5": "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n",

"llama3": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",

"llama3.1": "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n{#- This block extracts the system message, so we can slot it into the right place. #}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n\n{#- System message + builtin tools #}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{%- if builtin_tools is defined or tools is not none %}\n    {{- \"Environment: ipython\\n\" }}\n{%- endif %}\n{%- if builtin_tools is defined %}\n    {{- \"Tools: \" + builtin_tools | reject('equalto', 'code_interpreter') | join(\", \") + \"\\n\\n\"}}\n{%- endif %}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n{%- if tools is not none and not tools_in_user_message %}\n    {{- \"You have access to the following functions. To call a function, please respond with JSON for a function call.\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n\n{#- Custom tools are passed in a user message with some extra guidance #}\n{%- if tools_in_user_message and not tools is none %}\n    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n    {%- else %}\n        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}\n{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n    {{- first_user_message + \"<|eot_id|>\"}}\n{%- endif %}\n\n{%- for message in messages %}\n    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n    {%- elif 'tool_calls' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n            {{- \"<|python_tag|>\" + tool_call.name + \".call(\" }}\n            {%- for arg_name, arg_val in tool_call.arguments | items %}\n                {{- arg_name + '=\"' + arg_val + '\"' }}\n                {%- if not loop.last %}\n                    {{- \", \" }}\n                {%- endif %}\n                {%- endfor %}\n            {{- \")\" }}\n        {%- else  %}\n            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n            {{- '\"parameters\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- \"}\" }}\n        {%- endif %}\n        {%- if builtin_tools is defined %}\n            {#- This means we're in ipython mode #}\n            {{- \"<|eom_id|>\" }}\n        {%- else %}\n            {{- \"<|eot_id|>\" }}\n        {%- endif %}\n    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n        {%- if message.content is mapping or message.content is iterable %}\n            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n        {%- endif %}\n        {{- \"<|eot_id|>\" }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n",

"llama2": "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",

"codellama": "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content | trim + ' ' + eos_token }}{% endif %}{% endfor %}",

"mistral-v0.1": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",

"mistral-v0.2": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",

"mistral-v1": "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n",

"mistral-v3": "{%- if messages[0][\"role\"] == \"system\" %}\n    {%- set system_message = messages[0][\"content\"] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n{%- set user_messages = loop_messages | selectattr(\"role\", \"equalto\", \"user\") | list %}\n\n{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n{%- set ns = namespace() %}\n{%- set ns.index = 0 %}\n{%- for message in loop_messages %}\n    {%- if not (message.role == \"tool\" or message.role == \"tool_results\" or (message.tool_calls is defined and message.tool_calls is not none)) %}\n        {%- if (message[\"role\"] == \"user\") != (ns.index % 2 == 0) %}\n            {{- raise_exception(\"After the optional system message, conversation roles must alternate user/assistant/user/assistant/...\") }}\n        {%- endif %}\n        {%- set ns.index = ns.index + 1 %}\n    {%- endif %}\n{%- endfor %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if message[\"role\"] == \"user\" %}\n        {%- if tools is not none and (message == user_messages[-1]) %}\n            {{- \"[AVAILABLE_TOOLS] [\" }}\n            {%- for tool in tools %}\n                {%- set tool = tool.function %}\n                {{- '{\"type\": \"function\", \"function\": {' }}\n                {%- for key, val in tool.items() if key != \"return\" %}\n                    {%- if val is string %}\n                        {{- '\"' + key + '\": \"' + val + '\"' }}\n                    {%- else %}\n                        {{- '\"' + key + '\": ' + val|tojson }}\n                    {%- endif %}\n                    {%- if not loop.last %}\n                        {{- \", \" }}\n                    {%- endif %}\n                {%- endfor %}\n                {{- \"}}\" }}\n                {%- if not loop.last %}\n                    {{- \", \" }}\n                {%- else %}\n                    {{- \"]\" }}\n                {%- endif %}\n            {%- endfor %}\n            {{- \"[/AVAILABLE_TOOLS]\" }}\n            {%- endif %}\n        {%- if loop.last and system_message is defined %}\n            {{- \"[INST] \" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}\n        {%- else %}\n            {{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}\n        {%- endif %}\n    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n        {{- \"[TOOL_CALLS] [\" }}\n        {%- for tool_call in message.tool_calls %}\n            {%- set out = tool_call.function|tojson %}\n            {{- out[:-1] }}\n            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n                {{- raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!\") }}\n            {%- endif %}\n            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n            {%- if not loop.last %}\n                {{- \", \" }}\n            {%- else %}\n                {{- \"]\" + eos_token }}\n            {%- endif %}\n        {%- endfor %}\n    {%- elif message[\"role\"] == \"assistant\" %}\n        {{- \" \" + message[\"content\"]|trim + eos_token}}\n    {%- elif message[\"role\"] == \"tool_results\" or message[\"role\"] == \"tool\" %}\n        {%- if message.content is defined and message.content.content is defined %}\n            {%- set content = message.content.content %}\n        {%- else %}\n            {%- set content = message.content %}\n        {%- endif %}\n        {{- '[TOOL_RESULTS] {\"content\": ' + content|string + \", \" }}\n        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n            {{- raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!\") }}\n        {%- endif %}\n        {{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}\n    {%- else %}\n        {{- raise_exception(\"Only user and assistant roles are supported, with the exception of an initial optional system message!\") }}\n    {%- endif %}\n{%- endfor %}\n"
}'''
TEMPLATES = json.loads(TEMPLATES_JSON)

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# family -> (tokenizer: "bpe" (SmolLM2's) or "sp" (conftest's SentencePiece), template, system role)
FAMILIES = {
    "smollm2": ("bpe", None, True),  # the embedded tokenizer's own template
    "qwen2": ("bpe", "qwen2", True),
    "qwen2.5": ("bpe", "qwen2.5", True),
    "llama3": ("llama3", "llama3", True),
    "llama3.1": ("llama3", "llama3.1", True),
    "llama2": ("sp", "llama2", True),
    "codellama": ("sp", "codellama", True),
    "mistral-v0.1": ("sp", "mistral-v0.1", False),
    "mistral-v0.2": ("sp", "mistral-v0.2", False),
    "mistral-v1": ("sp", "mistral-v1", True),
    "mistral-v3": ("sp", "mistral-v3", True),
}
# what the start-up line names
FAMILY_NAMES = {"smollm2": "chatml", "qwen2": "chatml", "qwen2.5": "chatml", "llama3": "llama3", "llama3.1": "llama3.1",
                "llama2": "llama2",
                "codellama": "llama2", "mistral-v0.1": "mistral-legacy", "mistral-v0.2": "mistral-legacy",
                "mistral-v1": "mistral-v1", "mistral-v3": "mistral-v3"}

SYSTEM = "You are a terse assistant.\nAnswer in one line. "
# (user, assistant) turns; whitespace around answers tells templates that trim from those that do not
TURNS = [("Hello! 你好", "  Hi there, 你好!  "),
         ("What is a llama?\nOne line, please.", "A South American camelid.\n"),
         ("And an alpaca? 羊驼", "Smaller, with finer wool.")]


def escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def messages_for(k: int, system: str | None) -> list[dict]:
    """system + turns[:k-1] answered + turns[k-1]'s question."""
    msgs = [] if system is None else [{"role": "system", "content": system}]
    for user, answer in TURNS[:k - 1]:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return msgs + [{"role": "user", "content": TURNS[k - 1][0]}]


def hf_ids(tok, messages) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def dry_run(vicuna, path, turns, *flags, check=True):
    """(prompt ids of each turn as `chat --dry-run` prints them, stderr)."""
    stdin = "".join(escape(u) + "\n" + escape(a) + "\n" for u, a in turns).encode()
    proc = run([vicuna, "chat", "-m", path, "--dry-run", *flags], stdin=stdin, check=check)
    out = proc.stdout.decode()
    prompts = [[int(x) for x in m.split()] for m in re.findall(r"^prompt ids:((?: \d+)*)$", out, re.MULTILINE)]
    return prompts, proc.stderr.decode(errors="replace")


def _save_tokenizer(tok, out_dir, sp_model: str | None):
    tok.save_pretrained(out_dir)
    if sp_model and not os.path.isfile(os.path.join(out_dir, "tokenizer.model")):
        shutil.copy(sp_model, os.path.join(out_dir, "tokenizer.model"))
    return out_dir


@pytest.fixture(scope="session")
def family_ggufs(tiny_models, embedded_path, tmp_path_factory):
    """{family: (HF tokenizer carrying the template, tokenizer-only GGUF carrying it)}."""
    import gguf
    from transformers import AutoTokenizer

    T = gguf.GGUFValueType
    root = tmp_path_factory.mktemp("vicuna-templates")
    sp_dir = tiny_models["sp"]
    sp_model = os.path.join(os.path.dirname(sp_dir), "sp-raw", "tokenizer.model")
    out = {}
    for family, (kind, key, _) in FAMILIES.items():
        base = sp_dir if kind == "sp" else embedded_path
        tok = AutoTokenizer.from_pretrained(base)
        if kind == "llama3":
            tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
            tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
        if key is not None:
            tok.chat_template = TEMPLATES[key]
        d = _save_tokenizer(tok, str(root / family), sp_model if kind == "sp" else None)
        kvs = _tokenizer_kvs(d) + [("tokenizer.chat_template", tok.chat_template, T.STRING, None),
                                   ("llama.context_length", 4096, T.UINT32, None)]
        path = write_gguf(str(root / f"{family}.gguf"), {"arch": "llama", "kvs": kvs, "tensors": {}})
        out[family] = (AutoTokenizer.from_pretrained(d), path)
    return out


# ---------------------------------------------------------------------------------------------
# each family: the ids apply_chat_template gives


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chat_template_ids_match_transformers(vicuna, family_ggufs, family):
    tok, path = family_ggufs[family]
    systems = [None, SYSTEM] if FAMILIES[family][2] else [None]
    for system in systems:
        flags = [] if system is None else ["--system", system]
        prompts, err = dry_run(vicuna, path, TURNS, *flags)
        assert f"chat: prompt template chat_template ({FAMILY_NAMES[family]}), from tokenizer.chat_template" in err, err
        assert len(prompts) == 3, err
        for k in (1, 2, 3):
            want = hf_ids(tok, messages_for(k, system))
            assert prompts[k - 1] == want, (f"{family}, {k} turn(s), system {system is not None}:\n"
                                            f"ours {tok.decode(prompts[k - 1])!r}\nhf   {tok.decode(want)!r}")
        # --prompt-type chat_template says the same
        again, _ = dry_run(vicuna, path, TURNS[:1], "--prompt-type", "chat_template", *flags)
        assert again[0] == prompts[0]


@pytest.mark.parametrize("family", [f for f, (_, _, sys_ok) in FAMILIES.items() if not sys_ok])
def test_system_message_refused_where_the_template_raises(vicuna, family_ggufs, family):
    tok, path = family_ggufs[family]
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="roles"):  # transformers raises too: the roles must alternate
        hf_ids(tok, messages_for(1, SYSTEM))
    _, err = dry_run(vicuna, path, TURNS[:1], "--system", SYSTEM, check=False)
    assert len(err.strip().splitlines()) == 1 and "has no system message; drop --system" in err, err


def test_default_system_message_is_the_templates(vicuna, family_ggufs):
    """SmolLM2 and Qwen2.5 write their own system turn when the conversation has none."""
    for family, text in [("smollm2", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
                         ("qwen2.5", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")]:
        tok, path = family_ggufs[family]
        prompts, err = dry_run(vicuna, path, TURNS[:1])
        assert text in tok.decode(prompts[0]) and "default system message" in err, err


# ---------------------------------------------------------------------------------------------
# our own templates, as tools/convert_gguf.py writes them


def _convert_gguf():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_gguf_for_tests", os.path.join(ROOT, "tools", "convert_gguf.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind", ["bpe", "sp"])
@pytest.mark.parametrize("prompt_type", ["instruct", "chat"])
def test_our_templates_from_the_chat_template_use_prompt_py_layout(vicuna, tiny_models, tmp_path, kind, prompt_type):
    """A file whose tokenizer.chat_template is convert_gguf.py's rendering of prompt.py (and no
    vicuna.prompt_type) chats exactly as prompt.build_prompt_ids builds: instruct holds only the
    current question, chat the whole history (a system text replaces the preamble)."""
    import gguf
    from transformers import AutoTokenizer

    from prompt import Conversation, build_prompt_ids

    T = gguf.GGUFValueType
    hf_dir = tiny_models[kind]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    template = tok.chat_template = _convert_gguf().chat_template_for(prompt_type, tok)
    kvs = _tokenizer_kvs(hf_dir) + [("tokenizer.chat_template", template, T.STRING, None)]
    path = write_gguf(str(tmp_path / "ours.gguf"), {"arch": "llama", "kvs": kvs, "tensors": {}})
    for system in ([None, SYSTEM] if prompt_type == "chat" else [None]):
        flags = [] if system is None else ["--system", system]
        prompts, err = dry_run(vicuna, path, TURNS, *flags)
        assert f"chat: prompt template {prompt_type}, from tokenizer.chat_template" in err, err
        for k in (1, 2, 3):
            turns = [(u, a) for u, a in TURNS[:k - 1]] + [(TURNS[k - 1][0], None)]
            if prompt_type == "instruct":
                turns = turns[-1:]
            want = build_prompt_ids(prompt_type, Conversation(turns=turns, system=system), tok)
            assert prompts[k - 1] == want, (prompt_type, kind, k, system)
            if kind == "bpe":  # no BOS, and pieces meet at special tokens: also transformers' ids
                assert prompts[k - 1] == hf_ids(tok, messages_for(k, system)), (prompt_type, k, system)
    if prompt_type == "instruct":
        _, err = dry_run(vicuna, path, TURNS[:1], "--system", SYSTEM, check=False)
        assert "the instruct template has no system message; drop --system" in err, err


@pytest.mark.parametrize("prompt_type", ["instruct", "chat"])
def test_chat_on_an_export_follows_its_training_config(vicuna, tiny_models, tmp_path, prompt_type):
    """`vicuna chat` with no flag on an f32 export of a model whose training_config.json names
    the template renders exactly prompt.build_prompt_ids (issue 12: it used to fall back to chat
    for an instruct model). The real chat (-v) feeds the same ids as the dry run."""
    from transformers import AutoTokenizer

    from prompt import Conversation, build_prompt_ids

    src = tiny_models["sp"]
    model_dir = tmp_path / "merged"
    shutil.copytree(src, model_dir)
    (model_dir / "training_config.json").write_text(json.dumps({"prompt_type": prompt_type}), encoding="utf-8")
    out = tmp_path / "model.f32.gguf"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_gguf.py"), "--model_path",
                           str(model_dir), "--outfile", str(out), "--outtype", "f32", "--no-verify"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(src)
    prompts, err = dry_run(vicuna, out, TURNS)
    assert f"chat: prompt template {prompt_type}, from vicuna.prompt_type" in err, err
    for k in (1, 2, 3):
        turns = list(TURNS[:k - 1]) + [(TURNS[k - 1][0], None)]
        if prompt_type == "instruct":
            turns = turns[-1:]  # the instruct template has no turns: only the current question
        assert prompts[k - 1] == build_prompt_ids(prompt_type, Conversation(turns=turns), tok), (prompt_type, k)
    # the real chat, two questions: the first prompt is the dry run's, whatever the model answers
    stdin = (TURNS[0][0] + "\n" + TURNS[2][0] + "\n").encode()  # one line each
    proc = run([vicuna, "chat", "-m", out, "-v", "-n", "4", "--temp", "0", "-c", "256", "-t", "2"], stdin=stdin)
    fed = [[int(x) for x in m.split()] for m in re.findall(r"^prompt ids:((?: \d+)*)$", proc.stderr.decode(), re.MULTILINE)]
    assert len(fed) == 2 and fed[0] == prompts[0]
    if prompt_type == "instruct":
        assert fed[1] == build_prompt_ids("instruct", Conversation(turns=[(TURNS[2][0], None)]), tok)


# ---------------------------------------------------------------------------------------------
# history trimming, end of turn, errors


def test_history_trimming_keeps_whole_turns(vicuna, family_ggufs):
    """With a small context the oldest turns go whole (the system message stays), and what is
    left is exactly the template's rendering of the kept turns."""
    tok, path = family_ggufs["qwen2.5"]
    turns = [(f"Question number {i}: what is {i} + {i}?", f"It is {2 * i}.") for i in range(1, 7)]
    n_ctx, n = 160, 16
    prompts, err = dry_run(vicuna, path, turns, "-c", str(n_ctx), "-n", str(n), "--system", "Be brief.")
    assert len(prompts) == len(turns), err
    dropped = 0
    for k in range(1, len(turns) + 1):
        history = turns[:k - 1]
        for start in range(len(history) + 1):  # the longest suffix of whole turns that fits
            msgs = [{"role": "system", "content": "Be brief."}]
            for u, a in history[start:]:
                msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            want = hf_ids(tok, msgs + [{"role": "user", "content": turns[k - 1][0]}])
            if len(want) + n <= n_ctx:
                break
        dropped = max(dropped, start)
        assert prompts[k - 1] == want, k
    assert dropped >= 2  # the test did trim


@pytest.fixture(scope="session")
def eot_model(tiny_models, embedded_path, tmp_path_factory):
    """A tiny model (SmolLM2's tokenizer, its ChatML template) that always predicts <|im_end|>,
    with EOS set to <|endoftext|>: only the template's end of turn can stop it."""
    import gguf
    from transformers import AutoTokenizer

    T = gguf.GGUFValueType
    spec = gguf_spec(tiny_models["bpe"])
    tok = AutoTokenizer.from_pretrained(embedded_path)
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    t = spec["tensors"]
    # dimension 0 of the residual stream is a large constant (no layer writes to it), the final
    # norm keeps only it, and only <|im_end|>'s output row reads it: its logit alone is positive
    t["token_embd.weight"] = t["token_embd.weight"].copy()
    t["token_embd.weight"][:, 0] = 10.0
    for name in list(t):
        if name.endswith(("attn_output.weight", "ffn_down.weight")):
            t[name] = t[name].copy()
            t[name][0, :] = 0.0
    t["output_norm.weight"] = np.zeros_like(t["output_norm.weight"])
    t["output_norm.weight"][0] = 1.0
    t["output.weight"] = np.zeros_like(t["output.weight"])
    t["output.weight"][im_end, 0] = 1.0
    spec["kvs"] = [kv for kv in spec["kvs"] if kv[0] != "tokenizer.ggml.eos_token_id"] + [
        ("tokenizer.ggml.eos_token_id", endoftext, T.UINT32, None),
        ("tokenizer.chat_template", tok.chat_template, T.STRING, None)]
    path = write_gguf(str(tmp_path_factory.mktemp("vicuna-eot") / "eot.gguf"), spec)
    return tok, path, im_end


def test_generation_stops_at_the_end_of_turn_token(vicuna, eot_model):
    tok, path, im_end = eot_model
    flags = ["-m", path, "-p", "hi", "-n", "6", "--temp", "0", "--repeat-penalty", "1", "--print-ids"]
    raw = run([vicuna, "run", *flags]).stdout.split()  # no template: <|im_end|> is just a token
    assert [int(x) for x in raw] == [im_end] * 6
    proc = run([vicuna, "run", *flags, "--prompt-type", "chat_template"])
    assert proc.stdout.split() == [], proc.stdout  # the template's end of turn stops it at once
    assert "an answer ends at <|im_end|>, <|endoftext|>" in proc.stderr.decode()
    # chat: the first answer ends at once (empty), and the second prompt holds it as an empty turn
    proc = run([vicuna, "chat", "-m", path, "-v", "-n", "6", "--temp", "0", "-t", "2"], stdin=b"hi\nagain\n")
    fed = [[int(x) for x in m.split()] for m in re.findall(r"^prompt ids:((?: \d+)*)$", proc.stderr.decode(), re.MULTILINE)]
    msgs = [{"role": "user", "content": "hi"}]
    assert fed[0] == hf_ids(tok, msgs)
    assert fed[1] == hf_ids(tok, msgs + [{"role": "assistant", "content": ""}, {"role": "user", "content": "again"}])
    assert proc.stdout.decode() == "\n\n"


def test_a_file_without_a_template_fails_naming_the_flag(vicuna, tiny_models, tmp_path):
    # the tiny model as test_vicuna_cpp.py writes it: no vicuna.prompt_type, no tokenizer.chat_template
    path = write_gguf(str(tmp_path / "plain.gguf"), gguf_spec(tiny_models["sp"]))
    for cmd in (["chat", "-m", path, "--dry-run"], ["run", "-m", path, "-p", "hi", "--prompt-type", "auto"],
                ["tokenize", "-m", path, "-p", "hi", "--prompt-type", "chat_template"]):
        proc = run([vicuna, *cmd], stdin=b"hi\n", check=False)
        err = proc.stderr.decode().strip()
        assert proc.returncode == 1 and len(err.splitlines()) == 1, err
        assert "--prompt-type instruct, chat or none" in err, err
    # run stays a raw completion without --prompt-type
    proc = run([vicuna, "run", "-m", path, "-p", "hi", "-n", "1", "--temp", "0"])
    assert b"prompt template" not in proc.stderr


def test_an_unknown_template_is_an_error_naming_the_markers(vicuna, tiny_models, tmp_path):
    import gguf

    T = gguf.GGUFValueType
    gemma = ("{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\\n' + "
             "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
             "{{'<start_of_turn>model\\n'}}{% endif %}")
    kvs = _tokenizer_kvs(tiny_models["sp"]) + [("tokenizer.chat_template", gemma, T.STRING, None)]
    path = write_gguf(str(tmp_path / "gemma.gguf"), {"arch": "llama", "kvs": kvs, "tensors": {}})
    proc = run([vicuna, "chat", "-m", path, "--dry-run"], stdin=b"hi\n", check=False)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 1 and len(err.splitlines()) == 1, err
    assert "not a template vicuna knows" in err and "<|im_start|>" in err and "<|start_header_id|>" in err, err
    # an explicit template still works on that file
    prompts, _ = dry_run(vicuna, path, TURNS[:1], "--prompt-type", "chat")
    assert len(prompts) == 1
