"""Merge a LoRA adapter into its base model and save a plain Hugging Face checkpoint.

    python tools/merge_lora.py --lora_path lora-Vicuna --output_path vicuna-merged
    python tools/merge_lora.py --model_path meta-llama/Llama-2-7b-hf --lora_path lora-Vicuna \\
        --output_path vicuna-7b-merged --dtype float16

For every LoRA module the base weight becomes  W + scale * B @ A  (computed in float32), with
scale = lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA, per-module r and alpha from the
adapter's rank_pattern / alpha_pattern, and the transpose for fan_in_fan_out layers. Adapters
trained on an 8-bit or 4-bit base hold the same plain LoRA tensors; they are merged into the
full-precision base. Legacy Chinese-Vicuna folders (`pytorch_model.bin`, old config keys) are read
in place through the same helpers as generate.py.

The merge streams: the base is read one tensor at a time from its safetensors shards (or
`pytorch_model*.bin`, memory-mapped), and output shards are written as soon as they are full, so
peak memory is about one output shard plus the adapter, not the whole model (figures in
docs/performance.md). Everything is checked before anything is written: each adapter tensor must
find its base weight with matching shapes, and the adapter must hold only finite values. Every
output tensor is checked for NaN and infinity as it is written (an adapter from a diverged run, or
a float16 overflow, stops the merge with an error naming the tensor). The output goes to a
temporary folder beside --output_path and is renamed into place at the end, so an interrupted
merge never leaves a half-written model under that name; an existing non-empty --output_path is
refused. Damaged inputs (truncated or empty safetensors, config or index files that are not the
JSON they should be) are one-line errors naming the file.

The output folder holds the shards (+ model.safetensors.index.json when there are several),
config.json, generation_config.json, the base's tokenizer files and the adapter's
training_config.json (so tools/convert_gguf.py knows the prompt template it was trained with).
Its chat template (chat_template.jinja and tokenizer_config.json's chat_template) is that trained
template: prompt.py's instruct or chat layout as Jinja (prompt.chat_template_jinja, what
convert_gguf.py writes into a GGUF); a chat_template adapter keeps the base's own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoints import (DTYPES, check_new_folder, element_size, is_finite, parse_size,  # noqa: E402
                         publish_folder, staging_folder, write_sharded_safetensors)
from errors import UserError, cli_errors, logger, one_line, setup_logging  # noqa: E402
from lora_weights import PEFT_PREFIX, LoraModule, read_lora_modules  # noqa: E402
from model_folder import SavedWeights, read_model_config, resolve_model_folder  # noqa: E402
from models import EMBEDDED_MODEL, save_training_config  # noqa: E402

# Files copied verbatim from the base folder (whichever exist).
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                "vocab.json", "merges.txt")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=EMBEDDED_MODEL,
                   help=f"base model: local folder, Hugging Face id or .gguf (default: embedded {EMBEDDED_MODEL})")
    p.add_argument("--lora_path", required=True, help="adapter folder (ours, plain peft or Chinese-Vicuna)")
    p.add_argument("--output_path", required=True, help="new folder for the merged model (must not hold files)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype of the saved weights (default: the base model's own dtype)")
    p.add_argument("--max_shard_size", default="2GB",
                   help="largest output shard, e.g. 2GB, 500MB (default: 2GB); peak memory is about one shard")
    return p


# --- the adapter -----------------------------------------------------------------------------------


def read_adapter(lora_path: str) -> tuple[list[LoraModule], dict]:
    """The LoRA modules of an adapter folder (lora_weights.read_lora_modules: finite values, a plain
    LoRA config, per-module scales) and its config dict."""
    return read_lora_modules(lora_path)


# --- the merge -------------------------------------------------------------------------------------


def check_fits(deltas: list[LoraModule], base: SavedWeights, lora_path: str, model_path: str,
               tied: bool = False) -> None:
    """Every adapter module has a base weight of the right shape; one line naming both otherwise."""
    for d in deltas:
        if d.weight_name == "lm_head.weight" and tied and d.weight_name not in base.files:
            raise UserError(f"adapter {lora_path} has LoRA on lm_head, which base model {model_path} ties to "
                            "embed_tokens; merging it would untie them, which this tool does not do")
        if d.weight_name not in base.files:
            raise UserError(f"adapter {lora_path} does not fit base model {model_path}: the base has no "
                            f"{d.weight_name} for the adapter's {PEFT_PREFIX}{d.module}; pass the base model the "
                            "adapter was trained on")
        have = base.shape(d.weight_name)
        if have != d.weight_shape():
            raise UserError(f"adapter {lora_path} does not fit base model {model_path}: {d.weight_name} is "
                            f"{have} in the base but the adapter's lora_A {tuple(d.a.shape)} / lora_B "
                            f"{tuple(d.b.shape)} make {d.weight_shape()}; pass the base model the adapter was "
                            "trained on")


def base_dtype_name(config: dict) -> str:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return name if name in DTYPES else "float32"


def merge(model_path: str, lora_path: str, output_path: str, dtype: str | None = None,
          max_shard_size: str = "2GB") -> str:
    """Merge `lora_path` into `model_path` and write the result to `output_path`; returns it."""
    import torch

    max_bytes = parse_size(max_shard_size)
    check_new_folder(output_path, "--output_path")
    deltas, adapter_config = read_adapter(lora_path)
    training = training_config_of(lora_path, model_path, adapter_config)
    base_dir = resolve_model_folder(model_path)
    config = read_model_config(base_dir)
    base = SavedWeights(base_dir)
    check_fits(deltas, base, lora_path, model_path, tied=bool(config.get("tie_word_embeddings")))
    by_weight = {d.weight_name: d for d in deltas}

    out_dtype_name = dtype or base_dtype_name(config)
    out_dtype = getattr(torch, out_dtype_name)
    # Shard by shard, each shard's tensors in name order, so each input file is read front to back.
    names = [n for shard in base.shards() for n in sorted(k for k, v in base.files.items() if v == shard)]
    dtypes = {n: out_dtype if base.dtype(n).is_floating_point else base.dtype(n) for n in names}
    entries = [(n, base.shape(n), dtypes[n]) for n in names]
    logger.info("merging %d LoRA modules of %s into %s (%d base shard(s), %.1f MB as %s)", len(deltas), lora_path,
                base_dir, len(base.shards()), sum(math.prod(s) * element_size(t) for _, s, t in entries) / 1e6,
                out_dtype_name)

    merged = []

    def produce(name: str):
        """One output tensor: the base weight, plus B @ A * scale where the adapter has a module;
        refused when it holds NaN or infinity (a damaged base, an exploding delta, a dtype overflow)."""
        t = base.tensor(name)
        full = None
        if name in by_weight:
            merged.append(name)
            full = t.float() + by_weight[name].delta()
            out = full.to(out_dtype)
        else:
            out = t.to(dtypes[name])
        if is_finite(out):  # one check per tensor; the others only find out why
            return out
        if not is_finite(t):
            raise UserError(f"base model {model_path}: {name} in {base.files[name]} holds NaN or infinite values; "
                            "the base checkpoint is damaged")
        if full is not None and not is_finite(full):
            raise UserError(f"merging {lora_path} makes {name} NaN or infinite (its LoRA delta overflows "
                            "float32); the adapter is broken: retrain it with a lower --learning_rate")
        raise UserError(f"{name} does not fit --dtype {out_dtype_name} after the merge (values beyond its "
                        "range become infinite); pass --dtype float32 or bfloat16")

    try:
        with staging_folder(output_path) as tmp:
            write_sharded_safetensors(tmp, entries, produce, max_bytes)
            write_metadata(tmp, config, out_dtype_name, base_dir, training)
            write_chat_template(tmp, training, lora_path)
            publish_folder(tmp, output_path, "--output_path")
    except OSError as e:  # disk full, permissions: the staging folder is gone, --output_path untouched
        raise UserError(f"--output_path {output_path}: writing the merged model failed ({one_line(e)}); "
                        "nothing was written there") from None
    assert len(merged) == len(deltas), (len(merged), len(deltas))
    logger.info("merged %d LoRA modules; saved %s", len(deltas), output_path)
    return output_path


def write_metadata(folder: str, config: dict, out_dtype_name: str, base_dir: str, training: dict) -> None:
    """config.json (dtype updated, no quantization_config), the base's tokenizer and generation
    files, and training_config.json, into the staging folder."""
    config = {k: v for k, v in config.items() if k not in ("quantization_config", "torch_dtype")}
    config["dtype"] = out_dtype_name
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    for name in COPIED_FILES:
        src = os.path.join(base_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(folder, name))
    save_training_config(folder, training)


def write_chat_template(folder: str, training: dict, lora_path: str) -> None:
    """The merged folder's chat template is the template the adapter was trained with (prompt.py's
    instruct or chat layout as Jinja, the one tools/convert_gguf.py writes into a GGUF), so
    `tokenizer.apply_chat_template`, vLLM, TGI and any HF-side exporter build the trained prompt
    rather than the base's. chat_template adapters keep the base's own template, copied as is.
    Written as chat_template.jinja and as tokenizer_config.json's chat_template (whichever a
    transformers version reads); a copied chat_template.json (processors) is dropped."""
    from models import resolve_prompt_type
    from prompt import chat_template_jinja

    prompt_type = training.get("prompt_type") or resolve_prompt_type(None, lora_path, "instruct")
    if prompt_type == "chat_template":
        return
    template = chat_template_jinja(prompt_type, None)
    with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(template)
    if os.path.isfile(os.path.join(folder, "chat_template.json")):
        os.remove(os.path.join(folder, "chat_template.json"))
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        from checkpoints import read_json_file

        tokenizer_config = read_json_file(config_path, dict)
        tokenizer_config["chat_template"] = template
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
            f.write("\n")
    logger.info("chat template of %s: the %s template it was trained with", folder, prompt_type)


def training_config_of(lora_path: str, model_path: str, adapter_config: dict) -> dict:
    """The adapter's training_config.json (template name, hyperparameters), plus where it came from;
    read before anything is written, so a damaged one stops the merge at once."""
    from models import load_training_config

    training = dict(load_training_config(lora_path))
    training["merged_from"] = {"base_model": model_path, "lora_path": os.path.abspath(lora_path),
                               "r": adapter_config.get("r"), "lora_alpha": adapter_config.get("lora_alpha"),
                               "target_modules": adapter_config.get("target_modules")}
    return training


@cli_errors
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    merge(args.model_path, args.lora_path, args.output_path, args.dtype, args.max_shard_size)
    print(args.output_path)


if __name__ == "__main__":
    main()
