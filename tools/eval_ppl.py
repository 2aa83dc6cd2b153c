"""Perplexity of a base model, a LoRA adapter or both: on a text file, or on a data file's responses.

    python tools/eval_ppl.py --text sample/ppl/en.txt                         # the embedded model
    python tools/eval_ppl.py --lora_path lora-Vicuna --compare_base --text sample/ppl/zh.txt
    python tools/eval_ppl.py --lora_path lora-Vicuna --compare_base --data_path held_out.jsonl
    python tools/eval_ppl.py --model_path vicuna.f32.gguf --engine vicuna --text sample/ppl/en.txt

--text: llama.cpp's perplexity method, as `vicuna perplexity` runs it (tools/vicuna.cpp/perplexity.h).
The whole text is tokenized once (with BOS in front where the tokenizer adds one), cut into chunks of
--ctx tokens (the first --chunks of them; all by default), each chunk runs from an empty cache with
BOS replacing its first token (where the tokenizer adds one), and only its second half is scored:
positions ctx/2 .. ctx-2 predicting the next token, ctx - 1 - ctx/2 tokens a chunk. The same token
ids as llama.cpp and vicuna.cpp, so the numbers compare across transformers and the GGUF engines
(tests/test_eval_ppl.py checks an f32 GGUF in vicuna.cpp against this within 1e-3).

--data_path: a data file in any of our formats (data.py), each record encoded exactly as training
encodes it (prompt.encode_example: --prompt_type, --cutoff_len, --train_on, by default the ones the
adapter was trained with), and scored on the supervised tokens only (the responses and their EOS)
with the trainer's loss (train.supervised_token_loss): mean loss = summed token loss / tokens scored,
the number the trainer logs as eval_loss when its eval set fits one batch; ppl = exp(mean loss).

One line per model on stdout; --json OUT also writes every number for scripts (after all of them
are computed, so a failed run writes nothing). --compare_base scores the base model first and then
the same weights with the adapter, in one load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from errors import UserError, cli_errors, logger, one_line, setup_logging  # noqa: E402
from eval_data import read_text, text_token_ids  # noqa: E402
from models import add_model_args  # noqa: E402

VICUNA = os.path.join(ROOT, "tools", "vicuna.cpp", "build", "vicuna")
ENGINES = ("transformers", "vicuna")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="UTF-8 text file: llama.cpp's chunked perplexity")
    what.add_argument("--data_path", help="JSON/JSONL data file in our formats: perplexity of the responses only")
    p.add_argument("--compare_base", action="store_true",
                   help="with --lora_path: also score the base model without the adapter (printed first)")
    p.add_argument("--ctx", type=int, default=512, help="--text: tokens per chunk (default: 512, as llama.cpp)")
    p.add_argument("--chunks", type=int, default=None, help="--text: score only the first N chunks (default: all)")
    p.add_argument("--cutoff_len", type=int, default=None,
                   help="--data_path: truncate examples as training does (default: the adapter's, else 256)")
    p.add_argument("--train_on", choices=("all", "last"), default=None,
                   help="--data_path: responses scored (default: the adapter's, else all)")
    p.add_argument("--batch_size", type=int, default=8, help="--data_path: examples per forward pass (default: 8)")
    p.add_argument("--engine", choices=ENGINES, default="transformers",
                   help="vicuna: score a .gguf --model_path with tools/vicuna.cpp's `vicuna perplexity` "
                        "(--text only; build it with `make cpp`)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


# --- checks that need no model ----------------------------------------------------------------------


def check_args(args) -> None:
    """Every flag combination and input file, before anything heavy loads."""
    if args.compare_base and not args.lora_path:
        raise UserError("--compare_base compares an adapter with its base; pass --lora_path too")
    if args.text is not None:
        if args.ctx < 4:
            raise UserError(f"--ctx must be at least 4 tokens, got {args.ctx}")
        if args.chunks is not None and args.chunks < 1:
            raise UserError(f"--chunks must be at least 1, got {args.chunks}")
        for flag in ("cutoff_len", "train_on", "prompt_type"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag} applies to --data_path, not to --text")
    else:
        if args.chunks is not None:
            raise UserError("--chunks applies to --text, not to --data_path")
        if args.cutoff_len is not None and args.cutoff_len < 2:
            raise UserError(f"--cutoff_len must be at least 2 tokens, got {args.cutoff_len}")
        if args.batch_size < 1:
            raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.engine == "vicuna":
        if args.text is None:
            raise UserError("--engine vicuna scores --text files only; use the default engine for --data_path")
        if not args.model_path.endswith(".gguf"):
            raise UserError(f"--engine vicuna needs a .gguf --model_path, got {args.model_path}; "
                            "export one with tools/convert_gguf.py")
        if args.lora_path and not args.lora_path.endswith(".gguf"):
            raise UserError("--engine vicuna takes the adapter as a GGUF: tools/convert_gguf.py --lora_path "
                            f"{args.lora_path} --outfile ADAPTER.gguf, then --lora_path ADAPTER.gguf")
        if args.quant != "none":
            raise UserError("--quant applies to the transformers engine; a GGUF carries its own tensor types")
        if not os.path.isfile(VICUNA):
            raise UserError(f"{VICUNA} is not built; run `make cpp` first (needs cmake and a C++17 compiler)")
    if args.json is not None:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise UserError(f"--json {args.json}: no folder {folder}; create it or pass another path")
        if os.path.isdir(args.json):
            raise UserError(f"--json {args.json}: is a folder; pass a file name")


# --- text: llama.cpp's chunked perplexity ------------------------------------------------------------


def chunk_count(n_ids: int, ctx: int, chunks: int | None, path: str) -> int:
    n = n_ids // ctx
    if n == 0:
        raise UserError(f"--text {path} is {n_ids} tokens, fewer than one chunk of --ctx {ctx}; pass a longer "
                        f"text or a smaller --ctx (at most {n_ids})")
    if chunks is not None and chunks > n:
        logger.warning("--text %s holds %d chunk(s) of %d tokens, fewer than --chunks %d; scoring %d",
                       path, n, ctx, chunks, n)
    return n if chunks is None else min(n, chunks)


def chunked_nll(model, ids: list[int], bos: int | None, ctx: int, n_chunks: int) -> tuple[float, float, int]:
    """(sum of negative log-likelihoods, sum of their squares, tokens scored) over the first
    n_chunks chunks: perplexity.h's loop, in float64 over the model's logits."""
    import torch
    import torch.nn.functional as F

    first = ctx // 2
    device = next(model.parameters()).device
    nll = nll2 = 0.0
    count = 0
    for ch in range(n_chunks):
        chunk = list(ids[ch * ctx:(ch + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        x = torch.tensor([chunk], device=device)
        with torch.no_grad():
            # logits of positions first .. ctx-1; the last one predicts nothing inside the chunk
            logits = model(input_ids=x, logits_to_keep=ctx - first, use_cache=False).logits[0, :-1]
        lp = F.log_softmax(logits.double(), dim=-1)
        token_nll = -lp.gather(1, x[0, first + 1:, None]).squeeze(1)
        nll += float(token_nll.sum())
        nll2 += float((token_nll ** 2).sum())
        count += token_nll.numel()
        logger.info("[%d/%d] ppl %.4f", ch + 1, n_chunks, math.exp(nll / count))
    return nll, nll2, count


def text_result(model, ids, bos, ctx, n_chunks) -> dict:
    nll, nll2, count = chunked_nll(model, ids, bos, ctx, n_chunks)
    mean = nll / count
    var = max(0.0, nll2 / count - mean * mean)
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_err": ppl * math.sqrt(var / (count - 1)) if count > 1 else 0.0, "mean_loss": mean,
            "tokens": count, "chunks": n_chunks, "ctx": ctx}


# --- data: the responses, as training scores them ------------------------------------------------------


def encode_data(path: str, convs, tokenizer, prompt_type: str, cutoff_len: int,
                train_on: str) -> tuple[list[dict], int]:
    """(examples, dropped): the records as train.build_examples encodes them for training."""
    from prompt import encode_example

    examples, dropped = [], 0
    for conv in convs:
        ex, _ = encode_example(prompt_type, conv, tokenizer, cutoff_len, train_on)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    if not examples:
        raise UserError(f"--data_path {path}: no record has a response token within --cutoff_len {cutoff_len}; "
                        "raise --cutoff_len")
    if dropped:
        logger.warning("%d of %d records have no response token within --cutoff_len %d and are not scored "
                       "(training drops them too)", dropped, len(convs), cutoff_len)
    return examples, dropped


def response_nll(model, examples: list[dict], pad_id: int, batch_size: int) -> tuple[float, int]:
    """(summed token loss, tokens scored) over every supervised label, batches padded on the right
    (shortest first), with the trainer's own loss function."""
    import torch

    from prompt import IGNORE_INDEX
    from train import supervised_token_loss

    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = [examples[i] for i in order[start:start + batch_size]]
        width = max(len(ex["input_ids"]) for ex in batch)
        pad = [width - len(ex["input_ids"]) for ex in batch]
        inputs = {
            "input_ids": torch.tensor([ex["input_ids"] + [pad_id] * p for ex, p in zip(batch, pad)], device=device),
            "attention_mask": torch.tensor([[1] * len(ex["input_ids"]) + [0] * p for ex, p in zip(batch, pad)],
                                           device=device),
            "labels": torch.tensor([ex["labels"] + [IGNORE_INDEX] * p for ex, p in zip(batch, pad)], device=device),
        }
        with torch.no_grad():
            s, n = supervised_token_loss(model, inputs)
        total += float(s)
        count += int(n)
    return total, count


