"""vicuna.cpp, the C++ CPU engine (tools/vicuna.cpp), against Python references.

The engine is built once per session: the release binary with `make cpp`, and test.cpp (which
includes the engine) with ASan + UBSan for the unit tests, the corrupt-file tests and the fuzz
loop. Everything is skipped cleanly when cmake or a C++ compiler is missing.

GGUF files are written here with gguf-py's GGUFWriter from Hugging Face folders (a minimal
converter: f32 tensors, q/k rows permuted as llama.cpp's convert_hf_to_gguf does, tokenizer from
tokenizer.json or the SentencePiece model), so these tests do not depend on tools/convert_gguf.py.

References:
- tokenizer ids: the HF tokenizer (AutoTokenizer) of the same folder, on a few hundred
  deterministic mixed Chinese/English strings, for byte-level BPE (SmolLM2) and SentencePiece;
- logits: transformers on the same weights, final position, within 1e-3 relative for f32 files
  (tiny random LLaMA and the embedded SmolLM2), and greedy generation token for token;
- quantized blocks: gguf-py's gguf.quants.quantize, byte for byte.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import subprocess

import numpy as np
import pytest

from conftest import NEEDS_CPP, ROOT

VDIR = os.path.join(ROOT, "tools", "vicuna.cpp")
ASAN_BUILD = os.path.join(VDIR, "build-asan")

pytestmark = NEEDS_CPP

# relative tolerance of final-position logits against transformers, f32 files
LOGITS_RTOL = 1e-3
# the shipped Q4_1 file against transformers on its dequantized weights: int8 activations in
# the engine's dot products cost accuracy (measured 2e-2 to 3.5e-2), so a loose bound plus top-1
Q4_1_RTOL = 6e-2
# perplexity of quantized files relative to f32 (issue 4: q8_0 within 1 %). The only real f32
# model at hand is the embedded SmolLM2 dequantized from its Q4_1 file, so q4_1 lands back on
# the same grid (measured x0.99) while q4_0 re-grids Q4_1 values (measured x1.39 on these 3
# chunks of 128 tokens, x1.33 on 4 of 256); llama.cpp's +4 % for q4_0 is for 7B models quantized
# from f16.
PPL_Q8_0_MAX_RATIO = 1.01
PPL_Q4_1_MAX_RATIO = 1.10
PPL_Q4_0_MAX_RATIO = 1.60


# ---------------------------------------------------------------------------------------------
# build


@pytest.fixture(scope="session")
def vicuna_builds():
    """(release vicuna, ASan+UBSan vicuna-test), compiled in parallel once per session."""
    release = subprocess.Popen(["make", "--no-print-directory", "cpp"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    asan_cmd = (f"cmake -S {VDIR} -B {ASAN_BUILD} -DCMAKE_BUILD_TYPE=Debug -DVICUNA_SANITIZE=ON > /dev/null && "
                f"cmake --build {ASAN_BUILD} --target vicuna-test")
    asan = subprocess.Popen(asan_cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_r, _ = release.communicate(timeout=600)
    out_a, _ = asan.communicate(timeout=600)
    if release.returncode != 0:
        pytest.fail(f"make cpp failed:\n{out_r[-4000:]}")
    if asan.returncode != 0:
        pytest.fail(f"sanitizer build failed:\n{out_a[-4000:]}")
    return os.path.join(VDIR, "build", "vicuna"), os.path.join(ASAN_BUILD, "vicuna-test")


@pytest.fixture(scope="session")
def vicuna(vicuna_builds):
    return vicuna_builds[0]


@pytest.fixture(scope="session")
def vicuna_asan(vicuna_builds):
    return vicuna_builds[1]


def run(cmd, *, stdin=None, timeout=300, check=True):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n"
                             f"{proc.stderr.decode(errors='replace')[-3000:]}")
    return proc


# ---------------------------------------------------------------------------------------------
# a minimal HF -> GGUF (f32) writer


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k permutation: HF rotates halves of a head, GGUF adjacent pairs."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _tokenizer_kvs(model_dir: str) -> list[tuple]:
    import gguf
    from transformers import AutoTokenizer

    T = gguf.GGUFValueType
    tok = AutoTokenizer.from_pretrained(model_dir)
    tj = json.loads(tok.backend_tokenizer.to_str())
    kvs = []
    sp_path = None
    for cand in (os.path.join(model_dir, "tokenizer.model"),
                 os.path.join(os.path.dirname(model_dir), "sp-raw", "tokenizer.model")):  # conftest's
        if os.path.isfile(cand):
            sp_path = cand
            break
    if tj["model"].get("byte_fallback"):
        import sentencepiece as spm

        assert sp_path, "a SentencePiece tokenizer needs its tokenizer.model"
        sp = spm.SentencePieceProcessor(model_file=sp_path)
        n = sp.get_piece_size()
        tokens = [sp.id_to_piece(i) for i in range(n)]
        scores = [sp.get_score(i) for i in range(n)]
        types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                 else 5 if sp.is_unused(i) else 1 for i in range(n)]
        kvs += [("tokenizer.ggml.model", "llama", T.STRING, None),
                ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
                ("tokenizer.ggml.scores", scores, T.ARRAY, T.FLOAT32),
                ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
                ("tokenizer.ggml.add_bos_token", True, T.BOOL, None),
                ("tokenizer.ggml.add_space_prefix", True, T.BOOL, None)]
        pre = tj.get("pre_tokenizer") or {}
        if pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "first":
            # transformers' Metaspace: no U+2581 in front of text that starts with a space
            # (SentencePiece, and the engine by default, add one anyway)
            kvs.append(("vicuna.tokenizer.prepend_scheme", "first", T.STRING, None))
    else:
        vocab = tj["model"]["vocab"]
        added = {a["id"]: a for a in tj["added_tokens"]}
        n = len(tok)
        tokens = [""] * n
        for piece, i in vocab.items():
            tokens[i] = piece
        for i, a in added.items():
            tokens[i] = a["content"]
        types = [(3 if added[i]["special"] else 4) if i in added else 1 for i in range(n)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
        kvs += [("tokenizer.ggml.model", "gpt2", T.STRING, None),
                ("tokenizer.ggml.pre", "smollm", T.STRING, None),
                ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
                ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
                ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING),
                ("tokenizer.ggml.add_bos_token", False, T.BOOL, None)]
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{name}_token_id")
        key = "unknown" if name == "unk" else "padding" if name == "pad" else name
        if tid is not None:
            kvs.append((f"tokenizer.ggml.{key}_token_id", tid, T.UINT32, None))
    return kvs


def gguf_spec(model_dir: str) -> dict:
    """Metadata and f32 tensors of a HF LLaMA folder, in GGUF names; tests may edit it."""
    import gguf
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    T = gguf.GGUFValueType
    cfg = AutoConfig.from_pretrained(model_dir)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    theta = getattr(cfg, "rope_theta", None) or (cfg.rope_parameters or {}).get("rope_theta", 10000.0)
    kvs = [("llama.context_length", cfg.max_position_embeddings, T.UINT32, None),
           ("llama.embedding_length", cfg.hidden_size, T.UINT32, None),
           ("llama.block_count", cfg.num_hidden_layers, T.UINT32, None),
           ("llama.feed_forward_length", cfg.intermediate_size, T.UINT32, None),
           ("llama.attention.head_count", n_head, T.UINT32, None),
           ("llama.attention.head_count_kv", n_kv, T.UINT32, None),
           ("llama.rope.dimension_count", head_dim, T.UINT32, None),
           ("llama.rope.freq_base", float(theta), T.FLOAT32, None),
           ("llama.attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps), T.FLOAT32, None),
           ("general.file_type", 0, T.UINT32, None)] + _tokenizer_kvs(model_dir)
    sd = {}
    for f in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        sd.update(load_file(f))
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"].to(torch.float32).numpy()
            if gg == "attn_q":
                w = _permute(w, n_head)
            elif gg == "attn_k":
                w = _permute(w, n_kv)
            tensors[f"blk.{i}.{gg}.weight"] = w
    tensors["output_norm.weight"] = sd["model.norm.weight"]
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    tensors = {k: (v.to(torch.float32).numpy() if hasattr(v, "numpy") else v) for k, v in tensors.items()}
    return {"arch": "llama", "kvs": kvs, "tensors": tensors}


def write_gguf(path: str, spec: dict) -> str:
    import gguf

    w = gguf.GGUFWriter(path, spec["arch"])
    for key, val, vtype, sub in spec["kvs"]:
        w.add_key_value(key, val, vtype, sub)
    for name, t in spec["tensors"].items():
        if isinstance(t, tuple):  # (raw bytes, shape, GGMLQuantizationType)
            w.add_tensor(name, t[0], raw_shape=t[1], raw_dtype=t[2])
        else:
            w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_ggufs(tiny_models, tmp_path_factory):
    """{"bpe": (hf_dir, f32.gguf), "sp": (hf_dir, f32.gguf)} for conftest's tiny random LLaMAs."""
    root = tmp_path_factory.mktemp("vicuna-gguf")
    return {kind: (d, write_gguf(str(root / f"tiny-{kind}.f32.gguf"), gguf_spec(d))) for kind, d in tiny_models.items()}


