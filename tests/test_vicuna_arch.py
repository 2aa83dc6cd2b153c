"""The model families vicuna.cpp runs besides LLaMA/SmolLM2, each against transformers.

For each family a tiny random Hugging Face model (2 layers, hidden 64, 4 query heads sharing 2
key/value heads, SmolLM2's tokenizer) is saved as a user would have it, exported with
tools/convert_gguf.py --outtype f32, and run by the engine:

- qwen2, tied and untied output: general.architecture=qwen2, q/k/v biases (set to random values:
  transformers initializes them to zero), q/k rows not permuted, RoPE on the halves of each head;
- mistral with sliding_window 8 and a 24-token prompt: the window is written to the GGUF and the
  engine masks attention to it; which positions it includes is checked exactly (below);
- LLaMA-3.1 rope scaling (rope_type llama3, original context 64, so that all three bands of the
  smoothing -- unscaled, smoothed, divided by the factor -- occur for head size 16) and linear
  rope scaling (factor 4).

Each case asserts last-position logits within 1e-3 relative of transformers' (LOGITS_RTOL, as
tests/test_vicuna_cpp.py) and 16 greedy tokens equal to transformers' argmax after every prefix.
The weights are drawn with std 0.1 (not transformers' 0.02) so that attention is far from uniform:
with 0.02 the logits move by under 1 % when RoPE changes, which a 1e-3 check barely sees. Where a
feature could be dropped without the comparison noticing, a guard asserts that transformers' own
logits move by more than 10x the tolerance without it (window, rope scaling, biases).

The files llama.cpp's own converter (convert_hf_to_gguf.py, from the llama-cpp-python source
package that `make llama-vocab` fetches into .cache/llama-vocab) writes for the qwen2 and llama
folders are run too, and must give the same logits; that test is skipped, saying why, when the
converter is not there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import NEEDS_CPP, ROOT

pytestmark = NEEDS_CPP

LOGITS_RTOL = 1e-3    # f32 files against transformers, as tests/test_vicuna_cpp.py
GUARD_FACTOR = 10     # a feature the test relies on moves transformers' logits by > 10x LOGITS_RTOL
N_GREEDY = 16
INIT_STD = 0.1        # weight init (see the docstring)
SLIDING_WINDOW = 8
PROMPT_LEN = 24       # > 2 layers x (window - 1) + 1: the first tokens are outside what the last one sees
LLAMA_VOCAB_DIR = os.path.join(ROOT, ".cache", "llama-vocab")
LLAMA_CONVERTER = os.path.join(LLAMA_VOCAB_DIR, "convert_hf_to_gguf.py")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0}
LINEAR_ROPE = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}

# family -> (transformers model class name, config overrides)
FAMILIES = {
    "qwen2_tied": ("Qwen2", {"tie_word_embeddings": True}),
    "qwen2_untied": ("Qwen2", {"tie_word_embeddings": False}),
    "mistral_swa": ("Mistral", {"sliding_window": SLIDING_WINDOW, "tie_word_embeddings": False}),
    "llama3_rope": ("Llama", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": False}),
    "llama_linear_rope": ("Llama", {"rope_parameters": LINEAR_ROPE, "tie_word_embeddings": False}),
}


def build_config(family: str, tokenizer, **overrides):
    import transformers

    kind, extra = FAMILIES[family]
    cfg = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               initializer_range=INIT_STD, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, **extra)
    cfg.update(overrides)
    return getattr(transformers, f"{kind}Config")(**cfg), getattr(transformers, f"{kind}ForCausalLM")


def make_family_model(out_dir: str, family: str, tokenizer_dir: str, seed: int = 0) -> str:
    """A 2-layer random model of the family with the given tokenizer, saved into out_dir."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config, model_cls = build_config(family, tokenizer)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # qwen2's q/k/v biases, zero after init
                p.normal_(0.0, 0.5)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def convert_f32(model_dir: str, outfile: str) -> str:
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert_gguf

    convert_gguf.convert(model_dir, outfile, "f32", overwrite=True)
    return outfile


@pytest.fixture(scope="session")
def family_ggufs(tmp_path_factory, embedded_path):
    """family -> (HF folder, our f32 GGUF), built on first use."""
    root = str(tmp_path_factory.mktemp("families"))
    cache = {}

    def get(family: str) -> tuple[str, str]:
        if family not in cache:
            hf_dir = make_family_model(os.path.join(root, family), family, embedded_path)
            cache[family] = (hf_dir, convert_f32(hf_dir, os.path.join(root, f"{family}.f32.gguf")))
        return cache[family]

    return get


# ---------------------------------------------------------------------------------------------
# references and the engine

_HF = {}


