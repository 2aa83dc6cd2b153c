"""Multi-turn chat tuning: the finetune.py trainer with chat defaults.

    python finetune_chat.py --data_path sample/chat/data_sample.jsonl

Chinese-Vicuna's chatv1 prompt, long context (cutoff 2048) and LoRA on every linear layer.
Chat data in Chinese-Vicuna ({"input": [...], "output": [...]}), ShareGPT or OpenAI
messages format is detected automatically. Same flags as finetune.py.
"""

import sys

import train_args

DEFAULTS = dict(
    data_path="sample/chat/data_sample.jsonl",
    output_path="lora-Vicuna-chat",
    prompt_type="chat",
    cutoff_len=2048,
    lora_target_modules="all-linear",
)


def main(argv=None):
    return train_args.main(argv, defaults=DEFAULTS, description=__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
