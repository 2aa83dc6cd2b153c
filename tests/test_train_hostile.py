"""Training as a careless or hostile user runs it: the output folder, bad flags, damaged
checkpoints and adapters, diverging runs, interrupted saves and a full disk. Every case ends in a
one-line error with exit status 2 (or a complete result) and leaves the user's files as they were."""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import finetune
import train
from conftest import INSTRUCT_RECORDS, ROOT, train_args, write_jsonl


def tree(path) -> dict:
    """{relative path: sha256} of every file under path (the user's files, to compare later)."""
    out = {}
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def one_line_error(capsys, code) -> str:
    """The SystemExit was 2 and stderr ends in exactly one `error: ` line; returns it."""
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err[-2000:]
    return last


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        finetune.main(argv)
    return one_line_error(capsys, e.value.code)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", INSTRUCT_RECORDS)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_models, data):
    """A complete 4-step run with checkpoints at steps 2 and 4 (the small-vocabulary model)."""
    out = str(tmp_path_factory.mktemp("run") / "out")
    finetune.main(train_args(data, out, tiny_models["sp"]))
    return out


# --- 1. the output folder ----------------------------------------------------------------------------


def test_killed_run_folder_is_not_reused(finished_run, tiny_models, data, tmp_path, capsys):
    """A run killed after checkpoint-4 (no final adapter): a new run into the same folder used to
    replace checkpoint-2, delete checkpoint-3 and mix two runs. Now it is refused, both ways out named."""
    out = str(tmp_path / "killed")
    shutil.copytree(finished_run, out)
    for name in checkpoints.ADAPTER_FILES:
        os.remove(os.path.join(out, name))
    before = tree(out)
    err = refused(train_args(data, out, tiny_models["sp"], "--max_steps", "2", "--save_steps", "1"), capsys)
    assert f"--output_path {out} holds checkpoints of an earlier run (checkpoint-2, checkpoint-4)" in err
    assert f"--resume_from_checkpoint {os.path.join(out, 'checkpoint-4')}" in err
    assert tree(out) == before


def test_user_files_and_foreign_checkpoints_survive(tiny_models, data, tmp_path, capsys):
    """README.md beside checkpoint-1/checkpoint-9 under --save_total_limit 1: both checkpoints were
    deleted and README.md rewritten by peft. Refused with and without --overwrite_output_dir."""
    out = tmp_path / "mine"
    for name in ("checkpoint-1", "checkpoint-9"):
        (out / name).mkdir(parents=True)
        (out / name / "notes.txt").write_text(f"my {name}\n")
    (out / "README.md").write_text("# my experiment notes\n")
    before = tree(out)
    err = refused(train_args(data, str(out), tiny_models["sp"], "--save_total_limit", "1"), capsys)
    assert "checkpoints of an earlier run (checkpoint-1, checkpoint-9)" in err
    assert tree(out) == before
    err = refused(train_args(data, str(out), tiny_models["sp"], "--save_total_limit", "1", "--overwrite_output_dir"),
                  capsys)
    assert "checkpoint-1 was not written by finetune.py (it has no training_config.json and trainer_state.json)" in err
    assert tree(out) == before


def test_non_empty_folder_needs_overwrite_which_replaces_only_adapter_files(tiny_models, data, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "README.md").write_text("# keep me\n")
    (out / "adapter_config.json").write_text('{"stale": true}\n')
    err = refused(train_args(data, str(out), tiny_models["sp"], "--max_steps", "1"), capsys)
    assert f"--output_path {out} already holds an adapter (README.md, adapter_config.json)" in err
    assert "--overwrite_output_dir" in err
    finetune.main(train_args(data, str(out), tiny_models["sp"], "--max_steps", "1", "--save_steps", "5",
                             "--overwrite_output_dir"))
    assert (out / "README.md").read_text() == "# keep me\n"  # peft's model card did not replace it
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    assert not [n for n in os.listdir(out) if n.startswith(".adapter.partial-")]  # staging cleaned up


