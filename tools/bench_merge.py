"""Peak memory of tools/merge_lora.py on a model saved in several shards (a benchmark, not a test).

    python tools/bench_merge.py [--hidden 1024 --layers 8 --vocab 32000 --shard 100MB]

Builds a random LLaMA (float32) saved with a small max_shard_size and an all-linear r=16 adapter
in a temporary folder, then runs, each in its own process, measuring peak RSS (ru_maxrss):
  1. the imports alone (python + torch + transformers + peft + safetensors): the floor;
  2. tools/merge_lora.py (streams one tensor in, one output shard out);
  3. for contrast, the usual way: from_pretrained + PeftModel + merge_and_unload + save_pretrained.
Prints a markdown table row per run; docs/performance.md holds the figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))

IMPORTS = "import torch, transformers, peft, safetensors.torch; from transformers import AutoModelForCausalLM"
NAIVE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3], max_shard_size=sys.argv[4])
"""


def build(folder: str, hidden: int, layers: int, vocab: int, shard: str) -> tuple[str, str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    base = os.path.join(folder, "base")
    model.save_pretrained(base, max_shard_size=shard)
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    adapter = os.path.join(folder, "adapter")
    lora.save_pretrained(adapter)
    return base, adapter


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS of `cmd` in MiB, wall seconds).

    ru_maxrss of RUSAGE_CHILDREN is the largest over all children ever waited for, so each run goes
    through a fresh python whose only child is `cmd`, and that python prints the figure.
    """
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1]), wall


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard", default="100MB", help="max_shard_size of the base and of the merged output")
    p.add_argument("--skip_naive", action="store_true", help="do not run the whole-model merge for contrast")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = build(tmp, args.hidden, args.layers, args.vocab, args.shard)
        shards = sorted(f for f in os.listdir(base) if f.endswith(".safetensors"))
        sizes = [os.path.getsize(os.path.join(base, f)) / 2**20 for f in shards]
        adapter_mb = os.path.getsize(os.path.join(adapter, "adapter_model.safetensors")) / 2**20
        print(f"model: {sum(sizes):.0f} MiB float32 in {len(shards)} shards (largest {max(sizes):.0f} MiB); "
              f"adapter {adapter_mb:.1f} MiB; hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}")
        print("| run | peak RSS (MiB) | wall (s) |")
        print("|---|---|---|")
        floor, wall = peak_rss_mb([sys.executable, "-c", IMPORTS])
        print(f"| imports only (floor) | {floor:.0f} | {wall:.1f} |")
        out = os.path.join(tmp, "merged")
        rss, wall = peak_rss_mb([sys.executable, os.path.join(TOOLS, "merge_lora.py"), "--model_path", base,
                                          "--lora_path", adapter, "--output_path", out,
                                          "--max_shard_size", args.shard])
        print(f"| tools/merge_lora.py | {rss:.0f} (floor + {rss - floor:.0f}) | {wall:.1f} |")
        if not args.skip_naive:
            rss, wall = peak_rss_mb([sys.executable, "-c", NAIVE, base, adapter,
                                              os.path.join(tmp, "naive"), args.shard])
            print(f"| from_pretrained + merge_and_unload + save_pretrained | {rss:.0f} (floor + {rss - floor:.0f}) "
                  f"| {wall:.1f} |")


if __name__ == "__main__":
    main()
