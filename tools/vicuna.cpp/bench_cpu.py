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
Numbers move a lot when other jobs share the cores: compare rows from one run only, and pass
--repeat N to run every configuration N times, interleaved, and print medians.

K-quant files: --make-quant q4_k_m,q6_k quantizes each --quant-from file (f32/f16; `embedded`, the
default: an f32 file of the embedded model) with `vicuna quantize`, and --random llama-1024 or
llama-7b first writes a LLaMA of that shape with random weights (the embedded tokenizer, vocab
49152; the 7B f16 source, 13.5 GB, is deleted once quantized); all cached in the build folder.
--threads 1,2 runs each thread count; --bandwidth measures the streaming read bandwidth (numpy,
1 GiB) and prints how much of it each engine's decode uses (weight bytes per token x tok/s):

    python tools/vicuna.cpp/bench_cpu.py --threads 1,2 --prompt 512 --gen 128 --repeat 3 --no-transformers \
        --make-quant q4_k_m,q6_k --quant-from embedded
    python tools/vicuna.cpp/bench_cpu.py --threads 1,2 --prompt 64 --gen 32 --repeat 3 --no-transformers \
        --random llama-7b --make-quant q4_k_m --bandwidth

LoRA adapters (a second table): --lora ADAPTER.gguf[=MERGED.gguf] times each model with the
adapter applied by `vicuna --lora` (--lora-mode auto, and runtime when auto merges), next to the
merged model's own file when given; --make-lora R:TARGETS makes such a pair for the embedded
model (a random peft adapter of rank R on TARGETS, e.g. 8:q_proj,v_proj or 16:all-linear, its GGUF
via tools/convert_gguf.py --lora_path, and the merged Q4_1 file via tools/merge_lora.py and
convert_gguf.py --outtype q4_1; cached in the build folder):

    python tools/vicuna.cpp/bench_cpu.py --threads 1 --prompt 64 --gen 128 --repeat 5 --no-transformers \
        --models "$(python -c 'import models; print(models.embedded_gguf_path())')" \
        --make-lora 8:q_proj,v_proj --make-lora 16:all-linear
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import statistics
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


def vicuna_bench(model: str, threads: int, n_prompt: int, n_gen: int, extra: tuple[str, ...] = ()) -> tuple[float, float]:
    out = subprocess.run([VICUNA, "bench", "-m", model, "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
                          *extra], capture_output=True, text=True, check=True).stdout
    prefill = float(re.search(r"prefill: ([0-9.]+) tok/s", out).group(1))
    decode = float(re.search(r"decode: ([0-9.]+) tok/s", out).group(1))
    return prefill, decode


def llama_cpp_bench(model: str, threads: int, n_prompt: int, n_gen: int,
                    lora: str | None = None) -> tuple[float, float] | None:
    try:
        import numpy as np
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=model, n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt, n_ubatch=n_prompt,
                n_threads=threads, n_threads_batch=threads, verbose=False, **({"lora_path": lora} if lora else {}))
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


RANDOM_SHAPES = {  # name: (dim, ffn hidden, layers, heads, kv heads); vocab: the embedded model's 49152
    "llama-1024": (1024, 2816, 8, 16, 16),
    "llama-7b": (4096, 11008, 32, 32, 32),
}


