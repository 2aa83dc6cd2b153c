"""Convert Meta's original LLaMA checkpoint (consolidated.*.pth, params.json, tokenizer.model) to a
Hugging Face model folder.

    python tools/convert_llama.py --input_dir llama --model_size 7B --output_dir llama-7b-hf

--input_dir is the folder of Meta's download: the weights are read from <input_dir>/<model_size>/
when that folder exists (Meta's layout: llama/7B/consolidated.00.pth, llama/tokenizer.model),
otherwise from <input_dir> itself; tokenizer.model is looked up in either.

transformers used to ship this converter (models/llama/convert_llama_weights_to_hf.py); 5.x no
longer does, so this is a small faithful re-implementation of its LLaMA-1/2 path:

- model-parallel shards are concatenated the way Meta split them: wq/wk/wv/w1/w3 and `output` by
  rows, wo/w2 by columns, tok_embeddings by columns (LLaMA-1/2's ParallelEmbedding); norms are
  replicated;
- wq and wk are permuted from Meta's interleaved rotary pairs to HF's rotate-half layout,
  per head (per KV head for wk): w.view(h, d/h/2, 2, in).transpose(1, 2);
- intermediate_size is read from the w1 shape (and checked against params.json's multiple_of /
  ffn_dim_multiplier rule); rope_theta and n_kv_heads come from params.json when present;
- the SentencePiece tokenizer.model becomes a LlamaTokenizer (BOS added, no EOS).

LLaMA-3's tiktoken tokenizer.model is not a SentencePiece model and is refused.
The output is written one tensor at a time into shards of at most --max_shard_size (the inputs are
memory-mapped), so memory stays near one tensor beyond the mapped input shards.

Damaged inputs (a truncated consolidated.*.pth, a params.json that is not an object of positive
sizes, shards that do not fit together, weights holding NaN or infinity) stop the conversion with
one line naming the file. The folder is written under a temporary name beside --output_dir and
renamed into place at the end; an existing non-empty --output_dir is refused.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoints import (DTYPES, check_new_folder, is_finite, parse_size, publish_folder, read_json_file,  # noqa: E402
                         staging_folder, write_sharded_safetensors)
from errors import UserError, cli_errors, logger, one_line, setup_logging  # noqa: E402

# Meta's published sizes -> number of model-parallel shards (as in the old transformers converter).
NUM_SHARDS = {"7B": 1, "7Bf": 1, "13B": 2, "13Bf": 2, "30B": 4, "34B": 4, "65B": 8, "70B": 8, "70Bf": 8}
# Context length by generation: LLaMA-1 was trained with 2048 tokens, LLaMA-2 with 4096.
DEFAULT_CONTEXT = {1: 2048, 2: 4096}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_dir", required=True, help="Meta's download folder (params.json, consolidated.*.pth)")
    p.add_argument("--model_size", default=None,
                   help="7B, 13B, 30B, 65B, 70B ...: subfolder of --input_dir and expected shard count "
                        "(default: read the weights from --input_dir itself)")
    p.add_argument("--output_dir", required=True, help="new folder for the Hugging Face model")
    p.add_argument("--llama_version", type=int, choices=(1, 2), default=2,
                   help="sets max_position_embeddings: 2048 for 1, 4096 for 2 (default: 2)")
    p.add_argument("--max_position_embeddings", type=int, default=None, help="override the context length")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="saved dtype (default: the checkpoint's own)")
    p.add_argument("--max_shard_size", default="2GB", help="largest output shard (default: 2GB)")
    return p


def permute_for_hf(w, n_heads: int):
    """Meta's interleaved rotary pairs -> HF's rotate-half halves, per head; rows of wq/wk."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward hidden size: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def find_inputs(input_dir: str, model_size: str | None) -> tuple[str, list[str], str]:
    """(weights folder, consolidated.*.pth sorted, tokenizer.model path)."""
    if not os.path.isdir(input_dir):
        raise UserError(f"--input_dir {input_dir}: no such directory")
    weights_dir = input_dir
    if model_size and os.path.isdir(os.path.join(input_dir, model_size)):
        weights_dir = os.path.join(input_dir, model_size)
    shards = sorted(glob.glob(os.path.join(weights_dir, "consolidated.*.pth")),
                    key=lambda p: int(re.search(r"consolidated\.(\d+)\.pth$", p).group(1)))
    if not shards:
        where = weights_dir if weights_dir != input_dir or not model_size else f"{input_dir} (nor in {model_size}/)"
        raise UserError(f"--input_dir {where}: no consolidated.*.pth files (Meta's checkpoint format)")
    if not os.path.isfile(os.path.join(weights_dir, "params.json")):
        raise UserError(f"--input_dir {weights_dir}: no params.json")
    expected = NUM_SHARDS.get(model_size or "")
    if expected is not None and expected != len(shards):
        raise UserError(f"--model_size {model_size} has {expected} consolidated shard(s) but {weights_dir} holds "
                        f"{len(shards)}; check --model_size")
    for folder in (weights_dir, input_dir):
        tok = os.path.join(folder, "tokenizer.model")
        if os.path.isfile(tok):
            return weights_dir, shards, tok
    raise UserError(f"--input_dir {input_dir}: no tokenizer.model (in {weights_dir} or {input_dir})")