def test_resume_into_another_non_empty_folder_is_refused(finished_run, tiny_models, data, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    err = refused(train_args(data, str(other), tiny_models["sp"], "--resume_from_checkpoint",
                             os.path.join(finished_run, "checkpoint-2")), capsys)
    assert "belongs to another folder" in err and f"--output_path {finished_run}" in err


# --- 2. flags that used to fail after the model loaded, or with a traceback ----------------------------


BAD_FLAGS = [
    (["--learning_rate", "-1"], r"--learning_rate must be > 0 and at most 1, got -1.0"),
    (["--learning_rate", "nan"], r"--learning_rate must be > 0 and at most 1, got nan"),
    (["--learning_rate", "inf"], r"--learning_rate must be > 0 and at most 1, got inf"),
    (["--learning_rate", "0"], r"--learning_rate must be > 0 and at most 1, got 0.0"),
    (["--learning_rate", "1e38"], r"--learning_rate must be > 0 and at most 1, got 1e\+38"),
    (["--warmup_steps", "-1"], r"--warmup_steps must be >= 0, got -1"),
    (["--save_total_limit", "-2"], r"--save_total_limit must be >= 0, got -2"),
    (["--test_size", "-1"], r"--test_size must be >= 0, got -1"),
    (["--max_steps", "-1", "--num_epochs", "nan"], r"--num_epochs must be a finite number, got nan"),
    (["--lora_dropout", "nan"], r"--lora_dropout must be in \[0, 1\), got nan"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_errors_before_anything_is_written(flags, message, tiny_models, data, tmp_path,
                                                                   capsys):
    import re

    out = tmp_path / "out"
    err = refused(train_args(data, str(out), tiny_models["sp"], *flags), capsys)
    assert re.search(message, err), err
    assert not out.exists()


def test_output_path_empty_or_unwritable(tiny_models, data, tmp_path, capsys):
    assert "--output_path is empty" in refused(train_args(data, "", tiny_models["sp"]), capsys)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    err = refused(train_args(data, str(blocker / "sub"), tiny_models["sp"]), capsys)
    assert f"{blocker} is a file, so no folder can be made there" in err
    assert blocker.read_text() == "x"


@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is not None, reason="deepspeed installed")
def test_deepspeed_without_the_package(tiny_models, data, tmp_path, capsys):
    err = refused(train_args(data, str(tmp_path / "o"), tiny_models["sp"], "--deepspeed",
                             os.path.join(ROOT, "config-sample", "zero2.json")), capsys)
    assert err.endswith("needs the deepspeed package: pip install deepspeed")


# --- 3. damaged --resume_from_checkpoint ----------------------------------------------------------------


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:int(len(data) * keep)])


def _nan_adapter(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, path)