@pytest.fixture(scope="session")
def embedded_f32_gguf(embedded_path, tmp_path_factory):
    return write_gguf(str(tmp_path_factory.mktemp("vicuna-embedded") / "smollm2-135m.f32.gguf"),
                      gguf_spec(embedded_path))


@pytest.fixture(scope="session")
def embedded_q4_1():
    from models import embedded_gguf_path

    return embedded_gguf_path()


_HF_MODELS = {}


def hf_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    if model_dir not in _HF_MODELS:
        torch.manual_seed(0)
        _HF_MODELS[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _HF_MODELS[model_dir]


def hf_last_logits(model_dir: str, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(model_dir)(torch.tensor([ids])).logits[0, -1].numpy()


def assert_greedy_matches_hf(model_dir: str, ids: list[int], generated: list[int]):
    """Our greedy tokens are HF's greedy tokens: with teacher forcing, HF's argmax after every
    prefix is the token we generated next (one forward pass instead of one per token)."""
    import torch

    with torch.no_grad():
        logits = hf_model(model_dir)(torch.tensor([ids + generated])).logits[0]
    hf_next = logits[len(ids) - 1:len(ids) - 1 + len(generated)].argmax(-1).tolist()
    assert generated == hf_next, f"ours {generated}\nhf   {hf_next}"


def vicuna_logits(vicuna, gguf_path, ids, tmp_path) -> np.ndarray:
    out = tmp_path / "logits.bin"
    run([vicuna, "eval", "-m", gguf_path, "--ids", ",".join(map(str, ids)), "--dump-logits", out])
    return np.fromfile(out, dtype="<f4")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------------------------
# unit tests (C++), under ASan/UBSan


@pytest.mark.parametrize("scalar", [False, True], ids=["optimized", "scalar"])
def test_unit_on_optimized_builds(scalar, tmp_path_factory):
    """The same unit test on -O3 builds, the SIMD one and -DVICUNA_SCALAR=ON: the compiler's
    vectorizer once turned the portable Q4_0 kernel into wrong sums at -O2 and above, which the
    -O0 sanitizer build cannot see."""
    build = str(tmp_path_factory.mktemp("scalar-build" if scalar else "release-build"))
    cmd = (f"cmake -S {VDIR} -B {build} -DCMAKE_BUILD_TYPE=Release -DVICUNA_SCALAR={'ON' if scalar else 'OFF'} "
           f"> /dev/null && cmake --build {build} --target vicuna-test -j 2 > /dev/null")
    subprocess.run(cmd, shell=True, check=True, timeout=600)
    proc = run([os.path.join(build, "vicuna-test"), "unit"], timeout=120, check=False)
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0 and "0 failure(s)" in out, out[-3000:]


def test_unit_under_sanitizers(vicuna_asan):
    proc = run([vicuna_asan, "unit"], timeout=120, check=False)
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, out
    assert "0 failure(s)" in out


# ---------------------------------------------------------------------------------------------
# tokenizer: token ids identical to HF on mixed Chinese/English text

EN = ["Hello", "world", "the quick brown fox", "don't", "I'M", "we'll", "it's", "They'RE", "LoRA", "fine-tuning",
      "GPU", "3.14159", "2024", "12345678", "x", "vicuna.cpp", "e-mail: a@b.com", "(parenthesis)", "[1, 2, 3]",
      "{'k': 'v'}", "#include <stdio.h>", "naïve café", "Ünïcödé", "snake_case_name", "CamelCase", "ALL CAPS",
      "https://example.com/a?b=c", "C++17", "$100", "50%", "a", "Instruction", "### Response:"]
ZH = ["你好", "世界", "我们的模型会用中文回答问题", "今天天气很好。", "小羊驼", "请把这句话翻译成英文：", "数学题：3+5=8",
      "《红楼梦》", "“引号”", "，", "。", "！", "？", "、", "中文English混合", "１２３", "ｆｕｌｌｗｉｄｔｈ", "羊驼",
      "机器学习", "深度神经网络", "一二三", "繁體中文", "龍"]
OTHER = ["🦙", "😀👍", "こんにちは", "안녕하세요", "Привет", "مرحبا", "नमस्ते", "½ ² ³", "\u00a0", "\u3000", "é", "ß",
         "Ⅻ", "\u200b", "x\u0301", "\U0001f600"]
SEP = ["", "", " ", " ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\r\n", " . ", ", ", "'s ", "!!! ", "...", " 1 ",
       "2", "  3"]
EDGE = ["", " ", "  ", "\n", "a", " a", "a ", "  a  b  ", "\n\n\n", " \t\n", "'", "''s", "1 2  3   4"]


def mixed_strings(n: int, seed: int, specials: list[str]) -> list[str]:
    rng = random.Random(seed)
    out = list(EDGE)
    while len(out) < n:
        s = rng.choice(["", " ", "  ", "\n"]) if rng.random() < 0.2 else ""
        for _ in range(rng.randint(1, 8)):
            pool = rng.choice([EN, EN, ZH, ZH, OTHER])
            s += rng.choice(pool) + rng.choice(SEP)
        if specials and rng.random() < 0.15:
            k = rng.randrange(len(s) + 1)
            s = s[:k] + rng.choice(specials) + s[k:]
        out.append(s)
    return out


def escape_line(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_tokenizer_matches_hf(vicuna, tiny_ggufs, kind, tmp_path):
    from transformers import AutoTokenizer

    hf_dir, path = tiny_ggufs[kind]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    specials = [t for t in tok.all_special_tokens]
    texts = mixed_strings(300, seed=1234, specials=specials)
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(escape_line(s) for s in texts) + "\n", encoding="utf-8")
    got = run([vicuna, "tokenize", "-m", path, "-f", lines, "--lines"]).stdout.decode().split("\n")[:len(texts)]
    bad = []
    for text, line in zip(texts, got):
        ours = [int(x) for x in line.split()]
        ref = tok(text)["input_ids"]
        if ours != ref:
            bad.append(f"{text!r}:\n  ours {ours}\n  hf   {ref}")
    assert not bad, f"{len(bad)} of {len(texts)} strings differ, e.g.\n" + "\n".join(bad[:5])


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def test_llama3_pretokenizer_matches_hf(vicuna, tiny_ggufs, tmp_path):
    """LLaMA-3's regex and ignore_merges (tokenizer.ggml.pre = "llama-bpe") on SmolLM2's vocabulary
    and merges, against the `tokenizers` library running the same regex."""
    import gguf
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from transformers import AutoTokenizer

    hf_dir = tiny_ggufs["bpe"][0]
    tj = json.loads(AutoTokenizer.from_pretrained(hf_dir).backend_tokenizer.to_str())
    tj["model"]["ignore_merges"] = True  # LLaMA-3's tokenizer.json has it; llama.cpp sets it for llama-bpe
    ref = Tokenizer.from_str(json.dumps(tj))
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    T = gguf.GGUFValueType
    kvs = [kv for kv in _tokenizer_kvs(hf_dir) if kv[0] != "tokenizer.ggml.pre"]
    spec = {"arch": "llama", "kvs": kvs + [("tokenizer.ggml.pre", "llama-bpe", T.STRING, None)], "tensors": {}}
    path = write_gguf(str(tmp_path / "llama3-tok.gguf"), spec)
    texts = mixed_strings(300, seed=99, specials=[])
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(escape_line(s) for s in texts) + "\n", encoding="utf-8")
    got = run([vicuna, "tokenize", "-m", path, "-f", lines, "--lines"]).stdout.decode().split("\n")[:len(texts)]
    bad = [f"{t!r}: ours {line} hf {ref.encode(t).ids}" for t, line in zip(texts, got)
           if [int(x) for x in line.split()] != ref.encode(t).ids]
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g.\n" + "\n".join(bad[:5])


@pytest.mark.parametrize("kind", ["bpe", "sp"])
@pytest.mark.parametrize("prompt_type", ["instruct", "chat"])
def test_prompt_templates_match_prompt_py(vicuna, tiny_ggufs, kind, prompt_type):
    from prompt import Conversation, build_prompt_ids
    from transformers import AutoTokenizer

    hf_dir, path = tiny_ggufs[kind]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    for text in ["Translate to English: 我们的模型", "  two  spaces\nand a newline  "]:
        ours = run([vicuna, "tokenize", "-m", path, "-p", text, "--prompt-type", prompt_type]).stdout.split()
        ref = build_prompt_ids(prompt_type, Conversation(turns=[(text, None)]), tok)
        assert [int(x) for x in ours] == ref


# ---------------------------------------------------------------------------------------------
# logits and greedy generation against transformers

PROMPTS = ["Hello, my name is", "你好，请介绍一下你自己。", "The capital of France is Paris. The capital of Germany"]


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_tiny_f32_logits_and_greedy_match_transformers(vicuna, tiny_ggufs, kind, tmp_path):
    from transformers import AutoTokenizer

    hf_dir, path = tiny_ggufs[kind]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        ours = vicuna_logits(vicuna, path, ids, tmp_path)
        ref = hf_last_logits(hf_dir, ids)
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) < LOGITS_RTOL, (text, rel_err(ours, ref))
    ids = tok(PROMPTS[0])["input_ids"]
    out = run([vicuna, "run", "-m", path, "--ids", ",".join(map(str, ids)), "-n", "32", "--temp", "0",
               "--repeat-penalty", "1", "--ignore-eos", "--print-ids", "-c", "128", "-t", "2"])
    generated = [int(x) for x in out.stdout.split()]
    assert len(generated) == 32
    assert_greedy_matches_hf(hf_dir, ids, generated)


