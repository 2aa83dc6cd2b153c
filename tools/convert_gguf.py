"""Export a Hugging Face LLaMA-family checkpoint (merged or base) to a GGUF v3 file.

    python tools/convert_gguf.py --model_path vicuna-merged --outfile vicuna.q8_0.gguf --outtype q8_0
    python tools/convert_gguf.py --model_path vicuna-merged --outfile vicuna.f16.gguf --outtype f16 --modelfile
    python tools/convert_gguf.py --model_path vicuna-merged --outfile vicuna.q4_k_m.gguf --outtype q4_k_m

The file carries what llama.cpp, ollama and tools/vicuna.cpp need: the `<arch>.*` hyperparameters
(context length, sizes, heads and KV heads, rope theta and scaling, RMSNorm epsilon), the tensors
under llama.cpp's names, the tokenizer (SentencePiece "llama" with scores and token types for
LLaMA-1/2; byte-level BPE "gpt2" with merges and the pre-tokenizer name for SmolLM2/LLaMA-3/Qwen2),
the special ids, add-BOS, and `tokenizer.chat_template`: a Jinja template that renders the prompt
format the model was trained with (instruct or chat, as prompt.py renders them; `chat_template`
keeps the tokenizer's own). The prompt type defaults to the one in the merged folder's
training_config.json (tools/merge_lora.py copies it there), else instruct.

Architectures (config.json's model_type), written as llama.cpp's convert_hf_to_gguf.py writes them
(tests/test_vicuna_arch.py checks the tensors and `<arch>.*` keys against its output):

- `llama` (LLaMA-1/2/3, SmolLM2) and `mistral`: general.architecture=llama, Q and K rows permuted
  the way llama.cpp permutes them (its runtime rotates adjacent pairs). LLaMA-3.1 rope scaling
  (`rope_type: llama3`) becomes the `rope_freqs` tensor of per-frequency divisors, linear scaling
  `llama.rope.scaling.type/factor`. Mistral's `sliding_window` is written as
  `llama.attention.sliding_window`, a key llama.cpp's converter does not write for Mistral and its
  llama architecture does not read (llama.cpp attends to the whole context, which differs from
  transformers past the window: 4096 tokens for Mistral-7B v0.1; v0.2+ have none); vicuna.cpp
  applies it.
- `qwen2` (Qwen2, Qwen2.5): general.architecture=qwen2, `qwen2.*` keys, q/k/v biases, Q and K
  not permuted (llama.cpp rotates the halves of each head for qwen2, as transformers does), tied
  or untied output. `use_sliding_window: true` (a window on some layers only) and llama3 or yarn
  rope scaling are refused.

Other model types, layer_types mixing attention kinds, and rope scalings other than linear and
llama3 are refused in one line.

Tensor types (--outtype): what llama.cpp's llama-quantize writes from an f32 export of the same
model, tensor for tensor and byte for byte (tests/test_kquants_export.py checks it against
llama-cpp-python), with general.file_type its LLAMA_FTYPE_*. 1-D tensors (norms) stay F32; f16
stores the 2-D weights as F16. q8_0, q5_0, q5_1, q4_0 and q4_1 quantize them with the gguf
package's quantizers, q6_k, q5_k_m and q4_k_m with kquants.py's (numpy ports of llama.cpp's
reference K-quant quantizers, without an importance matrix), in llama.cpp's per-tensor mix
(pick_type): the output projection (token_embd when tied) Q6_K; q4_k_m / q5_k_m keep attn_v and
ffn_down at Q6_K on the first and last eighth of the layers and every third between, the rest
Q4_K / Q5_K. Rows that do not split into blocks of 256 fall back as llama.cpp does (Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0; the embedded SmolLM2's 576-wide rows mostly do), and rows that do not
split into blocks of 32 are F16. One departure: q4_0 and q4_1 keep the output projection at Q8_0,
the way the embedded SmolLM2 Q4_1 file ships it and vicuna.cpp's quantize writes it (llama.cpp
gives it Q6_K when its rows are a multiple of 256). vicuna.cpp reads f32, f16, q8_0, q4_0 and q4_1;
--verify reads the other types with transformers' GGUF loader.

`--verify` (default: on for models under 1B parameters) runs a few prompts through the Hugging Face
model and through the written GGUF -- with tools/vicuna.cpp/build/vicuna when it has been built
(`make cpp`), otherwise with transformers' own GGUF loader -- and prints top-1 agreement and the
largest logit difference. An f32 export that disagrees (top-1 mismatch or max relative difference
over 1e-3), or any export whose logits are NaN or infinite, exits with status 1. `--modelfile`
writes an ollama Modelfile beside the GGUF.

A quantized export (any type but f32 and f16) of a merged folder whose training_config.json names
its base (tools/merge_lora.py writes it) quantizes the base's weights the same way and logs how
much of the merged-minus-base change survives; under 50 % it warns that the fine-tune is mostly
lost (a base dequantized from that grid, like the embedded Q4_1 SmolLM2, rounds small LoRA deltas
back onto it) and points to the adapter export below.

`--lora_path ADAPTER` writes the adapter itself instead, as a GGUF LoRA adapter in llama.cpp's format
(what its convert_lora_to_gguf.py writes, loaded by `vicuna --lora`, llama.cpp's `--lora` and ollama's
`ADAPTER`), for the base model's GGUF:

    python tools/convert_gguf.py --lora_path lora-Vicuna --outfile lora-Vicuna.gguf [--outtype f32|f16|q8_0]
    python tools/convert_gguf.py --lora_path lora-Vicuna --outfile lora.gguf --base_gguf base.gguf --modelfile

`general.type=adapter`, `adapter.type=lora`, `adapter.lora.alpha`, `vicuna.prompt_type` (from the
adapter's training_config.json), and per adapted weight `<its GGUF name>.lora_a` (A, ne [in, r]) and
`.lora_b` (B, ne [r, out]; attn_q / attn_k rows permuted as the base export permutes the weights; an
embedding's pair flipped as llama.cpp expects). llama.cpp scales every pair by alpha / r with the
file's one alpha, so a module whose own scale differs (alpha_pattern, rank_pattern, rsLoRA) has the
ratio folded into B. --model_path is the base the adapter was trained on (default: the adapter's
base_model_name_or_path); --base_gguf, the base's GGUF (default: --model_path when it is a .gguf,
or the embedded model's file), is checked for every target tensor and shape, is the Modelfile's
FROM line (the adapter its ADAPTER line), and with --verify (default on under 1B parameters when
vicuna.cpp is built) runs with the adapter in vicuna.cpp against transformers + peft. Non-finite
adapters, DoRA, trained biases, modules_to_save and LoRA on a tied lm_head are refused.

Nothing is overwritten without --overwrite (the GGUF and the Modelfile alike), and both are written
under a temporary name and renamed into place, so an interrupted export never leaves a half file
under the final name. Source tensors holding NaN or infinity are refused (naming the tensor), as
are damaged inputs: truncated or empty safetensors, a config.json that is not a JSON object or
has impossible sizes, missing tokenizer files, an adapter folder passed as --model_path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoints import all_close, publish_file, staging_file, write_text_atomically  # noqa: E402
from errors import UserError, cli_errors, logger, one_line, setup_logging  # noqa: E402
from model_folder import SavedWeights, read_model_config, resolve_model_folder  # noqa: E402
from models import resolve_prompt_type  # noqa: E402

# --outtype: (llama.cpp's LLAMA_FTYPE_* name, written as general.file_type; the tensor type of the
# 2-D weights before pick_type's per-tensor rules)
FILE_TYPES = {"f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"), "q8_0": ("MOSTLY_Q8_0", "Q8_0"),
              "q6_k": ("MOSTLY_Q6_K", "Q6_K"), "q5_k_m": ("MOSTLY_Q5_K_M", "Q5_K"),
              "q5_1": ("MOSTLY_Q5_1", "Q5_1"), "q5_0": ("MOSTLY_Q5_0", "Q5_0"),
              "q4_k_m": ("MOSTLY_Q4_K_M", "Q4_K"), "q4_1": ("MOSTLY_Q4_1", "Q4_1"), "q4_0": ("MOSTLY_Q4_0", "Q4_0")}
OUTTYPES = tuple(FILE_TYPES)
ENGINE = os.path.join(ROOT, "tools", "vicuna.cpp", "build", "vicuna")
VERIFY_MAX_PARAMS = 1_000_000_000  # --verify is on by default below this size
F32_MAX_REL_DIFF = 1e-3  # an f32 export must match the HF logits this closely (max |d| / max |logit|)
PROMPT_TYPE_KEY = "vicuna.prompt_type"  # instruct | chat | chat_template
ARCHITECTURES = ("llama", "mistral")  # model_type values llama.cpp runs as general.architecture=llama
VERIFY_QUESTIONS = ["Give three tips for staying healthy.", "用一句话介绍你自己。",
                    "Translate to English: 我明天要去图书馆还书。"]
VERIFY_TEXTS = ["Hello world! 你好，世界。", "数字 2024 年 12 月 31 日, tabs\tand  two  spaces\n\nnew paragraph",
                " leading space, café, naïve, 🦙 and 小羊驼"]

# Byte-level BPE pre-tokenizers by the regex their tokenizer.json splits with, named as llama.cpp
# names them in `tokenizer.ggml.pre` (llama-vocab.cpp). GPT-2's own regex is ByteLevel(use_regex).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2/2.5: LLaMA-3's with single digits


def build_parser() -> argparse.ArgumentParser:
    from prompt import PROMPT_TYPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None,
                   help="Hugging Face model folder (e.g. from tools/merge_lora.py), hub id or the embedded name; "
                        "with --lora_path the adapter's base (default: its base_model_name_or_path)")
    p.add_argument("--lora_path", default=None,
                   help="write this LoRA adapter folder as a GGUF adapter (llama.cpp's format: vicuna --lora, "
                        "llama.cpp --lora, ollama ADAPTER) instead of a model; --outtype f32, f16 or q8_0")
    p.add_argument("--base_gguf", default=None,
                   help="with --lora_path: the base model's GGUF the adapter is for (checked against it, the "
                        "Modelfile's FROM line, --verify); default: --model_path if a .gguf, or the embedded file")
    p.add_argument("--outfile", required=True, help="GGUF file to write")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16",
                   help="tensor type of the 2-D weights, or llama.cpp's mix of that name (q4_k_m, q5_k_m) "
                        "(default: f16)")
    p.add_argument("--prompt_type", choices=PROMPT_TYPES, default=None,
                   help="template stored as tokenizer.chat_template (default: the training_config.json one, "
                        "else instruct)")
    p.add_argument("--modelfile", action="store_true", help="also write an ollama Modelfile beside the GGUF")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="compare logits of the export with the HF model (default: on under 1B parameters)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --outfile (and, with --modelfile, the Modelfile beside it) if they exist")
    return p


# --- hyperparameters -------------------------------------------------------------------------------


# config.json model_type -> general.architecture, as llama.cpp's convert_hf_to_gguf.py maps them
# (its LlamaModel registers MistralForCausalLM; Qwen2Model writes qwen2 with q/k rows unpermuted)
GGUF_ARCHITECTURES = {**{t: "llama" for t in ARCHITECTURES}, "qwen2": "qwen2"}


@dataclass
class HParams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rope_theta: float
    rope_scaling: dict | None
    rms_eps: float
    tied: bool
    name: str
    arch: str = "llama"  # general.architecture: llama (LLaMA, Mistral) or qwen2
    sliding_window: int = 0  # Mistral's attention window (tokens, the current one included); 0: none
    head_dim_key: bool = False  # config.json names head_dim: key/value_length are written, as llama.cpp does

    @property
    def permute(self) -> bool:
        """q/k rows permuted for interleaved RoPE: llama yes, qwen2 no (llama.cpp rotates its halves)."""
        return self.arch == "llama"

    @classmethod
    def from_config(cls, config: dict, model_dir: str) -> "HParams":
        model_type = config.get("model_type")
        if model_type not in GGUF_ARCHITECTURES:
            raise UserError(f"--model_path {model_dir}: model_type {repr(model_type)[:80]} is not a LLaMA-architecture "
                            f"model this converter exports ({', '.join(GGUF_ARCHITECTURES)} are: LLaMA-1/2/3, SmolLM2, "
                            "Mistral, Qwen2/2.5)")
        arch = GGUF_ARCHITECTURES[model_type]
        check_config_values(config, os.path.join(model_dir, "config.json"))
        sliding_window = 0
        layer_types = config.get("layer_types")
        if isinstance(layer_types, list) and any(t != "full_attention" for t in layer_types):
            raise UserError(f"--model_path {model_dir}: layer_types {json.dumps(layer_types)[:120]} mixes attention "
                            "kinds per layer, which this converter and vicuna.cpp do not support")
        if model_type == "qwen2" and config.get("use_sliding_window"):
            # transformers then slides the window on layers >= max_window_layers only; llama.cpp's qwen2 runs
            # every layer on the full context, so the file would answer differently from the model
            raise UserError(f"--model_path {model_dir}: use_sliding_window=true (a sliding window on layers >= "
                            f"max_window_layers={config.get('max_window_layers')}) is not supported; released "
                            "Qwen2/2.5 checkpoints have it false")
        if model_type == "mistral" and config.get("sliding_window") is not None:
            sliding_window = config["sliding_window"]
            if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window <= 0:
                raise UserError(f"{os.path.join(model_dir, 'config.json')}: \"sliding_window\" must be a positive "
                                f"integer or null, got {json.dumps(sliding_window)[:80]}; the file is damaged")
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
            raise UserError(f"{os.path.join(model_dir, 'config.json')}: rope_theta must be a positive number, got "
                            f"{json.dumps(theta)[:80]}; the file is damaged")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        supported = ("default", "linear", "llama3") if arch == "llama" else ("default", "linear")
        if rope_type not in supported:
            # llama.cpp's Qwen2Model writes no rope_freqs, so llama3 scaling on qwen2 would be dropped
            raise UserError(f"--model_path {model_dir}: rope scaling {rope_type!r} is not supported for "
                            f"{model_type} ({', '.join(supported)} are)")
        if rope_type == "linear":
            factor = rope.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
                raise UserError(f"{os.path.join(model_dir, 'config.json')}: linear rope scaling needs a factor >= 1, "
                                f"got {json.dumps(factor)[:80]}")
        try:
            n_head = config["num_attention_heads"]
            n_embd = config["hidden_size"]
            return cls(
                n_vocab=config["vocab_size"], n_embd=n_embd, n_layer=config["num_hidden_layers"],
                n_ff=config["intermediate_size"], n_head=n_head,
                n_head_kv=config.get("num_key_value_heads") or n_head,
                head_dim=config.get("head_dim") or n_embd // n_head,
                n_ctx=config.get("max_position_embeddings", 2048), rope_theta=float(theta),
                rope_scaling=None if rope_type == "default" else dict(rope, rope_type=rope_type),
                rms_eps=config.get("rms_norm_eps", 1e-6), tied=bool(config.get("tie_word_embeddings", False)),
                name=os.path.basename(os.path.normpath(model_dir)), arch=arch, sliding_window=sliding_window,
                head_dim_key=config.get("head_dim") is not None)
        except KeyError as e:
            raise UserError(f"--model_path {model_dir}: config.json lacks {e.args[0]!r}") from None


# config.json keys that must be positive integers (required ones first) or positive finite numbers
CONFIG_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")
CONFIG_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
CONFIG_FLOATS = ("rope_theta", "rms_norm_eps")


def check_config_values(config: dict, path: str) -> None:
    """Sizes are positive integers, rope theta and epsilon positive finite numbers, and the head
    layout divides evenly; one line naming config.json otherwise (instead of a traceback later)."""
    def bad(key, want):
        raise UserError(f"{path}: \"{key}\" must be {want}, got {json.dumps(config[key])[:80]}; the file is damaged")

    for key in CONFIG_INTS + CONFIG_OPTIONAL_INTS:
        value = config.get(key)
        if value is None and key in CONFIG_OPTIONAL_INTS:
            continue
        if key not in config:
            raise UserError(f"--model_path {os.path.dirname(path)}: config.json lacks {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            bad(key, "a positive integer")
    for key in CONFIG_FLOATS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            bad(key, "a positive number")
    for key in ("rope_parameters", "rope_scaling"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            bad(key, "an object (or null)")
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if heads % kv or head_dim % 2 or (not config.get("head_dim") and config["hidden_size"] % heads):
        raise UserError(f"{path}: hidden_size {config['hidden_size']}, num_attention_heads {heads}, "
                        f"num_key_value_heads {kv} and head_dim {head_dim} do not divide evenly; the file is damaged")


def write_hparams(writer, hp: HParams) -> None:
    import gguf

    writer.add_name(hp.name)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    if hp.arch == "llama":  # llama.cpp's Qwen2Model writes neither (its runtime defaults to the head size)
        writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    if hp.arch == "llama":
        writer.add_vocab_size(hp.n_vocab)
    if hp.head_dim_key or hp.head_dim != hp.n_embd // hp.n_head:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp.rope_scaling["factor"]))
    if hp.sliding_window:
        # Mistral's window. llama.cpp's converter drops it and its llama architecture attends to the whole
        # context (the key is what it reads for its SWA architectures); vicuna.cpp applies it, as transformers.
        writer.add_sliding_window(hp.sliding_window)


def llama3_rope_factors(hp: HParams):
    """LLaMA-3.1 rope scaling as llama.cpp stores it: a `rope_freqs` tensor of per-frequency divisors
    (the same computation as convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors)."""
    import numpy as np

    rs = hp.rope_scaling
    factor, low, high = rs.get("factor", 8.0), rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_ctx = rs.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float32) / hp.head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# --- tensors ---------------------------------------------------------------------------------------


def permute_qk(w, n_head: int):
    """HF's rotate-half layout -> llama.cpp's interleaved pairs, per head (rows of a q/k weight or bias).

    Exactly convert_hf_to_gguf.py's LlamaModel.permute; transformers' GGUF loader undoes it with
    reshape(n_head, dim, 2, ...).swapaxes(2, 1). For K, n_head is the number of KV heads.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class TensorPlan:
    gguf_name: str
    hf_name: str | None  # None: computed (rope_freqs)
    shape: tuple[int, ...]  # HF (torch) order: rows first
    qtype: object  # gguf.GGMLQuantizationType
    permute_heads: int = 0  # 0: as is; else permute_qk with this many heads


