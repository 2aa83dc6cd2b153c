"""--eval_prompts: greedy answers during training (samples.jsonl, TensorBoard), without changing it;
several data files in one run (--data_path a,b --data_shares)."""

import json
import os
import random
import re

import pytest
import torch

import finetune
from conftest import INSTRUCT_RECORDS, read_jsonl, train_args, write_jsonl

PROMPTS = [
    {"instruction": "Translate this sentence into English.", "input": "我明天要去图书馆还书。"},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                       {"from": "human", "value": "Count to three."}]},
]
GOLDEN_QUESTIONS = ["Translate this sentence into English.\n我明天要去图书馆还书。", "Count to three."]


def test_callback_writes_the_answers_generate_text_gives(tmp_path, tiny_model, bpe_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainerState

    from data import load_prompts
    from generation import GenerationParams, generate_text
    from prompt import STOP_STRINGS, build_prompt_ids, extract_response
    from train import GenerationSamples

    prompts_file = tmp_path / "p.json"
    prompts_file.write_text(json.dumps(PROMPTS[:1]) + "\n")  # a JSON list of one instruct prompt
    chat_file = write_jsonl(tmp_path / "c.jsonl", PROMPTS[1:])
    prompts = load_prompts(str(prompts_file)) + load_prompts(chat_file)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():  # a trained-looking adapter: lora_B away from zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    samples = GenerationSamples(prompts, "chat", bpe_tokenizer, 6, str(tmp_path / "out"))
    state = TrainerState()
    model.train()
    for step in (2, 4):
        state.global_step = step
        random.seed(5)
        torch.manual_seed(5)
        samples.on_evaluate(None, state, None, model=model)
        assert model.training  # back in training mode
        assert random.random() == random.Random(5).random()  # RNGs as they were
        assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(5)))
    lines = read_jsonl(tmp_path / "out" / "samples.jsonl")
    assert [(e["step"], e["index"], e["prompt"]) for e in lines] == [
        (2, 0, GOLDEN_QUESTIONS[0]), (2, 1, GOLDEN_QUESTIONS[1]), (4, 0, GOLDEN_QUESTIONS[0]), (4, 1, GOLDEN_QUESTIONS[1])]
    model.eval()
    expected = [extract_response(generate_text(model, bpe_tokenizer, build_prompt_ids("chat", conv, bpe_tokenizer),
                                               GenerationParams(max_new_tokens=6), STOP_STRINGS["chat"]), "chat")
                for conv in prompts]
    assert [e["answer"] for e in lines] == expected * 2
    assert any(expected), "the model answered nothing: the comparison would prove little"


def test_samples_at_each_evaluation_of_a_run(tmp_path, tiny_models, sp_tokenizer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from data import train_test_split
    from prompt import Conversation, question_text

    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS * 2)
    out = str(tmp_path / "out")
    finetune.main(train_args(data, out, tiny_models["sp"], "--test_size", "5", "--eval_steps", "2",
                             "--eval_max_new_tokens", "4"))
    _, held_out = train_test_split(INSTRUCT_RECORDS * 2, 5, 42, data)  # the default: the first 4 held out
    questions = [question_text(Conversation([(r["instruction"], None)], input=r.get("input", ""))) for r in held_out[:4]]
    lines = read_jsonl(os.path.join(out, "samples.jsonl"))
    assert [(e["step"], e["index"], e["prompt"]) for e in lines] == [
        (step, i, q) for step in (2, 4) for i, q in enumerate(questions)]
    [run] = os.listdir(os.path.join(out, "runs"))
    events = EventAccumulator(os.path.join(out, "runs", run), size_guidance={"tensors": 0}).Reload()
    tags = events.Tags()["tensors"]
    assert {f"samples/{i}/text_summary" for i in range(4)} <= set(tags)
    text = events.Tensors("samples/3/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert questions[3] in text and lines[-1]["answer"] in text


def test_samples_do_not_change_training(tmp_path, tiny_models):
    """Bitwise the same adapter with and without samples (dropout draws from the RNG the samples
    must leave alone); without a held-out split the samples come every --eval_steps, from
    sample/heldout_prompts.json by default."""
    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS)
    runs = {}
    for name, extra in (("with", []), ("without", ["--eval_prompts", "none"])):
        out = str(tmp_path / name)
        finetune.main(train_args(data, out, tiny_models["sp"], "--lora_dropout", "0.3", "--eval_steps", "2",
                                 "--eval_max_new_tokens", "3", *extra))
        runs[name] = out
    with open(os.path.join(runs["with"], "adapter_model.safetensors"), "rb") as a, \
            open(os.path.join(runs["without"], "adapter_model.safetensors"), "rb") as b:
        assert a.read() == b.read()
    lines = read_jsonl(os.path.join(runs["with"], "samples.jsonl"))
    assert [(e["step"], e["index"]) for e in lines] == [(s, i) for s in (2, 4) for i in range(4)]
    assert lines[0]["prompt"] == "What should I call you, and what can you do?"
    assert not os.path.exists(os.path.join(runs["without"], "samples.jsonl"))