def hf_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    if model_dir not in _HF:
        _HF[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _HF[model_dir]


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) logits of a transformers model."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def run(cmd, timeout=300):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def engine_logits(vicuna, path, ids, tmp_path) -> np.ndarray:
    out = tmp_path / "logits.bin"
    run([vicuna, "eval", "-m", path, "--ids", ",".join(map(str, ids)), "--dump-logits", out, "-t", "2"])
    return np.fromfile(out, dtype="<f4")


def engine_greedy(vicuna, path, ids, n=N_GREEDY) -> list[int]:
    out = run([vicuna, "run", "-m", path, "--ids", ",".join(map(str, ids)), "-n", str(n), "--temp", "0",
               "--repeat-penalty", "1", "--ignore-eos", "--print-ids", "-c", "128", "-t", "2"])
    return [int(x) for x in out.stdout.split()]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def prompt_ids(hf_dir: str, n: int = PROMPT_LEN) -> list[int]:
    """n token ids of an ordinary text (no BOS: SmolLM2's tokenizer adds none)."""
    from transformers import AutoTokenizer

    text = ("The capital of France is Paris. The capital of Germany is Berlin, the capital of Italy is Rome, "
            "and the capital of Spain is Madrid. 你好，世界。")
    ids = AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"]
    assert len(ids) >= n
    return ids[:n]


def assert_matches_transformers(vicuna, hf_dir, path, ids, tmp_path):
    """Last-position logits within LOGITS_RTOL, and greedy tokens equal to transformers' argmax after
    every prefix (teacher forcing: one forward pass instead of one per token)."""
    model = hf_model(hf_dir)
    ours = engine_logits(vicuna, path, ids, tmp_path)
    ref = hf_logits(model, ids)[-1]
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < LOGITS_RTOL, rel_err(ours, ref)
    generated = engine_greedy(vicuna, path, ids)
    assert len(generated) == N_GREEDY
    want = hf_logits(model, ids + generated)[len(ids) - 1:-1].argmax(-1).tolist()
    assert generated == want, f"ours {generated}\nhf   {want}"


