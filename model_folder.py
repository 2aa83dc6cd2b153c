"""A Hugging Face model folder as the tools read it: found, its config.json, its tensors one at a time.

tools/merge_lora.py and tools/convert_gguf.py read base models file by file rather than through
`from_pretrained`, so that memory stays at about one tensor whatever the model size:

    folder = resolve_model_folder(args.model_path)   # embedded name, .gguf, folder or hub id
    config = read_model_config(folder)
    weights = SavedWeights(folder)                   # safetensors or pytorch_model*.bin, sharded or not
    for name in weights.files: weights.tensor(name)

Damaged files (an index that is not a weight map, a truncated or empty shard, a config that is
not a JSON object) are one-line errors naming the file.
"""

from __future__ import annotations

import os

from checkpoints import INDEX_NAME, read_json_file, read_safetensors_tensor, safetensors_dtypes
from errors import UserError, logger, one_line
from models import ADAPTER_CONFIG, resolve_model_path


def resolve_model_folder(model_path: str, flag: str = "--model_path") -> str:
    """A local folder for `model_path`: the embedded model or a .gguf (converted once, cached), a
    local folder, or a hub id downloaded with huggingface_hub (weights, config and tokenizer files
    only). An adapter folder is refused, naming the merge that makes a model of it."""
    if (os.path.isdir(model_path) and os.path.isfile(os.path.join(model_path, ADAPTER_CONFIG))
            and not os.path.isfile(os.path.join(model_path, "config.json"))):
        raise UserError(f"{flag} {model_path} is a LoRA adapter folder ({ADAPTER_CONFIG}), not a model; "
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
        raise UserError(f"{flag} {model_path}: not a local folder and cannot be downloaded ({one_line(e)})") from None


def read_model_config(folder: str, flag: str = "--model_path") -> dict:
    """config.json of a model folder: a JSON object, or a one-line error naming the file."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {folder}: no config.json; pass a Hugging Face model folder")
    return read_json_file(path, dict)


class SavedWeights:
    """The tensors of a saved model, readable one at a time without loading the whole file.

    `files[name]` is the shard holding tensor `name`; `shape(name)` and `dtype(name)` read only the
    header. Tensors of safetensors shards are read with plain reads, one at a time; .bin shards are
    torch.load-ed with mmap=True, which pages in only the tensors touched.
    """

    def __init__(self, folder: str, flag: str = "--model_path"):
        self.folder, self.flag = folder, flag
        self.files: dict[str, str] = {}
        self._open: dict[str, object] = {}
        for index, single in ((INDEX_NAME, "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
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
            raise UserError(f"{flag} {folder}: no model.safetensors, pytorch_model.bin or index file found")

    def shards(self) -> list[str]:
        return sorted(set(self.files.values()))

    def _handle(self, shard: str):
        """A safe_open handle (header queries only) or a torch.load-ed, memory-mapped state dict."""
        if shard not in self._open:
            path = os.path.join(self.folder, shard)
            if not os.path.isfile(path):
                raise UserError(f"{self.flag} {self.folder}: the index names {shard}, which is missing")
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
        if kind not in safetensors_dtypes():
            raise UserError(f"{os.path.join(self.folder, self.files[name])}: {name} has dtype {kind}, which this tool "
                            f"does not read ({', '.join(safetensors_dtypes())})")
        return safetensors_dtypes()[kind]

    def tensor(self, name: str):
        shard = self.files[name]
        if shard.endswith(".safetensors"):
            return read_safetensors_tensor(os.path.join(self.folder, shard), name)
        return self._handle(shard)[name]