def read_params(weights_dir: str) -> dict:
    """params.json: an object with positive integer sizes and positive finite norm_eps / rope_theta."""
    path = os.path.join(weights_dir, "params.json")
    params = read_json_file(path, dict)
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise UserError(f"{path}: lacks {key!r}; is this Meta's params.json?")
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of"):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise UserError(f"{path}: \"{key}\" must be a positive integer, got {json.dumps(value)[:80]}; "
                            "the file is damaged")
    for key in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise UserError(f"{path}: \"{key}\" must be a positive number, got {json.dumps(value)[:80]}; "
                            "the file is damaged")
    vocab = params.get("vocab_size", -1)
    if isinstance(vocab, bool) or not isinstance(vocab, int) or (vocab <= 0 and vocab != -1):
        raise UserError(f"{path}: \"vocab_size\" must be a positive integer or -1, got {json.dumps(vocab)[:80]}")
    return params


def convert_tokenizer(tokenizer_model: str, out_dir: str):
    """tokenizer.model -> a saved LlamaTokenizer (tokenizer.json + tokenizer.model); returns it."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    try:
        spm.SentencePieceProcessor(model_file=tokenizer_model)
    except Exception:  # RuntimeError, OSError: damaged files, tiktoken models
        raise UserError(f"{tokenizer_model} is not a SentencePiece model (damaged, or LLaMA-3's tiktoken tokenizer, "
                        "which this converter does not support)") from None
    with tempfile.TemporaryDirectory() as raw:
        shutil.copyfile(tokenizer_model, os.path.join(raw, "tokenizer.model"))
        with open(os.path.join(raw, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                       "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False}, f)
        tokenizer = AutoTokenizer.from_pretrained(raw)
        tokenizer.save_pretrained(out_dir)
    shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
    return tokenizer


def convert(input_dir: str, output_dir: str, model_size: str | None = None, llama_version: int = 2,
            max_position_embeddings: int | None = None, dtype: str | None = None,
            max_shard_size: str = "2GB") -> str:
    import torch

    max_bytes = parse_size(max_shard_size)
    check_new_folder(output_dir, "--output_dir")
    weights_dir, shard_paths, tokenizer_model = find_inputs(input_dir, model_size)
    params = read_params(weights_dir)
    dim, n_layers, n_heads = params["dim"], params["n_layers"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise UserError(f"{os.path.join(weights_dir, 'params.json')}: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv} "
                        "do not divide evenly (into heads of an even size)")

    loaded = []
    for path in shard_paths:
        try:
            shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # not a zip/pickle, truncated file
            raise UserError(f"{path}: cannot be read as a PyTorch checkpoint ({one_line(e)}); it is truncated "
                            "or damaged") from None
        if not isinstance(shard, dict) or not all(isinstance(v, torch.Tensor) for v in shard.values()):
            raise UserError(f"{path}: holds a {type(shard).__name__}, not a dict of tensors; is this Meta's "
                            "LLaMA checkpoint?")
        loaded.append(shard)
    first = loaded[0]
    for key in ("tok_embeddings.weight", "norm.weight", "output.weight", "layers.0.feed_forward.w1.weight"):
        if key not in first:
            raise UserError(f"{shard_paths[0]}: no {key}; is this Meta's LLaMA checkpoint?")
    # Every shard has every tensor that params.json's n_layers implies (finiteness is checked as
    # each output tensor is made, so the weights are read once).
    wanted = [k for k in first if not k.startswith("layers.")] + [
        f"layers.{i}.{k.split('.', 2)[2]}" for i in range(n_layers) for k in first if k.startswith("layers.0.")]
    for path, shard in zip(shard_paths, loaded):
        missing = [k for k in wanted if k not in shard]
        if missing:
            raise UserError(f"{path}: no {missing[0]} ({len(missing)} tensors missing); the checkpoint is incomplete "
                            f"or params.json's n_layers ({n_layers}) does not match it")
        odd = next((k for k in wanted if not shard[k].is_floating_point()), None)
        if odd:
            raise UserError(f"{path}: {odd} is {shard[odd].dtype}, not a float tensor; the checkpoint is damaged")
    n_shards = len(loaded)
    # params.json must describe these weights: a wrong head count would permute the rotary pairs
    # of wq/wk wrongly and give a model that loads but is garbage.
    head_dim = dim // n_heads
    for key, rows, what in (("layers.0.attention.wq.weight", n_heads * head_dim, "n_heads x head size"),
                            ("layers.0.attention.wk.weight", n_kv * head_dim, "n_kv_heads x head size")):
        have = first[key].shape[0] * n_shards
        if first[key].dim() != 2 or have != rows:
            raise UserError(f"{os.path.join(weights_dir, 'params.json')}: dim {dim}, n_heads {n_heads} and n_kv_heads "
                            f"{n_kv} give {key} {rows} rows ({what}), but the checkpoint's has {have}; params.json "
                            "does not match the weights")
    if first["tok_embeddings.weight"].dim() != 2 or first["tok_embeddings.weight"].shape[1] * n_shards != dim:
        raise UserError(f"{os.path.join(weights_dir, 'params.json')}: dim {dim} does not match tok_embeddings "
                        f"{tuple(first['tok_embeddings.weight'].shape)} x {n_shards} shard(s); params.json does not "
                        "match the weights")
    n_ff = first["layers.0.feed_forward.w1.weight"].shape[0] * n_shards
    if "multiple_of" in params:
        formula = ffn_size(dim, params["multiple_of"], params.get("ffn_dim_multiplier"))
        if formula != n_ff:
            logger.warning("params.json implies a feed-forward size of %d but w1 has %d rows; using %d",
                           formula, n_ff, n_ff)

    src_dtype = first["tok_embeddings.weight"].dtype
    out_dtype = getattr(torch, dtype) if dtype else src_dtype

    try:
        write_hf_folder(output_dir, weights_dir, loaded, first, params, tokenizer_model, max_bytes, out_dtype,
                        n_ff, llama_version, max_position_embeddings)
    except OSError as e:  # disk full, permissions: the staging folder is gone, --output_dir untouched
        raise UserError(f"--output_dir {output_dir}: writing failed ({one_line(e)}); nothing was written there") from None
    except RuntimeError as e:  # torch.cat / view: shard or head shapes that do not fit params.json
        raise UserError(f"{weights_dir}: the checkpoint's tensors do not fit together or do not match params.json "
                        f"({one_line(e)})") from None
    logger.info("converted %d shard(s) of %s: %d layers, hidden %d, %d heads (%d KV) -> %s",
                n_shards, weights_dir, n_layers, dim, n_heads, n_kv, output_dir)
    return output_dir


def hf_layout(n_layers: int, n_heads: int, n_kv: int) -> list[tuple[str, str, int | None, int]]:
    """[(HF name, Meta name, dimension along which Meta's model-parallel shards are concatenated
    (None: replicated norms), heads to permute the rows by (wq, wk) or 0)], in checkpoint order."""
    out = [("model.embed_tokens.weight", "tok_embeddings.weight", 1, 0)]
    for i in range(n_layers):
        p, m = f"layers.{i}.", f"model.layers.{i}."
        out += [(m + "self_attn.q_proj.weight", p + "attention.wq.weight", 0, n_heads),
                (m + "self_attn.k_proj.weight", p + "attention.wk.weight", 0, n_kv),
                (m + "self_attn.v_proj.weight", p + "attention.wv.weight", 0, 0),
                (m + "self_attn.o_proj.weight", p + "attention.wo.weight", 1, 0),
                (m + "mlp.gate_proj.weight", p + "feed_forward.w1.weight", 0, 0),
                (m + "mlp.down_proj.weight", p + "feed_forward.w2.weight", 1, 0),
                (m + "mlp.up_proj.weight", p + "feed_forward.w3.weight", 0, 0),
                (m + "input_layernorm.weight", p + "attention_norm.weight", None, 0),
                (m + "post_attention_layernorm.weight", p + "ffn_norm.weight", None, 0)]
    return out + [("model.norm.weight", "norm.weight", None, 0), ("lm_head.weight", "output.weight", 0, 0)]


def write_hf_folder(output_dir: str, weights_dir: str, loaded: list[dict], first: dict, params: dict,
                    tokenizer_model: str, max_bytes: int, out_dtype, n_ff: int, llama_version: int,
                    max_position_embeddings: int | None) -> None:
    """Tokenizer, shards, config and generation config, staged beside output_dir and renamed into place."""
    import torch
    from transformers import GenerationConfig, LlamaConfig

    dim, n_layers, n_heads = params["dim"], params["n_layers"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim = dim // n_heads
    n_shards = len(loaded)
    layout = hf_layout(n_layers, n_heads, n_kv)
    source = {hf: (meta, cat_dim, heads) for hf, meta, cat_dim, heads in layout}

    def shape_of(meta: str, cat_dim: int | None) -> tuple[int, ...]:
        shape = list(first[meta].shape)
        if cat_dim is not None and len(shape) > 1:
            shape[cat_dim] *= n_shards
        return tuple(shape)

    def produce(name: str):
        """One output tensor from Meta's shards; NaN or infinity in it (from the checkpoint or a
        float16 overflow) is refused."""
        meta, cat_dim, heads = source[name]
        parts = [s[meta] for s in loaded]
        tensor = parts[0] if cat_dim is None or n_shards == 1 or parts[0].dim() == 1 else torch.cat(parts, cat_dim)
        if heads:
            tensor = permute_for_hf(tensor, heads)
        converted = tensor.to(out_dtype)
        if not is_finite(converted):
            cause = ("holds NaN or infinite values in the checkpoint; the checkpoint is damaged"
                     if not is_finite(tensor) else
                     f"has values beyond {str(out_dtype).removeprefix('torch.')}'s range; pass --dtype float32 "
                     "or bfloat16")
            raise UserError(f"{weights_dir}: {name} {cause}")
        return converted

    with staging_folder(output_dir) as tmp:
        tokenizer = convert_tokenizer(tokenizer_model, tmp)
        vocab_size = first["tok_embeddings.weight"].shape[0]
        if params.get("vocab_size", -1) not in (-1, vocab_size):
            raise UserError(f"params.json says vocab_size {params['vocab_size']} but tok_embeddings has {vocab_size} rows")
        if len(tokenizer) > vocab_size:
            raise UserError(f"{tokenizer_model} has {len(tokenizer)} tokens but the checkpoint only {vocab_size} embeddings")
        write_sharded_safetensors(tmp, [(hf, shape_of(meta, cat_dim), out_dtype) for hf, meta, cat_dim, _ in layout],
                                  produce, max_bytes)
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=dim, intermediate_size=n_ff, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
            rms_norm_eps=params.get("norm_eps", 1e-5),
            max_position_embeddings=max_position_embeddings or DEFAULT_CONTEXT[llama_version],
            rope_theta=float(params.get("rope_theta", 10000.0)), tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            architectures=["LlamaForCausalLM"])
        config.dtype = str(out_dtype).removeprefix("torch.")
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(tmp)
        publish_folder(tmp, output_dir, "--output_dir")


@cli_errors
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    convert(args.input_dir, args.output_dir, args.model_size, args.llama_version, args.max_position_embeddings,
            args.dtype, args.max_shard_size)
    print(args.output_dir)


if __name__ == "__main__":
    main()