K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp's for rows not a multiple of 256


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get 6 bits in Q4_K_M / Q5_K_M: the
    first and last eighth, and every third layer between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def pick_type(gguf_name: str, shape: tuple[int, ...], outtype: str, tied: bool, hp: HParams):
    """The GGML type of one tensor: llama.cpp's llama_tensor_get_type (llama-quant.cpp) for a llama-
    architecture model without an importance matrix, so that --outtype X writes the tensor types
    llama-quantize writes for X from an f32 export.

    1-D tensors stay F32. The output projection (token_embd when tied) is Q6_K, or Q8_0 when its rows
    do not split into the type's blocks, or stays Q8_0 for q8_0 -- and for q4_0 / q4_1, our one
    departure: Q8_0 always, as the embedded SmolLM2 Q4_1 file and vicuna.cpp's quantize keep it
    (llama.cpp gives those Q6_K when rows are a multiple of 256). q4_k_m / q5_k_m give attn_v and
    ffn_down Q6_K on the layers use_more_bits picks (of hp.n_layer); a LLaMA-70B-shaped model
    (80 layers, grouped KV heads) gets attn_v at least Q5_K. Rows that do not split into the type's
    blocks fall back as llama.cpp's tensor_type_fallback does: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K ->
    Q8_0, and F16 when even blocks of 32 do not fit.
    """
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or outtype == "f32":
        return T.F32
    if outtype == "f16":
        return T.F16
    default = T[FILE_TYPES[outtype][1]]
    n_cols = shape[-1]  # ne[0]: the values of one row
    qtype = default
    layer = re.match(r"blk\.(\d+)\.(attn_v|ffn_down)\.weight$", gguf_name)
    if gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight"):
        if outtype in ("q4_0", "q4_1") or n_cols % gguf.GGML_QUANT_SIZES[default][0]:
            qtype = T.Q8_0
        elif default != T.Q8_0:
            qtype = T.Q6_K
    elif layer and outtype in ("q4_k_m", "q5_k_m"):
        if use_more_bits(int(layer.group(1)), hp.n_layer):
            qtype = T.Q6_K
        if layer.group(2) == "attn_v" and hp.n_layer == 80 and hp.n_head != hp.n_head_kv and qtype == T.Q4_K:
            qtype = T.Q5_K  # llama.cpp's LLM_TYPE_70B rule: several heads share each attn_v row
    if n_cols % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = T[K_FALLBACK.get(qtype.name, qtype.name)]
        if n_cols % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = T.F16
    return qtype


