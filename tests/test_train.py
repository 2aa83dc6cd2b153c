"""Training on tiny random models: outputs, plain-peft loading, quantized steps, resume, DDP."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import finetune
import train
import train_args as flags
from conftest import INSTRUCT_RECORDS, ROOT, run_script, train_args, write_jsonl


def logits(model, tokenizer, text="Below is an instruction. 你好"):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("trained")
    data = write_jsonl(tmp / "d.jsonl", INSTRUCT_RECORDS)
    out = str(tmp / "out")
    finetune.main(train_args(data, out, tiny_model))
    return out


def test_outputs_written(trained):
    names = set(os.listdir(trained))
    assert {"adapter_config.json", "adapter_model.safetensors", "training_config.json", "loss.png"} <= names
    with open(os.path.join(trained, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    config = json.load(open(os.path.join(trained, "training_config.json")))
    assert config["prompt_type"] == "instruct" and config["args"]["lora_r"] == 8
    assert config["lora_target_modules"] == ["q_proj", "v_proj"]
    for step in (2, 4):  # every checkpoint carries the config too
        assert os.path.isfile(os.path.join(trained, f"checkpoint-{step}", "training_config.json"))
    events = [f for _, _, files in os.walk(trained) for f in files if f.startswith("events.out.tfevents")]
    assert events, "no TensorBoard log"


def test_adapter_loads_in_plain_peft_with_identical_logits(trained, tiny_model, bpe_tokenizer):
    from peft import PeftModel
    from safetensors.torch import load_file

    from models import load_adapter

    weights = load_file(os.path.join(trained, "adapter_model.safetensors"))
    assert len(weights) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (lora_A, lora_B)
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)
    plain = PeftModel.from_pretrained(base(tiny_model), trained).eval()
    ours = load_adapter(base(tiny_model), trained)
    reference = logits(base(tiny_model), bpe_tokenizer)
    assert torch.equal(logits(plain, bpe_tokenizer), logits(ours, bpe_tokenizer))
    assert not torch.allclose(logits(plain, bpe_tokenizer), reference, atol=1e-4)  # it learned something


def test_refuses_to_overwrite_adapter(trained, tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS)
    before = open(os.path.join(trained, "adapter_model.safetensors"), "rb").read()
    with pytest.raises(SystemExit) as e:
        finetune.main(train_args(data, trained, tiny_model))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "already holds an adapter and the checkpoints of an earlier run (checkpoint-2, checkpoint-4)" in err
    assert f"--resume_from_checkpoint {os.path.join(trained, 'checkpoint-4')}" in err
    assert open(os.path.join(trained, "adapter_model.safetensors"), "rb").read() == before


def test_overwrite_replaces_an_earlier_run_whole(trained, tiny_model, tmp_path):
    """--overwrite_output_dir over a finished run: its checkpoints are replaced, not mixed with the
    new run's (a 3-step run leaves checkpoint-2 and checkpoint-3, not the old checkpoint-4), and a
    file of the user's stays."""
    out = str(tmp_path / "again")
    shutil.copytree(trained, out)
    with open(os.path.join(out, "NOTES.txt"), "w") as f:
        f.write("mine\n")
    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS)
    finetune.main(train_args(data, out, tiny_model, "--max_steps", "3", "--overwrite_output_dir", "--seed", "5"))
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-3"]
    state = json.load(open(os.path.join(out, "checkpoint-3", "trainer_state.json")))
    assert state["global_step"] == 3
    assert json.load(open(os.path.join(out, "training_config.json")))["args"]["seed"] == 5
    assert open(os.path.join(out, "NOTES.txt")).read() == "mine\n"


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantized_training_steps_on_cpu(tmp_path, tiny_model, quant):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS)
    out = str(tmp_path / "out")
    finetune.main(train_args(data, out, tiny_model, "--quant", quant, "--max_steps", "2"))
    config = json.load(open(os.path.join(out, "training_config.json")))
    assert config["args"]["quant"] == quant
    model = PeftModel.from_pretrained(base(tiny_model), out)  # the adapter also applies to the fp32 base
    assert sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n) > 0


def test_padded_length_grouped_path_trains(tmp_path, tiny_model):
    """--no-packing (padded, length-grouped batches) runs end to end and updates the adapter."""
    from peft import PeftModel

    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS)
    out = str(tmp_path / "out")
    finetune.main(train_args(data, out, tiny_model, "--no-packing", "--max_steps", "2"))
    config = json.load(open(os.path.join(out, "training_config.json")))
    assert config["args"]["packing"] is False and config["args"]["group_by_length"] is True
    model = PeftModel.from_pretrained(base(tiny_model), out)
    assert sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n) > 0


def test_single_step_inside_warmup_saves_and_warns(tmp_path, tiny_model, caplog):
    """A smoke run of one step with warmup trains at learning rate 0: lora_B stays zero, which is
    expected then (a warning), not a failed run."""
    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS)
    out = str(tmp_path / "out")
    with caplog.at_level("WARNING", logger="vicuna"):
        finetune.main(train_args(data, out, tiny_model, "--max_steps", "1", "--warmup_steps", "10"))
    assert os.path.isfile(os.path.join(out, "training_config.json"))
    assert "no step of this run had a learning rate above 0" in caplog.text


