"""The embedded model as a float model whose weights are off any 4-bit grid: ppl_table.py's reference.

    python tools/vicuna.cpp/rotate_float_reference.py --output build/smollm2-rotated
    python tools/convert_gguf.py --model_path build/smollm2-rotated --outtype f32 \\
        --outfile tools/vicuna.cpp/build/smollm2-rotated.f32.gguf
    python tools/vicuna.cpp/ppl_table.py --model tools/vicuna.cpp/build/smollm2-rotated.f32.gguf --text held.txt

The embedded SmolLM2-135M-Instruct ships only as Q4_1: its float weights sit on Q4_1's grid (16
levels per 32 weights), so re-quantizing them to q4_1 gives them back and every other type is
measured against a format the weights were fitted to. This writes the same function with other
weights, the computational invariance QuaRot and SpinQuant use: each RMSNorm's gain is folded into
the linear layers that read its output (q/k/v, gate/up, and the output head, which becomes untied),
then the residual stream is turned by one random orthogonal matrix R (Haar, from --seed): embeddings
and every layer's input weights become W R, the layers that write into the residual (o_proj,
down_proj) R^T W. RMSNorm without a gain commutes with R (||x R|| = ||x||), so the logits are the
embedded model's to float rounding (checked on a few sequences, printed, and refused above --tol).
Each weight is now a sum of hundreds of grid values with random signs: near-Gaussian, on no grid, as
a model trained in float is. The folder (model.safetensors in f32, config.json with untied embeddings,
the tokenizer) loads in transformers and converts with tools/convert_gguf.py.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def haar_orthogonal(n: int, seed: int):
    """A random orthogonal n x n matrix (float64), uniform over the orthogonal group."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def rotated_state(model, rot) -> dict:
    """The state dict of the rotated model (float32, gains folded, lm_head untied)."""
    import torch

    def w(module):
        return module.weight.detach().double()

    out = {"model.embed_tokens.weight": w(model.model.embed_tokens) @ rot,
           "lm_head.weight": (w(model.lm_head) * w(model.model.norm)) @ rot,
           "model.norm.weight": torch.ones_like(w(model.model.norm))}
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        gain_attn, gain_mlp = w(layer.input_layernorm), w(layer.post_attention_layernorm)
        for name in ("q_proj", "k_proj", "v_proj"):
            out[p + f"self_attn.{name}.weight"] = (w(getattr(attn, name)) * gain_attn) @ rot
        for name in ("gate_proj", "up_proj"):
            out[p + f"mlp.{name}.weight"] = (w(getattr(mlp, name)) * gain_mlp) @ rot
        out[p + "self_attn.o_proj.weight"] = rot.T @ w(attn.o_proj)
        out[p + "mlp.down_proj.weight"] = rot.T @ w(mlp.down_proj)
        out[p + "input_layernorm.weight"] = torch.ones_like(gain_attn)
        out[p + "post_attention_layernorm.weight"] = torch.ones_like(gain_mlp)
    return {k: v.float().contiguous() for k, v in out.items()}


def rotate(model, seed: int = 0):
    """A new LlamaForCausalLM computing `model`'s function with rotated weights (see the module doc)."""
    import copy

    from transformers import LlamaForCausalLM

    cfg = model.config
    if model.config.model_type != "llama":
        raise SystemExit(f"error: model type {cfg.model_type!r}: only llama models are rotated here")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise SystemExit("error: the model has linear biases; this rotation covers bias-free LLaMA models only")
    state = rotated_state(model, haar_orthogonal(cfg.hidden_size, seed))
    new_cfg = copy.deepcopy(cfg)
    new_cfg.tie_word_embeddings = False
    if hasattr(new_cfg, "get_text_config"):
        new_cfg.get_text_config().tie_word_embeddings = False
    rotated = LlamaForCausalLM(new_cfg).float()
    rotated.load_state_dict(state, strict=True)
    return rotated.eval()


def max_logit_difference(a, b, sequences) -> float:
    import torch

    worst = 0.0
    with torch.no_grad():
        for ids in sequences:
            x = torch.tensor([ids])
            worst = max(worst, (a(input_ids=x).logits - b(input_ids=x).logits).abs().max().item())
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", default=None, help="a LLaMA model folder (default: the embedded SmolLM2)")
    p.add_argument("--output", required=True, help="the new Hugging Face folder (must not exist)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rotation (default: 0)")
    p.add_argument("--tol", type=float, default=2e-3,
                   help="largest logit difference to the original model accepted (default: %(default)s)")
    args = p.parse_args(argv)
    if os.path.exists(args.output):
        raise SystemExit(f"error: --output {args.output} exists; pass a new folder")

    import torch

    sys.path.insert(0, ROOT)
    from models import EMBEDDED_MODEL, load_tokenizer, resolve_model_path
    from transformers import AutoModelForCausalLM

    src = resolve_model_path(args.model_path or EMBEDDED_MODEL)
    tokenizer = load_tokenizer(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    rotated = rotate(model, args.seed)
    texts = ["The capital of France is Paris, and the capital of Italy is",
             "请用三句话介绍一下长城的历史。", "def fibonacci(n):\n    return n if n < 2 else"]
    diff = max_logit_difference(model, rotated, [tokenizer(t)["input_ids"] for t in texts])
    changed = (rotated.model.layers[0].mlp.down_proj.weight - model.model.layers[0].mlp.down_proj.weight).abs().mean()
    print(f"largest logit difference to {src}: {diff:.2e}; mean |change| of layer 0 down_proj: {changed:.2e}")
    if diff > args.tol:
        raise SystemExit(f"error: the rotated model's logits differ by {diff:.2e} > --tol {args.tol}")
    rotated.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