def gguf_fields(path: str) -> tuple[dict, list[str]]:
    """(metadata key -> value for scalar keys, tensor names) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    kv = {}
    for name, field in reader.fields.items():
        if not field.types or field.types[0] != gguf.GGUFValueType.ARRAY:
            kv[name] = field.contents()
    return kv, [t.name for t in reader.tensors]


def hf_variant_logits(hf_dir: str, ids: list[int], **overrides) -> np.ndarray:
    """Last-position logits of the same weights under another config (a guard's reference)."""
    import torch
    from transformers import AutoTokenizer

    family = os.path.basename(hf_dir)
    config, model_cls = build_config(family, AutoTokenizer.from_pretrained(hf_dir), **overrides)
    model = model_cls(config).eval()
    model.load_state_dict(hf_model(hf_dir).state_dict())
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


# ---------------------------------------------------------------------------------------------
# qwen2


@pytest.mark.parametrize("family", ["qwen2_tied", "qwen2_untied"])
def test_qwen2_matches_transformers(vicuna, family_ggufs, family, tmp_path):
    hf_dir, path = family_ggufs(family)
    kv, tensors = gguf_fields(path)
    assert kv["general.architecture"] == "qwen2"
    assert kv["qwen2.block_count"] == 2 and kv["qwen2.attention.head_count_kv"] == 2
    assert not any(k.startswith("llama.") for k in kv)
    for t in ("attn_q", "attn_k", "attn_v"):
        assert f"blk.0.{t}.bias" in tensors
    assert ("output.weight" in tensors) == (family == "qwen2_untied")
    # q/k stored as transformers has them (llama.cpp's Qwen2Model does not permute)
    import torch
    from safetensors.torch import load_file

    import gguf

    hf = load_file(os.path.join(hf_dir, "model.safetensors"))
    reader = gguf.GGUFReader(path)
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    np.testing.assert_array_equal(np.asarray(q.data).reshape(64, 64),
                                  hf["model.layers.0.self_attn.q_proj.weight"].to(torch.float32).numpy())
    ids = prompt_ids(hf_dir)
    assert_matches_transformers(vicuna, hf_dir, path, ids, tmp_path)


def test_qwen2_biases_matter(family_ggufs):
    """Guard: the q/k/v biases move transformers' logits, so the comparison above checks them."""
    import torch

    hf_dir, _ = family_ggufs("qwen2_untied")
    ids = prompt_ids(hf_dir)
    model = hf_model(hf_dir)
    ref = hf_logits(model, ids)[-1]
    state = {k: (torch.zeros_like(v) if k.endswith(".bias") else v) for k, v in model.state_dict().items()}
    from transformers import AutoTokenizer

    config, model_cls = build_config("qwen2_untied", AutoTokenizer.from_pretrained(hf_dir))
    unbiased = model_cls(config).eval()
    unbiased.load_state_dict(state)
    assert rel_err(hf_logits(unbiased, ids)[-1], ref) > GUARD_FACTOR * LOGITS_RTOL


# ---------------------------------------------------------------------------------------------
# mistral: sliding window


def test_mistral_sliding_window_matches_transformers(vicuna, family_ggufs, tmp_path):
    hf_dir, path = family_ggufs("mistral_swa")
    kv, _ = gguf_fields(path)
    assert kv["general.architecture"] == "llama"  # as llama.cpp's converter writes Mistral
    assert kv["llama.attention.sliding_window"] == SLIDING_WINDOW
    ids = prompt_ids(hf_dir)
    # guard: at 24 tokens the window changes transformers' answer
    full = hf_variant_logits(hf_dir, ids, sliding_window=None)
    assert rel_err(full, hf_logits(hf_model(hf_dir), ids)[-1]) > GUARD_FACTOR * LOGITS_RTOL
    assert_matches_transformers(vicuna, hf_dir, path, ids, tmp_path)


def test_sliding_window_includes_exactly_the_last_w_positions(vicuna, family_ggufs, tmp_path):
    """A token attends to itself and the W-1 positions before it (transformers: kv_idx > q_idx - W).
    Through 2 layers the last token (position n-1) then depends on positions n-1-2(W-1) .. n-1: a
    change at position n-2W+1 moves its logits, one at n-2W (just outside) leaves them bit for bit
    -- in the engine and in transformers alike."""
    hf_dir, path = family_ggufs("mistral_swa")
    ids = prompt_ids(hf_dir)
    n, w = len(ids), SLIDING_WINDOW
    first_seen = n - 1 - 2 * (w - 1)
    model = hf_model(hf_dir)
    base_ours = engine_logits(vicuna, path, ids, tmp_path)
    base_hf = hf_logits(model, ids)[-1]
    for pos, seen in ((first_seen - 1, False), (first_seen, True)):
        changed = list(ids)
        changed[pos] = (changed[pos] + 7) % 1000 + 1
        ours = engine_logits(vicuna, path, changed, tmp_path)
        ref = hf_logits(model, changed)[-1]
        if seen:
            assert rel_err(ref, base_hf) > GUARD_FACTOR * LOGITS_RTOL, pos
            assert rel_err(ours, base_ours) > GUARD_FACTOR * LOGITS_RTOL, pos
        else:
            assert rel_err(ref, base_hf) < 1e-6, pos  # transformers' masked softmax adds exact zeros
            np.testing.assert_array_equal(ours, base_ours, err_msg=f"position {pos} is outside the window")
        assert rel_err(ours, ref) < LOGITS_RTOL


def test_sliding_window_in_decode(vicuna, family_ggufs, tmp_path):
    """The window also holds one token at a time: a prompt of 3 tokens, then 30 greedy tokens, each
    decoded with the cache (positions past the window), equal transformers' argmax."""
    hf_dir, path = family_ggufs("mistral_swa")
    ids = prompt_ids(hf_dir, 3)
    generated = engine_greedy(vicuna, path, ids, 30)
    want = hf_logits(hf_model(hf_dir), ids + generated)[len(ids) - 1:-1].argmax(-1).tolist()
    assert generated == want, f"ours {generated}\nhf   {want}"


# ---------------------------------------------------------------------------------------------
# rope scaling


def test_llama3_rope_scaling_matches_transformers(vicuna, family_ggufs, tmp_path):
    hf_dir, path = family_ggufs("llama3_rope")
    import gguf

    factors = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    factors = np.asarray(factors.data)
    # head size 16, theta 1e4, original context 64: unscaled, smoothed and fully scaled bands all occur
    assert factors[0] == 1.0 and factors[-1] == LLAMA3_ROPE["factor"]
    assert ((factors > 1.0) & (factors < LLAMA3_ROPE["factor"])).any()
    ids = prompt_ids(hf_dir)
    plain = hf_variant_logits(hf_dir, ids, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert rel_err(plain, hf_logits(hf_model(hf_dir), ids)[-1]) > GUARD_FACTOR * LOGITS_RTOL
    assert_matches_transformers(vicuna, hf_dir, path, ids, tmp_path)


def test_linear_rope_scaling_matches_transformers(vicuna, family_ggufs, tmp_path):
    hf_dir, path = family_ggufs("llama_linear_rope")
    kv, _ = gguf_fields(path)
    assert kv["llama.rope.scaling.type"] == "linear" and kv["llama.rope.scaling.factor"] == LINEAR_ROPE["factor"]
    ids = prompt_ids(hf_dir)
    plain = hf_variant_logits(hf_dir, ids, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert rel_err(plain, hf_logits(hf_model(hf_dir), ids)[-1]) > GUARD_FACTOR * LOGITS_RTOL
    assert_matches_transformers(vicuna, hf_dir, path, ids, tmp_path)
