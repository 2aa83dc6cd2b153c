"""generate.py prints only the answer; chat.py --cli keeps the history; both share one core.
`--help`, the one-shot answer and `chat.py --cli` never load gradio."""

import json
import os
import subprocess
import sys

import pytest

from chat import reply_stream
from conftest import ROOT, run_script
from generation import GenerationParams, generate_batch
from prompt import STOP_STRINGS, Conversation, build_prompt_ids, extract_response, fit_history
from models import load_for_inference

GREEDY = GenerationParams(max_new_tokens=12, num_beams=1, do_sample=False, repetition_penalty=1.0)

# Runs an entry script as `python SCRIPT ARGS...` does, then says on stderr's last line whether
# gradio was imported.
WATCH_IMPORTS = """
import runpy, sys
script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, {root!r})
try:
    runpy.run_path(script, run_name="__main__")
finally:
    print("gradio imported:", "gradio" in sys.modules, file=sys.stderr)
""".format(root=ROOT)


def run_watching_imports(script: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WATCH_IMPORTS, os.path.join(ROOT, script), *args], cwd=ROOT,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=600,
                          input=stdin)


def hf_generate(model, tokenizer, ids, params, stop_strings):
    """The reference: the non-streaming model.generate."""
    return generate_batch(model, tokenizer, [ids], params.generate_kwargs(tokenizer, model), stop_strings)[0]


@pytest.fixture(scope="module")
def loaded(tiny_model):
    model, tokenizer = load_for_inference(tiny_model)
    return model, tokenizer


def test_generate_cli_prints_only_the_response(tiny_model, loaded):
    model, tokenizer = loaded
    ids = build_prompt_ids("instruct", Conversation(turns=[("Say hi", None)], input="ctx"), tokenizer)
    expected = extract_response(hf_generate(model, tokenizer, ids, GREEDY, STOP_STRINGS["instruct"]), "instruct")
    # greedy by default: no --num_beams / --no-do_sample needed
    result = run_watching_imports("generate.py", "--model_path", tiny_model, "--instruction", "Say hi", "--input",
                                  "ctx", "--max_new_tokens", "12", "--repetition_penalty", "1.0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert result.stderr.splitlines()[-1] == "gradio imported: False"


def test_generate_cli_beams_and_sampling(tiny_model, loaded):
    """--num_beams 4 is beam search (equal to model.generate's); --do_sample alone samples (seeded:
    the same answer as model.generate with that seed), not beam sampling."""
    from transformers import set_seed

    model, tokenizer = loaded
    ids = build_prompt_ids("instruct", Conversation(turns=[("Name a colour", None)]), tokenizer)
    common = ["--model_path", tiny_model, "--instruction", "Name a colour", "--max_new_tokens", "12"]
    for flags, params in ((["--num_beams", "4"], GenerationParams(max_new_tokens=12, num_beams=4)),
                          (["--do_sample", "--seed", "7"], GenerationParams(max_new_tokens=12, do_sample=True, seed=7))):
        set_seed(7)
        expected = extract_response(hf_generate(model, tokenizer, ids, params, STOP_STRINGS["instruct"]), "instruct")
        result = run_script("generate.py", *common, *flags)
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected + "\n", flags


@pytest.mark.parametrize("script", ["generate.py", "chat.py"])
def test_help_shows_the_defaults_without_loading_gradio(script):
    result = run_watching_imports(script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1] == "gradio imported: False"
    help_text = " ".join(result.stdout.split())
    defaults = GenerationParams()
    for name in GenerationParams.flags():
        assert f"--{name}" in help_text and f"(default: {getattr(defaults, name)})" in help_text, name
    for shown in ("(default: 127.0.0.1)", "(default: 7860)", "(default: 32768)"):
        assert shown in help_text


def test_generate_uses_the_adapters_prompt_type(tmp_path, tiny_model, loaded):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = loaded
    adapter = tmp_path / "adapter"
    get_peft_model(load_for_inference(tiny_model)[0], LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    (adapter / "training_config.json").write_text(json.dumps({"prompt_type": "chat"}))
    ids = build_prompt_ids("chat", Conversation(turns=[("Say hi", None)]), tokenizer)  # lora_B = 0: same logits
    expected = extract_response(hf_generate(model, tokenizer, ids, GREEDY, STOP_STRINGS["chat"]), "chat")
    result = run_script("generate.py", "--model_path", tiny_model, "--lora_path", str(adapter), "--instruction",
                        "Say hi", "--num_beams", "1", "--max_new_tokens", "12", "--repetition_penalty", "1.0")
    assert result.returncode == 0, result.stderr
    assert "prompt type 'chat'" in result.stderr
    assert result.stdout == expected + "\n"


def test_reply_stream_uses_history_and_equals_one_shot(loaded):
    model, tokenizer = loaded
    history = [("你好", "你好！"), ("What is 2+2?", "4")]
    *partials, final = list(reply_stream(model, tokenizer, "chat", history, "And 3+3?", GREEDY, max_memory=512))
    conv = Conversation(turns=history + [("And 3+3?", None)])
    _, ids = fit_history("chat", conv, tokenizer, 512, GREEDY.max_new_tokens)
    assert ids == build_prompt_ids("chat", conv, tokenizer)  # fits: nothing trimmed
    one_shot = extract_response(hf_generate(model, tokenizer, ids, GREEDY, STOP_STRINGS["chat"]), "chat")
    assert final == one_shot
    assert all(final.startswith(p.rstrip()) for p in partials)


def test_chat_cli_session(tiny_model):
    result = run_watching_imports("chat.py", "--cli", "--model_path", tiny_model, "--max_new_tokens", "8",
                                  stdin="hello\nand again\n/clear\n你好\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Assistant: ") == 3
    assert "(history cleared)" in result.stderr
    assert result.stderr.splitlines()[-1] == "gradio imported: False"


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
