"""CPU speed of vicuna.cpp next to llama.cpp (through llama-cpp-python) and transformers.

    make bench-cpu                      # builds vicuna, then runs this with the defaults
    python tools/vicuna.cpp/bench_cpu.py --threads 2 --prompt 512 --gen 128 [--models A.gguf ...]

For each GGUF file it times a prompt of --prompt tokens (prefill) and --gen generated tokens
(decode) with the same thread count in every engine, and prints tokens per second and the
ratio vicuna / llama.cpp. The default files are the embedded SmolLM2-135M-Instruct.Q4_1.gguf and
a Q8_0 file made from it (`vicuna quantize --allow-requantize`, cached in the build folder).
transformers' f32 CPU forward/generate on the same model is the reference row.

llama.cpp is optional: `pip install llama-cpp-python` (it compiles llama.cpp; set
CMAKE_ARGS="-DGGML_NATIVE=ON" for this CPU's SIMD). Without it, its columns say "n/a".
Numbers move a lot when other jobs share the cores: compare rows from one run only.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
VICUNA = os.path.join(HERE, "build", "vicuna")


def bench_tokens(n: int, vocab: int) -> list[int]:
    """The prompt `vicuna bench` uses, so every engine sees the same tokens."""
    return [(i * 7919 + 13) % vocab for i in range(n)]


def vicuna_bench(model: str, threads: int, n_prompt: int, n_gen: int) -> tuple[float, float]:
    out = subprocess.run([VICUNA, "bench", "-m", model, "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen)],
                         capture_output=True, text=True, check=True).stdout
    prefill = float(re.search(r"prefill: ([0-9.]+) tok/s", out).group(1))
    decode = float(re.search(r"decode: ([0-9.]+) tok/s", out).group(1))
    return prefill, decode


def llama_cpp_bench(model: str, threads: int, n_prompt: int, n_gen: int) -> tuple[float, float] | None:
    try:
        import numpy as np
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=model, n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt, n_ubatch=n_prompt,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    tokens = bench_tokens(n_prompt, llm.n_vocab())
    llm.eval(tokens[:16])  # warm-up: page the weights in
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    t1 = time.perf_counter()
    vocab = llm.n_vocab()
    for _ in range(n_gen):  # greedy, like vicuna bench; the last logits straight from the context
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
        llm.eval([int(np.argmax(logits))])
    t2 = time.perf_counter()
    return n_prompt / (t1 - t0), n_gen / (t2 - t1)


def transformers_bench(threads: int, n_prompt: int, n_gen: int) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from models import EMBEDDED_MODEL, resolve_model_path

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(EMBEDDED_MODEL), dtype=torch.float32).eval()
    ids = torch.tensor([bench_tokens(n_prompt, model.config.vocab_size)])
    with torch.no_grad():
        model(ids[:, :16])
        t0 = time.perf_counter()
        model(ids)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=n_gen, min_new_tokens=n_gen, do_sample=False)
        t2 = time.perf_counter()
    prefill_s = t1 - t0
    return n_prompt / prefill_s, n_gen / max(1e-9, (t2 - t1) - prefill_s)


def default_models() -> list[str]:
    from models import embedded_gguf_path

    q4_1 = embedded_gguf_path()
    q8_0 = os.path.join(HERE, "build", "SmolLM2-135M-Instruct.Q8_0.gguf")
    if not os.path.isfile(q8_0):
        subprocess.run([VICUNA, "quantize", q4_1, q8_0, "q8_0", "--allow-requantize"], check=True)
    return [q4_1, q8_0]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="threads for every engine")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill)")
    p.add_argument("--gen", type=int, default=128, help="generated tokens (decode)")
    p.add_argument("--models", nargs="*", help="GGUF files (default: embedded Q4_1 and a Q8_0 made from it)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers reference row")
    args = p.parse_args(argv)
    if not os.path.isfile(VICUNA):
        raise SystemExit(f"error: {VICUNA} is not built; run `make cpp`")

    print(f"# {datetime.date.today()}  {cpu_name()}  {os.cpu_count()} cores  threads={args.threads}  "
          f"prompt={args.prompt}  gen={args.gen}")
    print(f"# command: python tools/vicuna.cpp/bench_cpu.py --threads {args.threads} --prompt {args.prompt} "
          f"--gen {args.gen}")
    print("| model | engine | prefill tok/s | decode tok/s | prefill vs llama.cpp | decode vs llama.cpp |")
    print("|---|---|---|---|---|---|")
    for model in args.models or default_models():
        name = os.path.basename(model)
        ours = vicuna_bench(model, args.threads, args.prompt, args.gen)
        theirs = llama_cpp_bench(model, args.threads, args.prompt, args.gen)
        if theirs:
            print(f"| {name} | vicuna.cpp | {ours[0]:.1f} | {ours[1]:.1f} | {ours[0] / theirs[0]:.2f}x | "
                  f"{ours[1] / theirs[1]:.2f}x |")
            print(f"| {name} | llama.cpp | {theirs[0]:.1f} | {theirs[1]:.1f} | 1.00x | 1.00x |")
        else:
            print(f"| {name} | vicuna.cpp | {ours[0]:.1f} | {ours[1]:.1f} | n/a | n/a |")
            print(f"| {name} | llama.cpp | n/a (pip install llama-cpp-python) | n/a | | |")
        sys.stdout.flush()
    if not args.no_transformers:
        tf = transformers_bench(args.threads, args.prompt, args.gen)
        print(f"| SmolLM2-135M-Instruct (f32) | transformers | {tf[0]:.1f} | {tf[1]:.1f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
