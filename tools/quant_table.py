"""Perplexity of every way we quantize the embedded model, on the same chunks of the same texts: one table.

    python tools/quant_table.py [--cache .cache/ppl_table] [--texts sample/ppl/en.txt,sample/ppl/zh.txt]
        [--rows float,int8,nf4,rtn4,gptq4,...] [--nsamples 128] [--seqlen 512] [--ready]

Rows (issue 15): the float model (f32, transformers), bitsandbytes int8 and nf4 (`eval_ppl.py
--quant`), round-to-nearest, GPTQ and AWQ folders of tools/quantize.py (symmetric int, group size
64: SmolLM2-135M's hidden size 576 is no multiple of 128), and GGUF exports scored by `vicuna
perplexity` (`eval_ppl.py --engine vicuna`; the files of tools/vicuna.cpp/ppl_table.py: the f32
export and `vicuna quantize` of it). Every model is made once into --cache (the quantized folders,
by the same tools/quantize.py command a user runs, printed as it starts) and every score is cached
there as eval_ppl.py's --json, so a rerun only adds what is missing; --ready scores what is already
made and marks the rest "not made" (to fill the table while quantizations still run).

Every row scores the same token ids: eval_ppl.py's text_token_ids, cut into --ctx chunks, the
second half of each scored (llama.cpp's method); the script checks that vicuna's tokenization of
each text gives the same ids and prints the f32 GGUF's perplexity next to the float model's
(eval_ppl.py's documented agreement: 1e-3). "loss" is the perplexity over the float model's - 1.
Size: the files on disk (safetensors or GGUF); bitsandbytes quantizes at load, so its row gives
the loaded model's memory footprint instead.

--layer_errors rtn4,gptq4: where the quantized folders' error is, per kind of linear layer: the
relative weight error ||W' - W||^2 / ||W||^2 and the relative output error on the float model's
own inputs X to that layer, ||(W' - W) X||^2 / ||W X||^2 (GPTQ's objective), summed over the 30
layers, with X from the first --layer_chunks chunks of each text (held out) and from the records
tools/quantize.py calibrates on by default (--nsamples x --seqlen), each with and without position
0 (whose activations in SmolLM2 are far larger than the rest). (Not for AWQ: its scales move into
the preceding norm, so W' there multiplies another X.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "vicuna.cpp"))

import ppl_table  # noqa: E402  tools/vicuna.cpp/ppl_table.py: the GGUF files

TEXTS = ("sample/ppl/en.txt", "sample/ppl/zh.txt")
GROUP = 64
# key: (label, kind, argument): kind float/bnb (eval_ppl.py --quant), folder (tools/quantize.py flags), gguf (type)
ROWS = {
    "float": ("float (f32, transformers)", "float", None),
    "int8": ("bitsandbytes int8", "bnb", "8bit"),
    "nf4": ("bitsandbytes nf4", "bnb", "4bit"),
    # gptq4/3/2: columns in their natural order (--no-desc_act); gptq*act: act-order, the tool's default
    **{f"rtn{b}": (f"RTN {b}-bit g{GROUP}", "folder", ["--method", "rtn", "--bits", str(b)]) for b in (4, 3, 2)},
    **{f"gptq{b}": (f"GPTQ {b}-bit g{GROUP} --no-desc_act", "folder",
                    ["--method", "gptq", "--bits", str(b), "--no-desc_act"]) for b in (4, 3, 2)},
    "gptq3act": (f"GPTQ 3-bit g{GROUP} --desc_act", "folder", ["--method", "gptq", "--bits", "3", "--desc_act"]),
    "gptq4act": (f"GPTQ 4-bit g{GROUP} --desc_act", "folder", ["--method", "gptq", "--bits", "4", "--desc_act"]),
    "gptq4actpack": (f"GPTQ 4-bit g{GROUP} --desc_act --pack", "folder",
                     ["--method", "gptq", "--bits", "4", "--desc_act", "--pack"]),
    "awq4": (f"AWQ 4-bit g{GROUP}", "folder", ["--method", "awq", "--bits", "4"]),
    # calibration on the English records of the default file only (CALIB_EN, made by english_records)
    "gptq4en": (f"GPTQ 4-bit g{GROUP} --no-desc_act, English calibration", "folder",
                ["--method", "gptq", "--bits", "4", "--no-desc_act", "--calib_data"]),
    **{f"gguf-{t}": (f"GGUF {t} (vicuna)", "gguf", t) for t in ("f32", "q8_0", "q4_1", "q4_0", "q4_k_m")},
}
ORDER = ("float", "int8", "nf4", "rtn4", "gptq4", "gptq4en", "gptq4act", "gptq4actpack", "awq4", "rtn3", "gptq3",
         "gptq3act", "rtn2", "gptq2", "gguf-f32", "gguf-q8_0", "gguf-q4_1", "gguf-q4_0", "gguf-q4_k_m")


def folder_name(flags: list[str]) -> str:
    """gptq-w4g64, rtn-w3g64, gptq-w4g64-act-pack, gptq-w4g64-en: the cache folder of a tools/quantize.py row."""
    method, bits = flags[flags.index("--method") + 1], flags[flags.index("--bits") + 1]
    return (f"{method}-w{bits}g{GROUP}" + ("-act" if "--desc_act" in flags else "")
            + ("-pack" if "--pack" in flags else "") + ("-en" if "--calib_data" in flags else ""))


def english_records(cache: str) -> str:
    """The records of tools/quantize.py's default calibration file with no Chinese character
    (`grep -vP '\\p{Han}' sample/instruct/data_sample.jsonl`: 154 of 314)."""
    import eval_data

    out = os.path.join(cache, "calib_en.jsonl")
    with open(eval_data.DEFAULT_CALIB, encoding="utf-8") as f:
        lines = [ln for ln in f if not any("\u4e00" <= c <= "\u9fff" for c in ln)]
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return out


def quantize_command(flags: list[str], out: str, nsamples: int, seqlen: int, model_path: str | None = None) -> list[str]:
    calib = [] if "rtn" in flags else ["--nsamples", str(nsamples), "--seqlen", str(seqlen)]
    if "--calib_data" in flags:
        flags = [*flags, english_records(os.path.dirname(out))]
    model = ["--model_path", model_path] if model_path else []
    return [sys.executable, os.path.join(HERE, "quantize.py"), *flags, *model, "--group_size", str(GROUP), *calib,
            "--output_path", out]


def files_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))


def base_model(args) -> str:
    """The float model every row is made from: --model_path, else the embedded model."""
    from models import EMBEDDED_MODEL, resolve_model_path

    return resolve_model_path(args.model_path or EMBEDDED_MODEL)


def f32_gguf(args) -> str:
    """The base model as an f32 GGUF: ppl_table.py's for the embedded model, else made into --cache."""
    if not args.model_path:
        return ppl_table.f32_reference()
    out = os.path.join(args.cache, "model.f32.gguf")
    if not os.path.isfile(out):
        subprocess.run([sys.executable, os.path.join(HERE, "convert_gguf.py"), "--model_path", base_model(args),
                        "--outfile", out, "--outtype", "f32"], check=True)
    return out


