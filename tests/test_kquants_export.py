"""K-quant exports: `tools/convert_gguf.py --outtype q4_k_m|q5_k_m|q6_k|q5_0|q5_1` write what llama.cpp's
llama-quantize writes from an f32 export of the same model.

- kquants.py's Q4_K / Q5_K / Q6_K quantizers (and gguf-py's Q5_0 / Q5_1) round-trip through gguf-py's
  dequantizers within a named error budget per type on random data; an all-zero block stays zero.
- A hand-checked super-block has golden bytes per K type (taken once from llama.cpp's
  ggml_quantize_chunk), so bit-exactness is tested without llama.cpp too.
- With llama-cpp-python installed: every block equals ggml_quantize_chunk's (libggml-base, the code
  llama-quantize runs) on random and edge-case rows (zeros, constants, one spike, ties, tiny and huge
  values), and llama_model_quantize on convert_gguf.py's f32 export of tiny random LLaMAs gives the
  same tensor types, general.file_type and byte-identical tensor data as convert_gguf.py's own
  export, for each type: hidden 256 (K-quants used, 4 layers so use_more_bits picks some), tied
  hidden 256, hidden 96 (rows not a multiple of 256: the Q5_0 / Q5_1 / Q8_0 fallbacks) and hidden 48
  (not even of 32: F16).
- The mix for real model shapes, listed by hand from llama-quant.cpp: LLaMA-2-7B (32 layers),
  8 layers, LLaMA-2-70B (80 layers, GQA: attn_v at least Q5_K), LLaMA-65B (80 layers, no GQA).
- A K-quant export of a merged folder whose base sits on the Q4_K grid warns that the fine-tune is
  mostly lost (lora_kept); on a random base it does not.
- An adapter export refuses the K types in one line.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import shutil
import sys

import numpy as np
import pytest

from conftest import ROOT, _sp_tokenizer_dir

sys.path.insert(0, os.path.join(ROOT, "tools"))

import convert_gguf  # noqa: E402
import kquants  # noqa: E402

KTYPES = ("Q4_K", "Q5_K", "Q6_K")
OUTTYPES = ("q4_k_m", "q5_k_m", "q6_k", "q5_0", "q5_1")
# Relative RMS error of quantize -> dequantize on the standard normal data below (measured: Q4_K
# 0.0714, Q5_K 0.0364, Q6_K 0.0178, Q5_0 0.0428, Q5_1 0.0381)
RMS_BUDGET = {"Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02, "Q5_0": 0.05, "Q5_1": 0.045}

# One super-block, x[i] = ((37 i) mod 64 - 32) / 32 with values 32..63 set to 0, and its bytes as
# llama.cpp's ggml_quantize_chunk (llama-cpp-python 0.3.36, libggml-base) wrote them; generated once
# and checked by hand: the zero sub-block has scale 0 and min 0 in Q4_K / Q5_K (scales byte 1 is 0xc0:
# its 6 low bits, sub-block 1's scale, are 0; the top 2 bits belong to sub-block 5) and int8 scales
# 0, 0 (sub-blocks 2, 3) in Q6_K, whose d is negative (-max|scale| / 128, the largest sub-block
# stored as -128); dequantized, the zeros come back exactly 0.
GOLDEN_X = (((np.arange(256) * 37) % 64 - 32) / 32).astype(np.float32)
GOLDEN_X[32:64] = 0
GOLDEN_HEX = {
    "Q4_K": "4d18fc23ffc0fffcffc0fffdffdcffdc0009020b050d070109030c050e08010a040c060f08020b040d070009030b050e8019a23b"
            "d56df78129b34cd57e08912ac45ce67f18a23bc46df78019b34bd56e8019a23bd56df78129b34cd57e08912ac45ce67f18a23bc4"
            "6df78019b34bd56e8019a23bd56df78129b34cd57e08912ac45ce67f18a23bc46df78019b34bd56e",
    "Q5_K": "16140624ffc0fffeffc0fffeffeeffeea855a855a855a8a855a855a85555a855a855a85555a855a855a8a855a855a85500020507"
            "0a0c0f010406090b0e000305080a0d0f020407090c0e010306080b0d00225577aaccff11446699bbee00335588aaddff22447799"
            "ccee11336688bbdd00225577aaccff11446699bbee00335588aaddff22447799ccee11336688bbdd00225577aaccff11446699bb"
            "ee00335588aaddff22447799ccee11336688bbdd",
    "Q6_K": "0055aaff4499ee3388dd2277cc1166bb00bb6611cc7722dd8833ee9944ffaa550050a0f04090e03080d02070c01060b0e0c03010"
            "f06040b09000e0c0301080600055aaff4499ee3388dd2277cc1166bb00bb6611cc7722dd8833ee9944ffaa550055aaff4499ee33"
            "88dd2277cc1166bbeecc3311ff6644bb9900eecc3311886680228022d173d180228073d17322802233802280d173d122802273d1"
            "73c0228088228822dd77dd88228877dd7722882233882288dd77dd22882277dd77cc2288807f0000807f8073807f8073807f8073"
            "008c",
}


def qtype(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


def raw(data) -> np.ndarray:
    return np.asarray(data).reshape(-1).view(np.uint8)


# --- quantizers without llama.cpp ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RMS_BUDGET))
def test_round_trip_within_budget(name):
    import gguf

    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 1024)).astype(np.float32)
    x[0, :256] = 0  # an all-zero block comes back exactly zero
    q = kquants.quantize(x, qtype(name))
    bs, ts = gguf.GGML_QUANT_SIZES[qtype(name)]
    assert q.shape == (32, 1024 // bs * ts) and q.dtype == np.uint8
    y = gguf.quants.dequantize(q, qtype(name))
    assert y.shape == x.shape and np.all(y[0, :256] == 0)
    rms = float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2)))
    assert rms < RMS_BUDGET[name], (name, rms)
    assert rms > RMS_BUDGET[name] / 3, (name, rms)  # and it is that type's grid, not a finer one


@pytest.mark.parametrize("name", KTYPES)
def test_hand_checked_block_matches_llama_cpp_bytes(name):
    import gguf

    got = raw(kquants.quantize(GOLDEN_X.reshape(1, 256), qtype(name)))
    assert got.tobytes().hex() == GOLDEN_HEX[name]
    y = gguf.quants.dequantize(got.reshape(1, -1), qtype(name))[0]
    assert np.all(y[32:64] == 0) and np.abs(y - GOLDEN_X).max() < 0.07


def test_k_quant_rows_must_split_into_super_blocks():
    with pytest.raises(ValueError, match="blocks of 256"):
        kquants.quantize(np.zeros((2, 96), np.float32), qtype("Q4_K"))


# --- the per-tensor mix ----------------------------------------------------------------------------


def hparams(n_layer: int, n_embd: int = 4096, n_head: int = 32, n_head_kv: int = 32, n_ff: int = 11008):
    return convert_gguf.HParams(n_vocab=32000, n_embd=n_embd, n_layer=n_layer, n_ff=n_ff, n_head=n_head,
                                n_head_kv=n_head_kv, head_dim=n_embd // n_head, n_ctx=4096, rope_theta=1e4,
                                rope_scaling=None, rms_eps=1e-5, tied=False, name="m")


def layer_types(outtype: str, hp, tensor: str) -> list[str]:
    kv = hp.n_embd // hp.n_head * hp.n_head_kv
    shape = {"attn_v": (kv, hp.n_embd), "ffn_down": (hp.n_embd, hp.n_ff), "attn_q": (hp.n_embd, hp.n_embd)}[tensor]
    return [convert_gguf.pick_type(f"blk.{i}.{tensor}.weight", shape, outtype, False, hp).name
            for i in range(hp.n_layer)]


def test_mix_matches_llama_quant_rules():
    # LLaMA-2-7B, 32 layers: 6 bits on layers 0-3, 28-31 and 6, 9, ..., 27 ((i - 4) % 3 == 2)
    hp = hparams(32)
    more = {0, 1, 2, 3, 28, 29, 30, 31} | set(range(6, 28, 3))
    for outtype, base in (("q4_k_m", "Q4_K"), ("q5_k_m", "Q5_K")):
        for tensor in ("attn_v", "ffn_down"):
            assert layer_types(outtype, hp, tensor) == ["Q6_K" if i in more else base for i in range(32)]
        assert set(layer_types(outtype, hp, "attn_q")) == {base}
        assert convert_gguf.pick_type("output.weight", (32000, 4096), outtype, False, hp).name == "Q6_K"
        assert convert_gguf.pick_type("token_embd.weight", (32000, 4096), outtype, False, hp).name == base
        assert convert_gguf.pick_type("token_embd.weight", (32000, 4096), outtype, True, hp).name == "Q6_K"
        assert convert_gguf.pick_type("blk.0.attn_norm.weight", (4096,), outtype, False, hp).name == "F32"
    assert set(layer_types("q6_k", hp, "attn_v") + layer_types("q6_k", hp, "ffn_down")) == {"Q6_K"}
    # 8 layers: the first and last, and 3, 6
    assert layer_types("q4_k_m", hparams(8), "ffn_down") == ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K",
                                                             "Q6_K", "Q6_K"]
    # LLaMA-2-70B (80 layers, 8 KV heads): attn_v never below Q5_K; LLaMA-65B (no GQA) keeps Q4_K
    v70 = layer_types("q4_k_m", hparams(80, 8192, 64, 8, 28672), "attn_v")
    assert set(v70) == {"Q5_K", "Q6_K"} and v70[10] == "Q5_K"
    assert "Q4_K" in layer_types("q4_k_m", hparams(80, 8192, 64, 64, 22016), "attn_v")
    assert set(layer_types("q5_k_m", hparams(80, 8192, 64, 8, 28672), "attn_v")) == {"Q5_K", "Q6_K"}
    # q5_0 / q5_1: one type, output Q6_K; rows not a multiple of 256 / 32 fall back
    for outtype in ("q5_0", "q5_1"):
        assert set(layer_types(outtype, hp, "ffn_down")) == {outtype.upper()}
        assert convert_gguf.pick_type("output.weight", (32000, 4096), outtype, False, hp).name == "Q6_K"
        assert convert_gguf.pick_type("output.weight", (49152, 576), outtype, True, hp).name == "Q8_0"
    fallbacks = {"q4_k_m": "Q5_0", "q5_k_m": "Q5_1", "q6_k": "Q8_0"}
    for outtype, fallback in fallbacks.items():
        assert convert_gguf.pick_type("blk.5.attn_q.weight", (576, 576), outtype, True, hp).name == fallback
        assert convert_gguf.pick_type("blk.5.attn_q.weight", (48, 48), outtype, True, hp).name == "F16"
        assert convert_gguf.pick_type("token_embd.weight", (49152, 576), outtype, True, hp).name == "Q8_0"
    assert convert_gguf.pick_type("blk.0.attn_v.weight", (64, 576), "q4_k_m", True, hp).name == "Q8_0"  # Q6_K's
    # q8_0 keeps its output at Q8_0 as llama.cpp does; q4_0 / q4_1 too (our documented departure: Q6_K there)
    for outtype in ("q8_0", "q4_0", "q4_1"):
        assert convert_gguf.pick_type("output.weight", (32000, 4096), outtype, False, hp).name == "Q8_0"
        assert set(layer_types(outtype, hp, "attn_v")) == {outtype.upper()}


# --- exports -----------------------------------------------------------------------------------------


def make_llama(out_dir: str, tokenizer_dir: str, hidden: int, n_layer: int, tied: bool = False, seed: int = 0,
               base_weights: dict | None = None) -> str:
    """A random LlamaForCausalLM (4 heads, 2 KV heads, ffn = hidden) saved with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden,
                         num_hidden_layers=n_layer, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if base_weights:
        with torch.no_grad():
            for name, value in base_weights.items():
                model.get_parameter(name).copy_(torch.from_numpy(value))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("kquants")