def gguf_arch(hp: HParams):
    """gguf-py's MODEL_ARCH for the tensor names of this architecture."""
    import gguf

    return {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[hp.arch]


def plan_tensors(base, hp: HParams, outtype: str, model_dir: str) -> list[TensorPlan]:
    """Which HF tensor becomes which GGUF tensor, in which type; raises on anything unexpected."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf_arch(hp), hp.n_layer)
    plans = []
    has_lm_head = "lm_head.weight" in base.files
    tied = hp.tied or not has_lm_head
    if not has_lm_head and not hp.tied:
        logger.warning("config says tie_word_embeddings=false but there is no lm_head.weight; exporting as tied")
    for hf_name in sorted(base.files, key=_gguf_order):
        if hf_name.endswith("rotary_emb.inv_freq") or (hf_name == "lm_head.weight" and tied):
            continue  # recomputed by every runtime / the tied output is token_embd
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"--model_path {model_dir}: tensor {hf_name} has no llama.cpp name for {hp.arch}; "
                            "is this a plain checkpoint of that architecture?")
        shape = base.shape(hf_name)
        heads = 0
        if hp.permute and re.search(r"\.q_proj\.(weight|bias)$", hf_name):
            heads = hp.n_head
        elif hp.permute and re.search(r"\.k_proj\.(weight|bias)$", hf_name):
            heads = hp.n_head_kv
        plans.append(TensorPlan(gguf_name, hf_name, shape, pick_type(gguf_name, shape, outtype, tied, hp), heads))
    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "llama3":
        plans.append(TensorPlan("rope_freqs.weight", None, (hp.head_dim // 2,), gguf.GGMLQuantizationType.F32))
    if not any(p.gguf_name == "token_embd.weight" for p in plans):
        raise UserError(f"--model_path {model_dir}: no model.embed_tokens.weight in the checkpoint")
    return plans


def _gguf_order(hf_name: str):
    """token_embd, then the blocks in order, then output_norm and output: llama.cpp's order."""
    group = 0 if "embed_tokens" in hf_name else 1 if ".layers." in hf_name else 2
    return [group] + [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", hf_name)]


def tensor_data(plan: TensorPlan, base, hp: HParams):
    """The bytes of one GGUF tensor as a numpy array (float32/float16, or uint8 blocks)."""
    import gguf
    import numpy as np

    import kquants

    if plan.hf_name is None:
        data = llama3_rope_factors(hp)
    else:
        data = base.tensor(plan.hf_name).float().numpy()
        if not np.isfinite(data).all():
            raise UserError(f"{os.path.join(base.folder, base.files[plan.hf_name])}: {plan.hf_name} holds NaN or "
                            "infinite values; refusing to export a broken model (was it merged from an adapter "
                            "whose training diverged?)")
    if plan.permute_heads:
        data = permute_qk(data, plan.permute_heads)
    data = np.ascontiguousarray(data, dtype=np.float32)
    with np.errstate(over="ignore"):  # an F16 overflow is reported below, as one line
        out = kquants.quantize(data, plan.qtype)
    if plan.qtype == gguf.GGMLQuantizationType.F16 and not np.isfinite(out).all():
        raise UserError(f"{plan.hf_name} has values beyond float16's range (65504); export with --outtype f32 or "
                        "q8_0")
    return out


def nbytes_of(plan: TensorPlan) -> tuple[tuple[int, ...], int]:
    """(byte shape or element shape, nbytes) of a planned tensor, without computing it."""
    import gguf

    T = gguf.GGMLQuantizationType
    if plan.qtype in (T.F32, T.F16):
        return plan.shape, math.prod(plan.shape) * (4 if plan.qtype == T.F32 else 2)
    byte_shape = gguf.quant_shape_to_byte_shape(plan.shape, plan.qtype)
    return byte_shape, math.prod(byte_shape)


# --- tokenizer -------------------------------------------------------------------------------------


def load_hf_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(model_dir, n)) for n in names):
        raise UserError(f"--model_path {model_dir}: no tokenizer files ({', '.join(names)}); copy them from the "
                        "base model's folder")
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # OSError, ValueError, JSON and type errors from damaged tokenizer files
        raise UserError(f"cannot load a tokenizer from {model_dir}: {one_line(e)}; its tokenizer files (or "
                        "config.json) are damaged: copy them from the base model's folder") from None