def test_embedded_f32_logits_and_greedy_match_transformers(vicuna, embedded_f32_gguf, embedded_path, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_path)
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        err = rel_err(vicuna_logits(vicuna, embedded_f32_gguf, ids, tmp_path), hf_last_logits(embedded_path, ids))
        assert err < LOGITS_RTOL, (text, err)
    ids = tok(PROMPTS[2])["input_ids"]
    out = run([vicuna, "run", "-m", embedded_f32_gguf, "--ids", ",".join(map(str, ids)), "-n", "32", "--temp", "0",
               "--repeat-penalty", "1", "--ignore-eos", "--print-ids", "-c", "128"])
    generated = [int(x) for x in out.stdout.split()]
    assert len(generated) == 32
    assert_greedy_matches_hf(embedded_path, ids, generated)


def test_shipped_q4_1_matches_transformers_top1(vicuna, embedded_q4_1, embedded_path, tmp_path):
    """The shipped Q4_1/Q8_0/F32 file as is, against transformers on its dequantized weights."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_path)
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        ours, ref = vicuna_logits(vicuna, embedded_q4_1, ids, tmp_path), hf_last_logits(embedded_path, ids)
        assert int(ours.argmax()) == int(ref.argmax()), text
        assert rel_err(ours, ref) < Q4_1_RTOL, (text, rel_err(ours, ref))


# ---------------------------------------------------------------------------------------------
# quantize: bit-identical blocks, valid files, perplexity


@pytest.mark.parametrize("qtype,pure", [("q8_0", False), ("q4_0", False), ("q4_1", False), ("q4_0", True)])
def test_quantize_matches_gguf_py(vicuna, tiny_ggufs, qtype, pure, tmp_path):
    """Every block byte-identical to gguf-py's quantizer; the classifier stays q8_0 for 4-bit
    types (as llama.cpp keeps it at 6+ bits) unless --pure."""
    import gguf

    src = tiny_ggufs["sp"][1]
    out = str(tmp_path / f"tiny.{qtype}.gguf")
    run([vicuna, "quantize", src, out, qtype] + (["--pure"] if pure else []))
    target = gguf.GGMLQuantizationType[qtype.upper()]
    ref = {t.name: t for t in gguf.GGUFReader(src).tensors}
    got = gguf.GGUFReader(out)
    assert int(got.fields["general.file_type"].contents()) == {"q8_0": 7, "q4_0": 2, "q4_1": 3}[qtype]
    n_quantized = 0
    for t in got.tensors:
        r = ref[t.name]
        if len(r.shape) == 1:  # norms stay f32
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        want = target
        if t.name == "output.weight" and qtype != "q8_0" and not pure:
            want = gguf.GGMLQuantizationType.Q8_0
        assert t.tensor_type == want, t.name
        expected = gguf.quants.quantize(np.asarray(r.data, dtype=np.float32), want)
        assert np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), expected.reshape(-1).view(np.uint8)), t.name
        n_quantized += 1
    assert n_quantized == len([r for r in ref.values() if len(r.shape) > 1])
    run([vicuna, "run", "-m", out, "-p", "hello", "-n", "4", "--temp", "0"])  # and it runs


def test_quantized_perplexity_close_to_f32(vicuna, embedded_f32_gguf, tmp_path):
    texts = [json.loads(line)["output"] for line in open(os.path.join(ROOT, "sample", "instruct", "data_sample.jsonl"),
                                                          encoding="utf-8")]
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(texts), encoding="utf-8")

    def ppl(path):
        out = run([vicuna, "perplexity", "-m", path, "-f", text, "-c", "128", "--chunks", "3"]).stdout.decode()
        return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))

    base = ppl(embedded_f32_gguf)
    assert 1.0 < base < 100.0, base
    for qtype, bound in [("q8_0", PPL_Q8_0_MAX_RATIO), ("q4_1", PPL_Q4_1_MAX_RATIO), ("q4_0", PPL_Q4_0_MAX_RATIO)]:
        q = str(tmp_path / f"e.{qtype}.gguf")
        run([vicuna, "quantize", embedded_f32_gguf, q, qtype])
        assert ppl(q) / base < bound, (qtype, ppl(q), base)
        os.remove(q)


# ---------------------------------------------------------------------------------------------
# robustness: corrupt files, fuzzing (under ASan/UBSan)


def _patch(data: bytes, off: int, new: bytes) -> bytes:
    return data[:off] + new + data[off + len(new):]


def _key_offset(data: bytes, key: str) -> int:
    """Offset just after a metadata key's name (where its u32 value type starts)."""
    k = key.encode()
    pos = data.index(len(k).to_bytes(8, "little") + k)
    return pos + 8 + len(k)


