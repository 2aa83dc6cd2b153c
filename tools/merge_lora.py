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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from checkpoints import staging_folder  # noqa: E402
from errors import one_line  # noqa: E402
from errors import UserError, cli_errors, logger, setup_logging
from models import ADAPTER_CONFIG, EMBEDDED_MODEL, TRAINING_CONFIG, read_json_file

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


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, flag: str = "--max_shard_size") -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, '1000' -> 1000 (bytes); at least one byte.

    Only plain decimal numbers: nan, inf, negative numbers, 0 and unknown units are one-line errors.
    """
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:E([+-]?[0-9]{1,3}))?\s*([A-Z]*)\s*", str(text).upper())
    nbytes = float("nan")
    if m and m.group(3) in SIZE_UNITS:
        nbytes = float(f"{m.group(1)}e{m.group(2) or 0}") * SIZE_UNITS[m.group(3)]  # 1e400 -> inf
    if not (math.isfinite(nbytes) and nbytes >= 1):
        raise UserError(f"{flag} {text!r}: expected a positive size such as 2GB, 500MB, 1GiB or 1000000 (bytes)")
    return int(nbytes)


def read_model_config(folder: str, flag: str = "--model_path") -> dict:
    """config.json of a model folder: a JSON object, or a one-line error naming the file."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {folder}: no config.json; pass a Hugging Face model folder")
    return read_json_file(path, dict)


def is_finite(t) -> bool:
    """No NaN or infinity in a tensor; checked in slices so a large tensor costs little extra memory."""
    import torch

    if not t.is_floating_point():
        return True
    flat = t.reshape(-1)
    step = 1 << 24
    return all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step))


# --- the base checkpoint -------------------------------------------------------------------------


def resolve_base(model_path: str) -> str:
    """A local folder for the base: the embedded model / .gguf (converted once), a local folder, or
    a hub id downloaded with huggingface_hub (weights, config and tokenizer files only)."""
    from models import resolve_model_path

    if (os.path.isdir(model_path) and os.path.isfile(os.path.join(model_path, ADAPTER_CONFIG))
            and not os.path.isfile(os.path.join(model_path, "config.json"))):
        raise UserError(f"--model_path {model_path} is a LoRA adapter folder ({ADAPTER_CONFIG}), not a model; "
                        f"pass a full model folder (merge the adapter into its base first: tools/merge_lora.py "
                        f"--lora_path {model_path} --output_path MERGED)")
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
                weight_map = read_json_file(index_path, dict).get("weight_map")
                if not (isinstance(weight_map, dict) and weight_map and all(
                        isinstance(k, str) and isinstance(v, str) and v == os.path.basename(v) and v
                        for k, v in weight_map.items())):
                    raise UserError(f"{index_path}: no \"weight_map\" object naming each tensor's shard file; "
                                    "the index is damaged")
                self.files = dict(weight_map)
                break
            if os.path.isfile(os.path.join(folder, single)):
                names = list(self._handle(single).keys())
                if not names:
                    raise UserError(f"{os.path.join(folder, single)}: holds no tensors; the file is empty or damaged")
                self.files = {name: single for name in names}
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
            try:
                if shard.endswith(".safetensors"):
                    from safetensors import safe_open

                    handle = safe_open(path, framework="pt")
                else:
                    import torch

                    handle = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # SafetensorError, zip/pickle errors: truncated or damaged files
                raise UserError(f"{path}: cannot be read as a {'safetensors' if shard.endswith('.safetensors') else 'PyTorch'} "
                                f"file ({one_line(e)}); it is truncated or damaged") from None
            if not hasattr(handle, "keys"):
                raise UserError(f"{path}: holds a {type(handle).__name__}, not a dict of tensors")
            self._open[shard] = handle
        return self._open[shard]

    def _entry(self, name: str):
        """The header slice (safetensors) or tensor (.bin) of `name`; one line when the shard lacks it."""
        shard = self.files[name]
        handle = self._handle(shard)
        try:
            return handle.get_slice(name) if shard.endswith(".safetensors") else handle[name]
        except Exception:  # SafetensorError / KeyError: the index promises a tensor the shard lacks
            raise UserError(f"{os.path.join(self.folder, shard)}: has no tensor {name}, which "
                            f"{'the index maps to it' if len(self.shards()) > 1 else 'was listed'}; the checkpoint "
                            "is damaged") from None

    def shape(self, name: str) -> tuple[int, ...]:
        if self.files[name].endswith(".safetensors"):
            return tuple(self._entry(name).get_shape())
        return tuple(self._entry(name).shape)

    def dtype(self, name: str):
        if not self.files[name].endswith(".safetensors"):
            return self._entry(name).dtype
        kind = self._entry(name).get_dtype()
        if kind not in _safetensors_dtypes():
            raise UserError(f"{os.path.join(self.folder, self.files[name])}: {name} has dtype {kind}, which this tool "
                            f"does not read ({', '.join(_safetensors_dtypes())})")
        return _safetensors_dtypes()[kind]

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