@pytest.mark.parametrize("make,message", [
    (lambda tmp: str(tmp / "missing.json"),
     "missing.json: no such file; pass an existing JSON or JSONL file to --eval_prompts"),
    (lambda tmp: write_jsonl(tmp / "bad.jsonl", [{"instruction": "a"}, {"instruction": 3}]),
     "bad.jsonl:2: field 'instruction' must be a string, got int"),
    (lambda tmp: write_jsonl(tmp / "multi.jsonl", [{"input": ["a", "b"], "output": ["c"]}]),
     "--eval_prompts {tmp}/multi.jsonl:1: 2 turns, but the instruct template holds one instruction"),
])
def test_bad_eval_prompts_are_one_line_errors_before_training(tmp_path, tiny_models, capsys, make, message):
    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        finetune.main(train_args(data, str(out), tiny_models["sp"], "--eval_prompts", make(tmp_path)))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message.format(tmp=tmp_path) in err
    assert not out.exists()


def test_eval_prompt_beyond_the_context_is_refused_before_training(tmp_path, tiny_models, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Hi"}])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:  # the tiny model's context is 1024 tokens
        finetune.main(train_args(data, str(out), tiny_models["sp"], "--eval_prompts", prompts,
                                 "--eval_max_new_tokens", "1020"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: the eval prompt {re.escape(prompts)}:1 is (\d+) tokens and --eval_max_new_tokens is "
                        r"1020: \d+ tokens exceed the model's context of 1024 tokens; shorten it \(--eval_prompts\), "
                        r"or lower --eval_max_new_tokens", err), err
    assert not out.exists() or not os.listdir(out)  # refused before anything is written


# --- several data files --------------------------------------------------------------------------


def test_two_files_of_two_formats_with_shares(tmp_path, tiny_models, caplog):
    a = write_jsonl(tmp_path / "a.jsonl", INSTRUCT_RECORDS)
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(4)]
    b = tmp_path / "b.json"
    b.write_text(json.dumps(chats))
    out = str(tmp_path / "out")
    finetune.main(train_args(f"{a},{b}", out, tiny_models["sp"], "--data_shares", "0.25,0.75", "--max_steps", "1",
                             "--prompt_type", "chat"))
    config = json.load(open(os.path.join(out, "training_config.json")))
    assert config["data_format"] == "instruct,openai"
    assert config["data_files"] == [
        {"path": a, "format": "instruct", "records": 8, "train_examples": 8, "eval_examples": 0,
         "dropped_examples": 0, "share": 0.25, "in_training_mix": 3},
        {"path": str(b), "format": "openai", "records": 4, "train_examples": 4, "eval_examples": 0,
         "dropped_examples": 0, "share": 0.75, "in_training_mix": 9}]
    assert config["num_train_examples"] == 12
    assert f"{a}: instruct format, 8 records: 8 train / 0 eval examples, 3 in the training mix, share 0.25" in caplog.text
    assert f"{b}: openai format, 4 records: 4 train / 0 eval examples, 9 in the training mix, share 0.75" in caplog.text


def test_inspect_data_and_errors_name_each_file(tmp_path, tiny_models, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", INSTRUCT_RECORDS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                              {"from": "gpt", "value": "yo"}]}])
    report = tmp_path / "inspect.jsonl"
    finetune.main(["--data_path", f"{a},{b}", "--model_path", tiny_models["sp"], "--prompt_type", "chat",
                   "--inspect_data", str(report)])
    assert [e["where"] for e in read_jsonl(report)] == [f"{a}:1", f"{a}:2", f"{b}:1"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x"}])
    for extra, message in ((["--data_path", f"{a},{bad}"], f"{bad}:2: missing field 'output'"),
                           (["--data_path", f"{a},{b}", "--data_shares", "0.5,0.6"],
                            "--data_shares 0.5,0.6 sums to 1.1; the shares must sum to 1")):
        with pytest.raises(SystemExit):
            finetune.main(["--output_path", str(tmp_path / "out"), "--model_path", tiny_models["sp"], *extra])
        err = capsys.readouterr().err.strip()
        assert err == f"error: {message}"
    assert not (tmp_path / "out").exists()