def corrupt_files(tiny_sp_gguf: str, tiny_sp_dir: str, root) -> dict[str, str]:
    import gguf

    data = open(tiny_sp_gguf, "rb").read()
    r = gguf.GGUFReader(tiny_sp_gguf)
    data_start = r.data_offset
    cases = {
        "empty": b"",
        "text": b"this is not a model\n",
        "ggjt": b"tjgg" + data[4:],
        "version1": _patch(data, 4, (1).to_bytes(4, "little")),
        "version99": _patch(data, 4, (99).to_bytes(4, "little")),
        "bigendian": _patch(data, 4, (3).to_bytes(4, "big")),
        "n_tensors_huge": _patch(data, 8, (2**62).to_bytes(8, "little")),
        "n_kv_huge": _patch(data, 16, (2**40).to_bytes(8, "little")),
        "key_len_huge": _patch(data, 24, (2**63).to_bytes(8, "little")),
        "value_type_99": _patch(data, _key_offset(data, "llama.block_count"), (99).to_bytes(4, "little")),
        "tokens_count_huge": _patch(data, _key_offset(data, "tokenizer.ggml.tokens") + 8, (2**61).to_bytes(8, "little")),
        "string_len_huge": _patch(data, _key_offset(data, "tokenizer.ggml.model") + 4, (2**40).to_bytes(8, "little")),
        "truncated_data": data[:len(data) - 100],
    }
    for frac in (0.001, 0.01, 0.05, 0.1, 0.3, 0.6, 0.9, 0.999):  # cut the metadata at many places
        cases[f"truncated_meta_{frac}"] = data[:int(data_start * frac)]
    t_last = r.tensors[-1]
    name = t_last.name.encode()
    info = data.index(len(name).to_bytes(8, "little") + name)
    off_pos = info + 8 + len(name) + 4 + 8 * len(t_last.shape) + 4
    cases["tensor_offset_huge"] = _patch(data, off_pos, (2**50).to_bytes(8, "little"))
    cases["tensor_offset_misaligned"] = _patch(data, off_pos, (int(t_last.data_offset - data_start) + 4).to_bytes(8, "little"))
    cases["tensor_overlap"] = _patch(data, off_pos, int(r.tensors[-2].data_offset - data_start).to_bytes(8, "little"))
    cases["tensor_ndims_9"] = _patch(data, info + 8 + len(name), (9).to_bytes(4, "little"))
    cases["tensor_type_77"] = _patch(data, off_pos - 4, (77).to_bytes(4, "little"))
    paths = {k: str(root / f"{k}.gguf") for k in cases}
    for k, v in cases.items():
        open(paths[k], "wb").write(v)

    # well-formed files that are not a model vicuna can run
    def variant(name, edit):
        spec = gguf_spec(tiny_sp_dir)
        edit(spec)
        paths[name] = write_gguf(str(root / f"{name}.gguf"), spec)

    T = gguf.GGUFValueType

    def set_kv(key, val, vtype, sub=None):
        def edit(spec):
            spec["kvs"] = [kv for kv in spec["kvs"] if kv[0] != key] + [(key, val, vtype, sub)]
        return edit

    variant("arch_qwen2", lambda s: s.update(arch="qwen2"))
    variant("missing_tensor", lambda s: s["tensors"].pop("blk.1.ffn_down.weight"))
    variant("wrong_shape", lambda s: s["tensors"].update({"blk.0.attn_q.weight": np.zeros((64, 32), np.float32)}))
    variant("iq4_nl_tensor", lambda s: s["tensors"].update(  # a type vicuna does not run
        {"extra.weight": (np.zeros(18, np.uint8), None, gguf.GGMLQuantizationType.IQ4_NL)}))
    variant("alignment_3", set_kv("general.alignment", 3, T.UINT32))
    variant("bos_out_of_range", set_kv("tokenizer.ggml.bos_token_id", 10**6, T.UINT32))
    variant("tokenizer_bert", set_kv("tokenizer.ggml.model", "bert", T.STRING))
    variant("heads_not_dividing", set_kv("llama.attention.head_count_kv", 3, T.UINT32))
    variant("block_count_string", set_kv("llama.block_count", "two", T.STRING))
    variant("no_block_count", lambda s: s.update(kvs=[kv for kv in s["kvs"] if kv[0] != "llama.block_count"]))
    return paths