def _merge_strings(merges) -> list[str]:
    # tokenizer.json stores merges as "a b" strings or, since tokenizers 0.20, as [a, b] pairs; a
    # space inside a part is written as chr(ord(" ") + 256) (byte-level's "Ġ"), as gguf-py does.
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        else:
            out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in m))
    return out


def bpe_pre_type(backend: dict, model_dir: str) -> str:
    """llama.cpp's name for the byte-level BPE pre-tokenizer of this tokenizer.json."""
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM/StarCoder: single digits, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == QWEN2_SPLIT:
            return "qwen2"
    raise UserError(f"--model_path {model_dir}: byte-level BPE pre-tokenizer {json.dumps(pre)[:120]} is not one "
                    "this converter knows (gpt-2, smollm, llama-bpe, qwen2); llama.cpp would split text differently")


def tokenizer_fields(tokenizer, model_dir: str, n_vocab: int) -> dict:
    """Everything `tokenizer.ggml.*` for this tokenizer, as plain Python values."""
    import gguf

    from prompt import leading_special_ids

    TT = gguf.TokenType
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model.get("type") != "BPE":
        raise UserError(f"--model_path {model_dir}: tokenizer model {model.get('type')!r} is not supported "
                        "(SentencePiece BPE and byte-level BPE are)")
    spm = bool(model.get("byte_fallback"))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in backend.get("added_tokens", [])}
    for i, t in added.items():
        vocab.setdefault(t["content"], i)
    size = max(vocab.values()) + 1
    if size > n_vocab:
        raise UserError(f"--model_path {model_dir}: the tokenizer has {size} tokens but the embedding only "
                        f"{n_vocab} rows")
    merges = _merge_strings(model.get("merges") or [])
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types, scores = [], [], []
    # SentencePiece models score a candidate merge by the merged piece: use the first merge rank that
    # builds each piece (real sentencepiece scores when tokenizer.model is there), so llama.cpp's
    # score-driven merging picks the same pairs as the HF merges.
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), r)
    sp_scores = _sentencepiece_scores(model_dir) if spm else None
    specials = set(tokenizer.all_special_ids)
    for i in range(n_vocab):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
            scores.append(-1e9)
            continue
        if i in added and not added[i].get("special", False) and i not in specials:
            tt = TT.USER_DEFINED
        elif i in added or i in specials:
            # llama.cpp's converters mark <unk> UNKNOWN in SentencePiece vocabularies, CONTROL in BPE ones
            tt = TT.UNKNOWN if spm and tok == tokenizer.unk_token else TT.CONTROL
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
            tt = TT.BYTE
        else:
            tt = TT.NORMAL
        tokens.append(tok)
        types.append(tt)
        if sp_scores is not None and i < len(sp_scores):
            scores.append(sp_scores[i])
        elif tok in rank:
            scores.append(-float(rank[tok]))
        else:
            scores.append(0.0 if len(tok) == 1 or tt != TT.NORMAL else -1e9)

    lead = leading_special_ids(tokenizer)
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    fields = {
        "model": "llama" if spm else "gpt2",
        "tokens": tokens, "types": [int(t) for t in types], "merges": merges,
        "scores": scores if spm else None,
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id,
        "add_bos": bool(lead) and lead == [tokenizer.bos_token_id],
        "add_eos": tokenizer.eos_token_id is not None and with_special[len(lead):] == plain + [tokenizer.eos_token_id],
    }
    if spm:
        pre = backend.get("pre_tokenizer") or {}
        norm = json.dumps(backend.get("normalizer") or {})
        fields["add_space_prefix"] = (pre.get("type") == "Metaspace" and pre.get("prepend_scheme", "always") != "never"
                                      ) or '"Prepend"' in norm
        if pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "first":
            fields["prepend_scheme"] = "first"  # no U+2581 before text that starts with a space
    else:
        fields["pre"] = bpe_pre_type(backend, model_dir)
    return fields


def _sentencepiece_scores(model_dir: str) -> list[float] | None:
    path = os.path.join(model_dir, "tokenizer.model")
    if not os.path.isfile(path):
        return None
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except Exception as e:  # RuntimeError / OSError from a damaged model file
        raise UserError(f"{path}: not a SentencePiece model ({one_line(e)}); the file is damaged (copy it from "
                        "the base model's folder)") from None
    return [sp.GetScore(i) for i in range(sp.vocab_size())]


def write_tokenizer(writer, fields: dict, chat_template: str | None) -> None:
    writer.add_tokenizer_model(fields["model"])
    if "pre" in fields:
        writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    if fields["scores"] is not None:
        writer.add_token_scores(fields["scores"])
    writer.add_token_types(fields["types"])
    if fields["merges"]:
        writer.add_token_merges(fields["merges"])
    for key in ("bos", "eos", "unk", "pad"):
        if fields[key] is not None:
            getattr(writer, f"add_{key}_token_id")(fields[key])
    writer.add_add_bos_token(fields["add_bos"])
    writer.add_add_eos_token(fields["add_eos"])
    if "add_space_prefix" in fields:
        writer.add_add_space_prefix(fields["add_space_prefix"])
    if "prepend_scheme" in fields:
        writer.add_string("vicuna.tokenizer.prepend_scheme", fields["prepend_scheme"])
    if chat_template:
        writer.add_chat_template(chat_template)


# --- prompt templates for llama.cpp (Jinja) and ollama (Go templates) -----------------------------


def chat_template_for(prompt_type: str, tokenizer) -> str:
    """A Jinja chat template rendering `messages` the way prompt.py renders our templates
    (prompt.chat_template_jinja, shared with tools/merge_lora.py); --prompt_type errors are one line."""
    import prompt

    try:
        return prompt.chat_template_jinja(prompt_type, tokenizer)
    except prompt.TemplateError as e:
        raise UserError(f"--prompt_type {prompt_type}: {e}") from None


def _go_literal(text: str) -> str:
    # Text outside {{ }} is copied as is; only "{{" would start an action.
    return text.replace("{{", '{{ "{{" }}')


