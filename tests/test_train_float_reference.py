"""tools/vicuna.cpp/train_float_reference.py: the float model behind docs/performance.md's
"On a float model trained here" table. Two steps of a hidden-32 model: the folder loads in
transformers with SmolLM2's architecture choices and converts to GGUF."""

from __future__ import annotations

import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tools", "vicuna.cpp"))

import convert_gguf
import train_float_reference as tfr


def test_records_flatten_to_their_strings():
    assert tfr.record_text({"instruction": "Say hi.", "input": "", "output": "Hi!"}) == "Say hi.\nHi!"
    assert tfr.record_text({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}) \
        == "human\na\ngpt\nb"


def test_two_steps_load_and_convert(tmp_path, embedded_path):
    from transformers import AutoModelForCausalLM

    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))}
                                  for i in range(3, 40)]))
    sharegpt = tmp_path / "b.jsonl"
    sharegpt.write_text("\n".join(json.dumps({"conversations": [{"from": "human", "value": f"问题 {i}"},
                                                                {"from": "gpt", "value": f"回答 {i} 。" * 5}]})
                                  for i in range(20)))
    plain = tmp_path / "c.txt"
    plain.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = str(tmp_path / "model")
    assert tfr.main(["--text", str(alpaca), str(sharegpt), str(plain), "--output", out, "--steps", "2",
                     "--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2", "--kv_heads", "1",
                     "--seq_len", "16", "--batch", "2"]) == 0
    with open(os.path.join(out, "train_info.json")) as f:
        info = json.load(f)
    assert info["steps"] == 2 and info["tokens"] == 64
    model = AutoModelForCausalLM.from_pretrained(out)
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (49152, 32, 1, True)
    assert model.dtype.is_floating_point and str(model.dtype) == "torch.float32"
    gguf = str(tmp_path / "model.f32.gguf")
    assert convert_gguf.main(["--model_path", out, "--outfile", gguf, "--outtype", "f32", "--no-verify"]) == 0
    assert os.path.getsize(gguf) > 49152 * 32 * 4
