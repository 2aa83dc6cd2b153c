"""The LoRA modules of an adapter folder as the tools read them: A, B and the scale of each.

    modules, config = read_lora_modules("lora-Vicuna")   # ours, plain peft or Chinese-Vicuna
    for m in modules:
        m.module       # "model.layers.0.self_attn.q_proj"
        m.a, m.b       # lora_A (r, in) and lora_B (out, r); an embedding: (r, vocab) and (dim, r)
        m.scale        # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA, per module from
                       # rank_pattern / alpha_pattern

so that delta_W = scale * B @ A (transposed for embeddings and fan_in_fan_out layers). The adapter
file must be readable and hold only finite values (models.check_adapter_file), its config a LoRA
config whose scales are finite numbers (models.check_adapter_config), and the adapter a plain
LoRA: DoRA, trained biases and modules_to_save are refused, one line each. tools/convert_gguf.py
--lora_path writes these modules as a GGUF adapter (llama.cpp's format); the same semantics as
tools/merge_lora.py's merge.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from errors import UserError

PEFT_PREFIX = "base_model.model."  # peft's prefix in front of the wrapped model's module names


@dataclass
class LoraModule:
    """One LoRA module: delta_W = scale * B @ A (transposed for embeddings and fan_in_fan_out)."""

    module: str
    a: object  # torch.Tensor (r, in); an embedding's lora_embedding_A (r, vocab)
    b: object  # torch.Tensor (out, r); an embedding's lora_embedding_B (dim, r)
    scale: float
    fan_in_fan_out: bool = False
    embedding: bool = False

    @property
    def weight_name(self) -> str:
        return self.module + ".weight"

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def weight_shape(self) -> tuple[int, int]:
        """The shape of the base weight this module adapts, as the checkpoint stores it."""
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if (self.embedding or self.fan_in_fan_out) else (out, inp)

    def delta(self):
        """scale * B @ A in float32, shaped like the base weight (what a merge adds to it)."""
        d = self.b.float() @ self.a.float()
        if self.embedding or self.fan_in_fan_out:
            d = d.T
        return d * self.scale


def read_lora_modules(lora_path: str, flag: str = "--lora_path") -> tuple[list[LoraModule], dict]:
    """The LoRA modules of an adapter folder (sorted by module name) and its config dict."""
    from models import check_adapter_file, find_adapter_weights, lora_config_from_dict, read_adapter_config

    if not os.path.isdir(lora_path):
        raise UserError(f"{flag} {lora_path}: no such directory")
    weights = find_adapter_weights(lora_path)
    from peft.utils.other import get_pattern_key  # after the cheap checks: peft takes seconds to import

    state = check_adapter_file(weights)
    config_dict = read_adapter_config(lora_path, state, weights)
    config = lora_config_from_dict(config_dict, lora_path)
    if getattr(config, "use_dora", False):
        raise UserError(f"{flag} {lora_path}: DoRA adapters (use_dora) are not plain LoRA pairs; merge it with "
                        "peft's merge_and_unload and export the merged model instead")
    if getattr(config, "lora_bias", False) or (config.bias or "none") != "none":
        raise UserError(f"{flag} {lora_path}: adapters that train biases (bias={config.bias!r}, "
                        f"lora_bias={getattr(config, 'lora_bias', False)}) are not supported; LLaMA has no biases")
    if config.modules_to_save:
        raise UserError(f"{flag} {lora_path}: modules_to_save={list(config.modules_to_save)} are full copies of "
                        "base modules, not LoRA tensors; merge the adapter (tools/merge_lora.py) instead")

    # base_model.model.<module>.lora_A.weight -> {module: {"A": tensor, "B": tensor}}
    pairs: dict[str, dict] = {}
    for key, value in state.items():
        head, _, tail = key.partition(".lora_")
        tail = tail.removesuffix(".default")  # lora_embedding_A.default of some peft versions
        kind = {"A.weight": "A", "B.weight": "B", "embedding_A": "A", "embedding_B": "B"}.get(tail)
        if kind is None:
            raise UserError(f"{flag} {lora_path}: {key} is not a LoRA A/B tensor")
        module = head[len(PEFT_PREFIX):] if head.startswith(PEFT_PREFIX) else head
        pairs.setdefault(module, {})[kind] = value
        pairs[module]["embedding"] = tail.startswith("embedding_")

    modules = []
    alpha_pattern = config.alpha_pattern or {}
    for module, ab in sorted(pairs.items()):
        if "A" not in ab or "B" not in ab:
            raise UserError(f"{flag} {lora_path}: {module} has lora_{'B' if 'A' in ab else 'A'} but no "
                            f"lora_{'A' if 'A' in ab else 'B'}; the adapter file is incomplete")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or a.shape[0] == 0:
            raise UserError(f"{flag} {lora_path}: {module}: lora_A {tuple(a.shape)} and lora_B "
                            f"{tuple(b.shape)} do not form a rank-r pair")
        r = a.shape[0]
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.lora_alpha)
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        modules.append(LoraModule(module, a, b, float(scale), bool(config.fan_in_fan_out), ab["embedding"]))
    return modules, config_dict