def _modelfile_ref(path: str) -> str:
    # ollama reads a relative FROM / ADAPTER path from the Modelfile's folder
    return path if os.path.isabs(path) or path.startswith(("./", "../")) else "./" + path


def modelfile_for(gguf_name: str, prompt_type: str, tokenizer, adapter: str | None = None) -> str:
    """An ollama Modelfile: FROM the GGUF, TEMPLATE in Go-template syntax, stop markers. With
    `adapter` (a LoRA adapter GGUF), `gguf_name` is its base model: FROM the base, ADAPTER the adapter."""
    import prompt

    eos = tokenizer.eos_token or ""
    lines = [f"# ollama create my-model -f Modelfile   (written by tools/convert_gguf.py, prompt type {prompt_type})",
             f"FROM {_modelfile_ref(gguf_name)}"]
    if adapter:
        lines.append(f"ADAPTER {_modelfile_ref(adapter)}")
    if prompt_type == "instruct":
        no_in_head, no_in_tail = prompt.INSTRUCT_NO_INPUT.split("{instruction}")
        template = _go_literal(no_in_head) + "{{ .Prompt }}" + _go_literal(no_in_tail) + "{{ .Response }}"
    elif prompt_type == "chat":
        user_head, user_tail = prompt.CHAT_USER.split("{input}")
        preamble = prompt.CHAT_PREAMBLE
        template = (
            "{{- if .System }}{{ .System }}" + "\n\n" + "{{ else }}" + _go_literal(preamble) + "{{ end }}"
            "{{- $first := true }}"
            "{{- range .Messages }}"
            "{{- if eq .Role \"user\" }}{{ if not $first }}" + prompt.CHAT_TURN_SEPARATOR + "{{ end }}"
            + _go_literal(user_head) + "{{ .Content }}" + _go_literal(user_tail) + "{{ $first = false }}"
            "{{- else if eq .Role \"assistant\" }}{{ .Content }}" + _go_literal(eos) +
            "{{- end }}"
            "{{- end }}"
        )
    else:
        raise UserError("--modelfile: ollama templates are written for --prompt_type instruct and chat; "
                        "for chat_template use ollama's own template for the base model family")
    lines.append(f'TEMPLATE """{template}"""')
    for stop in prompt.STOP_STRINGS[prompt_type]:
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    if eos:
        lines.append(f"PARAMETER stop {json.dumps(eos)}")
    return "\n".join(lines) + "\n"


# --- conversion ------------------------------------------------------------------------------------


def check_outputs(outfile: str, overwrite: bool, modelfile: bool) -> str:
    """--outfile (and the Modelfile beside it) may be written; returns the Modelfile's path."""
    if not outfile.endswith(".gguf"):
        raise UserError(f"--outfile {outfile}: name the file *.gguf")
    if os.path.isdir(outfile):
        raise UserError(f"--outfile {outfile} is a directory; name a .gguf file")
    if os.path.lexists(outfile) and not overwrite:
        raise UserError(f"--outfile {outfile} exists; pass --overwrite to replace it")
    modelfile_path = os.path.join(os.path.dirname(os.path.abspath(outfile)), "Modelfile")
    if modelfile and os.path.lexists(modelfile_path) and not overwrite:
        raise UserError(f"--modelfile: {modelfile_path} exists; pass --overwrite to replace it (or write the GGUF "
                        "to another folder)")
    if modelfile and os.path.isdir(modelfile_path):
        raise UserError(f"--modelfile: {modelfile_path} is a directory; write the GGUF to another folder")
    return modelfile_path


def convert(model_path: str, outfile: str, outtype: str = "f16", prompt_type: str | None = None,
            overwrite: bool = False, modelfile: bool = False) -> dict:
    """Write the GGUF (and Modelfile); returns {"model_dir", "prompt_type", "n_params", "outfile"}."""
    import gguf
    import numpy as np

    modelfile_path = check_outputs(outfile, overwrite, modelfile)
    model_dir = resolve_model_folder(model_path)
    config = read_model_config(model_dir, "--model_path")
    hp = HParams.from_config(config, model_dir)
    prompt_type = resolve_prompt_type(prompt_type, model_dir, "instruct")
    tokenizer = load_hf_tokenizer(model_dir)
    template = chat_template_for(prompt_type, tokenizer)
    fields = tokenizer_fields(tokenizer, model_dir, hp.n_vocab)
    modelfile_text = modelfile_for(os.path.basename(outfile), prompt_type, tokenizer) if modelfile else None
    base = SavedWeights(model_dir)
    plans = plan_tensors(base, hp, outtype, model_dir)

    file_type = gguf.LlamaFileType[FILE_TYPES[outtype][0]]
    try:
        with staging_file(outfile) as tmp:  # removed unless published: an error, Ctrl-C
            writer = gguf.GGUFWriter(tmp, hp.arch)
            try:
                writer.add_type("model")
                write_hparams(writer, hp)
                writer.add_file_type(int(file_type))
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
                write_tokenizer(writer, fields, template)
                # Our own key (runtimes ignore keys they do not know): which of prompt.py's templates the
                # model was trained with, so vicuna.cpp can pick it without parsing the Jinja template.
                writer.add_string(PROMPT_TYPE_KEY, prompt_type)
                # Two passes: tensor infos first (shapes and byte sizes are known without the data), then
                # each tensor is read, converted, written and dropped, so memory stays at one tensor.
                for p in plans:
                    byte_shape, nbytes = nbytes_of(p)
                    dtype = {gguf.GGMLQuantizationType.F32: "float32",
                             gguf.GGMLQuantizationType.F16: "float16"}.get(p.qtype, "uint8")
                    writer.add_tensor_info(p.gguf_name, byte_shape, np.dtype(dtype), nbytes,
                                           raw_dtype=p.qtype if dtype == "uint8" else None)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for p in plans:
                    writer.write_tensor_data(tensor_data(p, base, hp))
            finally:
                writer.close()
            publish_file(tmp, outfile)
    except OSError as e:  # disk full, permissions: the staged file is gone, --outfile untouched
        raise UserError(f"--outfile {outfile}: writing failed ({one_line(e)}); nothing was written there") from None
    n_params = sum(math.prod(p.shape) for p in plans)
    logger.info("wrote %s: %d tensors, %.1fM parameters, %s, prompt type %s", outfile, len(plans),
                n_params / 1e6, outtype, prompt_type)
    if modelfile_text is not None:
        write_modelfile(modelfile_path, modelfile_text, outfile)
    info = {"model_dir": model_dir, "prompt_type": prompt_type, "n_params": n_params, "outfile": outfile}
    if outtype not in ("f32", "f16"):
        info["lora_kept"] = warn_if_quantization_undoes_lora(model_dir, base, plans, outtype, outfile)
    return info


LORA_KEPT_WARN = 0.5  # warn when a quantized merged export keeps less than this of the adapter's change