def bnb_footprint(quant: str, args) -> int:
    from models import load_model

    return load_model(base_model(args), quant=quant).get_memory_footprint()


def model_for(key: str, args) -> tuple[list[str] | None, int | None, str]:
    """(eval_ppl.py flags, size in bytes, size note) for a row, making its model first (None: not made)."""
    _, kind, arg = ROWS[key]
    if kind == "float":
        path = base_model(args)
        return ["--model_path", path], files_size(path), ""
    if kind == "bnb":
        return ["--model_path", base_model(args), "--quant", arg], None, "in memory"
    if kind == "gguf":
        path = ppl_table.quantized(f32_gguf(args), arg)
        return ["--model_path", path, "--engine", "vicuna"], files_size(path), ""
    out = os.path.join(args.cache, folder_name(arg))
    if not os.path.isdir(out):
        cmd = quantize_command(arg, out, args.nsamples, args.seqlen, args.model_path)
        if args.ready:
            return None, None, ""
        print("$ " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd), flush=True)
        subprocess.run(cmd, check=True)
    made = json.load(open(os.path.join(out, "training_config.json")))["quantized"]
    note = ""
    if "nsamples" in made:
        note = (f"{made['nsamples']} {'packed ' if made.get('pack') else ''}x {made['seqlen']} calibration"
                + (f" ({made['calib_tokens']:,} tokens)" if "calib_tokens" in made else ""))
    return ["--model_path", out], files_size(out), note


