"""LoRA instruction tuning of a LLaMA-family model.

    python finetune.py --data_path sample/instruct/data_sample.jsonl --output_path lora-out
    torchrun --nproc_per_node 2 finetune.py ...          # DDP, one process per GPU

Chinese-Vicuna's instruction recipe: alpaca template, cutoff 256, LoRA r=8 on q_proj,v_proj,
batch 128 in micro-batches of 4, 3 epochs at 3e-4 (every default is in train_args.DEFAULTS and
in --help). `finetune_4bit.py` (QLoRA) and `finetune_chat.py` (multi-turn chat) are the same
trainer with other defaults; every flag works in all three. Without --model_path the embedded
SmolLM2-135M-Instruct is used, so this runs on a laptop CPU with nothing to download. The
training itself is train.py.
"""

import sys

import train_args

DEFAULTS: dict = {}  # the recipe itself: train_args.DEFAULTS


def main(argv=None):
    return train_args.main(argv, defaults=DEFAULTS, description=__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