def warn_if_quantization_undoes_lora(model_dir: str, merged, plans: list[TensorPlan], outtype: str,
                                     outfile: str) -> float | None:
    """For a merged folder (tools/merge_lora.py's training_config.json names the base): quantize the
    base's and the merged weights the adapter changed the same way and measure how much of the
    change survives: sum <Q(M)-Q(B), M-B> / sum |M-B|^2 over those tensors (1: all of it, 0: the
    merged export is the base's). A base that was itself dequantized from this grid (the embedded
    Q4_1 SmolLM2) rounds small LoRA deltas back onto it. Under LORA_KEPT_WARN, warns and points to
    the adapter export. Returns the fraction, or None when there is nothing to compare."""
    import gguf
    import numpy as np

    import kquants
    from models import load_training_config

    merged_from = load_training_config(model_dir).get("merged_from") or {}
    base_model = merged_from.get("base_model")
    if not base_model:
        return None
    try:
        base = SavedWeights(resolve_model_folder(base_model))
    except (UserError, OSError) as e:
        logger.info("not measuring what %s keeps of the adapter: base %s unreadable (%s)", outtype, base_model,
                    one_line(e))
        return None
    T = gguf.GGMLQuantizationType
    num = den = 0.0
    for plan in plans:
        if plan.hf_name is None or plan.qtype in (T.F32, T.F16) or plan.hf_name not in base.files \
                or base.shape(plan.hf_name) != plan.shape:
            continue
        m = merged.tensor(plan.hf_name).float().numpy()
        b = base.tensor(plan.hf_name).float().numpy()
        delta = (m - b).astype(np.float64)
        d2 = float((delta * delta).sum())
        if d2 == 0.0:
            continue  # not a LoRA target
        qm = gguf.quants.dequantize(kquants.quantize(np.ascontiguousarray(m, dtype=np.float32), plan.qtype),
                                    plan.qtype)
        qb = gguf.quants.dequantize(kquants.quantize(np.ascontiguousarray(b, dtype=np.float32), plan.qtype),
                                    plan.qtype)
        num += float(((qm - qb).astype(np.float64) * delta).sum())
        den += d2
    if den == 0.0:
        return None
    kept = num / den
    logger.info("%s keeps %.0f %% of the adapter's change to the base weights (merged minus base, before and "
                "after quantization)", outtype, 100 * kept)
    if kept < LORA_KEPT_WARN:
        lora = merged_from.get("lora_path") or "ADAPTER"
        logger.warning("the %s export %s keeps only %.0f %% of the fine-tune's change to the base weights: the rest "
                       "rounds back onto the base's quantization grid, so it answers much like the base model", outtype,
                       outfile, 100 * kept)
        logger.warning("keep the fine-tune: export the adapter itself and run it on the base GGUF: python "
                       "tools/convert_gguf.py --lora_path %s --outfile adapter.gguf; vicuna chat -m BASE.gguf --lora "
                       "adapter.gguf (or export this merged folder as f16 / f32)", lora)
    return kept


# --- LoRA adapters ---------------------------------------------------------------------------------

ADAPTER_OUTTYPES = ("f32", "f16", "q8_0")


@dataclass
class AdapterTensor:
    gguf_name: str  # <base tensor>.lora_a / .lora_b
    data: object    # float32 numpy array, rows first (GGUF's ne is its shape reversed)
    qtype: object   # gguf.GGMLQuantizationType


def _fit_error(lora_path: str, model: str, what: str) -> UserError:
    return UserError(f"adapter {lora_path} does not fit base model {model}: {what}; pass the base model the adapter "
                     "was trained on (--model_path)")


def plan_adapter(modules, hp: HParams, base, outtype: str, alpha: float, lora_path: str,
                 model_path: str) -> list[AdapterTensor]:
    """The adapter's tensors as llama.cpp's convert_lora_to_gguf.py names and shapes them.

    A linear module on base weight W (out, in) becomes `<W's GGUF name>.lora_a` = A (r, in) and
    `.lora_b` = B (out, r), B's rows permuted for attn_q / attn_k exactly as the base export permutes
    W's (A is untouched: the permutation acts on output rows). An embedding module becomes
    `token_embd.weight.lora_a` = A^T (vocab, r) and `.lora_b` = B (dim, r), as llama.cpp flips it.
    llama.cpp scales every pair by alpha / r with the file's one alpha; a module whose own scale
    differs (alpha_pattern, rsLoRA) gets the ratio folded into B, so the file computes the same delta.
    """
    import gguf
    import numpy as np

    name_map = gguf.get_tensor_name_map(gguf_arch(hp), hp.n_layer)
    tied = hp.tied or "lm_head.weight" not in base.files
    out = []
    for m in modules:
        if m.fan_in_fan_out:
            raise UserError(f"--lora_path {lora_path}: {m.module} is fan_in_fan_out (a Conv1D layer); LLaMA's "
                            "linear layers are not, so the adapter is not for a LLaMA model")
        if m.weight_name == "lm_head.weight" and tied:
            raise UserError(f"adapter {lora_path} has LoRA on lm_head, which base model {model_path} ties to "
                            "embed_tokens; llama.cpp cannot apply it (its output is token_embd)")
        if m.weight_name not in base.files:
            raise _fit_error(lora_path, model_path, f"the base has no {m.weight_name} for the adapter's "
                             f"{m.module}")
        if tuple(base.shape(m.weight_name)) != tuple(m.weight_shape()):
            raise _fit_error(lora_path, model_path, f"{m.weight_name} is {tuple(base.shape(m.weight_name))} in "
                             f"the base but the adapter's lora_A {tuple(m.a.shape)} / lora_B {tuple(m.b.shape)} "
                             f"make {tuple(m.weight_shape())}")
        weight = name_map.get_name(m.weight_name, try_suffixes=(".weight",))
        if weight is None:
            raise UserError(f"--lora_path {lora_path}: {m.module} has no llama.cpp tensor name")
        a = m.a.float().numpy()
        b = m.b.float().numpy()
        runtime_scale = alpha / m.rank if alpha else 1.0  # what llama.cpp and vicuna.cpp multiply by
        factor = m.scale / runtime_scale
        if m.embedding:
            lora_a, lora_b = a.T, b
        else:
            lora_a, lora_b = a, b
            if hp.permute and re.search(r"\.q_proj$", m.module):
                lora_b = permute_qk(lora_b, hp.n_head)
            elif hp.permute and re.search(r"\.k_proj$", m.module):
                lora_b = permute_qk(lora_b, hp.n_head_kv)
        if factor != 1.0:
            lora_b = lora_b * np.float32(factor)
        for suffix, data in ((".lora_a", lora_a), (".lora_b", lora_b)):
            data = np.ascontiguousarray(data, dtype=np.float32)
            if not np.isfinite(data).all():
                raise UserError(f"--lora_path {lora_path}: {m.module}{suffix} is not finite after scaling by "
                                f"{factor:g} (per-module alpha / rsLoRA); the adapter is broken")
            name = weight + suffix
            out.append(AdapterTensor(name, data, pick_type(name, data.shape, outtype, False, hp)))
    return out


def base_gguf_shapes(base_gguf: str) -> tuple[str, dict[str, tuple[int, ...]], int]:
    """(general.architecture, {tensor: GGUF shape (ne)}, general.file_type) of a model GGUF."""
    import gguf

    if not os.path.isfile(base_gguf):
        raise UserError(f"--base_gguf {base_gguf}: no such file")
    try:
        reader = gguf.GGUFReader(base_gguf)
        arch = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else ""
        ftype = reader.fields["general.file_type"].contents() if "general.file_type" in reader.fields else -1
        kind = reader.fields["general.type"].contents() if "general.type" in reader.fields else "model"
        shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise UserError(f"--base_gguf {base_gguf}: not a readable GGUF file ({one_line(e)})") from None
    if kind == "adapter":
        raise UserError(f"--base_gguf {base_gguf} is itself an adapter; pass the base model's GGUF")
    return arch, shapes, int(ftype)


def gguf_prompt_type(path: str) -> str | None:
    """The vicuna.prompt_type a GGUF written by this tool carries (None for other files)."""
    import gguf

    field = gguf.GGUFReader(path).fields.get(PROMPT_TYPE_KEY)
    return field.contents() if field is not None else None