# files whose tokenizer is intact: `tokenize` may succeed on them, `run` must not
MODEL_ONLY_DAMAGE = {"arch_qwen2", "missing_tensor", "wrong_shape", "heads_not_dividing", "block_count_string",
                     "no_block_count"}


def test_corrupt_files_fail_with_one_line(vicuna_asan, tiny_ggufs, tmp_path):
    hf_dir, path = tiny_ggufs["sp"]
    for name, bad in corrupt_files(path, hf_dir, tmp_path).items():
        for cmd in (["run", "-m", bad, "-p", "hi", "-n", "2", "-c", "64"], ["tokenize", "-m", bad, "-p", "hi 你好"]):
            proc = run([vicuna_asan, "cli", *cmd], check=False, timeout=60)
            err = proc.stderr.decode(errors="replace").strip()
            if cmd[0] == "tokenize" and name in MODEL_ONLY_DAMAGE and proc.returncode == 0:
                continue
            assert proc.returncode == 1, f"{name} {cmd[0]}: exit {proc.returncode}\n{err[-2000:]}"
            assert len(err.splitlines()) == 1 and ": error: " in err, f"{name} {cmd[0]}: {err[-2000:]}"
            assert "Sanitizer" not in err and "runtime error" not in err, err


def test_fuzz_gguf_reader_and_tokenizer(vicuna_asan, tiny_ggufs, tmp_path):
    """Seeded mutations of two small models (SentencePiece and byte-level BPE), bounded in time."""
    import gguf

    seeds = [tiny_ggufs["sp"][1]]
    # a small byte-level BPE model: the first 600 tokens of SmolLM2's vocabulary and their merges
    spec = gguf_spec(tiny_ggufs["sp"][0])
    bpe = {kv[0]: kv for kv in gguf_spec_tokenizer_only(tiny_ggufs["bpe"][0])}
    n = 600
    tokens = bpe["tokenizer.ggml.tokens"][1][:n]
    keep = set(tokens)
    merges = [m for m in bpe["tokenizer.ggml.merges"][1] if all(p in keep for p in m.split(" ", 1))
              and m.replace(" ", "", 1) in keep]
    T = gguf.GGUFValueType
    spec["kvs"] = [kv for kv in spec["kvs"] if not kv[0].startswith("tokenizer.")] + [
        ("tokenizer.ggml.model", "gpt2", T.STRING, None), ("tokenizer.ggml.pre", "smollm", T.STRING, None),
        ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
        ("tokenizer.ggml.token_type", bpe["tokenizer.ggml.token_type"][1][:n], T.ARRAY, T.INT32),
        ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING),
        ("tokenizer.ggml.eos_token_id", 2, T.UINT32, None)]
    rng = np.random.default_rng(0)
    spec["tensors"]["token_embd.weight"] = rng.standard_normal((n, 64)).astype(np.float32) * 0.1
    spec["tensors"]["output.weight"] = rng.standard_normal((n, 64)).astype(np.float32) * 0.1
    seeds.append(write_gguf(str(tmp_path / "small-bpe.gguf"), spec))
    for i, seed in enumerate(seeds):
        proc = run([vicuna_asan, "fuzz", seed, 100000, 1000 + i, 7], check=False, timeout=120)
        out = proc.stdout.decode() + proc.stderr.decode()
        assert proc.returncode == 0, out[-4000:]
        m = re.search(r"fuzz: (\d+) mutated files", out)
        assert m and int(m.group(1)) >= 300, out