@pytest.fixture(scope="module")
def tokenizer_dir(work):
    return _sp_tokenizer_dir(str(work))


MODELS = {"h256": (256, 4, False), "h256-tied": (256, 2, True), "h96": (96, 2, False), "h48": (48, 2, False)}


@pytest.fixture(scope="module")
def models(work, tokenizer_dir):
    return {name: make_llama(str(work / name), tokenizer_dir, *spec) for name, spec in MODELS.items()}


def ggml_base():
    """libggml-base from llama-cpp-python (found without importing the package), or skip."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None:
        pytest.skip("llama-cpp-python is not installed: no llama.cpp to compare the blocks with")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "lib", "libggml-base.so")
    if not os.path.isfile(path):
        pytest.skip(f"llama-cpp-python has no {path}")
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError as e:  # not installed, or a dependency of its high-level API is missing
        pytest.skip(f"llama_cpp (llama-cpp-python) is not importable ({e}): no llama-quantize to compare with")
    return llama_cpp


def edge_rows(rng, n: int) -> np.ndarray:
    rows = [rng.standard_normal((16, n)), rng.standard_normal((4, n)) * 1e-3, rng.standard_normal((4, n)) * 1e4,
            rng.uniform(0, 1, (4, n)), -rng.uniform(0, 1, (4, n)),  # one sign: the min clamps to 0
            np.round(rng.standard_normal((4, n)) * 4) / 4,  # halves everywhere: nearest_int's ties
            rng.integers(-8, 8, (4, n)).astype(float), rng.standard_t(2, (4, n)),  # heavy tails
            np.full((2, n), 0.37), np.zeros((2, n)), rng.standard_normal((2, n)) * 1e-20,
            rng.standard_normal((2, n)) * 1e-40]  # subnormal
    holes = rng.standard_normal((4, n))
    holes[:, ::3] = 0
    holes[:2, :256] = 0
    holes[2:, 40:72] = 1.5  # a constant sub-block
    spikes = np.zeros((4, n))
    spikes[np.arange(4), rng.integers(0, n, 4)] = 10 * rng.standard_normal(4)
    return np.concatenate(rows + [holes, spikes]).astype(np.float32)


@pytest.mark.parametrize("name", KTYPES + ("Q5_0", "Q5_1", "Q8_0"))
def test_blocks_match_ggml_quantize_chunk(name):
    import gguf

    lib = ggml_base()
    x = edge_rows(np.random.default_rng(1), 1024)
    want = np.zeros(x.size // gguf.GGML_QUANT_SIZES[qtype(name)][0] * gguf.GGML_QUANT_SIZES[qtype(name)][1], np.uint8)
    lib.ggml_quantize_chunk(int(qtype(name)), x.ctypes.data, want.ctypes.data, 0, x.shape[0], x.shape[1], None)
    with np.errstate(all="ignore"):
        got = raw(kquants.quantize(x, qtype(name)))
    ts = gguf.GGML_QUANT_SIZES[qtype(name)][1]
    bad = np.nonzero((got.reshape(-1, ts) != want.reshape(-1, ts)).any(axis=1))[0]
    assert len(bad) == 0, f"{name}: {len(bad)} blocks differ, first {bad[:5]}"


def gguf_tensors(path: str) -> tuple[int, dict]:
    import gguf

    reader = gguf.GGUFReader(path)
    return (int(reader.fields["general.file_type"].contents()),
            {t.name: (t.tensor_type.name, raw(t.data)) for t in reader.tensors})


@pytest.mark.parametrize("model", list(MODELS))
def test_export_equals_llama_quantize(models, work, model):
    llama_cpp = llama_cpp_module()
    f32 = str(work / f"{model}.f32.gguf")
    convert_gguf.convert(models[model], f32, "f32", overwrite=True)
    for outtype in OUTTYPES:
        ref = str(work / f"{model}.{outtype}.llama-quantize.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}")
        params.nthread = 1
        assert llama_cpp.llama_model_quantize(f32.encode(), ref.encode(), params) == 0, outtype
        ours = str(work / f"{model}.{outtype}.gguf")
        convert_gguf.convert(models[model], ours, outtype, overwrite=True)
        ref_type, want = gguf_tensors(ref)
        our_type, got = gguf_tensors(ours)
        assert our_type == ref_type == int(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}"))
        assert sorted(got) == sorted(want), outtype
        types = {n: t for n, (t, _) in got.items()}
        assert types == {n: t for n, (t, _) in want.items()}, outtype
        differ = [n for n in want if not np.array_equal(got[n][1], want[n][1])]
        assert not differ, (outtype, differ)
        if model == "h256" and outtype in ("q4_k_m", "q5_k_m"):  # the mix is really exercised
            k = outtype[:2].upper() + "_K"
            assert [types[f"blk.{i}.ffn_down.weight"] for i in range(4)] == [k, k, "Q6_K", "Q6_K"]
            assert types["output.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == k
        if model == "h256-tied":
            assert types["token_embd.weight"] == "Q6_K" and "output.weight" not in types
        if model == "h96" and outtype == "q4_k_m":
            assert types["blk.0.attn_q.weight"] == "Q5_0" and types["blk.1.ffn_down.weight"] == "Q8_0"
        if model == "h48":
            assert types["blk.0.attn_q.weight"] == "F16"


def test_cli_writes_k_quants_and_verifies(models, work, capsys):
    out = str(work / "cli.q4_k_m.gguf")
    assert convert_gguf.main(["--model_path", models["h256"], "--outfile", out, "--outtype", "q4_k_m",
                              "--verify"]) == 0
    report = capsys.readouterr().out
    assert "top-1 agreement" in report and "tokenizer: 6/6" in report, report
    file_type, tensors = gguf_tensors(out)
    assert file_type == 15 and tensors["blk.0.attn_k.weight"][0] == "Q4_K"


def merged_folder(work, tokenizer_dir, name: str, base: str, delta_scale: float) -> str:
    """A "merged" copy of `base` with a small change to every q_proj, and the training_config.json
    tools/merge_lora.py writes (merged_from names the base)."""
    from safetensors.numpy import load_file, save_file

    folder = str(work / name)
    shutil.copytree(base, folder)
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    rng = np.random.default_rng(3)
    for key in state:
        if key.endswith("q_proj.weight"):
            state[key] = state[key] + delta_scale * rng.standard_normal(state[key].shape).astype(np.float32)
    save_file(state, path, metadata={"format": "pt"})
    with open(os.path.join(folder, "training_config.json"), "w") as f:
        json.dump({"merged_from": {"base_model": base, "lora_path": "lora-x"}}, f)
    return folder


def test_lora_kept_for_k_quants(work, tokenizer_dir, models, caplog):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    # a base whose q_proj weights sit on the Q4_K grid (as if dequantized from a Q4_K_M file)
    model = AutoModelForCausalLM.from_pretrained(models["h256"], dtype=torch.float32)
    on_grid = {}
    for name, p in model.named_parameters():
        if name.endswith("q_proj.weight"):
            w = p.detach().numpy()
            on_grid[name] = gguf.quants.dequantize(kquants.quantize(w, qtype("Q4_K")), qtype("Q4_K"))
    grid_base = make_llama(str(work / "grid-base"), tokenizer_dir, 256, 4, base_weights=on_grid)
    merged = merged_folder(work, tokenizer_dir, "grid-merged", grid_base, 1e-4)
    with caplog.at_level(logging.WARNING):
        info = convert_gguf.convert(merged, str(work / "grid-merged.q4_k_m.gguf"), "q4_k_m")
    assert info["lora_kept"] < convert_gguf.LORA_KEPT_WARN
    assert any("keeps only" in r.getMessage() and "q4_k_m" in r.getMessage() for r in caplog.records)
    caplog.clear()
    random_merged = merged_folder(work, tokenizer_dir, "random-merged", models["h256"], 1e-4)
    with caplog.at_level(logging.WARNING):
        info = convert_gguf.convert(random_merged, str(work / "random-merged.q6_k.gguf"), "q6_k")
    assert info["lora_kept"] > 0.9  # a random base is on no grid: the change survives
    assert not any("keeps only" in r.getMessage() for r in caplog.records)


def test_adapter_export_refuses_k_quants(work, capsys):
    for outtype in ("q4_k_m", "q6_k", "q5_0"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            convert_gguf.main(["--lora_path", str(work / "no-adapter"), "--outfile", str(work / "a.gguf"),
                               "--outtype", outtype])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --outtype {outtype}: an adapter is written as"), err