def check_adapter_fits_gguf(tensors: list[AdapterTensor], base_gguf: str, outfile: str,
                            adapter_arch: str = "llama") -> int:
    """Every adapter pair targets a tensor of the base GGUF with matching shapes, as llama.cpp and
    vicuna.cpp check at load; one line naming both files otherwise. Returns the base's file type."""
    arch, shapes, ftype = base_gguf_shapes(base_gguf)
    if arch != adapter_arch:
        raise UserError(f"adapter {outfile} does not fit base {base_gguf}: its architecture is {arch!r}, the "
                        f"adapter's {adapter_arch!r}")
    for t in tensors:
        weight, _, kind = t.gguf_name.rpartition(".")
        if weight not in shapes:
            raise UserError(f"adapter {outfile} does not fit base {base_gguf}: the base has no {weight}")
        ne, ne_t = shapes[weight], tuple(reversed(t.data.shape))
        # linear W ne [in, out]: lora_a ne [in, r], lora_b ne [r, out];
        # token_embd ne [dim, vocab]: lora_a ne [r, vocab], lora_b ne [r, dim]
        if weight == "token_embd.weight":
            fits = ne_t[1] == (ne[1] if kind == "lora_a" else ne[0])
        else:
            fits = ne_t[0] == ne[0] if kind == "lora_a" else ne_t[1] == ne[1]
        if not fits:
            raise UserError(f"adapter {outfile} does not fit base {base_gguf}: {weight} is {list(ne)} in the base "
                            f"but {t.gguf_name} is {list(ne_t)}")
    return ftype


def default_base_gguf(model_path: str, model_dir: str) -> str | None:
    """The base model's GGUF when it is evident: --model_path itself, or the embedded model's file."""
    from models import EMBEDDED_MODEL, cache_root, embedded_gguf_path

    if model_path.endswith(".gguf"):
        return model_path
    if model_path == EMBEDDED_MODEL or os.path.realpath(model_dir) == os.path.realpath(
            os.path.join(cache_root(), EMBEDDED_MODEL)):
        return embedded_gguf_path()
    return None


def write_modelfile(path: str, text: str, outfile: str) -> None:
    """The ollama Modelfile beside a finished GGUF, written atomically."""
    try:
        write_text_atomically(path, text)
    except OSError as e:
        raise UserError(f"--modelfile: cannot write {path} ({one_line(e)}); {outfile} is complete") from None
    logger.info("wrote %s", path)


