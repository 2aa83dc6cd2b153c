"""Train a small LLaMA from scratch in fp32 on CPU: a float model for ppl_table.py's quantized-types table.

    nice -n 19 python tools/vicuna.cpp/train_float_reference.py --text A.json B.jsonl C.txt \
        --output build/float-ref --minutes 34 [--layers 4 --hidden 256 --intermediate 768 --heads 4 --kv_heads 2]
    python tools/convert_gguf.py --model_path build/float-ref --outtype f32 --outfile build/float-ref.f32.gguf
    python tools/vicuna.cpp/ppl_table.py --model build/float-ref.f32.gguf --text held.txt --chunks 7

The embedded SmolLM2-135M-Instruct's weights are its shipped Q4_1 file dequantized, so it cannot
show what 4-bit rounding costs a model in float; no float LLaMA can be downloaded on these machines.
This trains one: SmolLM2's architecture (its tokenizer, vocabulary 49152, tied embeddings, grouped
KV heads, rope theta 100000) at a small size, AdamW with linear warmup and cosine decay, sequences of
--seq_len tokens, for --minutes of wall clock or --steps steps, with a fixed seed and
torch.set_num_threads(--threads). The text files may be plain text, a JSON list of records or JSON
lines: every string in a record (instruction/input/output, sharegpt turns...) is joined into one
document, and documents are separated by the end-of-text token. The output folder holds
model.safetensors, config.json, the tokenizer files and train_info.json (sizes, tokens, loss, time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def record_text(record) -> str:
    """Every string in a JSON record, in order, one per line."""
    if isinstance(record, str):
        return record.strip()
    if isinstance(record, dict):
        parts = [record_text(v) for v in record.values()]
    elif isinstance(record, list):
        parts = [record_text(v) for v in record]
    else:
        return ""
    return "\n".join(p for p in parts if p)


def read_documents(path: str) -> list[str]:
    """A file's documents: one per JSON record (a JSON list or JSON lines), else the whole text."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif path.endswith(".json"):
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    else:
        return [text]
    return [t for t in (record_text(r) for r in records) if t]


def token_stream(tokenizer, paths: list[str]) -> list[int]:
    """The files' documents tokenized and joined, each followed by the end-of-text token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for path in paths:
        docs = read_documents(path)
        for doc_ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            ids.extend(doc_ids)
            ids.append(eos)
    return ids


def build_model(tokenizer, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=max(2048, args.seq_len), rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=0.02)
    return LlamaForCausalLM(config)


def lr_at(progress: float, args) -> float:
    """Linear warmup over --warmup of the run, then cosine down to a tenth of --lr."""
    if progress < args.warmup:
        return args.lr * max(progress, 1e-3) / args.warmup
    t = min(1.0, (progress - args.warmup) / max(1e-9, 1.0 - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", nargs="+", required=True, help="plain-text, .json (a list of records) or .jsonl files")
    p.add_argument("--output", required=True, help="the Hugging Face folder to write")
    p.add_argument("--minutes", type=float, help="wall-clock training budget")
    p.add_argument("--steps", type=int, help="number of optimizer steps (with --minutes: whichever ends first)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of the run spent warming up")
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=10)
    args = p.parse_args(argv)
    if args.minutes is None and args.steps is None:
        p.error("give --minutes or --steps")

    import torch

    sys.path.insert(0, ROOT)
    from models import EMBEDDED_MODEL, load_tokenizer, resolve_model_path

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = load_tokenizer(resolve_model_path(EMBEDDED_MODEL))
    ids = token_stream(tokenizer, args.text)
    n_seq = len(ids) // args.seq_len
    if n_seq < args.batch:
        raise SystemExit(f"error: {len(ids)} tokens are fewer than one batch of {args.batch} x {args.seq_len}")
    data = torch.tensor(ids[:n_seq * args.seq_len], dtype=torch.long).view(n_seq, args.seq_len)
    model = build_model(tokenizer, args).float()
    n_params = sum(t.numel() for t in model.parameters())
    print(f"{len(ids)} tokens, {n_seq} sequences of {args.seq_len}; {n_params / 1e6:.2f} M parameters", flush=True)

    decay = [t for n, t in model.named_parameters() if t.dim() >= 2]
    no_decay = [t for n, t in model.named_parameters() if t.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    model.train()
    order: list[int] = []
    start = time.monotonic()
    step = tokens = 0
    losses: list[float] = []
    while True:
        elapsed = time.monotonic() - start
        progress = max(step / args.steps if args.steps else 0.0,
                       elapsed / (60 * args.minutes) if args.minutes else 0.0)
        if progress >= 1.0:
            break
        if len(order) < args.batch:
            order = list(range(n_seq))
            rng.shuffle(order)
        batch = data[[order.pop() for _ in range(args.batch)]]
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, args)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += batch.numel()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == 1:
            mean = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            print(f"step {step} tokens {tokens} loss {mean:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{time.monotonic() - start:.0f} s ({tokens / (time.monotonic() - start):.0f} tok/s)", flush=True)

    minutes = (time.monotonic() - start) / 60
    last = losses[-min(len(losses), 20):]
    info = {"steps": step, "tokens": tokens, "epochs": tokens / (n_seq * args.seq_len), "minutes": round(minutes, 2),
            "final_loss": round(sum(last) / len(last), 4), "parameters": n_params, "corpus_tokens": len(ids),
            "files": [os.path.basename(t) for t in args.text],
            "args": {k: v for k, v in vars(args).items() if k not in ("text", "output")}}
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    with open(os.path.join(args.output, "train_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
