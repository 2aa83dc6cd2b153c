"""Quantize a model's weights with GPTQ or AWQ, calibrated on our own data, into a Hugging Face folder.

    python tools/quantize.py --method gptq --bits 4 --group_size 128 --model_path vicuna-merged \\
        --calib_data sample/instruct/data_sample.jsonl --nsamples 128 --seqlen 512 --output_path vicuna-gptq
    python tools/quantize.py --method awq --output_path smollm2-awq     # the embedded model, sample/ data
    python tools/quantize.py --method rtn --bits 4 --output_path smollm2-rtn   # the baseline: no calibration

The algorithms are llm-compressor's (vLLM's project: GPTQModifier, AWQModifier), an optional
dependency: `pip install --no-deps -r requirements-quant.txt`. The output is a compressed-tensors checkpoint
(config.json's `quantization_config`, weights packed in int32, `pack-quantized` format) that
transformers loads (`--model_path DIR` in generate.py, chat.py, serve.py; with compressed-tensors
installed) and vLLM serves natively (4 and 8 bits: its WNA16 kernels; 2 and 3 bits load in
transformers only). Linear layers are quantized, lm_head is kept in full precision.

--method rtn is the baseline both are measured against: the same scheme (symmetric int, one scale
per group, lm_head kept) by plain round-to-nearest (llm-compressor's QuantizationModifier), with no
calibration data (--calib_data, --nsamples, --seqlen, --pack, --prompt_type and --desc_act are refused with it).

GPTQ visits the columns in act-order by default (--no-desc_act for the natural order): on the
embedded model it takes the 4-bit loss from +68 % to +40 % on English and from +38 % to +24 % on
Chinese (docs/performance.md, "GPTQ, AWQ and round-to-nearest").

Calibration text is read by data.py (any of our formats: instruct, vicuna_chat, sharegpt, openai)
and rendered with the model's prompt template, so the quantizer sees what the model will see:
--prompt_type, else the one in the model folder's training_config.json (a merged adapter), else
instruct for instruct data and chat for conversations. The first --nsamples records (all of them
when the file holds fewer) are cut to --seqlen tokens.

Everything is checked before the model is loaded (bits the method supports, a group size that
divides every quantized layer's input width, an adapter folder instead of a model, a missing or bad
calibration file, an --output_path that holds files): one-line errors, nothing written. The output
goes to a hidden staging folder beside --output_path and is renamed into place at the end. The
folder also holds the tokenizer and our training_config.json (the prompt type and how it was
quantized). On the CPU GPTQ and AWQ run, slowly (docs/notes.md has the measured times); a GPU is
found and used by llm-compressor when present.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoints import check_new_folder, publish_folder, staging_folder  # noqa: E402
from errors import UserError, cli_errors, logger, one_line, setup_logging  # noqa: E402
from model_folder import read_model_config, resolve_model_folder  # noqa: E402
from eval_data import DEFAULT_CALIB, calibration_ids, calibration_prompt_type  # noqa: E402
from models import EMBEDDED_MODEL, load_training_config, save_training_config  # noqa: E402

METHODS = ("gptq", "awq", "rtn")
CALIBRATED = ("gptq", "awq")
# Bits each method's recipe supports here: GPTQ and round-to-nearest any integer width the packed
# format holds; AWQ's search targets 4-bit (its kernels and vLLM's AWQ path are 4-bit; 8-bit gains
# nothing over RTN).
BITS = {"gptq": (2, 3, 4, 8), "awq": (4,), "rtn": (2, 3, 4, 8)}
CALIBRATION_FLAGS = ("calib_data", "nsamples", "seqlen", "prompt_type", "pack")
VLLM_BITS = (4, 8)  # vLLM's compressed-tensors WNA16 kernels
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
INSTALL_HINT = "pip install --no-deps -r requirements-quant.txt"


def build_parser() -> argparse.ArgumentParser:
    from prompt import PROMPT_TYPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="gptq",
                   help="GPTQ, AWQ, or rtn: round-to-nearest, no calibration (default: gptq)")
    p.add_argument("--bits", type=int, default=4, help="weight bits: gptq and rtn 2, 3, 4, 8; awq 4 (default: 4)")
    p.add_argument("--group_size", type=int, default=None,
                   help="weights per scale along the input dimension, dividing every layer's input width; -1 for "
                        "one scale per output channel (default: 128, or the largest of 64, 32, 16 that divides: "
                        "64 for SmolLM2-135M's 576)")
    p.add_argument("--desc_act", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: quantize columns in order of decreasing Hessian diagonal (static act-order: groups "
                        "stay in place, no g_idx, the same format; llm-compressor's default); --no-desc_act for "
                        "the natural order (default: on for gptq)")
    p.add_argument("--calib_data", default=None,
                   help="calibration data in any of our formats (default: sample/instruct/data_sample.jsonl)")
    p.add_argument("--nsamples", type=int, default=None,
                   help="calibration sequences: records, or with --pack sequences of --seqlen tokens (default: 128)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per calibration sequence, at most (default: 512)")
    p.add_argument("--pack", action="store_true", default=None,
                   help="concatenate the rendered records and cut them into --seqlen-token sequences (as the GPTQ "
                        "paper calibrates) instead of one record per sequence")
    p.add_argument("--prompt_type", choices=PROMPT_TYPES, default=None,
                   help="template the calibration text is rendered with (default: the model's training_config.json, "
                        "else instruct for instruct data, chat for conversations)")
    p.add_argument("--model_path", default=EMBEDDED_MODEL,
                   help="model to quantize: a merged or base model folder, hub id or .gguf "
                        f"(default: embedded {EMBEDDED_MODEL})")
    p.add_argument("--output_path", required=True, help="new folder for the quantized model (must not hold files)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample order (default: 0)")
    return p


# --- checks made before anything is loaded ---------------------------------------------------------


def check_args(args) -> None:
    """Refuses what cannot work; fills in the calibration defaults of GPTQ and AWQ."""
    if args.method not in CALIBRATED:
        given = [f"--{f}" for f in CALIBRATION_FLAGS if getattr(args, f) is not None]
        if given:
            raise UserError(f"{', '.join(given)}: --method {args.method} rounds to nearest without calibration data "
                            "(drop them or use --method gptq or awq)")
    else:
        args.calib_data = args.calib_data or DEFAULT_CALIB
        args.nsamples = 128 if args.nsamples is None else args.nsamples
        args.seqlen = 512 if args.seqlen is None else args.seqlen
    if args.bits not in BITS[args.method]:
        raise UserError(f"--bits {args.bits}: {args.method} supports {', '.join(map(str, BITS[args.method]))} bits here"
                        + ("; use --method gptq for 2, 3 or 8 bits" if args.method == "awq" else ""))
    if args.group_size is not None and (args.group_size == 0 or args.group_size < -1):
        raise UserError(f"--group_size {args.group_size}: pass a positive group size (e.g. 128) or -1 for per-channel")
    if args.desc_act is not None and args.method != "gptq":
        flag = "--desc_act" if args.desc_act else "--no-desc_act"
        raise UserError(f"{flag} sets GPTQ's activation order; --method {args.method} has none "
                        f"(drop {flag} or use --method gptq)")
    if args.desc_act is None:
        args.desc_act = args.method == "gptq"
    if args.method not in CALIBRATED:
        return
    if args.nsamples < 1:
        raise UserError(f"--nsamples {args.nsamples}: pass at least 1 calibration record")
    if args.seqlen < 8:
        raise UserError(f"--seqlen {args.seqlen}: pass at least 8 tokens per calibration record")


def input_widths(config: dict) -> dict[str, int]:
    """Input width of each quantized LLaMA-family linear layer, from config.json."""
    hidden = config.get("hidden_size")
    heads, head_dim = config.get("num_attention_heads"), config.get("head_dim")
    inter = config.get("intermediate_size")
    widths = {}
    if isinstance(hidden, int):
        widths["q_proj, k_proj, v_proj, gate_proj, up_proj"] = hidden
    if isinstance(heads, int) and (isinstance(head_dim, int) or isinstance(hidden, int)):
        widths["o_proj"] = heads * (head_dim if isinstance(head_dim, int) else hidden // heads)
    if isinstance(inter, int):
        widths["down_proj"] = inter
    return widths


def fitting_group_sizes(config: dict) -> list[int]:
    return [g for g in (128, 64, 32, 16) if all(w % g == 0 for w in input_widths(config).values())]


def default_group_size(config: dict, model_path: str) -> int:
    fits = fitting_group_sizes(config)
    if not fits or fits[0] != 128:
        logger.info("group size %d: 128 does not divide the layer widths of %s", fits[0] if fits else -1, model_path)
    return fits[0] if fits else -1


def check_model_config(config: dict, model_path: str, group_size: int) -> None:
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "some") if isinstance(
            config["quantization_config"], dict) else "some"
        raise UserError(f"--model_path {model_path} is already quantized ({method} quantization_config in its "
                        "config.json); pass the full-precision model (merged or base)")
    if group_size > 0:
        for layers, width in input_widths(config).items():
            if width % group_size:
                fits = fitting_group_sizes(config)
                raise UserError(f"--group_size {group_size} does not divide {width}, the input width of {layers} in "
                                f"{model_path}; pass --group_size {fits[0] if fits else -1}"
                                f"{' (or -1, per channel)' if fits else ' (per channel)'}")


def check_library() -> None:
    try:
        import compressed_tensors  # noqa: F401
        import llmcompressor  # noqa: F401
    except ImportError as e:
        raise UserError(f"tools/quantize.py needs llm-compressor ({one_line(e)}); "
                        f"install it with: {INSTALL_HINT}") from None


# --- calibration -----------------------------------------------------------------------------------


# --- the quantization ------------------------------------------------------------------------------


def recipe(method: str, bits: int, group_size: int, desc_act: bool):
    """llm-compressor's modifier: symmetric int weights with one scale per group, activations in
    full precision (WnA16, the layout vLLM's Marlin kernels take). rtn rounds each weight to the
    nearest step of that grid (QuantizationModifier); GPTQ chooses the steps with calibration data,
    AWQ scales the channels with it first. AWQ too is symmetric here: its zero points, packed by
    compressed-tensors 0.19, do not load in transformers 5.24 (the packed [out/8, groups] tensor
    meets an unpacked [out, groups] parameter: a size-mismatch error)."""
    from compressed_tensors.quantization import ActivationOrdering, QuantizationArgs, QuantizationScheme

    grouped = group_size > 0
    weights = QuantizationArgs(
        num_bits=bits, type="int", symmetric=True, strategy="group" if grouped else "channel",
        group_size=group_size if grouped else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    if method == "rtn":
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        # act-order as llm-compressor 0.14 has it: columns visited by decreasing Hessian diagonal,
        # groups kept static (no g_idx; the saved format is the same and every kernel reads it). Its
        # dynamic "group" order (AutoGPTQ's desc_act with g_idx) is removed from the library.
        return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                            actorder=ActivationOrdering.WEIGHT if desc_act else None)
    from llmcompressor.modifiers.awq import AWQModifier

    return AWQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])


def cpu_workarounds() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations for faster GPU copies, which fails with
    no accelerator ("Cannot access accelerator device"); on the CPU the pin has no purpose."""
    import torch

    if not torch.accelerator.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def library_versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("llmcompressor", "compressed-tensors", "transformers", "torch")}