def test_zero_adapter_after_real_steps_is_a_one_line_error(tmp_path, tiny_model, monkeypatch, capsys):
    """lora_B still zero although steps ran at a positive rate: the adapter is useless, say so."""
    import models

    real = models.load_adapter_state_dict
    monkeypatch.setattr(models, "load_adapter_state_dict",  # as if the optimizer had never touched lora_B
                        lambda path: {k: (v * 0 if ".lora_B." in k else v) for k, v in real(path).items()})
    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS)
    with pytest.raises(SystemExit) as exc:
        finetune.main(train_args(data, str(tmp_path / "out"), tiny_model, "--max_steps", "1"))
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "every lora_B tensor is zero although training ran at a positive learning rate" in err[-1]
    assert "Traceback" not in "\n".join(err)


@pytest.mark.gpu
def test_qlora_on_a_gpu_keeps_bf16_weights_and_pages_the_optimizer(tmp_path, tiny_model):
    """--quant 4bit on a GPU: NF4 linear layers, every other weight still bf16 after peft's k-bit
    preparation (which upcasts them to float32: about 2 GB more on a 7B model), paged 8-bit AdamW,
    and two steps that update the adapter."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from peft import PeftModel

    import finetune_4bit
    from models import load_tokenizer

    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS)
    argv = train_args(data, str(tmp_path / "out"), tiny_model, "--bf16", "--max_steps", "2")
    args = flags.build_parser({**flags.DEFAULTS, **finetune_4bit.DEFAULTS}).parse_args(argv)
    plan = train.Plan.from_args(args)
    assert plan.gradient_checkpointing  # on by default with a GPU
    model, resolved = train.load_trainable_model(args, tiny_model, plan)
    assert resolved["dtype"] == "bfloat16"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    for name, p in model.named_parameters():
        if "lora_" not in name and p.dtype.is_floating_point:
            assert p.dtype == torch.bfloat16, name
    trainer = train.make_trainer(args, plan, model, load_tokenizer(tiny_model), [], [])
    assert str(getattr(trainer.args.optim, "value", trainer.args.optim)) == "paged_adamw_8bit"
    del trainer, model

    finetune_4bit.main(argv)
    adapter = PeftModel.from_pretrained(base(tiny_model), str(tmp_path / "out"))
    assert sum(float(p.abs().sum()) for n, p in adapter.named_parameters() if "lora_B" in n) > 0


def _hash_tree(path):
    digest = {}
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            digest[os.path.relpath(full, path)] = (hashlib.sha256(open(full, "rb").read()).hexdigest(),
                                                    os.stat(full).st_mtime_ns)
    return digest


def test_continue_finetune_from_adapter_leaves_it_untouched(trained, tiny_model, tmp_path):
    from safetensors.torch import load_file

    before = _hash_tree(trained)
    data = write_jsonl(tmp_path / "new.jsonl", INSTRUCT_RECORDS[:4])
    out = str(tmp_path / "continued")
    finetune.main(train_args(data, out, tiny_model, "--lora_path", trained, "--max_steps", "2",
                             "--lora_r", "4"))  # r comes from the adapter, not the flag
    assert _hash_tree(trained) == before
    start, end = load_file(os.path.join(trained, "adapter_model.safetensors")), \
        load_file(os.path.join(out, "adapter_model.safetensors"))
    assert start.keys() == end.keys()
    assert all(start[k].shape == end[k].shape for k in start)  # r=8 kept
    assert any(not torch.equal(start[k], end[k]) for k in start)
    config = json.load(open(os.path.join(out, "training_config.json")))
    assert config["lora_r"] == 8


def _complete_checkpoints(out):
    need = {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
    found = []
    for name in os.listdir(out):
        if name.startswith("checkpoint-") and need <= set(os.listdir(os.path.join(out, name))):
            found.append(int(name.split("-")[1]))
    return sorted(found)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tiny_models):
    from safetensors.torch import load_file

    model = tiny_models["sp"]  # small vocabulary: fast steps
    records = INSTRUCT_RECORDS * 4
    data = write_jsonl(tmp_path / "d.jsonl", records)
    common = ["--max_steps", "60", "--save_steps", "5", "--lora_dropout", "0.1", "--learning_rate", "1e-3",
              "--warmup_steps", "3", "--seed", "7"]
    full = str(tmp_path / "full")
    finetune.main(train_args(data, full, model, *common))

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "finetune.py"), *train_args(data, killed, model, *common)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(killed) and _complete_checkpoints(killed) and _complete_checkpoints(killed)[-1] >= 10:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "adapter_model.safetensors")), "finished before the kill"
    last = _complete_checkpoints(killed)[-1]
    assert last < 60
    finetune.main(train_args(data, killed, model, *common,
                             "--resume_from_checkpoint", os.path.join(killed, f"checkpoint-{last}")))
    a = load_file(os.path.join(full, "adapter_model.safetensors"))
    b = load_file(os.path.join(killed, "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


def test_ddp_two_cpu_processes(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS)
    out = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         os.path.join(ROOT, "finetune.py"),
         *train_args(data, out, tiny_models["sp"], "--batch_size", "8", "--max_steps", "2")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.load(open(os.path.join(out, "training_config.json")))
    assert config["world_size"] == 2
    assert config["gradient_accumulation_steps"] == 8 // 2 // 2  # divided by world size
    state = json.load(open(os.path.join(out, "checkpoint-2", "trainer_state.json")))
    assert state["global_step"] == 2
    assert result.stderr.count("adapter saved to") == 1  # only rank 0 writes
