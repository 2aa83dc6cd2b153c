"""The float references of docs/performance.md's quantized-types tables. train_float_reference.py:
two steps of a hidden-32 model, the folder loads in transformers with SmolLM2's architecture choices
and converts to GGUF. rotate_float_reference.py: the rotated model computes the original's logits
(transformers, both tied and untied heads, norm gains folded) with every weight moved."""

from __future__ import annotations

import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tools", "vicuna.cpp"))

import convert_gguf
import rotate_float_reference as rfr
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


# --- rotate_float_reference.py: the embedded model's function on weights off the Q4_1 grid ---------


def _with_random_gains(model, seed: int = 1):
    import torch

    gen = torch.Generator().manual_seed(seed)
    norms = [model.model.norm] + [n for layer in model.model.layers
                                  for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    with torch.no_grad():
        for norm in norms:  # fresh models have gains of 1, which would make folding them untested
            norm.weight.copy_(0.5 + 1.5 * torch.rand(norm.weight.shape, generator=gen))
    return model


def _tiny(tie: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return _with_random_gains(LlamaForCausalLM(cfg).float().eval())


def test_rotation_keeps_the_logits_and_moves_every_weight():
    import torch

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    for tie in (True, False):
        model = _tiny(tie)
        rotated = rfr.rotate(model, seed=3)
        with torch.no_grad():
            want, got = model(input_ids=ids).logits, rotated(input_ids=ids).logits
        assert (want - got).abs().max().item() < 1e-4 * want.abs().max().item()
        assert rotated.config.tie_word_embeddings is False
        assert rotated.lm_head.weight.data_ptr() != rotated.model.embed_tokens.weight.data_ptr()
        before, after = dict(model.named_parameters()), dict(rotated.named_parameters())
        for name, w in after.items():
            if name.endswith("norm.weight"):
                assert torch.equal(w, torch.ones_like(w)), name
                continue
            old = before.get(name, before["model.embed_tokens.weight"])  # a tied head is the embedding
            # each weight is a new mix of a row's values, not a small change of the old one
            assert (w - old).abs().mean() > 0.5 * old.abs().mean(), name
        # the same seed gives the same model; another seed another one
        assert torch.equal(rfr.rotate(model, seed=3).lm_head.weight, rotated.lm_head.weight)
        assert not torch.equal(rfr.rotate(model, seed=4).lm_head.weight, rotated.lm_head.weight)


def test_rotated_folder_loads_and_an_existing_output_is_refused(tmp_path, tiny_model):
    import pytest
    import torch
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "rot")
    assert rfr.main(["--model_path", tiny_model, "--output", out]) == 0
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=ids).logits
    assert (want - got).abs().max().item() < 1e-4
    before = sorted(os.listdir(out))
    with pytest.raises(SystemExit, match="exists"):
        rfr.main(["--model_path", tiny_model, "--output", out])
    assert sorted(os.listdir(out)) == before