def _tensor_offset_pos(data: bytes, tensor) -> int:
    """Where a tensor info's u64 data offset sits in the file."""
    name = tensor.name.encode()
    info = data.index(len(name).to_bytes(8, "little") + name)
    return info + 8 + len(name) + 4 + 8 * len(tensor.shape) + 4


def test_overlapping_tensors_are_refused_naming_both(vicuna, tiny_ggufs, tmp_path):
    """Two tensor infos whose data ranges intersect (the same bytes, or one running into the next)
    used to load and give garbage; the loader names both tensors."""
    import gguf

    path = tiny_ggufs["sp"][1]
    data = open(path, "rb").read()
    r = gguf.GGUFReader(path)
    start = r.data_offset
    by_offset = sorted(r.tensors, key=lambda t: t.data_offset)
    big = max(by_offset[:-1], key=lambda t: t.n_bytes)  # its successor may start inside it
    nxt = by_offset[by_offset.index(big) + 1]
    cases = {
        "same-bytes": (by_offset[-1], by_offset[0].data_offset - start, {by_offset[0].name, by_offset[-1].name}),
        "inside": (nxt, big.data_offset - start + 32, {big.name, nxt.name}),
    }
    for case, (tensor, new_offset, names) in cases.items():
        bad = tmp_path / f"{case}.gguf"
        bad.write_bytes(_patch(data, _tensor_offset_pos(data, tensor), int(new_offset).to_bytes(8, "little")))
        for cmd in (["run", "-m", bad, "-p", "hi", "-n", "2"], ["tokenize", "-m", bad, "-p", "hi"]):
            proc = run([vicuna, *cmd], check=False, timeout=60)
            err = proc.stderr.decode(errors="replace").strip()
            assert proc.returncode == 1 and len(err.splitlines()) == 1, (case, err)
            assert "overlap" in err and all(f"'{n}'" in err for n in names), (case, err)


