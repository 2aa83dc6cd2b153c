"""QLoRA: the finetune.py trainer with the base model loaded in 4-bit NF4 (double quantization).

    python finetune_4bit.py --model_path meta-llama/Llama-2-7b-hf --data_path data.jsonl

Same flags as finetune.py; only the defaults below differ. On a GPU the optimizer is paged
8-bit AdamW; 4-bit loading also works on CPU (slowly) through bitsandbytes.
"""

import sys

import train_args

DEFAULTS = dict(quant="4bit", output_path="lora-Vicuna-4bit")


def main(argv=None):
    return train_args.main(argv, defaults=DEFAULTS, description=__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
