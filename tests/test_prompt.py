"""Golden prompt strings for every template, and the helpers around them."""

import pytest

from prompt import (CHAT_PREAMBLE, IGNORE_INDEX, Conversation, StopStringFilter, TemplateError,
                    build_prompt_ids, extract_response, fit_history, generation_prompt, render,
                    tokenize_pieces)


def test_instruct_golden_without_input():
    conv = Conversation(turns=[("Name a colour.", "Blue.")])
    assert render("instruct", conv).text() == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.")


def test_instruct_golden_with_input():
    conv = Conversation(turns=[("Translate to English.", "Our model.")], input="我们的模型")
    assert render("instruct", conv).text() == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate to English.\n\n### Input:\n我们的模型\n\n### Response:\nOur model.")


def test_instruct_generation_prompt_ends_with_response_newline():
    text = generation_prompt("instruct", Conversation(turns=[("Hi", None)]))
    assert text.endswith("### Instruction:\nHi\n\n### Response:\n")
    assert "noqa" not in text


def test_instruct_rejects_multi_turn():
    with pytest.raises(TemplateError, match="--prompt_type chat"):
        render("instruct", Conversation(turns=[("a", "b"), ("c", "d")]))


def test_chat_golden_multi_turn():
    conv = Conversation(turns=[("你好", "你好！"), ("What is 2+2?", "4")])
    assert render("chat", conv).text() == (
        "The following is a conversation between an AI assistant called Assistant and a human user "
        "called User. The assistant is intelligent, knowledgeable and polite to answer questions of "
        "user.\n\nUser:你好\n\nAssistant:你好！\n\nUser:What is 2+2?\n\nAssistant:4")


def test_chat_generation_prompt_and_system():
    conv = Conversation(turns=[("a", "b"), ("c", None)], system="You are a pirate.")
    assert generation_prompt("chat", conv) == "You are a pirate.\n\nUser:a\n\nAssistant:b\n\nUser:c\n\nAssistant:"
    conv = Conversation(turns=[("q", None)])
    assert generation_prompt("chat", conv) == CHAT_PREAMBLE + "User:q\n\nAssistant:"


def test_chat_folds_alpaca_input_into_question():
    conv = Conversation(turns=[("Translate", "Hello")], input="你好")
    assert render("chat", conv).prompts[0].endswith("User:Translate\n你好\n\nAssistant:")


def test_chat_template_golden_smollm2(bpe_tokenizer):
    conv = Conversation(turns=[("Hi", "Hello!"), ("2+2?", "4")])
    pieces = render("chat_template", conv, bpe_tokenizer)
    assert pieces.prompts == [
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    ]
    assert pieces.responses == ["Hello!<|im_end|>\n", "4<|im_end|>\n"]


def test_chat_template_labels_end_with_template_eos(bpe_tokenizer):
    pieces = render("chat_template", Conversation(turns=[("Hi", "Hello!")]), bpe_tokenizer)
    ids, labels = tokenize_pieces(pieces, bpe_tokenizer)
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert bpe_tokenizer.decode(supervised) == "Hello!<|im_end|>\n"
    assert bpe_tokenizer.eos_token_id in supervised  # <|im_end|> is SmolLM2's EOS
    assert supervised.count(bpe_tokenizer.eos_token_id) == 1  # no second EOS appended


def test_sp_tokenizer_gets_bos_first_and_eos_after_response(sp_tokenizer):
    pieces = render("instruct", Conversation(turns=[("Hi", "Hello")]))
    ids, labels = tokenize_pieces(pieces, sp_tokenizer)
    assert ids[0] == sp_tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    assert ids[-1] == sp_tokenizer.eos_token_id and labels[-1] == sp_tokenizer.eos_token_id
    prompt_ids = build_prompt_ids("instruct", Conversation(turns=[("Hi", None)]), sp_tokenizer)
    assert ids[:len(prompt_ids)] == prompt_ids  # generation sees exactly the training prefix


def test_extract_response_cuts_at_turn_markers():
    assert extract_response(" Paris.\n\n### Instruction:\nmore", "instruct") == "Paris."
    assert extract_response("Sure!\nUser: next question", "chat") == "Sure!"
    assert extract_response("no marker here ", "chat") == "no marker here"


def test_stop_filter_holds_back_marker_prefix():
    f = StopStringFilter("chat")
    assert f.update("Hello\nUs") == "Hello"  # "\nUs" may become "\nUser:"
    assert f.update("Hello\nUsually") == "Hello\nUsually"
    assert not f.done
    assert f.update("Hello\nUsually\nUser: hi") == "Hello\nUsually"
    assert f.done


def test_fit_history_keeps_newest_turns_and_current_question(bpe_tokenizer):
    turns = [(f"question {i} " + "word " * 20, f"answer {i} " + "word " * 20) for i in range(6)]
    conv = Conversation(turns=turns + [("current question", None)])
    full = build_prompt_ids("chat", conv, bpe_tokenizer)
    trimmed, ids = fit_history("chat", conv, bpe_tokenizer, budget=len(full) // 2, max_new_tokens=16)
    assert len(ids) + 16 <= len(full) // 2
    assert trimmed.turns[-1] == ("current question", None)
    assert trimmed.turns == conv.turns[-len(trimmed.turns):]  # a suffix: newest turns kept
    assert 1 < len(trimmed.turns) < len(conv.turns)
    # A question that alone exceeds the budget is still kept.
    alone, _ = fit_history("chat", conv, bpe_tokenizer, budget=10, max_new_tokens=16)
    assert alone.turns == [("current question", None)]


# Llama-2-chat's template as its tokenizer_config.json ships it (the system turn folded into the
# first user turn); it writes bos_token itself, as Llama-3's and Mistral's do.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_template_that_writes_bos_gets_one_bos(sp_tokenizer, system):
    """tokenize_pieces and fit_history put the tokenizer's BOS in front of a prompt only when the
    template does not write it itself: the ids equal apply_chat_template's (one BOS, not two)."""
    import copy

    tok = copy.deepcopy(sp_tokenizer)
    tok.chat_template = LLAMA2_TEMPLATE
    conv = Conversation(turns=[("hello world", "the quick brown fox"), ("你好", None)], system=system)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the quick brown fox"},
        {"role": "user", "content": "你好"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = tok(text, add_special_tokens=False)["input_ids"]  # how transformers tokenizes a chat
    ids = build_prompt_ids("chat_template", conv, tok)
    assert ids.count(tok.bos_token_id) == 2 and ids[:2] != [tok.bos_token_id] * 2  # one BOS per [INST]
    assert tok.decode(ids) == tok.decode(expected) and ids[0] == expected[0] == tok.bos_token_id
    _, fitted = fit_history("chat_template", conv, tok, 1024, 16)
    assert fitted == ids
    pieces = render("chat_template", Conversation(turns=[("hello world", "the quick brown fox")], system=system), tok)
    train_ids, _ = tokenize_pieces(pieces, tok)
    assert train_ids[0] == tok.bos_token_id and train_ids[1] != tok.bos_token_id
