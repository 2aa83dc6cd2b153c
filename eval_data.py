"""The token ids the quantization tools calibrate on and score: calibration records rendered as in
training (tools/quantize.py), and a text file's ids as llama.cpp's perplexity takes them
(tools/eval_ppl.py). Here, not in those scripts, so tools/quant_table.py measures exactly what they
do without importing an entry script."""

from __future__ import annotations

import os
import random

from errors import UserError, logger, one_line
from models import load_training_config

DEFAULT_CALIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample", "instruct", "data_sample.jsonl")


def calibration_prompt_type(prompt_type: str | None, model_dir: str, data_format: str) -> str:
    if prompt_type:
        return prompt_type
    saved = load_training_config(model_dir).get("prompt_type")
    if saved:
        logger.info("calibration prompt type %r, from %s's training_config.json", saved, model_dir)
        return saved
    return "instruct" if data_format == "instruct" else "chat"


def calibration_ids(convs: list, path: str, tokenizer, prompt_type: str, nsamples: int, seqlen: int,
                    seed: int = 0, pack: bool = False) -> list[list[int]]:
    """Token ids of up to `nsamples` calibration sequences from the conversations read from `path`,
    rendered with `prompt_type` (question and answer, as in training) in a seeded order. Unpacked,
    each record is one sequence cut to `seqlen`. Packed, the rendered records follow each other (each
    ends with its EOS, as in training) and are cut into sequences of `seqlen` tokens, the last one
    shorter when the records run out: the GPTQ paper's fixed-length segments, where a sequence's first
    position (an attention sink with outlier activations in many LLaMA-family models) is one token
    in `seqlen`, not one in a record's length."""
    from prompt import render, tokenize_pieces

    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    samples: list[list[int]] = []
    if not pack:
        if len(convs) < nsamples:
            logger.info("%s holds %d records, fewer than --nsamples %d; using them all", path, len(convs), nsamples)
        for i in order[:nsamples]:
            ids, _ = tokenize_pieces(render(prompt_type, convs[i], tokenizer), tokenizer, max_len=seqlen)
            samples.append(ids[:seqlen])
        return samples
    stream: list[int] = []
    for i in order:
        ids, _ = tokenize_pieces(render(prompt_type, convs[i], tokenizer), tokenizer)
        stream += ids
        while len(stream) >= seqlen and len(samples) < nsamples:
            samples.append(stream[:seqlen])
            stream = stream[seqlen:]
        if len(samples) == nsamples:
            return samples
    if stream:
        samples.append(stream)
    logger.info("%s holds %d tokens: %d packed sequences of up to %d, fewer than --nsamples %d; using them all",
                path, sum(map(len, samples)), len(samples), seqlen, nsamples)
    return samples


def read_text(path: str) -> str:
    """The text file's contents, refused when missing, not UTF-8 or blank."""
    if not os.path.exists(path):
        raise UserError(f"--text {path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"--text {path}: is a folder; pass a UTF-8 text file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"--text {path}: cannot read it ({e.strerror or one_line(e)})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--text {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    if not text.strip():
        raise UserError(f"--text {path}: the file is empty; pass a text of at least one --ctx of tokens")
    return text


def text_token_ids(tokenizer, text: str) -> tuple[list[int], int | None]:
    """(ids, bos): the text's ids as llama.cpp tokenizes a perplexity text (the leading special ids
    the tokenizer adds, then the text without them), and the BOS id each chunk starts with, or None
    when the tokenizer adds no BOS (SmolLM2)."""
    from prompt import leading_special_ids

    lead = leading_special_ids(tokenizer)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None and tokenizer.bos_token_id in lead else None
    return lead + list(tokenizer(text, add_special_tokens=False)["input_ids"]), bos