def score(key: str, flags: list[str], text: str, args) -> dict:
    """eval_ppl.py's result for the row on the text (cached in --cache/scores)."""
    name = os.path.splitext(os.path.basename(text))[0]
    out = os.path.join(args.cache, "scores", f"{key}.{name}.ctx{args.ctx}.json")
    if not os.path.isfile(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.run([sys.executable, os.path.join(HERE, "eval_ppl.py"), *flags, "--text", text, "--ctx",
                        str(args.ctx), "--json", out], check=True)
    return json.load(open(out))["results"][0]


def same_ids(text: str, args) -> str:
    """Whether vicuna's tokenization of the text (BOS handling included) is eval_ppl.py's."""
    from eval_data import read_text, text_token_ids
    from models import load_tokenizer

    ours, bos = text_token_ids(load_tokenizer(base_model(args)), read_text(text))
    theirs, vbos = ppl_table.vicuna_ids(f32_gguf(args), text)
    theirs = ([vbos] if vbos is not None else []) + theirs
    if ours == theirs and bos == vbos:
        return f"{text}: {len(ours)} token ids, the same in transformers and vicuna.cpp"
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    raise SystemExit(f"error: {text}: transformers and vicuna.cpp tokenize differently from id {first}")


def text_chunks(texts: list[str], ctx: int, chunks: int, model_dir: str) -> list[list[int]]:
    """The first `chunks` chunks of each text, as eval_ppl.py cuts them."""
    from eval_data import read_text, text_token_ids
    from models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    out = []
    for text in texts:
        ids, bos = text_token_ids(tokenizer, read_text(text))
        for ch in range(min(chunks, len(ids) // ctx)):
            out.append(ids[ch * ctx:(ch + 1) * ctx])
            if bos is not None:
                out[-1][0] = bos
    return out


def calibration_records(nsamples: int, seqlen: int, path: str) -> list[list[int]]:
    """The records tools/quantize.py calibrates on by default (sample/instruct, its template and order)."""
    import eval_data
    from data import load_conversations
    from models import load_tokenizer

    fmt, convs = load_conversations(eval_data.DEFAULT_CALIB)
    prompt_type = eval_data.calibration_prompt_type(None, path, fmt)
    return eval_data.calibration_ids(convs, eval_data.DEFAULT_CALIB, load_tokenizer(path), prompt_type, nsamples, seqlen)


def input_grams(model, sequences: list[list[int]]) -> dict:
    """{linear name: (X0^T X0, X^T X)}: the float model's inputs to each linear layer, at position 0
    of each sequence and at the other positions."""
    import torch

    grams, hooks = {}, []

    def hook(name):
        def pre(module, inputs):
            x = inputs[0][0].float()
            if name not in grams:
                grams[name] = (torch.zeros(x.shape[1], x.shape[1]), torch.zeros(x.shape[1], x.shape[1]))
            grams[name][0].addr_(x[0], x[0])
            grams[name][1].addmm_(x[1:].T, x[1:])
        return pre

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            hooks.append(module.register_forward_pre_hook(hook(name)))
    with torch.no_grad():
        for seq in sequences:
            model(input_ids=torch.tensor([seq]), use_cache=False)
    for h in hooks:
        h.remove()
    return grams


def layer_errors(keys: list[str], args, texts: list[str]) -> None:
    """Prints the --layer_errors tables (see the module docstring)."""
    import re

    import torch
    from compressed_tensors import decompress_module

    from models import load_model

    reference = load_model(base_model(args), dtype=torch.float32).eval()
    inputs = {os.path.basename(t): input_grams(reference, text_chunks([t], args.ctx, args.layer_chunks,
                                                                      base_model(args)))
              for t in texts}
    inputs["calibration"] = input_grams(reference, calibration_records(args.nsamples, args.seqlen, base_model(args)))
    names = list(inputs["calibration"])
    weights = {n: m.weight.detach() for n, m in reference.named_modules() if n in names}
    for where, grams in inputs.items():
        share = sum(float(grams[n][0].trace()) for n in names) / sum(float((g[0] + g[1]).trace())
                                                                      for g in grams.values())
        print(f"{where}: position 0 holds {100 * share:.1f} % of the squared input norm summed over the layers")
    sums = {}  # (key, kind) -> {"weight": [err, norm], (where, positions): [err, norm]}
    for key in keys:
        if ROWS[key][1] != "folder" or "awq" in ROWS[key][2]:
            raise SystemExit(f"error: --layer_errors takes RTN and GPTQ rows, not {key}")
        model = load_model(os.path.join(args.cache, folder_name(ROWS[key][2])), dtype=torch.float32)
        for name, module in model.named_modules():
            if name not in weights:
                continue
            decompress_module(module)
            w = weights[name]
            d = module.weight.detach() - w
            acc = sums.setdefault((key, re.sub(r".*\.", "", name)), {})
            pairs = {"weight": (d.pow(2).sum(), w.pow(2).sum())}
            for where, grams in inputs.items():
                first, rest = grams[name]
                pairs[(where, "all")] = (((d @ (first + rest)) * d).sum(), ((w @ (first + rest)) * w).sum())
                pairs[(where, "1..")] = (((d @ rest) * d).sum(), ((w @ rest) * w).sum())
            for col, (e, n) in pairs.items():
                old = acc.get(col, (0.0, 0.0))
                acc[col] = (old[0] + float(e), old[1] + float(n))
    kinds = list(dict.fromkeys(kind for _, kind in sums))  # q_proj ... down_proj, in the model's order
    cols = ["weight"] + [(w, p) for w in inputs for p in ("all", "1..")]
    heads = ["weight"] + [f"output, {w}" + (", positions 1.." if p == "1.." else "") for w, p in cols[1:]]
    print(f"\nrelative error summed over the 30 layers: weight ||W'-W||^2/||W||^2, output ||(W'-W)X||^2/||WX||^2 "
          f"on the float model's inputs X (held-out texts: the first {args.layer_chunks} chunks of {args.ctx}; "
          f"calibration: tools/quantize.py's default records, {args.nsamples} x {args.seqlen})")
    print("| layer | " + " | ".join(f"{ROWS[k][0]}: {h}" for k in keys for h in heads) + " |")
    print("|---" * (len(keys) * len(heads) + 1) + "|")
    for kind in kinds + ["all"]:
        cells = [kind]
        for key in keys:
            for col in cols:
                e = sum(v[col][0] for (k, kd), v in sums.items() if k == key and kind in (kd, "all"))
                n = sum(v[col][1] for (k, kd), v in sums.items() if k == key and kind in (kd, "all"))
                cells.append(f"{e / n:.5f}")
        print("| " + " | ".join(cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", default=None,
                   help="the float model to quantize every way (default: the embedded SmolLM2-135M-Instruct), "
                        "e.g. tools/vicuna.cpp/rotate_float_reference.py's folder")
    p.add_argument("--cache", default=None,
                   help="models and scores (default: .cache/ppl_table, or .cache/ppl_table/NAME for --model_path NAME)")
    p.add_argument("--texts", default=",".join(TEXTS))
    p.add_argument("--rows", default=",".join(ORDER), help="comma-separated rows (default: %(default)s)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--nsamples", type=int, default=128, help="GPTQ/AWQ calibration records (default: 128)")
    p.add_argument("--seqlen", type=int, default=512, help="GPTQ/AWQ tokens per record, at most (default: 512)")
    p.add_argument("--ready", action="store_true", help="score only the models already made")
    p.add_argument("--layer_errors", default=None, help="comma-separated RTN/GPTQ rows: print their per-layer "
                                                          "errors instead of the table")
    p.add_argument("--layer_chunks", type=int, default=2, help="--layer_errors: chunks of each text (default: 2)")
    args = p.parse_args(argv)
    if args.cache is None:
        args.cache = os.path.join(ROOT, ".cache", "ppl_table", *(
            [os.path.basename(os.path.normpath(args.model_path))] if args.model_path else []))
    texts = args.texts.split(",")
    if args.layer_errors:
        layer_errors(args.layer_errors.split(","), args, texts)
        return 0
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"error: unknown rows {unknown}; known: {', '.join(ORDER)}")
    checks = [same_ids(t, args) for t in texts]
    results = {}
    for key in rows:
        flags, size, note = model_for(key, args)
        if flags is None:
            results[key] = None
            continue
        if ROWS[key][1] == "bnb":
            size = bnb_footprint(ROWS[key][2], args)
        results[key] = ([score(key, flags, t, args) for t in texts], size, note)

    names = [os.path.basename(t) for t in texts]
    print()
    print(*checks, sep="\n")
    ref = results.get("float")
    if ref and results.get("gguf-f32"):
        for name, a, b in zip(names, ref[0], results["gguf-f32"][0]):
            print(f"{name}: f32 transformers {a['ppl']:.4f}, f32 GGUF in vicuna.cpp {b['ppl']:.4f} "
                  f"(difference {abs(a['ppl'] - b['ppl']):.4f}); {a['tokens']} tokens scored in {a['chunks']} "
                  f"chunks of {a['ctx']}")
    print()
    print("| model | " + " | ".join(f"PPL {n} | loss {n}" for n in names) + " | size MB | |")
    print("|---" * (2 * len(names) + 3) + "|")
    for key in rows:
        cells = [ROWS[key][0]]
        if results[key] is None:
            cells += ["not made"] * (2 * len(names) + 2)
        else:
            scores, size, note = results[key]
            for i, s in enumerate(scores):
                cells += [f"{s['ppl']:.4f}", f"{100 * (s['ppl'] / ref[0][i]['ppl'] - 1):+.2f} %" if ref else "—"]
            cells += [f"{size / 1e6:.1f}", note]
        print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