def quantize(args) -> str:
    from data import load_conversations

    check_args(args)
    check_new_folder(args.output_path, "--output_path")
    calibrated = args.method in CALIBRATED
    if calibrated:
        data_format, convs = load_conversations(args.calib_data)  # every record checked: one-line DataError
    model_dir = resolve_model_folder(args.model_path)
    config = read_model_config(model_dir)
    if args.group_size is None:
        args.group_size = default_group_size(config, args.model_path)
    check_model_config(config, args.model_path, args.group_size)
    check_library()

    import torch
    from datasets import Dataset
    from models import load_model, load_tokenizer, pick_dtype

    if calibrated:
        tokenizer = load_tokenizer(model_dir)
        prompt_type = calibration_prompt_type(args.prompt_type, model_dir, data_format)
        samples = calibration_ids(convs, args.calib_data, tokenizer, prompt_type, args.nsamples, args.seqlen,
                                  args.seed, pack=bool(args.pack))
        logger.info("%s %d-bit, group size %s%s: %d calibration %s of %s (%s template), %d tokens",
                    args.method.upper(), args.bits, args.group_size, ", act-order" if args.desc_act else "",
                    len(samples), "packed sequences" if args.pack else "records", args.calib_data, prompt_type,
                    sum(map(len, samples)))
    else:
        logger.info("round-to-nearest %d-bit, group size %s: no calibration", args.bits, args.group_size)

    import logging

    from loguru import logger as loguru_logger  # llm-compressor's own log: progress lines by the hundred

    loguru_logger.remove()
    loguru_logger.add(sys.stderr, level="ERROR" if logger.getEffectiveLevel() > logging.DEBUG else "INFO")
    from llmcompressor import oneshot

    cpu_workarounds()
    model = load_model(model_dir, dtype=pick_dtype() if torch.cuda.is_available() else torch.float32)
    modifier = recipe(args.method, args.bits, args.group_size, args.desc_act)
    training = dict(load_training_config(model_dir))
    training["quantized"] = {"method": args.method, "bits": args.bits, "group_size": args.group_size,
                             "desc_act": args.desc_act, "model_path": args.model_path,
                             "libraries": library_versions()}
    if calibrated:
        dataset = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
        oneshot(model=model, dataset=dataset, recipe=modifier, num_calibration_samples=len(samples),
                max_seq_length=args.seqlen)
        training["prompt_type"] = prompt_type
        training["quantized"].update(calib_data=os.path.abspath(args.calib_data), nsamples=len(samples),
                                     seqlen=args.seqlen, pack=bool(args.pack),
                                     calib_tokens=sum(map(len, samples)))
    else:
        oneshot(model=model, recipe=modifier)

    try:
        with staging_folder(args.output_path) as tmp:
            model.save_pretrained(tmp, save_compressed=True)
            for name in TOKENIZER_FILES:  # as the model has them (load_tokenizer changed padding)
                if os.path.isfile(os.path.join(model_dir, name)):
                    shutil.copyfile(os.path.join(model_dir, name), os.path.join(tmp, name))
            save_training_config(tmp, training)
            publish_folder(tmp, args.output_path, "--output_path")
    except OSError as e:
        raise UserError(f"--output_path {args.output_path}: writing the quantized model failed ({one_line(e)}); "
                        "nothing was written there") from None
    if args.bits not in VLLM_BITS:
        logger.warning("%d-bit weights load in transformers; vLLM serves only %s-bit compressed-tensors weights",
                       args.bits, " and ".join(map(str, VLLM_BITS)))
    logger.info("saved %s", args.output_path)
    return args.output_path


@cli_errors
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    quantize(args)
    print(args.output_path)


if __name__ == "__main__":
    main()