def data_result(model, examples, pad_id, batch_size) -> dict:
    total, count = response_nll(model, examples, pad_id, batch_size)
    mean = total / count
    return {"ppl": math.exp(mean), "mean_loss": mean, "tokens": count, "examples": len(examples)}


# --- vicuna.cpp ------------------------------------------------------------------------------------------


def vicuna_result(args) -> dict:
    """`vicuna perplexity` on a GGUF: the same chunks and ids, computed by the C++ engine."""
    if not os.path.isfile(args.model_path):
        raise UserError(f"--model_path {args.model_path}: no such GGUF file")
    cmd = [VICUNA, "perplexity", "-m", args.model_path, "-f", args.text, "-c", str(args.ctx)]
    if args.chunks:
        cmd += ["--chunks", str(args.chunks)]
    if args.lora_path:
        cmd += ["--lora", args.lora_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", proc.stdout)
    if proc.returncode != 0 or not final:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise UserError(f"vicuna perplexity failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")
    n_chunks = len(re.findall(r"\[\d+\]", proc.stdout))
    ppl = float(final.group(1))
    return {"ppl": ppl, "ppl_err": float(final.group(2)), "mean_loss": math.log(ppl),
            "tokens": n_chunks * (args.ctx - 1 - args.ctx // 2), "chunks": n_chunks, "ctx": args.ctx}


# --- the command ------------------------------------------------------------------------------------


def describe(result: dict) -> str:
    """`ppl 20.6412 over 1785 tokens (7 chunks of 512)`, or for data the response tokens and loss."""
    if "chunks" in result:
        plural = "s" if result["chunks"] != 1 else ""
        return (f"ppl {result['ppl']:.4f} over {result['tokens']} tokens "
                f"({result['chunks']} chunk{plural} of {result['ctx']})")
    return (f"ppl {result['ppl']:.4f} over {result['tokens']} response tokens of {result['examples']} "
            f"examples (mean loss {result['mean_loss']:.4f})")


def evaluate(args) -> list[dict]:
    """Score the models the flags name; returns one result per model (base first)."""
    from models import load_adapter, load_model, load_tokenizer, resolve_model_path, resolve_prompt_type
    from train_args import DEFAULTS

    label = {"model_path": args.model_path, "lora_path": None, "quant": args.quant}
    if args.engine == "vicuna":
        read_text(args.text)  # the same one-line errors as the transformers engine
        results = []
        if args.compare_base:
            lora, args.lora_path = args.lora_path, None
            results.append({**label, "engine": "vicuna", **vicuna_result(args)})
            args.lora_path = lora
        results.append({**label, "lora_path": args.lora_path, "engine": "vicuna", **vicuna_result(args)})
        return results

    text = read_text(args.text) if args.text is not None else None
    if text is None:
        from data import load_conversations

        _, convs = load_conversations(args.data_path)  # data.py's file:line errors, before any model
    path = resolve_model_path(args.model_path)
    tokenizer = load_tokenizer(path, args.trust_remote_code)
    if text is not None:
        ids, bos = text_token_ids(tokenizer, text)
        n_chunks = chunk_count(len(ids), args.ctx, args.chunks, args.text)
    else:
        from models import load_training_config

        trained = load_training_config(args.lora_path).get("args") or {}  # the flags it was trained with
        args.prompt_type = resolve_prompt_type(args.prompt_type, args.lora_path or path, DEFAULTS["prompt_type"])
        args.cutoff_len = args.cutoff_len or trained.get("cutoff_len") or DEFAULTS["cutoff_len"]
        args.train_on = args.train_on or trained.get("train_on") or DEFAULTS["train_on"]
        examples, _ = encode_data(args.data_path, convs, tokenizer, args.prompt_type, args.cutoff_len, args.train_on)

    model = load_model(path, quant=args.quant, trust_remote_code=args.trust_remote_code)
    model.eval()
    if text is not None:
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and args.ctx > limit:
            raise UserError(f"--ctx {args.ctx} exceeds the model's context of {limit} tokens; pass --ctx {limit} or less")

    def score(m) -> dict:
        if text is not None:
            return text_result(m, ids, bos, args.ctx, n_chunks)
        return {**data_result(m, examples, tokenizer.pad_token_id, args.batch_size),
                "prompt_type": args.prompt_type, "cutoff_len": args.cutoff_len, "train_on": args.train_on}

    if not args.lora_path:
        return [{**label, "engine": "transformers", **score(model)}]
    # The adapter is loaded (and checked against the base) before anything is scored; the base is
    # the same weights with the adapter switched off.
    model = load_adapter(model, args.lora_path, trainable=False)
    results = []
    if args.compare_base:
        with model.disable_adapter():
            results.append({**label, "engine": "transformers", **score(model)})
    results.append({**label, "lora_path": args.lora_path, "engine": "transformers", **score(model)})
    return results


def write_json(path: str, args, results: list[dict]) -> None:
    from checkpoints import write_text_atomically

    doc = {"text": args.text, "data_path": args.data_path, "results": results}
    try:
        write_text_atomically(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        raise UserError(f"--json {path}: cannot write it ({e.strerror or one_line(e)})") from None


@cli_errors
def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    setup_logging()
    check_args(args)
    results = evaluate(args)
    for r in results:
        name = r["model_path"] + (f" + {r['lora_path']}" if r["lora_path"] else "")
        name += f" ({r['quant']})" if r["quant"] != "none" else ""
        print(f"{name}: {describe(r)}", flush=True)
    if len(results) == 2:
        base, adapted = results
        print(f"adapter vs base: ppl {adapted['ppl'] / base['ppl'] - 1:+.2%}", flush=True)
    if args.json:
        write_json(args.json, args, results)
    return results


if __name__ == "__main__":
    main()
