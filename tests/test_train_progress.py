"""What the training page relies on: trainer_log.jsonl, a graceful stop on SIGTERM and its resume,
the run's own log files under --overwrite_output_dir, and quiet adapter saves."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import finetune
from conftest import INSTRUCT_RECORDS, ROOT, read_jsonl, train_args, write_jsonl


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.02)
    return False


STOP_RUN = ["--max_steps", "24", "--save_steps", "1000", "--lora_dropout", "0.1", "--learning_rate", "1e-3",
            "--warmup_steps", "3", "--seed", "7"]


def stop_after_first_log(command: list, out: str, pick=lambda proc: proc):
    """Start `command`, send SIGTERM to pick(proc) once OUT/trainer_log.jsonl has a "log" line;
    returns (exit status, output, the log's events, N, OUT/checkpoint-N)."""
    log = os.path.join(out, "trainer_log.jsonl")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    assert wait_for(lambda: os.path.isfile(log) and '"event": "log"' in open(log).read(), proc)
    pick(proc).send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    events = read_jsonl(log)
    n = events[-1]["step"]
    return proc.returncode, output, events, n, os.path.join(out, f"checkpoint-{n}")


def check_stopped(rc, output, events, n, checkpoint, out):
    assert rc == 0, output[-3000:]
    assert events[-1] == {**events[-1], "event": "stop", "checkpoint": checkpoint} and 1 <= n < 24
    assert f"stopped at step {n}: checkpoint saved to {checkpoint}; continue with --resume_from_checkpoint " \
           f"{checkpoint}" in output
    assert output.count("stopped at step") == 1 and "Traceback" not in output
    assert json.load(open(os.path.join(checkpoint, "trainer_state.json")))["global_step"] == n
    assert os.path.isfile(os.path.join(checkpoint, "training_config.json"))
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    assert [e["event"] for e in events if e["event"] in ("start", "save", "stop")] == ["start", "save", "stop"]
    assert events[0]["total_steps"] == 24 and events[0]["step"] == 0


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, tiny_models):
    """The training page's Stop: exit status 0, checkpoint-N and the line saying how to go on; the
    resumed run appends to trainer_log.jsonl and ends with an adapter that loads (that it continues
    exactly: the slow test below)."""
    model = tiny_models["sp"]  # small vocabulary: fast steps
    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS * 4)
    out = str(tmp_path / "stopped")
    rc, output, events, n, checkpoint = stop_after_first_log(
        [sys.executable, os.path.join(ROOT, "finetune.py"), *train_args(data, out, model, *STOP_RUN)], out)
    check_stopped(rc, output, events, n, checkpoint, out)

    finetune.main(train_args(data, out, model, *STOP_RUN, "--resume_from_checkpoint", checkpoint))
    resumed = read_jsonl(os.path.join(out, "trainer_log.jsonl"))[len(events):]  # appended
    assert resumed[0]["event"] == "start" and resumed[0]["step"] == n
    assert resumed[-1] == {**resumed[-1], "event": "end", "step": 24, "adapter": out}
    from transformers import AutoModelForCausalLM

    from models import load_adapter

    load_adapter(AutoModelForCausalLM.from_pretrained(model), out)  # the final adapter loads


