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
find its base weight with matching shapes. The output goes to a temporary folder beside
--output_path and is renamed into place at the end; an existing non-empty --output_path is refused.

The output folder holds the shards (+ model.safetensors.index.json when there are several),
config.json, generation_config.json, the base's tokenizer files and the adapter's
training_config.json (so tools/convert_gguf.py knows the prompt template it was trained with).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils import (EMBEDDED_MODEL, TRAINING_CONFIG, UserError, cli_errors, logger,  # noqa: E402
                   setup_logging)

DTYPES = ("float16", "bfloat16", "float32")
# Files copied verbatim from the base folder (whichever exist).
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                "vocab.json", "merges.txt")
PREFIX = "base_model.model."  # peft's prefix in front of the wrapped model's module names
INDEX_NAME = "model.safetensors.index.json"


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


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, '1000' -> 1000 (bytes)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = text.strip().upper()
    num = s.rstrip("KMGIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise UserError(f"--max_shard_size {text!r}: expected a size such as 2GB, 500MB or 1000000")
    return int(value * units[unit])


# --- the base checkpoint -------------------------------------------------------------------------


def resolve_base(model_path: str) -> str:
    """A local folder for the base: the embedded model / .gguf (converted once), a local folder, or
    a hub id downloaded with huggingface_hub (weights, config and tokenizer files only)."""
    from utils import resolve_model_path

    path = resolve_model_path(model_path)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    logger.info("downloading %s from the Hugging Face hub", model_path)
    try:
        return snapshot_download(model_path, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "pytorch_model*.bin"])
    except Exception as e:  # RepositoryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--model_path {model_path}: not a local folder and cannot be downloaded ({first})") from None


class BaseCheckpoint:
    """The tensors of a saved model, readable one at a time without loading the whole file.

    `files[name]` is the shard holding tensor `name`; `shape(name)` and `dtype(name)` read only the
    header. Tensors of safetensors shards are read with plain reads, one at a time; .bin shards are
    torch.load-ed with mmap=True, which pages in only the tensors touched.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.files: dict[str, str] = {}
        self._open: dict[str, object] = {}
        for index, single in (("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index_path = os.path.join(folder, index)
            if os.path.isfile(index_path):
                with open(index_path, encoding="utf-8") as f:
                    self.files = dict(json.load(f)["weight_map"])
                break
            if os.path.isfile(os.path.join(folder, single)):
                for name in self._handle(single).keys():
                    self.files[name] = single
                break
        if not self.files:
            raise UserError(f"--model_path {folder}: no model.safetensors, pytorch_model.bin or index file found")

    def shards(self) -> list[str]:
        return sorted(set(self.files.values()))

    def _handle(self, shard: str):
        """A safe_open handle (header queries only) or a torch.load-ed, memory-mapped state dict."""
        if shard not in self._open:
            path = os.path.join(self.folder, shard)
            if not os.path.isfile(path):
                raise UserError(f"--model_path {self.folder}: the index names {shard}, which is missing")
            if shard.endswith(".safetensors"):
                from safetensors import safe_open

                self._open[shard] = safe_open(path, framework="pt")
            else:
                import torch

                self._open[shard] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return self._open[shard]

    def shape(self, name: str) -> tuple[int, ...]:
        shard = self.files[name]
        if shard.endswith(".safetensors"):
            return tuple(self._handle(shard).get_slice(name).get_shape())
        return tuple(self._handle(shard)[name].shape)

    def dtype(self, name: str):
        shard = self.files[name]
        if shard.endswith(".safetensors"):
            return _safetensors_dtypes()[self._handle(shard).get_slice(name).get_dtype()]
        return self._handle(shard)[name].dtype

    def tensor(self, name: str):
        shard = self.files[name]
        if shard.endswith(".safetensors"):
            return self._read_safetensors(shard, name)
        return self._handle(shard)[name]

    def _read_safetensors(self, shard: str, name: str):
        """Read one tensor with plain file reads into a fresh tensor.

        Not get_tensor of a memory-mapped handle: its pages count as resident while the copy is made,
        so reading a 125 MiB tensor would briefly cost 250 MiB.
        """
        import struct

        import torch

        path = os.path.join(self.folder, shard)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            info = json.loads(f.read(n))[name]
            begin, end = info["data_offsets"]
            out = torch.empty(info["shape"], dtype=_safetensors_dtypes()[info["dtype"]])
            f.seek(8 + n + begin)
            view = out.reshape(-1).view(torch.uint8).numpy()
            if f.readinto(memoryview(view)) != end - begin:
                raise UserError(f"{path}: truncated file; {name} is incomplete")
        return out


def _safetensors_dtypes() -> dict:
    """safetensors' dtype names -> torch dtypes."""
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}