DAMAGE = {
    "partial (no optimizer.pt)": (lambda c: os.remove(os.path.join(c, "optimizer.pt")),
                                  "not a complete checkpoint (no optimizer.pt); the latest complete one is"),
    "no trainer_state.json": (lambda c: os.remove(os.path.join(c, "trainer_state.json")),
                              "not a complete checkpoint (no trainer_state.json)"),
    "truncated adapter": (lambda c: _truncate(os.path.join(c, "adapter_model.safetensors")),
                          "adapter_model.safetensors: cannot be read as a tensor file"),
    "empty adapter": (lambda c: open(os.path.join(c, "adapter_model.safetensors"), "wb").close(),
                      "adapter_model.safetensors: cannot be read as a tensor file"),
    "NaN adapter": (lambda c: _nan_adapter(os.path.join(c, "adapter_model.safetensors")),
                    "tensors hold NaN or infinite values"),
    "truncated optimizer.pt": (lambda c: _truncate(os.path.join(c, "optimizer.pt")),
                               "optimizer.pt: cannot be read"),
    "trainer_state.json not JSON": (lambda c: open(os.path.join(c, "trainer_state.json"), "w").write("{oops"),
                                    "trainer_state.json:1: invalid JSON"),
    "adapter_config.json a list": (lambda c: open(os.path.join(c, "adapter_config.json"), "w").write("[1]"),
                                   "adapter_config.json: expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_is_refused_before_loading(case, finished_run, tiny_models, data, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(finished_run, out)
    checkpoint = os.path.join(out, "checkpoint-4")
    damage, message = DAMAGE[case]
    damage(checkpoint)
    before = tree(out)
    err = refused(train_args(data, out, tiny_models["sp"], "--resume_from_checkpoint", checkpoint), capsys)
    assert message in err, err
    if case.startswith("partial"):
        assert err.endswith(os.path.join(out, "checkpoint-2"))
    assert tree(out) == before


def test_checkpoint_of_another_shape_or_not_a_checkpoint(finished_run, tiny_models, data, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(finished_run, out)
    err = refused(train_args(data, out, tiny_models["sp"], "--lora_r", "4", "--resume_from_checkpoint",
                             os.path.join(out, "checkpoint-2")), capsys)
    assert "the checkpoint is a LoRA of r=8, lora_alpha=16 but the flags ask for --lora_r 4" in err
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("a")
    err = refused(train_args(data, str(tmp_path / "new"), tiny_models["sp"], "--resume_from_checkpoint",
                             str(notes)), capsys)
    assert "not a complete checkpoint" in err and "pass a checkpoint-N folder finetune.py wrote" in err
    err = refused(train_args(data, str(tmp_path / "new"), tiny_models["sp"], "--resume_from_checkpoint",
                             str(tmp_path / "nope")), capsys)
    assert "no such directory" in err


# --- 4. damaged adapters (--lora_path, generate.py, chat.py) ----------------------------------------------


def _adapter_copy(finished_run, tmp_path, name="adapter"):
    d = tmp_path / name
    d.mkdir()
    for f in ("adapter_model.safetensors", "adapter_config.json", "training_config.json"):
        shutil.copy(os.path.join(finished_run, f), d / f)
    return d


BAD_ADAPTERS = {
    "truncated weights": (lambda d: _truncate(d / "adapter_model.safetensors"), "cannot be read as a tensor file"),
    "config is a list": (lambda d: (d / "adapter_config.json").write_text("[]"), "expected a JSON object, got list"),
    "r is a word": (lambda d: (d / "adapter_config.json").write_text(json.dumps(
        {**json.loads((d / "adapter_config.json").read_text()), "r": "eight"})), '"r" must be a positive integer, got "eight"'),
    "config not JSON": (lambda d: (d / "adapter_config.json").write_text("{"), "adapter_config.json:1: invalid JSON"),
    "weights without config": (lambda d: os.remove(d / "adapter_config.json"),
                               "has no adapter_config.json beside it (a save that was interrupted?)"),
    "NaN weights": (lambda d: _nan_adapter(d / "adapter_model.safetensors"), "hold NaN or infinite values"),
    "training_config.json damaged": (lambda d: (d / "training_config.json").write_text('{"prompt_type": '),
                                     "training_config.json:1: invalid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_damaged_adapter_is_a_one_line_error(case, finished_run, tiny_models, tmp_path, capsys):
    import generate

    d = _adapter_copy(finished_run, tmp_path)
    damage, message = BAD_ADAPTERS[case]
    damage(d)
    before = tree(d)
    with pytest.raises(SystemExit) as e:
        generate.main(["--model_path", tiny_models["sp"], "--lora_path", str(d), "--instruction", "hi",
                       "--max_new_tokens", "2"])
    assert message in one_line_error(capsys, e.value.code)
    assert tree(d) == before


def test_damaged_adapter_through_the_cli(finished_run, tiny_models, tmp_path):
    from conftest import run_script

    d = _adapter_copy(finished_run, tmp_path)
    _truncate(d / "adapter_model.safetensors")
    result = run_script("chat.py", "--cli", "--model_path", tiny_models["sp"], "--lora_path", str(d), stdin="hi\n")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {d / 'adapter_model.safetensors'}: cannot be read")


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("what", ["loss", "gradients", "saved weights"])
def test_non_finite_run_stops_with_one_line_error(what, tiny_models, data, tmp_path, monkeypatch, capsys):
    """A loss or gradient that turns NaN stops the run at that step; weights that are not finite
    at the end are not saved. (Divergence is forced: valid flags cannot reach it on a tiny model.)"""
    import models

    real_loss, real_read = train.supervised_token_loss, models.load_adapter_state_dict
    if what == "loss":
        def loss(model, inputs, **kw):
            total, count = real_loss(model, inputs, **kw)
            return total * float("nan"), count
        monkeypatch.setattr(train, "supervised_token_loss", loss)
    elif what == "gradients":
        def loss(model, inputs, **kw):
            total, count = real_loss(model, inputs, **kw)
            return _NanGradient.apply(total), count
        monkeypatch.setattr(train, "supervised_token_loss", loss)
    else:
        monkeypatch.setattr(models, "load_adapter_state_dict",
                            lambda path: {k: v * float("inf") for k, v in real_read(path).items()})
    out = tmp_path / "out"
    err = refused(train_args(data, str(out), tiny_models["sp"], "--max_steps", "2", "--save_steps", "10"), capsys)
    expected = {"loss": "step 1: the loss is nan: training diverged; lower --learning_rate (now 0.01)",
                "gradients": "step 1: the gradients hold NaN or infinite values: training diverged",
                "saved weights": f"{out / 'adapter_model.safetensors'}: 8 of 8 tensors hold NaN or infinite values"}
    assert expected[what] in err, err
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()


# --- 6. the final save, interrupted; a full disk -------------------------------------------------------


def test_killed_during_final_save_leaves_no_adapter_or_a_complete_one(tiny_models, data, tmp_path):
    """SIGKILL or SIGINT at random moments of the final save: the folder has no adapter_config.json
    (and --lora_path refuses it) or a complete adapter that loads with every file beside it."""
    from transformers import AutoModelForCausalLM

    from errors import UserError
    from models import load_adapter

    rng = random.Random(0)
    outcomes = []
    for trial in range(6):
        out = tmp_path / f"out{trial}"
        proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "finetune.py"),
             *train_args(data, str(out), tiny_models["sp"], "--max_steps", "1", "--save_steps", "10")],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if out.is_dir() and any(n.startswith(".adapter.partial-") for n in os.listdir(out)):
                break
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL if trial % 2 else signal.SIGINT)
        proc.wait()
        model = AutoModelForCausalLM.from_pretrained(tiny_models["sp"], dtype=torch.float32)
        if (out / "adapter_config.json").exists():
            assert {"adapter_model.safetensors", "training_config.json", "loss.png"} <= set(os.listdir(out))
            load_adapter(model, str(out))
            outcomes.append("complete")
        else:
            if out.exists() and (out / "adapter_model.safetensors").exists():
                with pytest.raises(UserError, match="has no adapter_config.json beside it"):
                    load_adapter(model, str(out))
            outcomes.append("none")
        if trial % 2 == 0 and out.exists():  # SIGINT: the staging folder is removed on the way out
            assert not [n for n in os.listdir(out) if n.startswith(".adapter.partial-")]
    assert "none" in outcomes, outcomes  # some kills did land inside the save


def test_full_disk_during_the_save(tiny_models, data, tmp_path):
    out = tmp_path / "out"

    def limit():  # files larger than 8 KB cannot be written: the adapter (about 14 KB) fails
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    result = subprocess.run([sys.executable, os.path.join(ROOT, "finetune.py"),
                             *train_args(data, str(out), tiny_models["sp"], "--max_steps", "1", "--save_steps", "10")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: writing ") and "free disk space" in last, last
    assert not (out / "adapter_config.json").exists()


# --- 7. what would surprise a user is said before training ----------------------------------------------


def test_start_up_summary_says_what_would_surprise(tiny_models, tmp_path, caplog):
    from prompt import Conversation, build_prompt_ids, encode_example
    from models import load_tokenizer

    records = [{"instruction": f"Question number {i}?", "input": "", "output": "An answer. " * (1 + i % 7)}
               for i in range(30)]
    tok = load_tokenizer(tiny_models["sp"])
    cutoff = len(build_prompt_ids("instruct", Conversation([("Question number 10?", None)]), tok)) + 12
    cut = [encode_example("instruct", Conversation([(r["instruction"], r["output"])]), tok, cutoff)[1]
           for r in records]
    assert 0 < sum(cut) < 30
    data = write_jsonl(tmp_path / "d.jsonl", records)
    argv = ["--data_path", data, "--output_path", str(tmp_path / "out"), "--model_path", tiny_models["sp"],
            "--max_steps", "2", "--micro_batch_size", "2", "--batch_size", "2", "--cutoff_len", str(cutoff),
            "--save_steps", "10", "--eval_steps", "10"]
    with caplog.at_level("INFO", logger="vicuna"):
        finetune.main(argv)
    text = caplog.text
    assert "held out 3 of 30 records for evaluation" in text  # not 200 of 30
    assert "--warmup_steps 100 is not below this run's 2 optimizer steps" in text
    assert f"{sum(cut)} of 30 examples were cut at --cutoff_len {cutoff}" in text


# --- 8. a huge record is not tokenized whole ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_huge_record_costs_only_its_first_tokens(kind, tiny_models):
    from prompt import Conversation, encode_example, render, tokenize_pieces
    from models import load_tokenizer

    tok = load_tokenizer(tiny_models[kind])
    encoded = []
    real = tok.__class__.__call__

    class Counting(tok.__class__):
        def __call__(self, text, *args, **kwargs):
            encoded.append(len(text))
            return real(self, text, *args, **kwargs)

    tok.__class__ = Counting
    try:
        words = "alpha beta 你好 gamma, delta! 12345 "
        conv = Conversation([("Summarize this.", words * 20000)])  # 700,000 characters
        example, truncated = encode_example("instruct", conv, tok, 256)
        assert truncated and len(example["input_ids"]) == 256
        assert sum(encoded) < 100_000, sum(encoded)
        ids, labels = tokenize_pieces(render("instruct", conv), tok)  # the whole text, then cut
        assert example == {"input_ids": ids[:256], "labels": labels[:256]}
    finally:
        tok.__class__ = Counting.__mro__[1]
