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
package that `make llama-vocab` fetches into .cache/llama-vocab/converter) writes for the qwen2 and
llama folders are run too, and must give the same logits and equal our exports tensor for tensor;
that test is skipped, saying why, when the converter is not there. Unsupported files (other
architectures, YaRN, mixed sliding layers, unused tensors) fail in one line; the converter refuses
the configurations the engine would run differently; a LoRA adapter on qwen2 matches peft.
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
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False)
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


def read_gguf(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata {key: value}, {tensor name: data} for F32 tensors, in file order) of a GGUF file. A
    small parser: gguf-py's reader takes ~25 s over a 150k-token vocabulary and its merges."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    _, _, n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
    fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def read_str(off):
        (n,) = struct.unpack_from("<Q", data, off)
        return data[off + 8:off + 8 + n].decode("utf-8"), off + 8 + n

    def read_val(t, off):
        if t == 8:
            return read_str(off)
        if t == 9:
            et, n = struct.unpack_from("<IQ", data, off)
            off += 12
            if et == 8:
                out = []
                for _ in range(n):
                    s, off = read_str(off)
                    out.append(s)
                return out, off
            return list(struct.unpack_from(f"<{n}{fmt[et]}", data, off)), off + n * struct.calcsize(fmt[et])
        return struct.unpack_from("<" + fmt[t], data, off)[0], off + struct.calcsize(fmt[t])

    kv, off = {}, 24
    for _ in range(n_kv):
        key, off = read_str(off)
        (t,) = struct.unpack_from("<I", data, off)
        kv[key], off = read_val(t, off + 4)
    infos = []
    for _ in range(n_tensors):
        name, off = read_str(off)
        (n_dims,) = struct.unpack_from("<I", data, off)
        ne = struct.unpack_from(f"<{n_dims}Q", data, off + 4)
        ggml_type, offset = struct.unpack_from("<IQ", data, off + 4 + 8 * n_dims)
        off += 4 + 8 * n_dims + 12
        infos.append((name, ne, ggml_type, offset))
    align = kv.get("general.alignment", 32)
    base = (off + align - 1) // align * align
    tensors = {}
    for name, ne, ggml_type, offset in infos:
        if ggml_type == 0:  # F32; GGUF's ne is the numpy shape reversed
            count = int(np.prod(ne))
            tensors[name] = np.frombuffer(data, "<f4", count, base + offset).reshape(tuple(reversed(ne)))
    return kv, tensors


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
    kv, tensors = read_gguf(path)
    assert kv["general.architecture"] == "qwen2"
    assert kv["qwen2.block_count"] == 2 and kv["qwen2.attention.head_count_kv"] == 2
    assert not any(k.startswith("llama.") for k in kv)
    for t in ("attn_q", "attn_k", "attn_v"):
        assert f"blk.0.{t}.bias" in tensors
    assert ("output.weight" in tensors) == (family == "qwen2_untied")
    # q/k stored as transformers has them (llama.cpp's Qwen2Model does not permute)
    from safetensors.numpy import load_file

    hf = load_file(os.path.join(hf_dir, "model.safetensors"))
    for name in ("q_proj.weight", "k_proj.weight", "q_proj.bias"):
        gguf_name = "blk.0.attn_" + name.replace("_proj", "")
        np.testing.assert_array_equal(tensors[gguf_name], hf[f"model.layers.0.self_attn.{name}"])
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
    kv, _ = read_gguf(path)
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
    factors = read_gguf(path)[1]["rope_freqs.weight"]
    # head size 16, theta 1e4, original context 64: unscaled, smoothed and fully scaled bands all occur
    assert factors[0] == 1.0 and factors[-1] == LLAMA3_ROPE["factor"]
    assert ((factors > 1.0) & (factors < LLAMA3_ROPE["factor"])).any()
    ids = prompt_ids(hf_dir)
    plain = hf_variant_logits(hf_dir, ids, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert rel_err(plain, hf_logits(hf_model(hf_dir), ids)[-1]) > GUARD_FACTOR * LOGITS_RTOL
    assert_matches_transformers(vicuna, hf_dir, path, ids, tmp_path)


def test_linear_rope_scaling_matches_transformers(vicuna, family_ggufs, tmp_path):
    hf_dir, path = family_ggufs("llama_linear_rope")
    kv, _ = read_gguf(path)
    assert kv["llama.rope.scaling.type"] == "linear" and kv["llama.rope.scaling.factor"] == LINEAR_ROPE["factor"]
    ids = prompt_ids(hf_dir)
    plain = hf_variant_logits(hf_dir, ids, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert rel_err(plain, hf_logits(hf_model(hf_dir), ids)[-1]) > GUARD_FACTOR * LOGITS_RTOL
    assert_matches_transformers(vicuna, hf_dir, path, ids, tmp_path)


# ---------------------------------------------------------------------------------------------
# files written by llama.cpp's own converter

LLAMA_CONVERTER_DIR = os.path.join(LLAMA_VOCAB_DIR, "converter")
LLAMA_CONVERTER = os.path.join(LLAMA_CONVERTER_DIR, "convert_hf_to_gguf.py")
QWEN2_VOCAB = os.path.join(LLAMA_VOCAB_DIR, "ggml-vocab-qwen2.gguf")


def qwen2_tokenizer_dir(out_dir: str) -> str:
    """Qwen2's own tokenizer (151643 tokens, 3 specials, the qwen2 pre-tokenizer), rebuilt from
    llama.cpp's ggml-vocab-qwen2.gguf: llama.cpp's converter names the pre-tokenizer by hashing
    the tokens of a test text, so only a real vocabulary passes it (SmolLM2's loaded as a
    Qwen2Tokenizer is not recognised)."""
    from transformers import Qwen2Tokenizer

    kv, _ = read_gguf(QWEN2_VOCAB)
    toks, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(toks) if types[i] in (1, 3)}  # NORMAL, CONTROL; not the [PADn]
    merges = [tuple(m.split(" ")) for m in kv["tokenizer.ggml.merges"]]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.save_pretrained(out_dir)
    return out_dir


def run_llama_cpp_converter(model_dir: str, outfile: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.path.join(LLAMA_CONVERTER_DIR, "gguf-py"))  # its gguf-py, not ours
    proc = subprocess.run([sys.executable, LLAMA_CONVERTER, model_dir, "--outfile", outfile, "--outtype", "f32"],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outfile


@pytest.fixture(scope="session")
def llama_cpp_exports(tmp_path_factory, family_ggufs):
    """family -> (HF folder, llama.cpp's f32 GGUF, our f32 GGUF). qwen2 gets Qwen2's real tokenizer
    (see qwen2_tokenizer_dir); llama3_rope keeps SmolLM2's, which llama.cpp knows as smollm."""
    if not (os.path.isfile(LLAMA_CONVERTER) and os.path.isfile(QWEN2_VOCAB)):
        pytest.skip(f"llama.cpp's converter and vocabularies are not in {LLAMA_VOCAB_DIR} (run `make llama-vocab`: "
                    "it fetches them from the llama-cpp-python source package on PyPI)")
    root = str(tmp_path_factory.mktemp("llama_cpp"))
    cache = {}

    def get(family: str):
        if family not in cache:
            if family == "qwen2_tied":
                hf_dir = make_family_model(os.path.join(root, family), family,
                                           qwen2_tokenizer_dir(os.path.join(root, "qwen2-tokenizer")))
                ours = convert_f32(hf_dir, os.path.join(root, f"{family}.ours.gguf"))
            else:
                hf_dir, ours = family_ggufs(family)
            cache[family] = (hf_dir, run_llama_cpp_converter(hf_dir, os.path.join(root, f"{family}.llama-cpp.gguf")),
                             ours)
        return cache[family]

    return get


@pytest.mark.parametrize("family", ["qwen2_tied", "llama3_rope", "mistral_swa"])
def test_llama_cpp_converter_files_run_and_equal_ours(vicuna, llama_cpp_exports, family, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py output: the engine matches transformers on it, and our
    export has the same architecture, the same <arch>.* values, tokenizer model and pre-tokenizer,
    and the same tensors bit for bit (so q/k are permuted, or not, as llama.cpp does it). For
    Mistral llama.cpp writes no sliding window (ours is the one extra key): its file runs with
    full attention, i.e. as transformers with sliding_window=None."""
    hf_dir, theirs, ours = llama_cpp_exports(family)
    arch = "qwen2" if family.startswith("qwen2") else "llama"
    kv_theirs, t_theirs = read_gguf(theirs)
    kv_ours, t_ours = read_gguf(ours)
    assert kv_theirs["general.architecture"] == kv_ours["general.architecture"] == arch
    assert kv_ours["tokenizer.ggml.model"] == kv_theirs["tokenizer.ggml.model"] == "gpt2"
    if family.startswith("qwen2"):
        assert kv_ours["tokenizer.ggml.pre"] == kv_theirs["tokenizer.ggml.pre"] == "qwen2"
    else:  # the same split: SmolLM2's tokenizer.json has no Digits step, llama.cpp names its hash smollm
        assert (kv_ours["tokenizer.ggml.pre"], kv_theirs["tokenizer.ggml.pre"]) == ("gpt-2", "smollm")
    arch_keys = {k for k in kv_theirs if k.startswith(arch + ".")}
    extra = {"llama.attention.sliding_window"} if family == "mistral_swa" else set()
    assert {k for k in kv_ours if k.startswith(arch + ".")} == arch_keys | extra
    for k in arch_keys:
        assert kv_ours[k] == pytest.approx(kv_theirs[k]), k
    assert sorted(t_ours) == sorted(t_theirs)  # the same names, all F32 (llama.cpp puts rope_freqs first)
    for name, data in t_theirs.items():
        np.testing.assert_array_equal(t_ours[name], data, err_msg=name)
    ids = prompt_ids(hf_dir)
    if family == "mistral_swa":
        full = hf_variant_logits(hf_dir, ids, sliding_window=None)
        assert rel_err(engine_logits(vicuna, theirs, ids, tmp_path), full) < LOGITS_RTOL
        return
    assert_matches_transformers(vicuna, hf_dir, theirs, ids, tmp_path)


# ---------------------------------------------------------------------------------------------
# what is not supported is refused in one line


def rewrite_gguf(src: str, dst: str, arch: str | None = None, set_kv: dict | None = None,
                 drop_keys: tuple[str, ...] = (), extra_tensors: dict | None = None) -> str:
    """A copy of an f32 GGUF with another general.architecture (its <arch>.* keys renamed), keys set
    or dropped, and tensors added."""
    import gguf
    from test_vicuna_cpp import write_gguf

    T = gguf.GGUFValueType
    kv, tensors = read_gguf(src)
    old_arch = kv["general.architecture"]
    arch = arch or old_arch
    kvs = []  # (key, value, type, None) as the writer's add_bool/add_uint32/... would store them
    for key, value in kv.items():
        if key in drop_keys or key == "general.architecture" or key.startswith("GGUF."):
            continue
        if key.startswith(old_arch + "."):
            key = arch + key[len(old_arch):]
        vtype = (T.BOOL if isinstance(value, bool) else T.UINT32 if isinstance(value, int)
                 else T.FLOAT32 if isinstance(value, float) else T.STRING if isinstance(value, str) else T.ARRAY)
        if vtype != T.ARRAY or len(value):  # add_array drops an empty array
            kvs.append((key, value, vtype, None))
    kvs += [(key, value, T.STRING if isinstance(value, str) else T.UINT32, None) for key, value in (set_kv or {}).items()]
    write_gguf(dst, {"arch": arch, "kvs": kvs, "tensors": {**tensors, **(extra_tensors or {})}})
    return dst


def engine_error(vicuna, path) -> str:
    """The engine's one error line for `eval` on path (exit status 1)."""
    proc = subprocess.run([str(vicuna), "eval", "-m", str(path), "--ids", "1,2,3", "--dump-logits", os.devnull],
                          capture_output=True, text=True, timeout=60, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, (proc.returncode, proc.stderr)
    return lines[0]


def test_unsupported_files_fail_in_one_line(vicuna, family_ggufs, tmp_path):
    _, qwen2 = family_ggufs("qwen2_tied")
    _, llama3 = family_ggufs("llama3_rope")
    for arch in ("phi3", "gemma"):
        line = engine_error(vicuna, rewrite_gguf(qwen2, str(tmp_path / f"{arch}.gguf"), arch=arch))
        assert f"is a '{arch}' model" in line and "llama" in line and "qwen2" in line, line
    cases = {
        "yarn": ({"llama.rope.scaling.type": "yarn"}, {}, "rope.scaling.type 'yarn' is not supported"),
        "longrope": ({"llama.rope.scaling.type": "longrope"}, {}, "'longrope' is not supported"),
        "swa-pattern": ({"llama.attention.sliding_window_pattern": 2}, {},
                        "sliding_window_pattern (sliding and full attention layers mixed) is not supported"),
        "output-bias": ({}, {"blk.0.attn_output.bias": np.ones(64)}, "'blk.0.attn_output.bias' is not part of"),
        "fused-qkv": ({}, {"blk.1.attn_qkv.weight": np.ones((128, 64))}, "'blk.1.attn_qkv.weight' is not part of"),
    }
    for name, (kv, extra, want) in cases.items():
        line = engine_error(vicuna, rewrite_gguf(llama3, str(tmp_path / f"{name}.gguf"), set_kv=kv,
                                                 extra_tensors=extra))
        assert want in line, (name, line)
    # LLaMA-3.1's rope_freqs belongs to llama; llama.cpp's qwen2 has none, so a qwen2 file with one is refused
    line = engine_error(vicuna, rewrite_gguf(qwen2, str(tmp_path / "q-freqs.gguf"),
                                             extra_tensors={"rope_freqs.weight": np.ones(8)}))
    assert "'rope_freqs.weight' is not part of the qwen2 architecture" in line, line


def test_convert_refuses_what_the_engine_would_run_differently(family_ggufs, tmp_path):
    """Sliding-window layers in Qwen2 (transformers slides on layers >= max_window_layers only),
    per-layer attention kinds, and LLaMA-3 rope scaling on qwen2 (llama.cpp's Qwen2Model writes
    no rope_freqs): one UserError each, and no file."""
    import json
    import shutil

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert_gguf

    from errors import UserError

    hf_dir, _ = family_ggufs("qwen2_tied")
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    cases = {
        "qwen2-swa": ({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
                      "use_sliding_window=true"),
        "layer-types": ({"layer_types": ["full_attention", "sliding_attention"]}, "mixes attention kinds"),
        "qwen2-llama3": ({"rope_parameters": LLAMA3_ROPE}, "rope scaling 'llama3' is not supported for qwen2"),
        "yarn": ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
                 "rope scaling 'yarn' is not supported"),
    }
    for name, (change, want) in cases.items():
        folder = tmp_path / name
        shutil.copytree(hf_dir, folder)
        (folder / "config.json").write_text(json.dumps(dict(config, **change)))
        out = tmp_path / f"{name}.gguf"
        with pytest.raises(UserError, match=re.escape(want)):
            convert_gguf.convert(str(folder), str(out), "f32")
        assert not out.exists()


# ---------------------------------------------------------------------------------------------
# LoRA adapters on qwen2


def test_qwen2_lora_adapter_matches_peft(vicuna, family_ggufs, tmp_path):
    """An adapter on every linear layer of the qwen2 model, exported with --lora_path (q/k rows of B
    not permuted, general.architecture=qwen2), applied by the engine at run time and merged at load:
    logits within LOGITS_RTOL of transformers + peft."""
    import torch
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert_gguf

    hf_dir, base = family_ggufs("qwen2_untied")
    torch.manual_seed(1)
    peft_model = get_peft_model(hf_model(hf_dir).__class__.from_pretrained(hf_dir, dtype=torch.float32),
                                LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]))
    peft_model.save_pretrained(str(tmp_path / "lora"))
    out = tmp_path / "lora.gguf"
    assert convert_gguf.main(["--lora_path", str(tmp_path / "lora"), "--model_path", hf_dir, "--base_gguf", base,
                              "--outfile", str(out), "--outtype", "f32", "--no-verify"]) == 0
    kv, _ = read_gguf(str(out))
    assert kv["general.architecture"] == "qwen2"
    ids = prompt_ids(hf_dir)
    ref = convert_gguf.hf_logits(hf_dir, [ids], str(tmp_path / "lora"))[0]
    assert rel_err(ref, hf_logits(hf_model(hf_dir), ids)[-1]) > GUARD_FACTOR * LOGITS_RTOL  # the adapter matters
    for mode in ("runtime", "merge"):
        run([vicuna, "eval", "-m", base, "--ids", ",".join(map(str, ids)), "--dump-logits", tmp_path / "l.bin",
             "--lora", out, "--lora-mode", mode, "-t", "2"])
        got = np.fromfile(tmp_path / "l.bin", dtype="<f4")
        assert rel_err(got, ref) < LOGITS_RTOL, (mode, rel_err(got, ref))


def test_qwen2_tokenizer_of_both_exports_matches_transformers(vicuna, llama_cpp_exports, tmp_path):
    """Qwen2's real vocabulary (pre-tokenizer qwen2), as our converter and llama.cpp's write it: the
    engine's ids equal transformers' Qwen2Tokenizer on 300 mixed strings with its special tokens.
    Not on text in decomposed Unicode: Qwen2Tokenizer NFC-normalizes first, llama.cpp and vicuna do
    not ('e' + U+0301 is two tokens here, one 'é' there)."""
    from test_vicuna_cpp import escape_line, mixed_strings
    from transformers import AutoTokenizer

    hf_dir, theirs, ours = llama_cpp_exports("qwen2_tied")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    texts = mixed_strings(300, 3, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(escape_line(t) for t in texts) + "\n", encoding="utf-8")
    want = [tok(t)["input_ids"] for t in texts]
    for path in (ours, theirs):
        out = run([vicuna, "tokenize", "-m", path, "-f", lines, "--lines"])
        got = [[int(x) for x in line.split()] for line in out.stdout.splitlines()]
        assert len(got) == len(texts)
        bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
        assert not bad, (path, bad[:3])
    decomposed = "cafe\u0301"
    assert tok(decomposed)["input_ids"] == tok("caf\u00e9")["input_ids"]  # transformers' NFC