def write_safetensors(path: str, entries: list[tuple[str, tuple[int, ...], object]], produce) -> int:
    """Write a safetensors file one tensor at a time; returns its data size in bytes.

    `entries` is [(name, shape, torch dtype)] in file order; `produce(name)` returns each tensor
    just before it is written. safetensors' own save_file takes a dict of every tensor and copies
    them into one buffer, which would hold two copies of a shard; the format (8-byte header length,
    JSON header with data_offsets, raw little-endian data) lets us stream instead.
    """
    import struct

    import torch

    names_of = {v: k for k, v in _safetensors_dtypes().items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * _element_size(dtype)
        header[name] = {"dtype": names_of[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in entries:
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"{name}: produced {tuple(t.shape)} {t.dtype}, planned {shape} {dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t  # before the next produce(): never two tensors alive at once
    return offset


def _element_size(dtype) -> int:
    import torch

    return torch.tensor([], dtype=dtype).element_size()


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
    """The LoRA modules of an adapter folder, with their per-module scale, and its config dict."""
    from utils import find_adapter_weights, load_adapter_state_dict, lora_config_from_dict, read_adapter_config

    if not os.path.isdir(lora_path):
        raise UserError(f"--lora_path {lora_path}: no such directory")
    weights = find_adapter_weights(lora_path)
    from peft.utils.other import get_pattern_key  # after the cheap checks: peft takes seconds to import

    state = load_adapter_state_dict(weights)
    config_dict = read_adapter_config(lora_path, state)
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
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
            raise UserError(f"--lora_path {lora_path}: {module}: lora_A {tuple(a.shape)} and lora_B "
                            f"{tuple(b.shape)} do not form a rank-r pair")
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        deltas.append(LoraDelta(module, a, b, scale, bool(config.fan_in_fan_out), ab["embedding"]))
    return deltas, config_dict


# --- the merge -------------------------------------------------------------------------------------


def check_fits(deltas: list[LoraDelta], base: BaseCheckpoint, lora_path: str, model_path: str,
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


def plan_shards(names: list[str], nbytes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy packing in checkpoint order: a new shard starts when the next tensor would overflow."""
    shards, current, size = [], [], 0
    for name in names:
        if current and size + nbytes[name] > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes[name]
    if current:
        shards.append(current)
    return shards


def base_dtype_name(config: dict) -> str:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return name if name in DTYPES else "float32"


def merge(model_path: str, lora_path: str, output_path: str, dtype: str | None = None,
          max_shard_size: str = "2GB") -> str:
    """Merge `lora_path` into `model_path` and write the result to `output_path`; returns it."""
    import torch

    max_bytes = parse_size(max_shard_size)
    if os.path.exists(output_path) and (not os.path.isdir(output_path) or os.listdir(output_path)):
        raise UserError(f"--output_path {output_path} already exists and is not empty; pass a new folder")
    deltas, adapter_config = read_adapter(lora_path)
    base_dir = resolve_base(model_path)
    with open(os.path.join(base_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    base = BaseCheckpoint(base_dir)
    check_fits(deltas, base, lora_path, model_path, tied=bool(config.get("tie_word_embeddings")))
    by_weight = {d.weight_name: d for d in deltas}

    out_dtype_name = dtype or base_dtype_name(config)
    out_dtype = getattr(torch, out_dtype_name)
    # Shard by shard, each shard's tensors in name order, so each input file is read front to back.
    names = [n for shard in base.shards() for n in sorted(k for k, v in base.files.items() if v == shard)]
    dtypes = {n: out_dtype if base.dtype(n).is_floating_point else base.dtype(n) for n in names}
    shapes = {n: base.shape(n) for n in names}
    nbytes = {n: math.prod(shapes[n]) * _element_size(dtypes[n]) for n in names}
    plan = plan_shards(names, nbytes, max_bytes)
    n_out = len(plan)
    logger.info("merging %d LoRA modules of %s into %s (%d base shard(s) -> %d output shard(s), %s)",
                len(deltas), lora_path, base_dir, len(base.shards()), n_out, out_dtype_name)

    merged = []

    def produce(name: str):
        """One output tensor: the base weight, plus B @ A * scale where the adapter has a module."""
        t = base.tensor(name)
        if name in by_weight:
            merged.append(name)
            return (t.float() + by_weight[name].delta()).to(out_dtype)
        return t.to(dtypes[name])

    parent = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".merging-", dir=parent)
    try:
        weight_map, total = {}, 0
        for i, group in enumerate(plan):
            fname = "model.safetensors" if n_out == 1 else f"model-{i + 1:05d}-of-{n_out:05d}.safetensors"
            total += write_safetensors(os.path.join(tmp, fname), [(n, shapes[n], dtypes[n]) for n in group], produce)
            weight_map.update({n: fname for n in group})
            logger.info("wrote %s (%d tensors)", fname, len(group))
        assert len(merged) == len(deltas), (len(merged), len(deltas))
        if n_out > 1:
            with open(os.path.join(tmp, INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                          f, indent=2)
                f.write("\n")
        config.pop("quantization_config", None)
        config["dtype"] = out_dtype_name
        config.pop("torch_dtype", None)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")
        for name in COPIED_FILES:
            src = os.path.join(base_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, name))
        write_training_config(tmp, lora_path, model_path, adapter_config)
        if os.path.isdir(output_path):
            os.rmdir(output_path)  # empty (checked above)
        os.replace(tmp, output_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("merged %d LoRA modules; saved %s", len(deltas), output_path)
    return output_path


def write_training_config(folder: str, lora_path: str, model_path: str, adapter_config: dict) -> None:
    """The adapter's training_config.json (template name, hyperparameters), plus where it came from."""
    from utils import load_training_config

    training = dict(load_training_config(lora_path))
    training["merged_from"] = {"base_model": model_path, "lora_path": os.path.abspath(lora_path),
                               "r": adapter_config.get("r"), "lora_alpha": adapter_config.get("lora_alpha"),
                               "target_modules": adapter_config.get("target_modules")}
    with open(os.path.join(folder, TRAINING_CONFIG), "w", encoding="utf-8") as f:
        json.dump(training, f, indent=2, ensure_ascii=False, sort_keys=True, default=list)
        f.write("\n")


@cli_errors
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    merge(args.model_path, args.lora_path, args.output_path, args.dtype, args.max_shard_size)
    print(args.output_path)


if __name__ == "__main__":
    main()