def make_random_llama(shape: str, dtype: str = "f16") -> str:
    """A LLaMA GGUF of the given shape with random weights (normal, std 0.02; norms 1), written tensor
    by tensor (never held whole in memory), with the embedded model's tokenizer (vocab 49152)."""
    import gguf
    import numpy as np

    from models import embedded_gguf_path

    dim, ffn, layers, heads, kv_heads = RANDOM_SHAPES[shape]
    path = os.path.join(HERE, "build", f"random-{shape}.{dtype}.gguf")
    if os.path.isfile(path):
        return path
    reader = gguf.GGUFReader(embedded_gguf_path())
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    w = gguf.GGUFWriter(path + ".partial", "llama")
    w.add_name(f"random {shape}")
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(dim // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(1 if dtype == "f16" else 0)
    for key, field in reader.fields.items():  # the tokenizer, as the embedded file has it
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), vtype, sub_type=field.types[1])
        else:
            w.add_key_value(key, field.contents(), vtype)
    np_dtype = np.float16 if dtype == "f16" else np.float32
    tensors = [("token_embd.weight", (vocab, dim))]
    for i in range(layers):
        tensors += [(f"blk.{i}.attn_norm.weight", (dim,)), (f"blk.{i}.attn_q.weight", (dim, dim)),
                    (f"blk.{i}.attn_k.weight", (dim * kv_heads // heads, dim)),
                    (f"blk.{i}.attn_v.weight", (dim * kv_heads // heads, dim)),
                    (f"blk.{i}.attn_output.weight", (dim, dim)), (f"blk.{i}.ffn_norm.weight", (dim,)),
                    (f"blk.{i}.ffn_gate.weight", (ffn, dim)), (f"blk.{i}.ffn_up.weight", (ffn, dim)),
                    (f"blk.{i}.ffn_down.weight", (dim, ffn))]
    tensors += [("output_norm.weight", (dim,)), ("output.weight", (vocab, dim))]
    for name, shp in tensors:
        dt = np.float32 if len(shp) == 1 else np_dtype  # norms stay f32, as converters write them
        w.add_tensor_info(name, shp, np.dtype(dt), int(np.prod(shp)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).astype(np_dtype)  # 16M values, reused
    for name, shp in tensors:
        n = int(np.prod(shp))
        if len(shp) == 1:
            w.write_tensor_data(np.ones(shp, dtype=np.float32))
            continue
        start = int(rng.integers(0, pool.size))  # a rotation of the pool, so rows differ
        w.write_tensor_data(np.resize(np.roll(pool, -start), n).reshape(shp))
    w.close()
    os.replace(path + ".partial", path)
    return path


def quant_path(src: str, qtype: str, extra: tuple[str, ...] = ()) -> str:
    stem = os.path.splitext(os.path.basename(src))[0]
    for suffix in (".f32", ".f16"):
        stem = stem.removesuffix(suffix)
    return os.path.join(HERE, "build", f"{stem}.{qtype}{'-pure' if '--pure' in extra else ''}.gguf")


def make_quant(src: str, qtype: str, extra: tuple[str, ...] = ()) -> str:
    """SRC quantized to QTYPE by `vicuna quantize` (cached in the build folder)."""
    out = quant_path(src, qtype, extra)
    if not os.path.isfile(out):
        subprocess.run([VICUNA, "quantize", src, out, qtype, "--allow-requantize", *extra], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def decode_bytes_per_token(path: str) -> int:
    """Bytes of weights one decoded token reads: every tensor but token_embd (one row of it)."""
    import gguf

    r = gguf.GGUFReader(path)
    total = 0
    for t in r.tensors:
        if t.name == "token_embd.weight":
            total += int(t.n_bytes) // int(t.shape[-1] if len(t.shape) > 1 else 1)
        else:
            total += int(t.n_bytes)
    return total


def memory_bandwidth(threads: int, mib: int = 1024, repeat: int = 5) -> float:
    """Streaming read bandwidth in GB/s: numpy sums over a buffer far larger than the caches,
    split over `threads` threads (numpy releases the GIL in the reduction); best of `repeat`."""
    import threading

    import numpy as np

    buf = np.ones(mib * (1 << 20) // 8, dtype=np.int64)
    parts = np.array_split(buf, threads)
    best = 0.0
    for _ in range(repeat):
        ths = [threading.Thread(target=np.add.reduce, args=(part,)) for part in parts]
        t0 = time.perf_counter()
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        best = max(best, buf.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def median_of(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def make_lora(spec: str) -> str:
    """ADAPTER.gguf=MERGED.gguf for a random adapter of rank R on TARGETS of the embedded model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from models import EMBEDDED_MODEL, resolve_model_path

    rank, _, targets = spec.partition(":")
    if not rank.isdigit() or not targets:
        raise SystemExit(f"error: --make-lora {spec}: expected R:TARGETS, e.g. 8:q_proj,v_proj or 16:all-linear")
    stem = os.path.join(HERE, "build", f"lora-r{rank}-{targets.replace(',', '-')}")
    adapter, merged = stem + ".f16.gguf", stem + ".merged.q4_1.gguf"
    if os.path.isfile(adapter) and os.path.isfile(merged):
        return f"{adapter}={merged}"
    base = resolve_model_path(EMBEDDED_MODEL)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    r = int(rank)
    lora = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                      target_modules=targets if targets == "all-linear" else targets.split(","))
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # random A and B, B small: a working model whose adapter is not zero
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.02)
    shutil.rmtree(stem, ignore_errors=True)
    shutil.rmtree(stem + "-merged", ignore_errors=True)
    peft_model.save_pretrained(stem)
    tools = os.path.join(ROOT, "tools")
    for cmd in ([os.path.join(tools, "convert_gguf.py"), "--lora_path", stem, "--outfile", adapter, "--overwrite",
                 "--no-verify"],
                [os.path.join(tools, "merge_lora.py"), "--lora_path", stem, "--output_path", stem + "-merged"],
                [os.path.join(tools, "convert_gguf.py"), "--model_path", stem + "-merged", "--outfile", merged,
                 "--outtype", "q4_1", "--overwrite", "--no-verify"]):
        subprocess.run([sys.executable, *cmd], check=True, capture_output=True)
    shutil.rmtree(stem + "-merged", ignore_errors=True)
    return f"{adapter}={merged}"


def lora_table(models: list[str], loras: list[str], args) -> None:
    """Decode and prefill with each adapter next to the merged file, medians of --repeat runs."""
    print()
    print("| base model | adapter | applied | prefill tok/s | decode tok/s | decode vs merged file |")
    print("|---|---|---|---|---|---|")
    for model in models:
        for spec in loras:
            adapter, _, merged = spec.partition("=")
            configs = [("base alone", model, ()), ("--lora (auto)", model, ("--lora", adapter)),
                       ("--lora-mode runtime", model, ("--lora", adapter, "--lora-mode", "runtime"))]
            if merged:
                configs.append(("merged file", merged, ()))
            runs: dict[str, list] = {label: [] for label, _, _ in configs}
            for _ in range(args.repeat):
                for label, m, extra in configs:
                    runs[label].append(vicuna_bench(m, args.threads, args.prompt, args.gen, extra))
            out = subprocess.run([VICUNA, "bench", "-m", model, "--lora", adapter, "-p", "16", "-n", "1", "-v"],
                                 capture_output=True, text=True, check=True).stderr
            how = "merged at load" if " 0 applied at run time" in out else "run time"
            ref = median_of(runs["merged file"])[1] if merged else None
            for label, m, _ in configs:
                pre, dec = median_of(runs[label])
                shown = f"{label}: {how}" if label == "--lora (auto)" else label
                ratio = f"{dec / ref:.2f}x" if ref else "n/a"
                print(f"| {os.path.basename(model)} | {os.path.basename(adapter)} | {shown} | {pre:.1f} | {dec:.1f} | "
                      f"{ratio} |")
            sys.stdout.flush()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def llama_cpp_flags() -> str:
    """How the installed llama.cpp was built (its system info line), or why it is not there."""
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python not installed"
    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    return f"llama-cpp-python {llama_cpp.__version__}: {info.strip()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="2", help="threads for every engine; a comma list (1,2) runs each")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill)")
    p.add_argument("--gen", type=int, default=128, help="generated tokens (decode)")
    p.add_argument("--models", nargs="*", help="GGUF files (default: embedded Q4_1 and a Q8_0 made from it)")
    p.add_argument("--make-quant", default="", metavar="TYPES",
                   help="comma list of `vicuna quantize` types (q4_k_m,q6_k,...): quantize each --quant-from file "
                        "(and each --random model) to each, cached in the build folder, and time those files")
    p.add_argument("--quant-from", nargs="*", default=[], metavar="F32.gguf",
                   help="f32/f16 GGUF files for --make-quant; `embedded`: an f32 file of the embedded model, "
                        "dequantized from its Q4_1 (the default when no --random is given either)")
    p.add_argument("--random", default="", metavar="SHAPES",
                   help=f"comma list of random-weight LLaMA shapes to write as --make-quant sources: "
                        f"{', '.join(RANDOM_SHAPES)} (the embedded tokenizer, vocab 49152; llama-7b is written as f16 "
                        f"and deleted once quantized)")
    p.add_argument("--bandwidth", action="store_true",
                   help="measure streaming read bandwidth at each thread count and print how close each "
                        "engine's decode gets to it (weight bytes per token x tok/s / bandwidth)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers reference row")
    p.add_argument("--repeat", type=int, default=1, help="runs of each configuration, interleaved; medians shown")
    p.add_argument("--lora", action="append", default=[], metavar="ADAPTER.gguf[=MERGED.gguf]",
                   help="also time each model with this LoRA adapter (vicuna --lora), next to the merged file")
    p.add_argument("--make-lora", action="append", default=[], metavar="R:TARGETS",
                   help="make a random rank-R adapter on TARGETS of the embedded model (and its merged Q4_1 "
                        "file) and time it as --lora does, e.g. 8:q_proj,v_proj or 16:all-linear")
    p.add_argument("--no-baseline", action="store_true", help="only the LoRA table")
    args = p.parse_args(argv)
    if args.repeat < 1:
        raise SystemExit("error: --repeat must be at least 1")
    if not os.path.isfile(VICUNA):
        raise SystemExit(f"error: {VICUNA} is not built; run `make cpp`")
    thread_counts = [int(t) for t in str(args.threads).split(",") if t]
    args.threads = thread_counts[0]  # the LoRA table and transformers run at the first count
    shapes = [x for x in args.random.split(",") if x]
    for shape in shapes:
        if shape not in RANDOM_SHAPES:
            raise SystemExit(f"error: --random {shape}: known shapes are {', '.join(RANDOM_SHAPES)}")
    qtypes = [x for x in args.make_quant.split(",") if x]
    if shapes and not qtypes:
        raise SystemExit("error: --random needs --make-quant TYPES (the random file is only a source)")

    cmd = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  {cpu_name()}  {os.cpu_count()} cores  "
          f"threads={','.join(map(str, thread_counts))}  prompt={args.prompt}  gen={args.gen}  "
          f"medians of {args.repeat} interleaved runs")
    print(f"# command: python tools/vicuna.cpp/bench_cpu.py {cmd}")
    print(f"# llama.cpp: {llama_cpp_flags()}")
    models = list(args.models or [])
    if qtypes:
        sources = list(args.quant_from)
        for shape in shapes:
            dtype = "f16" if shape == "llama-7b" else "f32"
            src = os.path.join(HERE, "build", f"random-{shape}.{dtype}.gguf")
            if all(os.path.isfile(quant_path(src, q)) for q in qtypes):
                models += [quant_path(src, q) for q in qtypes]
                continue
            src = make_random_llama(shape, dtype)
            outs = [make_quant(src, q) for q in qtypes]
            if shape == "llama-7b":
                os.remove(src)  # 13.5 GB; the quantized files are cached
            models += outs
        if not sources and not shapes:
            sources = ["embedded"]
        if "embedded" in sources:
            from models import embedded_gguf_path

            f32 = os.path.join(HERE, "build", "SmolLM2-135M-Instruct.f32.gguf")
            if not os.path.isfile(f32):
                subprocess.run([VICUNA, "quantize", embedded_gguf_path(), f32, "f32", "--allow-requantize"],
                               check=True, stdout=subprocess.DEVNULL)
            sources = [f32 if src == "embedded" else src for src in sources]
        models = [make_quant(src, q) for src in sources for q in qtypes] + models
    if not models:
        models = default_models()
    loras = list(args.lora) + [make_lora(spec) for spec in args.make_lora]
    if args.no_baseline:
        lora_table(models, loras, args)
        return 0
    bw = {}
    if args.bandwidth:
        for t in thread_counts:
            bw[t] = memory_bandwidth(t)
        print("# streaming read bandwidth (numpy int64 sums over 1 GiB, best of 5): "
              + ", ".join(f"{t} thread{'s' if t > 1 else ''} {bw[t]:.1f} GB/s" for t in thread_counts))
    head = "| model | threads | engine | prefill tok/s | decode tok/s | prefill vs llama.cpp | decode vs llama.cpp |"
    if bw:
        head += " decode weight GB/s | of bandwidth |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for model in models:
        name = os.path.basename(model)
        per_tok = decode_bytes_per_token(model) if bw else 0
        for threads in thread_counts:
            ours, theirs_runs = [], []
            for _ in range(args.repeat):
                ours.append(vicuna_bench(model, threads, args.prompt, args.gen))
                theirs_runs.append(llama_cpp_bench(model, threads, args.prompt, args.gen))
            ours = median_of(ours)
            theirs = median_of(theirs_runs) if all(theirs_runs) else None

            def extra(dec: float | None, per_tok: int = per_tok, threads: int = threads) -> str:
                if not bw:
                    return ""
                if dec is None:
                    return " | |"
                gbs = dec * per_tok / 1e9
                return f" {gbs:.1f} | {gbs / bw[threads]:.0%} |"

            if theirs:
                print(f"| {name} | {threads} | vicuna.cpp | {ours[0]:.1f} | {ours[1]:.2f} | {ours[0] / theirs[0]:.2f}x | "
                      f"{ours[1] / theirs[1]:.2f}x |" + extra(ours[1]))
                print(f"| {name} | {threads} | llama.cpp | {theirs[0]:.1f} | {theirs[1]:.2f} | 1.00x | 1.00x |"
                      + extra(theirs[1]))
            else:
                print(f"| {name} | {threads} | vicuna.cpp | {ours[0]:.1f} | {ours[1]:.2f} | n/a | n/a |" + extra(ours[1]))
                print(f"| {name} | {threads} | llama.cpp | n/a (pip install llama-cpp-python) | n/a | | |" + extra(None))
            sys.stdout.flush()
    if not args.no_transformers:
        tf = transformers_bench(args.threads, args.prompt, args.gen)
        print(f"| SmolLM2-135M-Instruct (f32) | {args.threads} | transformers | {tf[0]:.1f} | {tf[1]:.1f} | | |")
    if loras:
        lora_table(models, loras, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
