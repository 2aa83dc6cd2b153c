"""Fixtures: tiny random LLaMA models (2 layers, hidden 64) with two kinds of tokenizer.

- "bpe": the embedded SmolLM2 byte-level BPE tokenizer (ChatML template, EOS <|im_end|>, no BOS).
- "sp":  a SentencePiece LLaMA tokenizer trained here (byte fallback, BOS <s>, EOS </s>, no pad).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SP_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "The following is a conversation between an AI assistant called Assistant and a human user called User.",
    "### Instruction: ### Input: ### Response: User: Assistant:",
    "hello world, the quick brown fox jumps over the lazy dog. 1 2 3 4 5 6 7 8 9 0",
    "你好，世界。我们的模型会用中文和英文回答问题。今天天气很好。",
]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end runs, only with --runslow")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def embedded_path():
    """The embedded SmolLM2 converted to safetensors (cached across runs in ~/.cache)."""
    from models import EMBEDDED_MODEL, resolve_model_path

    return resolve_model_path(EMBEDDED_MODEL)


def _sp_tokenizer_dir(root: str) -> str:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    raw = os.path.join(root, "sp-raw")
    os.makedirs(raw, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS * 20), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2)
    with open(os.path.join(raw, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(raw, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}, f)
    return raw


def make_tiny_model(out_dir: str, tokenizer_dir: str, seed: int = 0, hidden_size: int = 64) -> str:
    """Save a 2-layer random LlamaForCausalLM with the given tokenizer into out_dir."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, embedded_path):
    """{"bpe": dir, "sp": dir}: tiny random models saved as a user would have them on disk."""
    root = str(tmp_path_factory.mktemp("tiny"))
    return {
        "bpe": make_tiny_model(os.path.join(root, "bpe"), embedded_path),
        "sp": make_tiny_model(os.path.join(root, "sp"), _sp_tokenizer_dir(root)),
    }


@pytest.fixture(scope="session")
def tiny_model(tiny_models):
    return tiny_models["bpe"]


@pytest.fixture(scope="session")
def bpe_tokenizer(tiny_models):
    from models import load_tokenizer

    return load_tokenizer(tiny_models["bpe"])


@pytest.fixture(scope="session")
def sp_tokenizer(tiny_models):
    from models import load_tokenizer

    return load_tokenizer(tiny_models["sp"])


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def read_jsonl(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


INSTRUCT_RECORDS = [
    {"instruction": "Say hello.", "input": "", "output": "Hello! 你好！"},
    {"instruction": "Translate to English.", "input": "我们的模型", "output": "Our model."},
    {"instruction": "Count to three.", "output": "1 2 3"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "用一句话介绍你自己。", "input": "", "output": "我是一个小模型。"},
    {"instruction": "What is 2+2?", "input": "", "output": "4"},
    {"instruction": "Reverse the word.", "input": "abc", "output": "cba"},
    {"instruction": "Give an antonym of hot.", "input": "", "output": "Cold."},
]


@pytest.fixture
def instruct_file(tmp_path):
    return write_jsonl(tmp_path / "instruct.jsonl", INSTRUCT_RECORDS)


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 600, stdin: str | None = None):
    """Run an entry script as a user would; returns CompletedProcess with text output."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, input=stdin)


def train_args(data: str, out: str, model: str, *extra: str) -> list[str]:
    """A quick training run: 4 optimizer steps of 2x2 examples, no eval, no warmup."""
    return ["--data_path", data, "--output_path", out, "--model_path", model, "--test_size", "0",
            "--micro_batch_size", "2", "--batch_size", "4", "--max_steps", "4", "--warmup_steps", "0",
            "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-2", *extra]


# vicuna.cpp: the engine's tests build it, which needs cmake and a C++17 compiler
NEEDS_CPP = pytest.mark.skipif(
    shutil.which("cmake") is None or (shutil.which("c++") is None and shutil.which("g++") is None),
    reason="vicuna.cpp needs cmake and a C++17 compiler")


@pytest.fixture(scope="session")
def vicuna():
    """The release binary (`make cpp`; a no-op when it is built already). test_vicuna_cpp.py and
    test_lora_gguf.py override it with their own build of release + sanitizer binaries."""
    proc = subprocess.run(["make", "--no-print-directory", "cpp"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, check=False)
    if proc.returncode != 0:
        pytest.fail(f"make cpp failed:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
    return os.path.join(ROOT, "tools", "vicuna.cpp", "build", "vicuna")
