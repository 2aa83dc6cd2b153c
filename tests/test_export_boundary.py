"""What was trained is what runs everywhere: checks across the export boundary.

- For an instruct, a chat and a chat_template adapter (a few real training steps on a tiny random
  model with the SmolLM2 tokenizer), the greedy answer of `generate.py` (transformers + peft) equals
  the answer of `vicuna chat` with no template flag (the template comes from the file), on the f32
  export, both merged (tools/merge_lora.py + tools/convert_gguf.py --outtype f32) and as a base f32
  GGUF + adapter GGUF (`--lora`). Same settings on both sides: a few new tokens, repetition
  penalty 1.1 (generate.py's default, set explicitly on both), greedy / --temp 0, and no minimum
  length (--min_new_tokens 0, the default since this test found the Python side masking EOS at the
  first step while vicuna chat has no minimum).
- tools/merge_lora.py writes the trained template as the merged folder's chat template:
  `tokenizer.apply_chat_template` on the merged folder gives prompt.py's `build_prompt_ids` for an
  instruct and a chat adapter; a chat_template adapter keeps the base's own.
- tools/convert_gguf.py warns when a quantized merged export undoes most of the adapter's change:
  a q4_1 export of an adapter trained on the embedded model (whose weights were dequantized from
  Q4_1, so small deltas round back onto the base) warns and points to --lora_path; an f32 export
  and a q8_0 export of a random-base merge do not.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from conftest import INSTRUCT_RECORDS, NEEDS_CPP, ROOT, train_args, write_jsonl

sys.path.insert(0, os.path.join(ROOT, "tools"))

import convert_gguf  # noqa: E402
import merge_lora  # noqa: E402

PROMPT_TYPES = ("instruct", "chat", "chat_template")
QUESTIONS = ["Say hello.", "用一句话介绍你自己。", "Name a colour."]
N_NEW = 6
REPEAT_PENALTY = "1.1"





@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("boundary")


def train(work, base: str, prompt_type: str, name: str, *extra: str) -> str:
    import finetune

    data = write_jsonl(work / f"{name}.jsonl", INSTRUCT_RECORDS)
    out = str(work / name)
    finetune.main(train_args(data, out, base, "--prompt_type", prompt_type, "--max_steps", "2", *extra))
    return out


@pytest.fixture(scope="module")
def adapters(work, tiny_model):
    """{prompt_type: adapter folder}: 2 optimizer steps each on the tiny bpe model."""
    return {pt: train(work, tiny_model, pt, f"lora-{pt}", "--lora_target_modules", "q_proj,k_proj,v_proj,o_proj")
            for pt in PROMPT_TYPES}


@pytest.fixture(scope="module")
def merged(work, tiny_model, adapters):
    return {pt: merge_lora.merge(tiny_model, lora, str(work / f"merged-{pt}")) for pt, lora in adapters.items()}


def convert(*argv) -> None:
    assert convert_gguf.main([str(a) for a in argv]) == 0


def generate_answer(base: str, lora: str, question: str) -> str:
    import generate

    args = generate.build_parser().parse_args(
        ["--model_path", base, "--lora_path", lora, "--instruction", question, "--max_new_tokens", str(N_NEW),
         "--repetition_penalty", REPEAT_PENALTY, "--min_new_tokens", "0"])
    assert not args.do_sample  # greedy is generate.py's default
    return generate.run(args)


def vicuna_answers(vicuna: str, model: str, questions: list[str], *extra: str) -> list[str]:
    """One fresh `vicuna chat` per question (no history), template from the file."""
    answers = []
    for q in questions:
        proc = subprocess.run([vicuna, "chat", "-m", model, "-n", str(N_NEW), "--temp", "0", "--repeat-penalty",
                               REPEAT_PENALTY, "-t", "1", *extra], input=(q + "\n").encode(), capture_output=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
        answers.append(proc.stdout.decode().strip())
    return answers


# --- generate.py == vicuna chat, merged and adapter GGUF -------------------------------------------


@NEEDS_CPP
@pytest.mark.parametrize("prompt_type", PROMPT_TYPES)
def test_generate_equals_vicuna_chat_on_f32_exports(prompt_type, vicuna, work, tiny_model, adapters, merged):
    lora = adapters[prompt_type]
    want = [generate_answer(tiny_model, lora, q).strip() for q in QUESTIONS]
    assert any(want), "the tiny model answered nothing; the comparison would prove nothing"

    merged_gguf = work / f"merged-{prompt_type}.f32.gguf"
    convert("--model_path", merged[prompt_type], "--outfile", merged_gguf, "--outtype", "f32", "--no-verify")
    assert vicuna_answers(vicuna, str(merged_gguf), QUESTIONS) == want

    base_gguf = work / "base.f32.gguf"
    if not base_gguf.exists():
        # A base keeps its own template (ChatML here), as the embedded Q4_1 file does; the adapter's
        # vicuna.prompt_type picks instruct or chat, and chat_template means the base file's template.
        convert("--model_path", tiny_model, "--outfile", base_gguf, "--outtype", "f32", "--prompt_type",
                "chat_template", "--no-verify")
    adapter_gguf = work / f"lora-{prompt_type}.f32.gguf"
    convert("--lora_path", lora, "--model_path", tiny_model, "--base_gguf", base_gguf, "--outfile", adapter_gguf,
            "--outtype", "f32", "--no-verify")
    assert vicuna_answers(vicuna, str(base_gguf), QUESTIONS, "--lora", str(adapter_gguf)) == want


# --- the merged folder's chat template -------------------------------------------------------------


@pytest.mark.parametrize("prompt_type", ["instruct", "chat"])
def test_merged_folder_chat_template_is_the_trained_one(prompt_type, merged):
    from transformers import AutoTokenizer

    from prompt import Conversation, build_prompt_ids, chat_template_jinja, generation_prompt

    folder = merged[prompt_type]
    assert open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8").read() == \
        chat_template_jinja(prompt_type, None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for question in QUESTIONS:
        conv = Conversation(turns=[(question, None)])
        messages = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == generation_prompt(prompt_type, conv, tokenizer)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == build_prompt_ids(prompt_type, conv, tokenizer)
    if prompt_type == "chat":  # a second turn: the answer ends with EOS, as in training
        conv = Conversation(turns=[("Hi", "Hello!"), ("Again", None)])
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Again"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == build_prompt_ids("chat", conv, tokenizer)


def test_chat_template_adapter_keeps_the_base_template(merged, tiny_model):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(tiny_model)
    assert AutoTokenizer.from_pretrained(merged["chat_template"]).chat_template == base.chat_template


# --- the quantization warning ----------------------------------------------------------------------


def test_q4_1_export_of_an_embedded_merge_warns(work, embedded_path, caplog):
    """The embedded base sits on the Q4_1 grid: a few steps of LoRA round back onto it."""
    lora = train(work, embedded_path, "instruct", "lora-embedded", "--max_steps", "2", "--micro_batch_size", "1",
                 "--batch_size", "1", "--cutoff_len", "64")
    folder = merge_lora.merge("SmolLM2-135M-Instruct", lora, str(work / "merged-embedded"))
    with caplog.at_level(logging.INFO):
        info = convert_gguf.convert(folder, str(work / "embedded.q4_1.gguf"), "q4_1")
    assert info["lora_kept"] < convert_gguf.LORA_KEPT_WARN
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("keeps only" in w and "q4_1" in w for w in warnings), warnings
    assert any(f"--lora_path {os.path.abspath(lora)}" in w for w in warnings), warnings


def test_exports_that_keep_the_adapter_do_not_warn(work, merged, tiny_model, caplog):
    with caplog.at_level(logging.INFO):
        info = convert_gguf.convert(merged["instruct"], str(work / "tiny-merged.q8_0.gguf"), "q8_0")
        assert info["lora_kept"] > 0.9  # a random base is on no grid: the change survives
        assert "lora_kept" not in convert_gguf.convert(merged["instruct"], str(work / "tiny-merged.f16.gguf"), "f16")
        # no training_config.json naming a base: nothing to compare against
        assert convert_gguf.convert(tiny_model, str(work / "tiny.q8_0.gguf"), "q8_0")["lora_kept"] is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "keeps only" in r.getMessage()]


def test_chat_template_adapter_refuses_a_base_exported_in_our_layout(work, tiny_model, adapters, capsys):
    """A chat_template adapter on a base GGUF whose tokenizer.chat_template is our instruct layout
    (convert_gguf's default --prompt_type) would chat in the wrong template: refused, naming the fix."""
    base_instruct = work / "base.instruct.f32.gguf"
    if not base_instruct.exists():
        convert("--model_path", tiny_model, "--outfile", base_instruct, "--outtype", "f32", "--no-verify")
    out = work / "refused-adapter.gguf"
    with pytest.raises(SystemExit) as e:
        convert_gguf.main(["--lora_path", adapters["chat_template"], "--model_path", tiny_model, "--base_gguf",
                           str(base_instruct), "--outfile", str(out), "--outtype", "f32", "--no-verify"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was exported with --prompt_type instruct" in err and "--prompt_type chat_template" in err, err
    assert not out.exists()