def adapter_config_path(lora_path: str) -> str:
    """Where read_adapter_config found the config (the folder's, else its parent's), for messages."""
    for folder in (lora_path, os.path.dirname(os.path.abspath(lora_path))):
        if os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
            return os.path.join(folder, ADAPTER_CONFIG)
    return os.path.join(lora_path, ADAPTER_CONFIG) + " (inferred)"


def read_adapter(lora_path: str) -> tuple[list[LoraDelta], dict]:
    """The LoRA modules of an adapter folder, with their per-module scale, and its config dict.

    The adapter file must be readable and hold only finite values (models.check_adapter_file), the
    config a LoRA config whose scales are finite numbers."""
    from models import check_adapter_file, find_adapter_weights, lora_config_from_dict, read_adapter_config

    if not os.path.isdir(lora_path):
        raise UserError(f"--lora_path {lora_path}: no such directory")
    weights = find_adapter_weights(lora_path)
    from peft.utils.other import get_pattern_key  # after the cheap checks: peft takes seconds to import

    state = check_adapter_file(weights)
    config_dict = read_adapter_config(lora_path, state, weights)
    config = lora_config_from_dict(config_dict, lora_path)
    config_path = adapter_config_path(lora_path)
    for key in ("alpha_pattern", "rank_pattern"):
        if not isinstance(getattr(config, key, None) or {}, dict):
            raise UserError(f"{config_path}: \"{key}\" must be an object of module patterns; the file is damaged")
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
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise UserError(f"{config_path}: lora_alpha for {module} is {json.dumps(alpha)}; expected a finite "
                            "number")
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
    check_new_folder(output_path, "--output_path")
    deltas, adapter_config = read_adapter(lora_path)
    training = training_config_of(lora_path, model_path, adapter_config)
    base_dir = resolve_base(model_path)
    config = read_model_config(base_dir)
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
        write_merged(output_path, plan, shapes, dtypes, produce, config, out_dtype_name, base_dir, training)
    except OSError as e:  # disk full, permissions: the staging folder is gone, --output_path untouched
        raise UserError(f"--output_path {output_path}: writing the merged model failed ({one_line(e)}); "
                        "nothing was written there") from None
    assert len(merged) == len(deltas), (len(merged), len(deltas))
    logger.info("merged %d LoRA modules; saved %s", len(deltas), output_path)
    return output_path


def write_merged(output_path: str, plan: list[list[str]], shapes: dict, dtypes: dict, produce, config: dict,
                 out_dtype_name: str, base_dir: str, training: dict) -> None:
    """Shards, index, config, tokenizer files and training_config.json, staged beside output_path
    and moved into place in one rename."""
    n_out = len(plan)
    with staging_folder(output_path) as tmp:
        weight_map, total = {}, 0
        for i, group in enumerate(plan):
            fname = "model.safetensors" if n_out == 1 else f"model-{i + 1:05d}-of-{n_out:05d}.safetensors"
            total += write_safetensors(os.path.join(tmp, fname), [(n, shapes[n], dtypes[n]) for n in group], produce)
            weight_map.update({n: fname for n in group})
            logger.info("wrote %s (%d tensors)", fname, len(group))
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
        with open(os.path.join(tmp, TRAINING_CONFIG), "w", encoding="utf-8") as f:
            json.dump(training, f, indent=2, ensure_ascii=False, sort_keys=True, default=list)
            f.write("\n")
        move_folder_into_place(tmp, output_path, "--output_path")


def check_new_folder(path: str, flag: str) -> None:
    """`path` may be created (or is an empty folder): nothing the user has is ever replaced."""
    if os.path.lexists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UserError(f"{flag} {path} already exists and is not empty; pass a new folder (nothing is overwritten)")


def move_folder_into_place(staged: str, path: str, flag: str) -> None:
    """Rename the finished `staged` folder to `path` (an empty folder there is replaced): one atomic
    rename, so `path` is either absent or complete. Something created at `path` meanwhile is kept:
    rename() replaces only an empty folder."""
    try:
        os.rename(staged, path)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot move the finished output into place ({e.strerror}); "
                        "something else created it meanwhile? nothing was overwritten") from None


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