@pytest.mark.parametrize("kind", ["fifo", "directory", "/dev/zero", "/dev/null"])
def test_model_that_is_not_a_regular_file_fails_at_once(vicuna, tmp_path, kind):
    """`-m FIFO` used to block in open() forever; a directory or a device is refused as well."""
    if kind == "fifo":
        path, what = tmp_path / "model.gguf", "named pipe"
        os.mkfifo(path)
    elif kind == "directory":
        path, what = tmp_path, "directory"
    else:
        path, what = kind, "character device"
    for cmd in (["run", "-m", path, "-p", "hi"], ["tokenize", "-m", path, "-p", "hi"], ["quantize", path,
                                                                                         tmp_path / "q.gguf", "q8_0"]):
        try:
            proc = run([vicuna, *cmd], check=False, timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"vicuna {cmd[0]} on a {what} did not return")
        err = proc.stderr.decode(errors="replace").strip()
        assert proc.returncode == 1 and len(err.splitlines()) == 1, err
        assert f"'{path}' is a {what}" in err and "not a GGUF file" in err, err
    assert not (tmp_path / "q.gguf").exists()


def test_quantize_never_overwrites_without_overwrite(vicuna, tiny_ggufs, tmp_path):
    """An existing OUT is kept unless --overwrite; the file is written under a fresh temporary name
    (a user's OUT.tmp is not touched) and renamed into place."""
    src = tiny_ggufs["sp"][1]
    out = tmp_path / "q.gguf"
    out.write_bytes(b"mine")
    (tmp_path / "q.gguf.tmp").write_bytes(b"also mine")
    proc = run([vicuna, "quantize", src, out, "q8_0"], check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "exists; pass --overwrite" in err and len(err.strip().splitlines()) == 1, err
    assert out.read_bytes() == b"mine"
    proc = run([vicuna, "quantize", src, tmp_path, "q8_0", "--overwrite"], check=False)
    assert proc.returncode == 1 and "is a directory" in proc.stderr.decode()
    run([vicuna, "quantize", src, out, "q8_0", "--overwrite"])
    assert out.read_bytes()[:4] == b"GGUF" and (tmp_path / "q.gguf.tmp").read_bytes() == b"also mine"
    assert sorted(os.listdir(tmp_path)) == ["q.gguf", "q.gguf.tmp"]  # no temporary left behind
    run([vicuna, "run", "-m", out, "-p", "hello", "-n", "2", "--temp", "0"])


def gguf_spec_tokenizer_only(model_dir: str) -> list[tuple]:
    return _tokenizer_kvs(model_dir)


# ---------------------------------------------------------------------------------------------
# the CLI: run, chat, bench


def run_ids(vicuna, path, *flags) -> tuple[list[int], list[int]]:
    """(the prompt ids `vicuna run -v` says it fed the model, the ids it generated)."""
    proc = run([vicuna, "run", "-m", path, "-v", "--print-ids", "--ignore-eos", *flags])
    fed = re.search(r"^prompt ids:((?: \d+)*)$", proc.stderr.decode(), re.M)
    assert fed, proc.stderr.decode()
    return [int(x) for x in fed.group(1).split()], [int(x) for x in proc.stdout.split()]


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_run_wraps_the_prompt_as_prompt_py(vicuna, tiny_ggufs, kind):
    """`run --prompt-type T` feeds the model exactly prompt.build_prompt_ids' ids (instruct, chat),
    or the tokenizer's own encoding of the bare text (none: BOS where the tokenizer adds one)."""
    from prompt import Conversation, build_prompt_ids
    from transformers import AutoTokenizer

    hf_dir, path = tiny_ggufs[kind]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = "你好 hello\n  two  spaces"
    fed = {pt: run_ids(vicuna, path, "-p", text, "-n", "1", "--prompt-type", pt)[0]
           for pt in ("none", "instruct", "chat")}
    assert fed["none"] == tok(text)["input_ids"]
    for pt in ("instruct", "chat"):
        assert fed[pt] == build_prompt_ids(pt, Conversation(turns=[(text, None)]), tok), pt
    assert fed["instruct"] != fed["chat"] and len(fed["chat"]) > len(fed["none"])


def test_run_sampling_flags_change_the_output(vicuna, tiny_ggufs):
    """Each sampling flag has its effect on the generated ids: sampling leaves the greedy path, the
    same seed reproduces a run and another seed does not, top-k 1 and top-p 0 leave only the argmax
    (greedy again), and a strong repetition penalty keeps every token of the context out."""
    _, path = tiny_ggufs["sp"]
    flags = ["-p", "hi", "-n", "16", "--repeat-penalty", "1"]

    def generate(*more):
        return run_ids(vicuna, path, *flags, *more)[1]

    greedy = generate("--temp", "0")
    assert len(greedy) == 16
    sampled = generate("--temp", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3")
    assert len(sampled) == 16 and sampled != greedy
    assert generate("--temp", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3") == sampled
    assert generate("--temp", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "4") != sampled
    assert generate("--temp", "0.8", "--top-k", "1", "--top-p", "1", "--seed", "3") == greedy
    assert generate("--temp", "0.8", "--top-k", "0", "--top-p", "0", "--seed", "3") == greedy

    prompt, penalized = run_ids(vicuna, path, "-p", "hi", "-n", "16", "--temp", "0", "--repeat-penalty", "100")
    assert len(set(greedy)) < len(greedy)  # the unpenalized greedy run repeats itself
    seen = list(prompt)
    for tok in penalized:
        assert tok not in seen, (prompt, penalized)
        seen.append(tok)

    proc = run([vicuna, "run", "-m", path, "-p", "hi", "--temp", "-1"], check=False)
    assert proc.returncode == 1 and b"--temp" in proc.stderr


def test_chat_survives_a_full_context(vicuna_asan, tiny_ggufs):
    """Many turns, Chinese, a line far longer than the context: history is trimmed, no crash."""
    _, path = tiny_ggufs["bpe"]
    lines = ["你好！", "Tell me about llamas.", "/clear", "再说一遍", "长" * 3000 + " end", "", "last question?"]
    stdin = ("\n".join(lines) + "\n").encode()
    proc = run([vicuna_asan, "cli", "chat", "-m", path, "--prompt-type", "chat", "-c", "96", "-n", "16", "--temp", "0.7",
                "--seed", "1", "-t", "2"], stdin=stdin, timeout=300, check=False)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err[-3000:]
    assert "kept its last" in err  # the long line was cut to fit
    proc.stdout.decode("utf-8")  # valid UTF-8 only, even from a random byte-level model


def test_bench_prints_two_lines(vicuna, tiny_ggufs):
    _, path = tiny_ggufs["sp"]
    out = run([vicuna, "bench", "-m", path, "-t", "2", "-p", "64", "-n", "16"]).stdout.decode()
    assert re.fullmatch(r"prefill: [0-9.]+ tok/s\ndecode: [0-9.]+ tok/s\n", out), out


# ---------------------------------------------------------------------------------------------
# llama.cpp reads our files (only when llama-cpp-python is installed: pip install llama-cpp-python)


def test_llama_cpp_reads_our_quantized_file(vicuna, embedded_f32_gguf, embedded_path, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    q = str(tmp_path / "e.q8_0.gguf")
    run([vicuna, "quantize", embedded_f32_gguf, q, "q8_0"])
    ids = AutoTokenizer.from_pretrained(embedded_path)(PROMPTS[0])["input_ids"]
    llm = llama_cpp.Llama(model_path=q, n_ctx=128, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
    ours = vicuna_logits(vicuna, q, ids, tmp_path)
    assert int(theirs.argmax()) == int(ours.argmax())
    # both quantize activations to int8, differently: measured 1.6e-2 and 2.4e-2 on two prompts
    assert rel_err(ours, theirs) < 5e-2
