"""generate.py prints only the answer; chat.py --cli keeps the history; both share one core."""

import json
import os
import shutil

import pytest

from chat import reply_stream
from conftest import run_script
from streaming import GenerationParams
from prompt import STOP_STRINGS, Conversation, build_prompt_ids, extract_response, fit_history
from models import load_for_inference
from streaming import generate_text

GREEDY = GenerationParams(max_new_tokens=12, num_beams=1, do_sample=False, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    model, tokenizer = load_for_inference(tiny_model)
    return model, tokenizer, GREEDY.generate_kwargs(tokenizer)


def test_generate_cli_prints_only_the_response(tiny_model, loaded):
    model, tokenizer, gen = loaded
    ids = build_prompt_ids("instruct", Conversation(turns=[("Say hi", None)], input="ctx"), tokenizer)
    expected = extract_response(generate_text(model, tokenizer, ids, gen, STOP_STRINGS["instruct"]), "instruct")
    result = run_script("generate.py", "--model_path", tiny_model, "--instruction", "Say hi", "--input", "ctx",
                        "--num_beams", "1", "--max_new_tokens", "12", "--repetition_penalty", "1.0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_generate_uses_the_adapters_prompt_type(tmp_path, tiny_model, loaded):
    from peft import LoraConfig, get_peft_model

    model, tokenizer, gen = loaded
    adapter = tmp_path / "adapter"
    get_peft_model(load_for_inference(tiny_model)[0], LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    (adapter / "training_config.json").write_text(json.dumps({"prompt_type": "chat"}))
    ids = build_prompt_ids("chat", Conversation(turns=[("Say hi", None)]), tokenizer)  # lora_B = 0: same logits
    expected = extract_response(generate_text(model, tokenizer, ids, gen, STOP_STRINGS["chat"]), "chat")
    result = run_script("generate.py", "--model_path", tiny_model, "--lora_path", str(adapter), "--instruction",
                        "Say hi", "--num_beams", "1", "--max_new_tokens", "12", "--repetition_penalty", "1.0")
    assert result.returncode == 0, result.stderr
    assert "prompt type 'chat'" in result.stderr
    assert result.stdout == expected + "\n"


def test_reply_stream_uses_history_and_equals_one_shot(loaded):
    model, tokenizer, gen = loaded
    history = [("你好", "你好！"), ("What is 2+2?", "4")]
    *partials, final = list(reply_stream(model, tokenizer, "chat", history, "And 3+3?", GREEDY, max_memory=512))
    conv = Conversation(turns=history + [("And 3+3?", None)])
    _, ids = fit_history("chat", conv, tokenizer, 512, gen["max_new_tokens"])
    assert ids == build_prompt_ids("chat", conv, tokenizer)  # fits: nothing trimmed
    one_shot = extract_response(generate_text(model, tokenizer, ids, gen, STOP_STRINGS["chat"]), "chat")
    assert final == one_shot
    assert all(final.startswith(p.rstrip()) for p in partials)


def test_chat_cli_session(tiny_model):
    result = run_script("chat.py", "--cli", "--model_path", tiny_model, "--max_new_tokens", "8",
                        stdin="hello\nand again\n/clear\n你好\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Assistant: ") == 3
    assert "(history cleared)" in result.stderr


def test_generate_rejects_bad_flags_before_loading(tiny_model):
    for args, message in ((["--instruction", " "], "--instruction is empty"),
                          (["--instruction", "hi", "--num_beams", "0"], "--num_beams"),
                          (["--auth", "nopassword"], "--auth")):
        result = run_script("generate.py", "--model_path", tiny_model, *args, timeout=120)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


def test_save_chat_refuses_root_and_adapter_folder(tmp_path):
    from chat import check_save_dir, save_chat
    from errors import UserError

    lora = tmp_path / "lora"
    lora.mkdir()
    for bad in ("/", str(lora), str(lora / "logs"), " "):
        with pytest.raises(UserError):
            check_save_dir(bad, str(lora))
    record = {"conversation": [{"role": "user", "content": "你好"}]}
    path = save_chat(str(tmp_path / "logs"), record, str(lora))
    save_chat(str(tmp_path / "logs"), record, str(lora))  # appends, never overwrites
    lines = open(path, encoding="utf-8").read().splitlines()
    assert [json.loads(l) for l in lines] == [record, record]
    assert not os.listdir(lora)