def convert_adapter(lora_path: str, outfile: str, model_path: str | None = None, outtype: str = "f16",
                    prompt_type: str | None = None, overwrite: bool = False, modelfile: bool = False,
                    base_gguf: str | None = None) -> dict:
    """Write a LoRA adapter as a GGUF adapter file (llama.cpp's format) for its base model's GGUF.

    Returns {"model_dir", "prompt_type", "outfile", "base_gguf", "base_file_type", "n_params"}."""
    import gguf
    import numpy as np

    from lora_weights import read_lora_modules

    if outtype not in ADAPTER_OUTTYPES:
        raise UserError(f"--outtype {outtype}: an adapter is written as {', '.join(ADAPTER_OUTTYPES)} (its tensors "
                        "are small, and a coarser grid would round the update away)")
    modelfile_path = check_outputs(outfile, overwrite, modelfile)
    modules, adapter_config = read_lora_modules(lora_path)
    if not model_path:
        model_path = adapter_config.get("base_model_name_or_path")
        if not isinstance(model_path, str) or not model_path:
            raise UserError(f"--lora_path {lora_path}: its adapter_config.json names no base model; pass the base "
                            "with --model_path")
        logger.info("base model %s (the adapter's base_model_name_or_path)", model_path)
    model_dir = resolve_model_folder(model_path)
    config = read_model_config(model_dir, "--model_path")
    hp = HParams.from_config(config, model_dir)
    base = SavedWeights(model_dir)
    prompt_type = resolve_prompt_type(prompt_type, lora_path, "instruct")
    alpha = float(adapter_config.get("lora_alpha", 8))
    tensors = plan_adapter(modules, hp, base, outtype, alpha, lora_path, model_path)
    base_gguf = base_gguf or default_base_gguf(model_path, model_dir)
    base_file_type = check_adapter_fits_gguf(tensors, base_gguf, outfile, hp.arch) if base_gguf else -1
    base_template = gguf_prompt_type(base_gguf) if base_gguf else None
    if prompt_type == "chat_template" and base_template in ("instruct", "chat"):
        # the engine would render the base file's template, which is then our own, not the tokenizer's
        raise UserError(f"adapter {lora_path} was trained with the tokenizer's own chat template, but {base_gguf} "
                        f"was exported with --prompt_type {base_template} (its tokenizer.chat_template is that "
                        "layout); export the base again with --prompt_type chat_template")
    modelfile_text = None
    if modelfile:
        if not base_gguf:
            raise UserError("--modelfile with --lora_path: pass the base model's GGUF with --base_gguf BASE.gguf "
                            "(the Modelfile's FROM line; the adapter is its ADAPTER line)")
        out_dir = os.path.dirname(os.path.abspath(outfile))
        rel = os.path.relpath(os.path.abspath(base_gguf), out_dir)
        from_ref = os.path.abspath(base_gguf) if rel.startswith("..") else rel
        modelfile_text = modelfile_for(from_ref, prompt_type, load_hf_tokenizer(model_dir),
                                       adapter=os.path.basename(outfile))

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    try:
        with staging_file(outfile) as tmp:
            writer = gguf.GGUFWriter(tmp, hp.arch)
            try:
                writer.add_type(gguf.GGUFType.ADAPTER)
                writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
                writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
                writer.add_name(os.path.basename(os.path.normpath(lora_path)))
                writer.add_file_type(int(file_type))
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
                writer.add_string(PROMPT_TYPE_KEY, prompt_type)
                for t in tensors:
                    with np.errstate(over="ignore"):
                        data = gguf.quants.quantize(t.data, t.qtype)
                    if t.qtype == gguf.GGMLQuantizationType.F16 and not np.isfinite(data).all():
                        raise UserError(f"{t.gguf_name} has values beyond float16's range (65504); export with "
                                        "--outtype f32")
                    plain = t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
                    writer.add_tensor(t.gguf_name, data, raw_dtype=None if plain else t.qtype)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()
            publish_file(tmp, outfile)
    except OSError as e:
        raise UserError(f"--outfile {outfile}: writing failed ({one_line(e)}); nothing was written there") from None
    n_params = sum(t.data.size for t in tensors)
    logger.info("wrote %s: %d LoRA pairs, %.2fM parameters, %s, alpha %g, prompt type %s", outfile,
                len(tensors) // 2, n_params / 1e6, outtype, alpha, prompt_type)
    if modelfile_text is not None:
        write_modelfile(modelfile_path, modelfile_text, outfile)
    n_base = sum(math.prod(base.shape(n)) for n in base.files)
    return {"model_dir": model_dir, "prompt_type": prompt_type, "outfile": outfile, "base_gguf": base_gguf,
            "base_file_type": base_file_type, "n_params": n_params, "n_base_params": n_base}


# --- verification ----------------------------------------------------------------------------------


def verify_prompts(model_dir: str, prompt_type: str) -> tuple[list[list[int]], list[str], list[list[int]]]:
    """(prompt ids for the logits check, texts and their HF ids for the tokenizer check)."""
    from prompt import Conversation, build_prompt_ids, generation_prompt
    from models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    convs = [Conversation(turns=[(q, None)]) for q in VERIFY_QUESTIONS]
    prompts = [build_prompt_ids(prompt_type, c, tokenizer) for c in convs]
    texts = [generation_prompt(prompt_type, c, tokenizer) for c in convs] + VERIFY_TEXTS
    return prompts, texts, [list(tokenizer(t)["input_ids"]) for t in texts]


def hf_logits(model_dir: str, prompts: list[list[int]], lora_path: str | None = None):
    """Last-position logits of the Hugging Face model (with the adapter when given), float32, one row
    per prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora_path:
        from models import load_adapter

        model = load_adapter(model, lora_path)
    model.eval()
    with torch.inference_mode():
        return torch.stack([model(torch.tensor([ids])).logits[0, -1] for ids in prompts]).numpy()


def engine_logits(gguf_path: str, prompts: list[list[int]], engine: str, extra: tuple[str, ...] = ()):
    """Last-position logits from `vicuna eval -m F.gguf --ids ... --dump-logits OUT.bin [extra]`."""
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, ids in enumerate(prompts):
            out = os.path.join(tmp, f"logits{k}.bin")
            _run_engine([engine, "eval", "-m", gguf_path, "--ids", ",".join(map(str, ids)), "--dump-logits", out,
                         *extra])
            rows.append(np.fromfile(out, dtype="<f4"))
    return np.stack(rows)


def engine_tokenize(gguf_path: str, texts: list[str], engine: str) -> list[list[int]]:
    """Token ids (BOS as the file says) from `vicuna tokenize -m F.gguf -f FILE --lines`."""
    escaped = [t.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") for t in texts]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "texts.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(escaped) + "\n")
        out = _run_engine([engine, "tokenize", "-m", gguf_path, "-f", path, "--lines"])
    lines = out.splitlines()
    if len(lines) != len(texts):
        raise UserError(f"--verify: {engine} tokenize printed {len(lines)} lines for {len(texts)} texts")
    return [[int(x) for x in line.split()] for line in lines]


def _run_engine(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"--verify: {cmd[0]} {cmd[1]} failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def transformers_gguf_logits(gguf_path: str, prompts: list[list[int]]):
    """Last-position logits of the GGUF as transformers' own GGUF loader reads it (dequantized)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    with torch.inference_mode():
        return torch.stack([model(torch.tensor([ids])).logits[0, -1] for ids in prompts]).numpy()


def transformers_gguf_tokenize(gguf_path: str, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return [list(tokenizer(t)["input_ids"]) for t in texts]


def compare_logits(ref, got) -> dict:
    """Top-1 agreement, max |diff| and max relative diff (max |diff| / max |ref|, per prompt)."""
    import numpy as np

    if ref.shape != got.shape:
        raise UserError(f"--verify: logits of shape {got.shape} from the GGUF, {ref.shape} from the HF model")
    diff = np.abs(ref - got)
    rel = diff.max(axis=1) / np.maximum(np.abs(ref).max(axis=1), 1e-12)
    top1 = (ref.argmax(axis=1) == got.argmax(axis=1))
    return {"n": len(ref), "top1_agree": int(top1.sum()), "max_abs_diff": float(diff.max()),
            "max_rel_diff": float(rel.max())}


def verify(model_dir: str, gguf_path: str, prompt_type: str, engine: str | None = None) -> tuple[dict, str]:
    """(report, which runtime read the GGUF): logits of a few prompts and token ids of a few texts,
    the GGUF through vicuna.cpp when it is built (it reads every --outtype), else through
    transformers, against the HF model."""
    engine = engine or ENGINE
    prompts, texts, want_ids = verify_prompts(model_dir, prompt_type)
    ref = hf_logits(model_dir, prompts)
    built = os.path.isfile(engine) and os.access(engine, os.X_OK)
    if built:
        used = f"vicuna.cpp ({os.path.relpath(engine, ROOT)})"
        got = engine_logits(gguf_path, prompts, engine)
        got_ids = engine_tokenize(gguf_path, texts, engine)
    else:
        used = "transformers' GGUF loader (tools/vicuna.cpp/build/vicuna not built; run `make cpp`)"
        got = transformers_gguf_logits(gguf_path, prompts)
        got_ids = transformers_gguf_tokenize(gguf_path, texts)
    report = compare_logits(ref, got)
    same = [a == b for a, b in zip(want_ids, got_ids)]
    report.update(n_texts=len(texts), tokens_agree=sum(same),
                  first_token_mismatch=next((texts[i] for i, ok in enumerate(same) if not ok), None))
    return report, used


def verify_adapter(info: dict, lora_path: str, adapter_gguf: str, engine: str | None = None) -> dict:
    """Logits of a few prompts: the base GGUF with the adapter GGUF in vicuna.cpp against the Hugging
    Face base with the adapter folder (peft)."""
    engine = engine or ENGINE
    prompts, _, _ = verify_prompts(info["model_dir"], info["prompt_type"])
    ref = hf_logits(info["model_dir"], prompts, lora_path)
    got = engine_logits(info["base_gguf"], prompts, engine, ("--lora", adapter_gguf))
    return compare_logits(ref, got)


def main_adapter(args) -> int:
    info = convert_adapter(args.lora_path, args.outfile, args.model_path, args.outtype, args.prompt_type,
                           args.overwrite, args.modelfile, args.base_gguf)
    print(args.outfile)
    built = os.path.isfile(ENGINE) and os.access(ENGINE, os.X_OK)
    do_verify = args.verify
    if do_verify is None:
        do_verify = built and bool(info["base_gguf"]) and info["n_base_params"] < VERIFY_MAX_PARAMS
    if not do_verify:
        return 0
    if not built or not info["base_gguf"]:
        raise UserError(f"--verify with --lora_path runs the base GGUF with the adapter in vicuna.cpp: "
                        f"{'build it (make cpp)' if not built else 'name the base with --base_gguf BASE.gguf'}; "
                        f"{args.outfile} is written")
    report = verify_adapter(info, args.lora_path, args.outfile)
    print(f"verify (vicuna.cpp, {os.path.basename(info['base_gguf'])} --lora {os.path.basename(args.outfile)} "
          f"against transformers + peft): top-1 agreement {report['top1_agree']}/{report['n']} prompts, "
          f"max logit diff {report['max_abs_diff']:.3g} (relative {report['max_rel_diff']:.3g})")
    if not math.isfinite(report["max_abs_diff"]):
        print("error: the base with the adapter gives NaN or infinite logits: the adapter is broken", file=sys.stderr)
        return 1
    if info["base_file_type"] == 0 and (report["top1_agree"] < report["n"]
                                        or not all_close(report["max_rel_diff"], F32_MAX_REL_DIFF)):
        print(f"error: on an f32 base the adapter disagrees with transformers + peft (limit: same top-1, relative "
              f"difference <= {F32_MAX_REL_DIFF}); {args.outfile} is kept for inspection", file=sys.stderr)
        return 1
    return 0


@cli_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.lora_path:
        return main_adapter(args)
    if args.base_gguf:
        raise UserError("--base_gguf goes with --lora_path (the base an adapter is for)")
    if not args.model_path:
        raise UserError("--model_path is required (or --lora_path ADAPTER to export a LoRA adapter)")
    info = convert(args.model_path, args.outfile, args.outtype, args.prompt_type, args.overwrite, args.modelfile)
    do_verify = args.verify if args.verify is not None else info["n_params"] < VERIFY_MAX_PARAMS
    print(args.outfile)
    if not do_verify:
        return 0
    report, used = verify(info["model_dir"], args.outfile, info["prompt_type"])
    print(f"verify ({used}): top-1 agreement {report['top1_agree']}/{report['n']} prompts, "
          f"max logit diff {report['max_abs_diff']:.3g} (relative {report['max_rel_diff']:.3g}); "
          f"tokenizer: {report['tokens_agree']}/{report['n_texts']} texts give the same ids")
    failed = False
    if not math.isfinite(report["max_abs_diff"]):
        print(f"error: the GGUF's logits differ from the Hugging Face model's by {report['max_abs_diff']} (NaN or "
              "infinite logits): the export is broken", file=sys.stderr)
        failed = True
    if report["first_token_mismatch"] is not None:
        print(f"error: the GGUF's tokenizer splits {report['first_token_mismatch']!r} differently from the "
              "Hugging Face tokenizer", file=sys.stderr)
        failed = True
    if args.outtype == "f32" and (report["top1_agree"] < report["n"]
                                  or not all_close(report["max_rel_diff"], F32_MAX_REL_DIFF)):
        print(f"error: the f32 export disagrees with the Hugging Face model (limit: same top-1, relative "
              f"difference <= {F32_MAX_REL_DIFF})", file=sys.stderr)
        failed = True
    if failed:
        print(f"{args.outfile} is kept for inspection", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