@pytest.mark.slow
def test_stopped_run_resumes_exactly(tmp_path, tiny_models):
    import torch
    from safetensors.torch import load_file

    model = tiny_models["sp"]
    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS * 4)
    full, out = str(tmp_path / "full"), str(tmp_path / "stopped")
    finetune.main(train_args(data, full, model, *STOP_RUN))
    rc, output, events, n, checkpoint = stop_after_first_log(
        [sys.executable, os.path.join(ROOT, "finetune.py"), *train_args(data, out, model, *STOP_RUN)], out)
    check_stopped(rc, output, events, n, checkpoint, out)
    finetune.main(train_args(data, out, model, *STOP_RUN, "--resume_from_checkpoint", checkpoint))
    a = load_file(os.path.join(full, "adapter_model.safetensors"))
    b = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_sigterm_to_one_ddp_process_stops_both_at_the_same_step(tmp_path, tiny_models):
    """Under torchrun the stop request is shared at each step end: a signal to rank 1 alone stops
    both processes after the same step, rank 0 saves and says so once, torchrun exits 0."""
    import psutil

    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS * 4)
    out = str(tmp_path / "ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               os.path.join(ROOT, "finetune.py"), *train_args(data, out, tiny_models["sp"], *STOP_RUN, "--batch_size", "8")]

    def rank_1(proc):
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
        assert len(workers) == 1
        return workers[0]

    rc, output, events, n, checkpoint = stop_after_first_log(command, out, rank_1)
    check_stopped(rc, output, events, n, checkpoint, out)


def test_trainer_log_lines(tmp_path, tiny_models, caplog):
    """One epoch of 12 examples in 3 steps of 4: every event, with the Trainer's own numbers."""
    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS * 2)
    out = str(tmp_path / "out")
    finetune.main(train_args(data, out, tiny_models["sp"], "--test_size", "4", "--eval_steps", "2", "--max_steps", "-1",
                             "--num_epochs", "1", "--eval_prompts", "none"))
    events = read_jsonl(os.path.join(out, "trainer_log.jsonl"))
    assert [(e["event"], e["step"]) for e in events] == [
        ("start", 0), ("log", 1), ("log", 2), ("eval", 2), ("save", 2), ("log", 3), ("eval", 3), ("save", 3),
        ("end", 3)]
    state = json.load(open(os.path.join(out, "checkpoint-3", "trainer_state.json")))
    losses = {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
    eval_losses = {h["step"]: h["eval_loss"] for h in state["log_history"] if "eval_loss" in h}
    rates = {h["step"]: h["learning_rate"] for h in state["log_history"] if "loss" in h}
    for e in events:
        assert e["total_steps"] == 3
        if e["event"] == "log":
            assert e["loss"] == losses[e["step"]] and e["learning_rate"] == rates[e["step"]]
            assert e["epoch"] == e["step"] / 3 and e["elapsed_s"] > 0 and e["remaining_s"] >= 0
        if e["event"] == "eval":
            assert e["eval_loss"] == eval_losses[e["step"]]
        if e["event"] == "save":
            assert e["checkpoint"] == os.path.join(out, f"checkpoint-{e['step']}")
    assert events[-1]["adapter"] == out and events[-1]["remaining_s"] == 0
    # tokens/s counts the input tokens of the epoch: every token of the 12 training examples once
    tokens = int(re.search(r"12 train / 4 eval examples, (\d+) tokens", caplog.text).group(1))
    assert state["num_input_tokens_seen"] == tokens
    last = events[-1]
    assert last["tokens_per_s"] == pytest.approx(tokens / last["elapsed_s"], rel=0.02)


def test_overwrite_empties_our_logs_and_keeps_foreign_files(tmp_path, tiny_models):
    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "trainer_log.jsonl").write_text('{"event": "old"}\n')
    (out / "notes.jsonl").write_text("mine\n")
    with pytest.raises(SystemExit):  # not empty, not ours to replace without the flag
        finetune.main(train_args(data, str(out), tiny_models["sp"], "--max_steps", "1"))
    finetune.main(train_args(data, str(out), tiny_models["sp"], "--max_steps", "1", "--overwrite_output_dir"))
    assert [e["event"] for e in read_jsonl(out / "trainer_log.jsonl")] == ["start", "log", "save", "end"]
    assert (out / "notes.jsonl").read_text() == "mine\n"


def test_overwrite_refuses_a_log_name_that_is_not_a_file(tmp_path, tiny_models, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS)
    out = tmp_path / "out"
    (out / "samples.jsonl").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        finetune.main(train_args(data, str(out), tiny_models["sp"], "--overwrite_output_dir"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--output_path {out}: samples.jsonl is not a file a run of finetune.py wrote" in err
    assert os.path.isdir(out / "samples.jsonl")


def test_adapter_saves_do_not_ask_the_hub(tmp_path, tiny_models, monkeypatch, recwarn):
    """The base is named as the user did (the embedded model's name, not a folder): peft must not
    look that name up on the hub at each save, and adapter_config.json keeps the name."""
    import train

    name = "SmolLM2-135M-Instruct"
    monkeypatch.setattr(train, "resolve_model_path", lambda path: tiny_models["sp"] if path == name else path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    data = write_jsonl(tmp_path / "d.jsonl", INSTRUCT_RECORDS)
    out = str(tmp_path / "out")
    finetune.main(train_args(data, out, name, "--max_steps", "2", "--save_steps", "1"))
    shown = [str(w.message) for w in recwarn]
    for warning in ("Unable to fetch remote file", "Could not find a config file"):
        assert not [w for w in shown if warning in w]
    for folder in (out, os.path.join(out, "checkpoint-1"), os.path.join(out, "checkpoint-2")):
        assert json.load(open(os.path.join(folder, "adapter_config.json")))["base_model_name_or_path"] == name
