"""The training page (train_web.py): its pure parts (presets read from scripts/common.sh, path
confinement, the finetune.py command, the run's log files, the rendered masks), the API, and a
real headless Chromium that checks data, starts, stops, resumes and finishes a run on a tiny model."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import INSTRUCT_RECORDS, ROOT, read_jsonl, write_jsonl
from test_pages_hostile import Page  # raw requests to any handler, hidden ones too
from test_web import browser  # noqa: F401  (the Chromium fixture of the other pages)

import train_web
from errors import UserError
from train_web import Folders


@pytest.fixture
def folders(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "data").mkdir()
    return Folders(str(work), [str(tmp_path / "data")])


@pytest.fixture(scope="module")
def parser():
    return train_web.finetune_parser()


# --- presets ---------------------------------------------------------------------------------------


def script_args(script: str, tmp_path) -> list[str]:
    """The finetune flags a scripts/*.sh passes (PYTHON=echo), after --data_path/--output_path."""
    env = {k: v for k, v in os.environ.items() if k not in ("TOT_CUDA", "MODEL_PATH", "PYTHON", "DATA_PATH",
                                                            "OUTPUT_PATH")}
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", script)], cwd=tmp_path, env=dict(env, PYTHON="echo"),
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.split()
    return argv[argv.index("--output_path") + 2:]


def test_presets_are_the_scripts_recipes(tmp_path):
    presets = train_web.read_presets()
    assert list(presets) == ["instruction", "chat", "QLoRA"]
    assert presets["instruction"] == script_args("finetune.sh", tmp_path)
    assert presets["chat"] == script_args("finetune_chat.sh", tmp_path)
    assert presets["QLoRA"] == script_args("finetune_4bit.sh", tmp_path)
    assert presets["QLoRA"][-2:] == ["--quant", "4bit"]


def test_preset_values_fill_the_flags(parser):
    values = train_web.flag_values(parser, train_web.read_presets()["chat"])
    assert values["prompt_type"] == "chat" and values["cutoff_len"] == "2048" and values["packing"] is True
    defaults = train_web.flag_values(parser)
    assert defaults["cutoff_len"] == "256" and defaults["test_size"] == ""  # finetune.py's own defaults


# --- folders ---------------------------------------------------------------------------------------


def test_confine_accepts_inside_and_refuses_escapes(folders, tmp_path):
    data = tmp_path / "data"
    assert folders.confine(str(data / "a.jsonl"), "Data file") == str(data / "a.jsonl")
    assert folders.confine("run1", "Output folder", base=folders.work_dir) == os.path.join(folders.work_dir, "run1")
    for bad in (str(data / ".." / "x.jsonl"), "/etc/passwd", str(tmp_path), "../../x"):
        with pytest.raises(UserError, match="outside the folders this page may use"):
            folders.confine(bad, "Data file", base=folders.work_dir)
    (data / "link").symlink_to("/etc")
    with pytest.raises(UserError, match="outside"):
        folders.confine(str(data / "link" / "passwd"), "Data file")
    (tmp_path / "data-evil").mkdir()  # a sibling whose name starts like an allowed folder
    with pytest.raises(UserError, match="outside"):
        folders.confine(str(tmp_path / "data-evil" / "x"), "Data file")
    with pytest.raises(UserError, match="empty"):
        folders.confine("  ", "Data file")


def test_model_argument(folders, tmp_path):
    from models import EMBEDDED_MODEL

    assert train_web.model_argument("", folders) == EMBEDDED_MODEL
    assert train_web.model_argument("meta-llama/Llama-2-7b-hf", folders) == "meta-llama/Llama-2-7b-hf"
    model = tmp_path / "data" / "m.gguf"
    assert train_web.model_argument(str(model), folders) == str(model)
    for bad in ("/etc", "../x.gguf", "/tmp/model.gguf", "~/models/x"):
        with pytest.raises(UserError, match="outside"):
            train_web.model_argument(bad, folders)


# --- the command ------------------------------------------------------------------------------------


def command(parser, folders, tmp_path, **over):
    data = write_jsonl(tmp_path / "data" / "d.jsonl", INSTRUCT_RECORDS)
    values = train_web.flag_values(parser)
    values.update(over.pop("values", {}))
    kwargs = {"model": "", "quant": "none", "data": data, "output": "run", "values": values}
    kwargs.update(over)
    return train_web.build_command(parser, folders, **kwargs)


def test_command_is_finetune_with_the_changed_flags(parser, folders, tmp_path):
    argv = command(parser, folders, tmp_path, values={"cutoff_len": "128", "num_epochs": "3.0", "packing": False,
                                                      "test_size": "2"})
    assert argv[:2] == [sys.executable, os.path.join(ROOT, "finetune.py")]
    out = os.path.join(folders.work_dir, "run")
    assert argv[2:] == ["--model_path", "SmolLM2-135M-Instruct", "--data_path", str(tmp_path / "data" / "d.jsonl"),
                        "--output_path", out, "--cutoff_len", "128", "--no-packing", "--test_size", "2"]
    assert shlex.split(shlex.join(argv)) == argv  # what the page shows is what runs
    args = parser.parse_args(argv[2:])
    assert args.cutoff_len == 128 and args.packing is False and args.num_epochs == 3


def test_command_refuses_bad_values_in_one_line(parser, folders, tmp_path):
    for values, message in (({"cutoff_len": "abc"}, "invalid int value"), ({"cutoff_len": "0"}, "must be > 0"),
                            ({"batch_size": "5"}, "not a multiple"), ({"prompt_type": "evil"}, "invalid choice"),
                            ({"lora_target_modules": "--overwrite_output_dir"}, "cannot start with '-'"),
                            ({"data_shares": "--inspect_data=x"}, "cannot start with '-'")):
        with pytest.raises(UserError, match=message) as e:
            command(parser, folders, tmp_path, values=values)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="outside"):
        command(parser, folders, tmp_path, output="/tmp/elsewhere")
    with pytest.raises(UserError, match="outside"):
        command(parser, folders, tmp_path, data="/etc/passwd")
    with pytest.raises(UserError, match="give a data file"):
        command(parser, folders, tmp_path, data=" , ")


def test_command_refuses_an_adapter_folder_unless_overwriting(parser, folders, tmp_path):
    out = os.path.join(folders.work_dir, "run")
    os.makedirs(out)
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        f.write("{}")
    with pytest.raises(UserError, match="already holds an adapter"):
        command(parser, folders, tmp_path)
    assert command(parser, folders, tmp_path, overwrite=True)[-1] == "--overwrite_output_dir"
    checkpoint = os.path.join(out, "checkpoint-4")
    os.makedirs(checkpoint)
    with pytest.raises(UserError, match="not a complete checkpoint"):  # finetune.py's check of a resume
        command(parser, folders, tmp_path, resume=checkpoint)


def test_newest_checkpoint(tmp_path):
    for n in (2, 10, 4):
        (tmp_path / f"checkpoint-{n}").mkdir()
    assert train_web.newest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    with pytest.raises(UserError, match="nothing to resume"):
        train_web.newest_checkpoint(str(tmp_path / "none"))


def test_runner_one_run_at_a_time_and_stop(tmp_path):
    runner = train_web.Runner(str(tmp_path))
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *_: (print('saved', flush=True), sys.exit(0)))\n"
            "print('started', flush=True)\n"
            "time.sleep(60)\n")
    log = runner.start([sys.executable, "-c", code], str(tmp_path / "out"), "m")
    assert runner.running() and log.startswith(str(tmp_path / "logs" / "out-"))
    with pytest.raises(UserError, match="a run is going already"):
        runner.start([sys.executable, "-c", "pass"], str(tmp_path / "other"), "m")
    deadline = time.time() + 30
    while "started" not in Path(log).read_text().splitlines() and time.time() < deadline:  # the handler is set
        time.sleep(0.1)
    assert runner.stop()
    runner.proc.wait(30)
    assert runner.poll() == 0 and not runner.running() and not runner.stop()
    assert Path(log).read_text().splitlines()[-2:] == ["started", "saved"]
    assert Path(log).read_text().startswith("$ " + shlex.join([sys.executable, "-c", code]).splitlines()[0])


# --- the run's files ------------------------------------------------------------------------------


def test_parse_trainer_log_takes_the_last_value_per_step():
    events = [
        {"event": "start", "step": 0, "total_steps": 6},
        {"event": "log", "step": 1, "total_steps": 6, "loss": 3.0, "tokens_per_s": 100.0, "remaining_s": 50},
        {"event": "log", "step": 2, "total_steps": 6, "loss": 2.5},
        {"event": "eval", "step": 2, "total_steps": 6, "eval_loss": 2.7},
        {"event": "stop", "step": 3, "total_steps": 6, "checkpoint": "out/checkpoint-3"},
    ]
    log = train_web.parse_trainer_log(events)
    assert log["train"] == [(1, 3.0), (2, 2.5)] and log["eval"] == [(2, 2.7)]
    assert log["stopped"] == 3 and log["checkpoint"] == "out/checkpoint-3" and log["progress"]["step"] == 3
    resumed = events + [{"event": "start", "step": 3, "total_steps": 6},
                        {"event": "log", "step": 2, "total_steps": 6, "loss": 2.4},  # a step done again
                        {"event": "log", "step": 6, "total_steps": 6, "loss": 1.0, "remaining_s": 0},
                        {"event": "end", "step": 6, "total_steps": 6, "adapter": "out"}]
    log = train_web.parse_trainer_log(resumed)
    assert log["train"] == [(1, 3.0), (2, 2.4), (6, 1.0)] and log["adapter"] == "out" and "stopped" not in log
    assert train_web.parse_trainer_log([]) == {"train": [], "eval": [], "progress": {}}


def test_curve_points_name_both_curves_from_the_start():
    import math

    rows = train_web.curve_points({"train": [(1, 3.0), (2, 2.5)], "eval": []})
    assert rows[:2] == [{"step": 1, "loss": 3.0, "curve": "train"}, {"step": 2, "loss": 2.5, "curve": "train"}]
    assert rows[2]["curve"] == "eval" and math.isnan(rows[2]["loss"])
    assert train_web.curve_points({"train": [], "eval": []}) == []


def test_run_result(tmp_path):
    out, log = tmp_path / "out", tmp_path / "run.log"
    (out / "checkpoint-3").mkdir(parents=True)
    log.write_text("step 1\nerror: --output_path x is a file; pass a folder\n")
    assert train_web.run_result(str(out), 0, {}, str(log), "m") == \
        f"**Stopped.** Checkpoint: `{out / 'checkpoint-3'}`; press Resume to continue it."
    assert train_web.run_result(str(out), 2, {}, str(log), "m") == \
        "**Failed** (exit status 2): `error: --output_path x is a file; pass a folder`"
    (out / "adapter_config.json").write_text("{}")
    finished = train_web.run_result(str(out), 0, {}, str(log), "m")
    assert finished.startswith(f"**Finished.** Adapter: `{out}`") and "chat.py --model_path m --lora_path" in finished


def test_read_jsonl_skips_a_half_written_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"event": "log", "step": 1}\n[1]\n{"event": "lo')
    assert train_web.read_jsonl(str(path)) == [{"event": "log", "step": 1}]
    assert train_web.read_jsonl(str(tmp_path / "missing.jsonl")) == []


def test_samples_table_newest_step_first():
    samples = [{"step": 2, "index": 0, "prompt": "p0", "answer": "a"}, {"step": 2, "index": 1, "prompt": "p1",
                                                                        "answer": "b"},
               {"step": 4, "index": 0, "prompt": "p0", "answer": "c"}, {"step": 4, "index": 0, "prompt": "p0",
                                                                        "answer": "d"}]
    assert train_web.latest_samples(samples) == [[4, 0, "p0", "d"], [2, 0, "p0", "a"], [2, 1, "p1", "b"]]


def test_log_tail_shows_progress_bars_at_their_latest_state(tmp_path):
    path = tmp_path / "run.log"
    path.write_text("start\n 10%|#  | 1/10\r 20%|## | 2/10\r\x1b[A\nstep 2: loss 3\n")
    assert train_web.log_tail(str(path)) == "start\n 20%|## | 2/10\nstep 2: loss 3\n"
    assert train_web.log_tail(str(tmp_path / "missing")) == ""


def test_progress_html():
    shown = train_web.progress_html({"step": 5, "total_steps": 10, "tokens_per_s": 1234.5, "remaining_s": 75,
                                     "elapsed_s": 60}, True)
    assert "step 5 / 10" in shown and "1,234 tokens/s" in shown and "left 0:01:15" in shown and "width:50.0%" in shown


def test_next_steps_are_commands_the_tools_accept():
    import importlib
    import re

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    shown = train_web.next_steps("SmolLM2-135M-Instruct", "/runs/lora run")
    commands = [shlex.split(block) for block in re.findall(r"```\n(.*?)\n```", shown)]
    assert len(commands) == 4
    for argv in commands:
        module = importlib.import_module(os.path.basename(argv[1])[:-3])
        args = module.build_parser().parse_args(argv[2:])
        assert (args.lora_path or args.model_path).startswith("/runs/lora run")


# --- masks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_token_texts_add_up_to_the_text(kind, tiny_models):
    from models import load_tokenizer

    tokenizer = load_tokenizer(tiny_models[kind])
    text = "Hello world, 你好，世界。 the quick fox\nnew line"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = train_web.token_texts(tokenizer, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces).strip() == tokenizer.decode(ids).strip()


def test_render_example_marks_supervised_tokens_and_escapes(bpe_tokenizer):
    ids = bpe_tokenizer("<script>alert(1)</script> answer", add_special_tokens=False)["input_ids"]
    labels = [-100] * 4 + ids[4:]
    shown = train_web.render_example(bpe_tokenizer, {"input_ids": ids, "labels": labels, "where": "d.jsonl:3",
                                                     "length": len(ids) + 5, "cut": True}, len(ids), 1)
    assert "<script" not in shown and "</script" not in shown and "&lt;/" in shown and "d.jsonl:3" in shown
    assert shown.count('class="tok unsup"') == 4 and shown.count('class="tok sup"') == len(ids) - 4
    assert f"cut at --cutoff_len {len(ids)} (the record has {len(ids) + 5} tokens)" in shown


def test_token_stats_from_inspect_data_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in [
        {"input_ids": [1] * 16, "labels": [1] * 16, "length": 20, "cut": True, "where": "a:1"},
        {"input_ids": [1] * 10, "labels": [-100] * 4 + [1] * 6, "length": 10, "cut": False, "where": "a:2"},
        {"where": "a:3", "length": 40, "dropped": True}]))
    stats = train_web.token_stats(train_web.read_inspect(str(path)), 16)
    assert stats == {"examples": 2, "dropped": 1, "cut": 1, "tokens": 26, "supervised": 22, "min": 10, "median": 20,
                     "max": 40, "mean": 23.3, "over_cutoff": 2}


def test_check_data_files_lists_every_error(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", INSTRUCT_RECORDS)
    bad = write_jsonl(tmp_path / "bad.jsonl", [INSTRUCT_RECORDS[0], {"instruction": "x", "output": 5},
                                               INSTRUCT_RECORDS[1], {"instruction": "y", "output": ["z"]}])
    files, errors = train_web.check_data_files([good, bad])
    assert files[0] == {"path": good, "format": "instruct", "records": len(INSTRUCT_RECORDS), "errors": 0}
    assert files[1]["errors"] == 2 and len(errors) == 2
    assert errors[0].startswith(f"{bad}:2: ") and errors[1].startswith(f"{bad}:4: ")
    with pytest.raises(UserError) as first:  # finetune.py's words for the first one
        from data import load_conversations

        load_conversations(bad)
    assert str(first.value) == errors[0]


# --- the page in a real browser ----------------------------------------------------------------------


QUICK_RUN = {"micro_batch_size": "2", "batch_size": "4", "max_steps": "40", "warmup_steps": "0", "test_size": "4",
             "eval_steps": "10", "save_steps": "10", "logging_steps": "1", "learning_rate": "1e-2",
             "eval_max_new_tokens": "8"}


@pytest.fixture(scope="module")
def train_page(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_page")
    data = write_jsonl(root / "data.jsonl", INSTRUCT_RECORDS * 4)
    work = root / "work"
    env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
    server = Page("train_web.py", ["--model_path", tiny_model, "--data_path", data, "--work_dir", str(work),
                                   "--allow_dir", str(root), "--allow_dir", os.path.dirname(tiny_model)], env,
                  str(root / "page.log"))
    server.wait()
    server.root, server.data, server.work = root, data, work
    yield server
    server.stop()


def flag_box(page, dest):
    return page.locator(f"#flag_{dest}").locator("textarea, input").first


def shown_command(page) -> list[str]:
    return shlex.split(page.locator("#command .cm-content").inner_text())


def wait_text(page, selector: str, text: str, timeout: float = 120):
    page.wait_for_function("([s, t]) => (document.querySelector(s) || {innerText: ''}).innerText.includes(t)",
                           arg=[selector, text], timeout=timeout * 1000)


def test_api_refuses_paths_outside_the_folders(train_page):
    import psutil
    from gradio_client import Client

    listening = {c.laddr.ip for c in psutil.Process(train_page.proc.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"} and "gradio.live" not in train_page.output()  # this machine only

    client = Client(train_page.url, verbose=False)
    flags = train_web.flag_values(train_web.finetune_parser(), train_web.read_presets()["instruction"])
    values = [flags[a.dest] for a in train_web.page_actions(train_web.finetune_parser())]
    report, examples = client.predict("", "none", "/etc/passwd", "run", "", False, *values, api_name="/check_data")
    assert "outside the folders this page may use" in report and examples == ""
    status, _ = client.predict("", "none", train_page.data, "../../escaped", "", False, *values, api_name="/start")
    assert status.startswith("Not started: Output folder ../../escaped is outside")
    status, _ = client.predict("/etc", "none", train_page.data, "run", "", False, *values, api_name="/start")
    assert status.startswith("Not started: Model /etc is outside")
    assert not os.path.exists(train_page.root / "escaped")
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="must be text"):  # webui.guard_requests checks every posted value
        client.predict("", "none", {"path": "/etc/passwd"}, "run", "", False, *values, api_name="/start")
    with pytest.raises(AppError, match="Quantization must be one of"):
        client.predict("", "2bit", train_page.data, "run", "", False, *values, api_name="/start")
    qlora = train_page.call("preset", ["QLoRA"])  # fills quantization and the flags from scripts/common.sh
    assert qlora["ok"] and qlora["data"][0] == "4bit" and qlora["data"][1:] == [
        train_web.flag_values(train_web.finetune_parser(), train_web.read_presets()["QLoRA"])[a.dest]
        for a in train_web.page_actions(train_web.finetune_parser())]
    assert train_page.call("preset", ["evil"])["error"].startswith("Preset (the recipes of scripts/common.sh) must be")
    # the hidden upload handler takes files from gradio's upload folder only
    refused = train_page.call("upload", [[{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}]])
    assert not refused["ok"] and "not uploaded by a user" in refused["error"], refused
    assert not os.path.exists(train_page.work / "uploads" / "passwd")
    assert "Traceback" not in train_page.output()


def test_train_page_in_browser(browser, train_page, tiny_model, tmp_path):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(train_page.url)
    page.locator("#uploads input[type=file]").set_input_files(train_page.data)  # lands in the work folder
    uploaded = os.path.join(os.path.realpath(train_page.work), "uploads", "data.jsonl")
    page.wait_for_function("(p) => document.querySelector('#data_path textarea, #data_path input').value === p",
                           arg=uploaded, timeout=30_000)
    assert Path(uploaded).read_text() == Path(train_page.data).read_text()
    page.get_by_role("button", name="Check data").click()
    page.locator("#examples .tok").first.wait_for(timeout=120_000)
    assert f"{uploaded}: instruct format, {4 * len(INSTRUCT_RECORDS)} records" in \
        page.locator("#data_report").inner_text()
    # the masks shown are --inspect_data's, for the command shown
    argv = shown_command(page)
    assert argv[1] == os.path.join(ROOT, "finetune.py")
    inspect = tmp_path / "inspect.jsonl"
    proc = subprocess.run(argv + ["--inspect_data", str(inspect)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    expected = read_jsonl(inspect)[:3]
    shown = page.evaluate("""() => [...document.querySelectorAll('#examples .example')].map(
        e => [...e.querySelectorAll('.tok')].map(t => [Number(t.dataset.id), t.classList.contains('sup')]))""")
    assert shown == [[[t, lab != -100] for t, lab in zip(e["input_ids"], e["labels"])] for e in expected]

    for dest, value in QUICK_RUN.items():
        if page.locator(f"#flag_{dest}").count():
            flag_box(page, dest).fill(value)
    page.wait_for_function("() => document.querySelector('#command .cm-content').innerText.includes('--max_steps 40')",
                           timeout=20_000)
    out = os.path.join(train_page.work, "lora-run")
    page.get_by_role("button", name="Start").click()
    wait_text(page, "#status", "Started:", 30)
    page.get_by_role("button", name="Start").click()  # one run at a time
    wait_text(page, "#status", "Not started: a run is going already", 30)
    page.wait_for_function("() => Number((/step (\\d+) \\//.exec(document.querySelector('#progress').innerText)"
                           " || [0, 0])[1]) >= 2", timeout=180_000)  # the loss curve has points
    page.wait_for_function("() => !!document.querySelector('#loss_plot canvas, #loss_plot svg')", timeout=30_000)
    page.get_by_role("button", name="Stop").click()
    wait_text(page, "#result", "Stopped.", 180)
    assert train_web.newest_checkpoint(out)
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    page.get_by_role("button", name="Resume").click()
    wait_text(page, "#status", "Resumed from", 30)
    wait_text(page, "#result", "Finished.", 300)
    page.wait_for_function("(prompts) => prompts.some(p => document.querySelector('#samples').innerText.includes(p))",
                           arg=[r["instruction"] for r in INSTRUCT_RECORDS], timeout=30_000)  # held-out prompts
    assert f"Adapter: {out}" in page.locator("#result").inner_text()
    assert "merge_lora.py" in page.locator("#result").inner_text()
    shot = os.environ.get("TRAIN_PAGE_SCREENSHOT") or str(tmp_path / "train_page.png")
    page.screenshot(path=shot, full_page=True)
    page.get_by_role("button", name="Open in chat page").click()  # chat.py with the adapter, a child process
    wait_text(page, "#chat_status", "Chat page with", 30)
    chat_url = page.locator("#chat_status a").get_attribute("href")
    assert chat_url.startswith("http://127.0.0.1:")
    deadline = time.time() + 120
    while True:
        try:
            assert "Vicuna-LoRA chat" in urllib.request.urlopen(chat_url, timeout=2).read().decode()
            break
        except OSError:
            assert time.time() < deadline, "the chat page did not start"
            time.sleep(0.5)
    # the finished run's folder holds an adapter: a new start there is refused unless overwriting
    page.get_by_role("button", name="Start").click()
    wait_text(page, "#status", "already holds an adapter", 30)
    page.close()

    from models import load_for_inference

    model, _ = load_for_inference(tiny_model, out)
    assert any("lora_" in name for name, _ in model.named_parameters())
