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
from model_folder import SavedWeights, read_model_config, resolve_model_folder  # noqa: E402
from models import EMBEDDED_MODEL, save_training_config  # noqa: E402

# Files copied verbatim from the base folder (whichever exist).
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                "vocab.json", "merges.txt")
PREFIX = "base_model.model."  # peft's prefix in front of the wrapped model's module names


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


class LoraDelta:
    """One LoRA module: delta_W = scale * B @ A (transposed for fan_in_fan_out), shaped like W."""

    def __init__(self, module: str, a, b, scale: float, fan_in_fan_out: bool, embedding: bool):
        self.module, self.a, self.b, self.scale = module, a, b, scale
        self.fan_in_fan_out, self.embedding = fan_in_fan_out, embedding

    @property
    def weight_name(self) -> str:
        return self.module + ".weight"

    def expected_shape(self) -> tuple[int, int]:
        # Linear: A (r, in), B (out, r), W (out, in).  Embedding: A (r, vocab), B (dim, r), W (vocab, dim).
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if (self.embedding or self.fan_in_fan_out) else (out, inp)

    def delta(self):
        d = self.b.float() @ self.a.float()
        if self.embedding or self.fan_in_fan_out:
            d = d.T
        return d * self.scale


def read_adapter(lora_path: str) -> tuple[list[LoraDelta], dict]:
    """The LoRA modules of an adapter folder, with their per-module scale, and its config dict.

    The adapter file must be readable and hold only finite values (models.check_adapter_file), the
    config a LoRA config whose scales are finite numbers (models.check_adapter_config)."""
    from models import check_adapter_file, find_adapter_weights, lora_config_from_dict, read_adapter_config

    if not os.path.isdir(lora_path):
        raise UserError(f"--lora_path {lora_path}: no such directory")
    weights = find_adapter_weights(lora_path)
    from peft.utils.other import get_pattern_key  # after the cheap checks: peft takes seconds to import

    state = check_adapter_file(weights)
    config_dict = read_adapter_config(lora_path, state, weights)
    config = lora_config_from_dict(config_dict, lora_path)
    if getattr(config, "use_dora", False):
        raise UserError(f"--lora_path {lora_path}: DoRA adapters (use_dora) are not supported by this merge; "
                        "merge with peft's merge_and_unload instead")
    if getattr(config, "lora_bias", False) or (config.bias or "none") != "none":
        raise UserError(f"--lora_path {lora_path}: adapters that train biases (bias={config.bias!r}, "
                        f"lora_bias={getattr(config, 'lora_bias', False)}) are not supported; LLaMA has no biases")
    if config.modules_to_save:
        raise UserError(f"--lora_path {lora_path}: modules_to_save={list(config.modules_to_save)} are full copies of "
                        "base modules, not LoRA tensors; this merge does not write them")

    # base_model.model.<module>.lora_A.weight -> {module: {"A": tensor, "B": tensor}}
    pairs: dict[str, dict] = {}
    for key, value in state.items():
        head, _, tail = key.partition(".lora_")
        tail = tail.removesuffix(".default")  # lora_embedding_A.default of some peft versions
        kind = {"A.weight": "A", "B.weight": "B", "embedding_A": "A", "embedding_B": "B"}.get(tail)
        if kind is None:
            raise UserError(f"--lora_path {lora_path}: {key} is not a LoRA A/B tensor this merge understands")
        module = head[len(PREFIX):] if head.startswith(PREFIX) else head
        pairs.setdefault(module, {})[kind] = value
        pairs[module]["embedding"] = tail.startswith("embedding_")

    deltas = []
    for module, ab in sorted(pairs.items()):
        if "A" not in ab or "B" not in ab:
            raise UserError(f"--lora_path {lora_path}: {module} has lora_{'B' if 'A' in ab else 'A'} but no "
                            f"lora_{'A' if 'A' in ab else 'B'}; the adapter file is incomplete")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or a.shape[0] == 0:
            raise UserError(f"--lora_path {lora_path}: {module}: lora_A {tuple(a.shape)} and lora_B "
                            f"{tuple(b.shape)} do not form a rank-r pair")
        r = a.shape[0]
        alpha = (config.alpha_pattern or {}).get(get_pattern_key((config.alpha_pattern or {}).keys(), module),
                                                 config.lora_alpha)
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        deltas.append(LoraDelta(module, a, b, scale, bool(config.fan_in_fan_out), ab["embedding"]))
    return deltas, config_dict


# --- the merge -------------------------------------------------------------------------------------


def check_fits(deltas: list[LoraDelta], base: SavedWeights, lora_path: str, model_path: str,
               tied: bool = False) -> None:
    """Every adapter module has a base weight of the right shape; one line naming both otherwise."""
    for d in deltas:
        if d.weight_name == "lm_head.weight" and tied and d.weight_name not in base.files:
            raise UserError(f"adapter {lora_path} has LoRA on lm_head, which base model {model_path} ties to "
                            "embed_tokens; merging it would untie them, which this tool does not do")
        if d.weight_name not in base.files:
            raise UserError(f"adapter {lora_path} does not fit base model {model_path}: the base has no "
                            f"{d.weight_name} for the adapter's {PREFIX}{d.module}; pass the base model the "
                            "adapter was trained on")
        have = base.shape(d.weight_name)
        if have != d.expected_shape():
            raise UserError(f"adapter {lora_path} does not fit base model {model_path}: {d.weight_name} is "
                            f"{have} in the base but the adapter's lora_A {tuple(d.a.shape)} / lora_B "
                            f"{tuple(d.b.shape)} make {d.expected_shape()}; pass the base model the adapter was "
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
