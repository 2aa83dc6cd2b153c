"""Adapters from elsewhere: plain peft, legacy Chinese-Vicuna checkpoints, and mismatched bases."""

import hashlib
import json
import os

import pytest
import torch

from conftest import make_tiny_model, run_script
from errors import UserError
from models import load_adapter

PROMPT = "Below is an instruction. 你好 world"


def base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def logits(model, tokenizer):
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, tiny_model):
    """A plain peft adapter with non-zero lora_B, saved by peft itself."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        init_lora_weights=False)  # random B, so the adapter changes the logits
    model = get_peft_model(base(tiny_model), config)
    out = str(tmp_path_factory.mktemp("peft") / "adapter")
    model.save_pretrained(out)
    return out


def legacy_state_dict(peft_dir, with_adapter_name=False, dtype=torch.float16):
    """The adapter as Chinese-Vicuna's Trainer checkpoints stored it: pytorch_model.bin, fp16,
    keys without (or, from some peft versions, with) the `.default` adapter name."""
    from safetensors.torch import load_file

    sd = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    out = {}
    for k, v in sd.items():
        if with_adapter_name:
            k = k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        out[k] = v.to(dtype)
    return out


OLD_CONFIG = {  # adapter_config.json as peft 0.2 wrote it for Chinese-Vicuna
    "base_model_name_or_path": "decapoda-research/llama-7b-hf", "bias": "none", "enable_lora": None,
    "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": 8, "lora_dropout": 0.05,
    "merge_weights": False, "modules_to_save": None, "peft_type": "LORA", "r": 4,
    "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}


def tree_digest(path):
    return {os.path.relpath(os.path.join(d, f), path): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(path) for f in files}


@pytest.mark.parametrize("with_adapter_name", [False, True])
def test_legacy_checkpoint_dir_gives_same_logits_as_peft(tmp_path, tiny_model, bpe_tokenizer, peft_adapter,
                                                         with_adapter_name):
    from peft import PeftModel

    run_dir = tmp_path / "lora-Vicuna"
    ckpt = run_dir / "checkpoint-800"  # no adapter_config.json inside: it sits in the run folder
    ckpt.mkdir(parents=True)
    (run_dir / "adapter_config.json").write_text(json.dumps(OLD_CONFIG))
    legacy = legacy_state_dict(peft_adapter, with_adapter_name, dtype=torch.float32)
    torch.save(legacy, ckpt / "pytorch_model.bin")
    before = tree_digest(run_dir)

    ours = load_adapter(base(tiny_model), str(ckpt))
    plain = PeftModel.from_pretrained(base(tiny_model), peft_adapter).eval()
    torch.testing.assert_close(logits(ours, bpe_tokenizer), logits(plain, bpe_tokenizer), rtol=0, atol=0)
    assert not torch.allclose(logits(ours, bpe_tokenizer), logits(base(tiny_model), bpe_tokenizer))
    assert tree_digest(run_dir) == before  # nothing renamed, nothing written


@pytest.mark.parametrize("legacy_keys", [False, True])
def test_adapter_on_the_embedding_loads(tmp_path, tiny_model, bpe_tokenizer, legacy_keys):
    """LoRA on embed_tokens stores parameters, not modules (`embed_tokens.lora_embedding_A`, or with a
    trailing `.default` from some peft versions): they load, and the logits equal peft's own."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    torch.manual_seed(4)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM",
                        init_lora_weights=False)
    out = str(tmp_path / "adapter")
    get_peft_model(base(tiny_model), config).save_pretrained(out)
    weights = os.path.join(out, "adapter_model.safetensors")
    sd = load_file(weights)
    assert any(k.endswith("embed_tokens.lora_embedding_A") for k in sd)
    if legacy_keys:
        save_file({k + ".default" if k.endswith(("lora_embedding_A", "lora_embedding_B")) else k: v
                   for k, v in sd.items()}, weights)
    ours = load_adapter(base(tiny_model), out)
    plain = get_peft_model(base(tiny_model), config)  # peft's own loader, on the file as peft wrote it
    set_peft_model_state_dict(plain, sd)
    plain.eval()
    torch.testing.assert_close(logits(ours, bpe_tokenizer), logits(plain, bpe_tokenizer), rtol=0, atol=0)
    assert not torch.allclose(logits(ours, bpe_tokenizer), logits(base(tiny_model), bpe_tokenizer))


def test_legacy_fp16_adapter_model_bin(tmp_path, tiny_model, bpe_tokenizer, peft_adapter):
    from peft import PeftModel

    d = tmp_path / "old"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(OLD_CONFIG))
    torch.save(legacy_state_dict(peft_adapter), d / "adapter_model.bin")
    ours = load_adapter(base(tiny_model), str(d))
    plain = PeftModel.from_pretrained(base(tiny_model), peft_adapter).eval()
    for name, param in plain.named_parameters():  # the legacy copy was rounded to fp16
        if "lora_" in name:
            param.data = param.data.half().float()
    torch.testing.assert_close(logits(ours, bpe_tokenizer), logits(plain, bpe_tokenizer), rtol=0, atol=1e-6)


def test_config_inferred_when_missing(tmp_path, tiny_model, peft_adapter, caplog):
    d = tmp_path / "bare"
    d.mkdir()
    torch.save(legacy_state_dict(peft_adapter), d / "pytorch_model.bin")
    model = load_adapter(base(tiny_model), str(d))
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (4, 8, ["q_proj", "v_proj"])
    assert "inferred r=4" in caplog.text


def test_adapter_for_other_base_is_a_clear_error(tmp_path, tiny_model, peft_adapter):
    other = make_tiny_model(str(tmp_path / "wide"), tiny_model, hidden_size=32)
    with pytest.raises(UserError, match=r"does not fit base model .*wide.*\(4, 64\) in the adapter but \(4, 32\)"):
        load_adapter(base(other), peft_adapter)
    result = run_script("generate.py", "--model_path", other, "--lora_path", peft_adapter, "--instruction", "hi")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: adapter ")


def test_missing_adapter_folder_and_non_lora_file(tmp_path, tiny_model):
    with pytest.raises(UserError, match="no such directory"):
        load_adapter(base(tiny_model), str(tmp_path / "nope"))
    d = tmp_path / "full"
    d.mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, d / "pytorch_model.bin")
    with pytest.raises(UserError, match="holds no LoRA weights"):
        load_adapter(base(tiny_model), str(d))


def test_adapter_naming_another_path_of_its_base_loads_without_peft_warning(tmp_path, tiny_model, peft_adapter):
    """Adapters name their base as the user did (the embedded model's name, a hub id), which is never
    the folder it resolves to: loading one must not make peft warn that the name was "renamed"."""
    import shutil
    import warnings

    adapter = str(tmp_path / "named")
    shutil.copytree(peft_adapter, adapter)
    config_path = os.path.join(adapter, "adapter_config.json")
    config = json.load(open(config_path))
    config["base_model_name_or_path"] = "SmolLM2-135M-Instruct"
    json.dump(config, open(config_path, "w"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_adapter(base(tiny_model), adapter)
    assert not [w for w in caught if "base_model_name_or_path" in str(w.message)], [str(w.message) for w in caught]
