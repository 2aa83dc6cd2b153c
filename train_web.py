"""The training page: finetune.py driven from a browser, one run at a time.

    python train_web.py                         # http://127.0.0.1:7860, this machine only
    python train_web.py --allow_dir ~/data --work_dir ~/runs --port 7861

Model (the embedded default, a local folder, a .gguf file or a hub id) and quantization; a preset
(instruction, chat, QLoRA: the recipes of scripts/common.sh, read from there) that fills the flags;
the data (paths or an upload) checked as finetune.py checks it, with its format, record count,
token statistics and a few examples rendered with the chosen template (supervised tokens
highlighted, the rest greyed, the cutoff marked) from `finetune.py --inspect_data`; the flags of
finetune.py that matter, with its defaults; the exact command line, which the page runs as a child
process (what the page does is what the script does). Start, Stop (SIGTERM: the run saves a
checkpoint and exits), Resume (from the newest checkpoint of the output folder); the progress,
the loss curves, the evaluation samples and the log tail update live; when the run ends, the
adapter path and the commands that chat with it, merge it and export it to GGUF, and a button that
serves it on the chat page (chat.py as another child process).

The page reads and writes only inside the folders it was started with: --work_dir (uploads,
logs, default outputs) and each --allow_dir (default: the current folder). Every path it is sent
is resolved (symbolic links followed) and refused in one line when it leads outside them.
gradio loads only when the page starts.
"""

from __future__ import annotations

import argparse
import datetime
import html
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import train_args
from checkpoints import ADAPTER_CONFIG, SAMPLES_LOG, TRAINER_LOG, checkpoints_in
from errors import UserError, cli_errors, setup_logging
from models import EMBEDDED_MODEL, QUANT_CHOICES
from webui import HelpFormatter, add_server_args

ROOT = os.path.dirname(os.path.abspath(__file__))
FINETUNE = os.path.join(ROOT, "finetune.py")
COMMON_SH = os.path.join(ROOT, "scripts", "common.sh")
WORK_DIR = "train_web_runs"
# finetune.py's flags the page shows, in this order (those the parser lacks are left out)
PAGE_FLAGS = ("prompt_type", "train_on", "cutoff_len", "micro_batch_size", "batch_size", "num_epochs", "max_steps",
              "learning_rate", "warmup_steps", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
              "packing", "test_size", "data_shares", "eval_steps", "eval_prompts", "eval_max_new_tokens",
              "save_steps", "save_total_limit", "logging_steps", "seed")
PATH_FLAGS = {"eval_prompts"}  # a file: confined like the data ("none" switches the samples off)
NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
UPLOAD_NAME = re.compile(r"[^\w.-]+")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # tqdm's cursor moves in the log
EXAMPLES_SHOWN = 3
TOKENS_SHOWN = 1024  # per rendered example


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model_path", default=EMBEDDED_MODEL,
                   help="the page's starting base model: Hugging Face id, local folder or .gguf file")
    p.add_argument("--lora_path", default=None,
                   help="the page's starting adapter to continue-finetune (finetune.py --lora_path; default none)")
    p.add_argument("--data_path", default=os.path.join("sample", "instruct", "data_sample.jsonl"),
                   help="the page's starting data file(s), comma-separated")
    p.add_argument("--work_dir", default=WORK_DIR,
                   help="the page's own folder: uploads, run logs and (unless named otherwise) outputs land here")
    p.add_argument("--allow_dir", action="append", default=None, metavar="DIR",
                   help="a folder the page may read data and models from and write outputs to (repeatable; "
                        "default: the current folder); --work_dir is always allowed")
    p.add_argument("--max_upload_mb", type=int, default=512, help="largest data file the page accepts (MB)")
    add_server_args(p)
    return p


# --- folders ---------------------------------------------------------------------------------------


class Folders:
    """The folders a page may touch: every path it is sent must resolve (realpath) inside one."""

    def __init__(self, work_dir: str, allowed: list[str]):
        self.work_dir = os.path.realpath(os.path.expanduser(work_dir))
        self.roots = [self.work_dir] + [r for r in (os.path.realpath(os.path.expanduser(a)) for a in allowed)
                                        if r != self.work_dir]

    def inside(self, path: str) -> bool:
        return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in self.roots)

    def confine(self, text: str, what: str, base: str | None = None) -> str:
        """`text` as a real path inside the folders (relative to `base`, default the current folder)."""
        text = (text or "").strip()
        if not text:
            raise UserError(f"{what} is empty")
        if "\0" in text:
            raise UserError(f"{what}: a path cannot hold a NUL character")
        path = os.path.realpath(os.path.join(base or os.getcwd(), os.path.expanduser(text)))
        if not self.inside(path):
            raise UserError(f"{what} {text} is outside the folders this page may use ({', '.join(self.roots)}); "
                            "start train_web.py with --allow_dir for another folder")
        return path


def model_argument(text: str, folders: Folders) -> str:
    """The --model_path to pass: the embedded name, a hub id, or a confined local folder / .gguf."""
    text = (text or "").strip()
    if not text or text == EMBEDDED_MODEL:
        return EMBEDDED_MODEL
    local = os.path.expanduser(text)
    if os.path.exists(local) or text.endswith(".gguf") or not HUB_ID.fullmatch(text) or local.startswith((".", "/")):
        return folders.confine(text, "Model")
    return text  # a hub id: downloaded into the Hugging Face cache, not into a folder of ours


# --- the recipes ----------------------------------------------------------------------------------


def read_presets(common_sh: str = COMMON_SH) -> dict[str, list[str]]:
    """{preset name: finetune.py flags}: scripts/common.sh's PRESETS, each a list of its arrays."""
    code = ('source "$1" || exit 1\n'
            'for ((i = 0; i < ${#PRESETS[@]}; i += 2)); do\n'
            '  printf "%s\\0" "@preset" "${PRESETS[i]}"\n'
            '  for name in ${PRESETS[i + 1]}; do declare -n arr="$name"; printf "%s\\0" "${arr[@]}"; unset -n arr; done\n'
            'done\n')
    proc = subprocess.run(["bash", "-c", code, "presets", common_sh], cwd=os.path.dirname(os.path.dirname(common_sh)),
                          capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise UserError(f"cannot read the presets from {common_sh}: {proc.stderr.strip() or proc.returncode}")
    presets: dict[str, list[str]] = {}
    fields = iter(proc.stdout.split("\0")[:-1])
    current: list[str] = []
    for field in fields:
        if field == "@preset":  # a name follows; a flag or value is never "@preset"
            current = presets.setdefault(next(fields), [])
        else:
            current.append(field)
    return presets


# --- finetune.py's flags --------------------------------------------------------------------------


def finetune_parser() -> argparse.ArgumentParser:
    """finetune.py's parser, answering a bad value with UserError instead of exiting."""
    parser = train_args.build_parser(train_args.DEFAULTS)

    def error(message):
        raise UserError(message)

    parser.error = error
    return parser


def page_actions(parser) -> list[argparse.Action]:
    by_dest = {a.dest: a for a in parser._actions}
    return [by_dest[name] for name in PAGE_FLAGS if name in by_dest]


def is_switch(action) -> bool:
    return isinstance(action, argparse.BooleanOptionalAction)


def as_text(value) -> str:
    return "" if value is None else str(value)


def flag_values(parser, flags: list[str] = ()) -> dict:
    """The shown flags' values after `flags` (a preset) on top of finetune.py's defaults: text,
    or a bool for a switch."""
    args = parser.parse_args(list(flags))
    return {a.dest: getattr(args, a.dest) if is_switch(a) else as_text(getattr(args, a.dest))
            for a in page_actions(parser)}


def same_value(action, text: str) -> bool:
    """`text` is the flag's default (3 and 3.0 alike)."""
    if text == as_text(action.default):
        return True
    try:
        return action.type is not None and action.default is not None and action.type(text) == action.default
    except (TypeError, ValueError):
        return False


def build_command(parser, folders: Folders, model: str, quant: str, data: str, output: str, values: dict,
                  lora_path: str = "", overwrite: bool = False, resume: str | None = None,
                  inspect: str | None = None) -> list[str]:
    """The finetune.py command for the page's values (the flags that differ from finetune.py's
    defaults), checked as finetune.py checks its flags before anything loads; UserError otherwise."""
    argv = [sys.executable, FINETUNE, "--model_path", model_argument(model, folders)]
    if quant != "none":
        argv += ["--quant", quant]
    paths = [p for p in (data or "").split(",") if p.strip()]
    if not paths:
        raise UserError("Data: give a data file (a path, or upload one)")
    argv += ["--data_path", ",".join(folders.confine(p, "Data file") for p in paths)]
    argv += ["--output_path", folders.confine(output or "lora-run", "Output folder", base=folders.work_dir)]
    if lora_path and lora_path.strip():
        argv += ["--lora_path", folders.confine(lora_path, "Continue adapter")]
    for action in page_actions(parser):
        option, value, default = action.option_strings[0], values.get(action.dest), action.default
        if is_switch(action):
            if value is not None and bool(value) != bool(default):
                argv.append(option if value else f"--no-{option[2:]}")
            continue
        text = as_text(value).strip()
        if not text or same_value(action, text):
            continue
        if text.startswith("-") and not NUMBER.fullmatch(text):  # a value, never another flag
            raise UserError(f"{option} {text}: a value cannot start with '-'")
        if action.dest in PATH_FLAGS and text != "none":
            text = folders.confine(text, f"--{action.dest}")
        argv += [option, text]
    if resume:
        argv += ["--resume_from_checkpoint", resume]
    elif overwrite:
        argv.append("--overwrite_output_dir")
    if inspect:
        argv += ["--inspect_data", inspect]
    args = parser.parse_args(argv[2:])
    train_args.check_args(args)  # finetune.py's own checks: ranges, combinations, the output folder
    return argv


# --- data -----------------------------------------------------------------------------------------


def check_data_files(paths: list[str]) -> tuple[list[dict], list[str]]:
    """Each file's format and record count, and every validation error (file:line) as finetune.py
    words it (data.check_data_file): ([{"path", "format", "records", "errors"}], [error lines])."""
    from data import check_data_file

    files, errors = [], []
    for path in paths:
        fmt, n_records, found = check_data_file(path)
        errors += found
        if n_records:
            files.append({"path": path, "format": fmt or "?", "records": n_records, "errors": len(found)})
    return files, errors


def read_inspect(path: str) -> dict:
    """--inspect_data's file -> {"examples", "dropped" (records with no supervised token left)}."""
    examples, dropped = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                (dropped if item.get("dropped") else examples).append(item)
    return {"examples": examples, "dropped": dropped}


def token_stats(inspected: dict, cutoff_len: int) -> dict:
    """Counts, and the lengths of every record before the cutoff: how many exceed it."""
    examples, dropped = inspected["examples"], inspected["dropped"]
    lengths = [e["length"] for e in examples + dropped]
    stats = {"examples": len(examples), "dropped": len(dropped), "cut": sum(1 for e in examples if e["cut"]),
             "tokens": sum(len(e["input_ids"]) for e in examples),
             "supervised": sum(sum(1 for t in e["labels"] if t != -100) for e in examples)}
    if lengths:
        ordered = sorted(lengths)
        stats.update(min=ordered[0], median=ordered[len(ordered) // 2], max=ordered[-1],
                     mean=round(sum(ordered) / len(ordered), 1),
                     over_cutoff=sum(1 for n in lengths if n > cutoff_len))
    return stats


def token_texts(tokenizer, ids: list[int], context: int = 6) -> list[str]:
    """The text each token adds, decoded after the few tokens before it (so SentencePiece's word
    spaces stay); a token holding part of a character shows nothing, the one completing it shows it."""
    out = []
    for i in range(len(ids)):
        window = ids[max(0, i - context):i]
        before = tokenizer.decode(window).rstrip("\ufffd") if window else ""
        now = tokenizer.decode(window + [ids[i]])
        piece = now[len(before):] if now.startswith(before) else tokenizer.decode([ids[i]])
        out.append(piece.rstrip("\ufffd") if i < len(ids) - 1 else piece)
    return out


def token_html(text: str, supervised: bool, token_id: int) -> str:
    shown = html.escape(text.replace("\n", "\u21b5"), quote=False)
    style = ("background:#c8f0c8;color:#063" if supervised else "background:#eee;color:#999")
    br = "<br>" if "\n" in text else ""
    return (f'<span class="tok {"sup" if supervised else "unsup"}" data-id="{token_id}" '
            f'style="{style};border-radius:2px;margin:0 1px;white-space:pre-wrap">{shown}</span>{br}')


def render_example(tokenizer, example: dict, cutoff_len: int, number: int) -> str:
    """One example as the model sees it: each token decoded alone, supervised ones highlighted,
    the rest greyed, the token count and the cutoff marked."""
    ids, labels = example["input_ids"], example["labels"]
    length = example.get("length", len(ids))
    cut = example.get("cut", length > cutoff_len)
    where = example.get("where")
    head = (f"<b>Example {number}</b>{f' ({html.escape(str(where))})' if where else ''}: {len(ids)} tokens, "
            f"{sum(1 for t in labels if t != -100)} supervised")
    body = "".join(token_html(text, lab != -100, t) for text, t, lab in zip(token_texts(tokenizer, ids[:TOKENS_SHOWN]),
                                                                            ids, labels))
    if len(ids) > TOKENS_SHOWN:
        body += f" <i>... {len(ids) - TOKENS_SHOWN} more tokens</i>"
    if cut:
        body += (f'<span class="cutoff" style="color:#c00;font-weight:bold"> \u2702 cut at --cutoff_len '
                 f'{cutoff_len}{f" (the record has {length} tokens)" if length > len(ids) else ""}</span>')
    elif len(ids) >= cutoff_len:
        body += f'<span class="cutoff" style="color:#c00"> | --cutoff_len {cutoff_len}</span>'
    return f'<div class="example" style="margin-bottom:1em"><p>{head}</p><div>{body}</div></div>'


# --- a run's files --------------------------------------------------------------------------------


def read_jsonl(path: str) -> list[dict]:
    """The objects of a JSON-lines file that another process is appending to (a half-written last
    line is skipped), [] when there is none yet."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out


def parse_trainer_log(events: list[dict]) -> dict:
    """trainer_log.jsonl's events -> the curves (the last value per step: a resumed run appends),
    the latest progress, and the end ("adapter") or stop ("checkpoint") of the run."""
    train, evals, progress, state = {}, {}, {}, {}
    for e in events:
        step = e.get("step")
        if e.get("event") == "log" and isinstance(e.get("loss"), (int, float)):
            train[step] = e["loss"]
        if e.get("event") == "eval" and isinstance(e.get("eval_loss"), (int, float)):
            evals[step] = e["eval_loss"]
        if step is not None:
            progress = {k: e.get(k, progress.get(k)) for k in ("step", "total_steps", "epoch", "elapsed_s",
                                                               "remaining_s", "tokens_per_s")}
        if e.get("event") == "start":
            state = {}
        elif e.get("event") == "end":
            state = {"adapter": e.get("adapter")}
        elif e.get("event") == "stop":
            state = {"stopped": step, "checkpoint": e.get("checkpoint")}
    return {"train": sorted(train.items()), "eval": sorted(evals.items()), "progress": progress, **state}


def latest_samples(samples: list[dict]) -> list[list]:
    """samples.jsonl -> table rows [step, index, prompt, answer], one per (step, index), newest step first."""
    rows = {}
    for s in samples:
        rows[(s.get("step"), s.get("index"))] = [s.get("step"), s.get("index"), str(s.get("prompt", "")),
                                                 str(s.get("answer", ""))]
    return [rows[k] for k in sorted(rows, key=lambda k: (-(k[0] or 0), k[1] or 0))]


def log_tail(path: str, lines: int = 30) -> str:
    """The last lines of a log, progress bars (\\r) shown at their latest state."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    text = ANSI_ESCAPE.sub("", text)
    shown = [line.rsplit("\r", 1)[-1] for line in (s.rstrip("\r") for s in text.split("\n"))]
    return "\n".join(shown[-lines:])


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)) or seconds < 0:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def curve_points(log: dict) -> list[dict]:
    """The loss plot's rows (step, loss, curve); a curve without points yet gets one NaN row, so the
    plot knows both curves from its first frame (it draws no curve it learns of later)."""
    points = []
    for curve in ("train", "eval"):
        rows = [{"step": s, "loss": v, "curve": curve} for s, v in log[curve]]
        points += rows or [{"step": 0, "loss": float("nan"), "curve": curve}]
    return points if log["train"] or log["eval"] else []


def progress_html(progress: dict, running: bool) -> str:
    step, total = progress.get("step") or 0, progress.get("total_steps") or 0
    share = min(1.0, step / total) if total else 0.0
    speed = progress.get("tokens_per_s")
    text = (f"step {step} / {total or '?'}"
            + (f" · {speed:,.0f} tokens/s" if isinstance(speed, (int, float)) else "")
            + f" · elapsed {duration(progress.get('elapsed_s'))} · left {duration(progress.get('remaining_s'))}"
            + ("" if running else " · not running"))
    return (f'<div id="progress"><div style="background:#ddd;border-radius:4px;height:14px">'
            f'<div style="background:#2a7;width:{100 * share:.1f}%;height:14px;border-radius:4px"></div></div>'
            f'<span>{html.escape(text)}</span></div>')


def next_steps(model: str, adapter: str) -> str:
    """The commands that chat with an adapter, merge it and export it to GGUF (Markdown)."""
    py = sys.executable
    tool = os.path.join(ROOT, "tools")
    merged = adapter.rstrip(os.sep) + "-merged"
    commands = [
        ("Chat with it", [py, os.path.join(ROOT, "chat.py"), "--model_path", model, "--lora_path", adapter]),
        ("Merge it into the base model", [py, os.path.join(tool, "merge_lora.py"), "--model_path", model,
                                          "--lora_path", adapter, "--output_path", merged]),
        ("Export the merged model to GGUF", [py, os.path.join(tool, "convert_gguf.py"), "--model_path", merged,
                                             "--outfile", merged + ".q8_0.gguf", "--outtype", "q8_0"]),
        ("Or export the adapter alone to GGUF", [py, os.path.join(tool, "convert_gguf.py"), "--lora_path",
                                                 adapter, "--outfile", os.path.join(adapter, "adapter.gguf")]),
    ]
    return "\n".join(f"{what}:\n```\n{shlex.join(cmd)}\n```" for what, cmd in commands)


def run_result(out: str, returncode: int, log: dict, log_path: str, model: str) -> str:
    """What an ended run left (Markdown): the adapter and what to do with it, the checkpoint a
    stopped run saved, or the error line of a failed one."""
    if returncode == 0 and os.path.isfile(os.path.join(out, ADAPTER_CONFIG)):
        return f"**Finished.** Adapter: `{out}`\n\n" + next_steps(model, out)
    if returncode == 0:
        saved = checkpoints_in(out) if os.path.isdir(out) else []
        where = log.get("checkpoint") or (os.path.join(out, saved[-1]) if saved else "none")
        return f"**Stopped.** Checkpoint: `{where}`; press Resume to continue it."
    errors = [line for line in log_tail(log_path, 200).splitlines() if line.startswith("error")]
    return f"**Failed** (exit status {returncode}): `{errors[-1] if errors else 'see the log'}`"


# --- the run --------------------------------------------------------------------------------------


class Runner:
    """The page's one training process: started from an argv, stopped with SIGTERM (the trainer
    saves a checkpoint and exits), its log in the work folder."""

    def __init__(self, work_dir: str):
        self.work_dir = work_dir
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.argv: list[str] = []
        self.output = ""
        self.model = ""
        self.log_path = ""
        self.returncode: int | None = None

    def running(self) -> bool:
        with self.lock:
            return self.proc is not None and self.proc.poll() is None

    def start(self, argv: list[str], output: str, model: str) -> str:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                raise UserError(f"a run is going already (pid {self.proc.pid}, output {self.output}); stop it "
                                "first: one run at a time")
            logs = os.path.join(self.work_dir, "logs")
            os.makedirs(logs, exist_ok=True)
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            self.log_path = os.path.join(logs, f"{os.path.basename(output)}-{stamp}.log")
            with open(self.log_path, "w", encoding="utf-8") as log:
                log.write(f"$ {shlex.join(argv)}\n")
                log.flush()
                env = dict(os.environ, PYTHONUNBUFFERED="1")
                self.proc = subprocess.Popen(argv, cwd=self.work_dir, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.argv, self.output, self.model, self.returncode = argv, output, model, None
            return self.log_path

    def stop(self) -> bool:
        """SIGTERM to the run's process group; False when nothing runs."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return False
            return True

    def poll(self) -> int | None:
        with self.lock:
            if self.proc is not None and self.returncode is None:
                self.returncode = self.proc.poll()
            return self.returncode


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def newest_checkpoint(output: str) -> str:
    names = checkpoints_in(output) if os.path.isdir(output) else []
    if not names:
        raise UserError(f"nothing to resume: {output} holds no checkpoint-N folder")
    return os.path.join(output, names[-1])


def run_inspect(argv: list[str], work_dir: str, timeout: int = 600) -> tuple[dict, str]:
    """Run finetune.py --inspect_data (argv ends with it) and read what it wrote."""
    proc = subprocess.run(argv, cwd=work_dir, capture_output=True, text=True, timeout=timeout, check=False,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise UserError(lines[-1] if lines else f"finetune.py --inspect_data exited with {proc.returncode}")
    return read_inspect(argv[-1]), proc.stderr


# --- the page -------------------------------------------------------------------------------------


def build_page(args, folders: Folders, presets: dict[str, list[str]], runner: Runner, chat: Runner):
    import gradio as gr
    import pandas as pd

    from webui import check_choice, check_text, guard_requests

    parser = finetune_parser()
    actions = page_actions(parser)
    max_chars = args.max_input_chars
    tokenizers: dict[str, object] = {}
    preset_names = list(presets)
    start_flags = presets[preset_names[0]] if preset_names else []
    start_values = flag_values(parser, start_flags)

    def tokenizer_for(model: str):
        if model not in tokenizers:
            from models import load_tokenizer, resolve_model_path

            tokenizers[model] = load_tokenizer(resolve_model_path(model))
        return tokenizers[model]

    def command_of(model, quant, data, output, lora, overwrite, flag_list, resume=None, inspect=None):
        values = {a.dest: v for a, v in zip(actions, flag_list)}
        for a, v in values.items():
            if isinstance(v, str):
                check_text(f"--{a}", v, max_chars)
        quant = check_choice("Quantization", quant, list(QUANT_CHOICES))
        return build_command(parser, folders, check_text("Model", model, max_chars), quant,
                             check_text("Data", data, max_chars), check_text("Output folder", output, max_chars),
                             values, check_text("Continue adapter", lora, max_chars), overwrite is True, resume,
                             inspect)

    def apply_preset(name):
        name = check_choice("Preset", name, preset_names)
        values = flag_values(parser, presets[name])
        return [parser.parse_args(presets[name]).quant] + [values[a.dest] for a in actions]

    def show_command(model, quant, data, output, lora, overwrite, *flag_list):
        try:
            return shlex.join(command_of(model, quant, data, output, lora, overwrite, flag_list))
        except UserError as e:
            return f"# not runnable: {e}"

    def upload(files):
        if not files:
            return gr.update()
        folder = os.path.join(folders.work_dir, "uploads")
        os.makedirs(folder, exist_ok=True)
        saved = []
        for f in files if isinstance(files, list) else [files]:
            src = f if isinstance(f, str) else getattr(f, "name", None) or f.get("path")
            name = UPLOAD_NAME.sub("_", os.path.basename(src)).lstrip(".") or "data.jsonl"
            dest = os.path.join(folder, name)
            shutil.copyfile(src, dest)
            saved.append(dest)
        return ",".join(saved)

    def check_data(model, quant, data, output, lora, overwrite, *flag_list):
        """Format, records and every error per file; token statistics and rendered examples."""
        try:
            paths = [folders.confine(p, "Data file") for p in check_text("Data", data, max_chars).split(",")
                     if p.strip()]
            if not paths:
                raise UserError("Data: give a data file (a path, or upload one)")
        except UserError as e:
            return f"**Error:** {html.escape(str(e))}", ""
        files, errors = check_data_files(paths)
        lines = [f"- `{f['path']}`: {f['format']} format, {f['records']} records"
                 + (f", {f['errors']} with errors" if f["errors"] else "") for f in files]
        if errors:
            lines.append(f"\n**{len(errors)} error(s)** (finetune.py refuses the data until they are fixed):")
            lines += [f"- `{html.escape(e)}`" for e in errors[:200]]
            if len(errors) > 200:
                lines.append(f"- ... and {len(errors) - 200} more")
            return "\n".join(lines), ""
        scratch = tempfile.mkdtemp(prefix="inspect-", dir=folders.work_dir)
        try:
            argv = command_of(model, quant, data, output, lora, False, flag_list,
                              inspect=os.path.join(scratch, "examples.jsonl"))
            cutoff = int(parser.parse_args(argv[2:]).cutoff_len)
            inspected, _ = run_inspect(argv, folders.work_dir)
            tokenizer = tokenizer_for(argv[argv.index("--model_path") + 1])
        except UserError as e:
            return "\n".join(lines + [f"\n**Error:** {html.escape(str(e))}"]), ""
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        s = token_stats(inspected, cutoff)
        lines.append(f"\n**Tokens** ({s['examples']} examples kept, {s['dropped']} dropped: no supervised token "
                     f"within --cutoff_len {cutoff}): {s['tokens']:,} in all, {s['supervised']:,} supervised; "
                     + (f"length min {s['min']}, median {s['median']}, mean {s['mean']}, max {s['max']}; "
                        f"{s['over_cutoff']} exceed the cutoff ({s['cut']} cut)" if "min" in s else ""))
        shown = "".join(render_example(tokenizer, ex, cutoff, i + 1)
                        for i, ex in enumerate(inspected["examples"][:EXAMPLES_SHOWN]))
        return "\n".join(lines), f'<div id="examples">{shown}</div>'

    def start(model, quant, data, output, lora, overwrite, *flag_list):
        try:
            argv = command_of(model, quant, data, output, lora, overwrite, flag_list)
            out = argv[argv.index("--output_path") + 1]
            runner.start(argv, out, argv[argv.index("--model_path") + 1])
        except UserError as e:
            return f"Not started: {e}", gr.update()
        return f"Started: output `{out}`, log `{runner.log_path}`", shlex.join(argv)

    def resume(model, quant, data, output, lora, overwrite, *flag_list):
        try:
            out = folders.confine(output or "lora-run", "Output folder", base=folders.work_dir)
            checkpoint = newest_checkpoint(out)
            argv = command_of(model, quant, data, output, lora, False, flag_list, resume=checkpoint)
            runner.start(argv, out, argv[argv.index("--model_path") + 1])
        except UserError as e:
            return f"Not resumed: {e}", gr.update()
        return f"Resumed from `{checkpoint}`, log `{runner.log_path}`", shlex.join(argv)

    def open_chat(model, output):
        """Serve the finished adapter on the chat page (chat.py, a child process on a free port)."""
        try:
            out = folders.confine(check_text("Output folder", output, max_chars) or "lora-run", "Output folder",
                                  base=folders.work_dir)
            if not os.path.isfile(os.path.join(out, ADAPTER_CONFIG)):
                raise UserError(f"{out} holds no adapter yet: let a run finish first")
            port = free_port(args.host)
            argv = [sys.executable, os.path.join(ROOT, "chat.py"), "--model_path",
                    model_argument(check_text("Model", model, max_chars), folders), "--lora_path", out,
                    "--host", args.host, "--port", str(port)]
            if chat.stop():  # one chat page at a time: the previous adapter's makes room
                chat.proc.wait(30)
            chat.start(argv, "chat", "")
        except UserError as e:
            return f"Chat page not started: {e}"
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{port}/"
        return f"Chat page with `{out}`: [{url}]({url}) (it opens once the model has loaded; log `{chat.log_path}`)"

    def stop():
        if runner.stop():
            return "Stopping: the run finishes its step, saves a checkpoint and exits (Resume continues it)"
        return "Nothing is running."

    def refresh(shown_curves, output_text):
        running = runner.running()
        rc = runner.poll()
        out = runner.output
        if not out:  # no run from this page yet: an earlier run's curves in the output folder, if any
            try:
                out = folders.confine(check_text("Output folder", output_text, max_chars) or "lora-run",
                                      "Output folder", base=folders.work_dir)
            except UserError:
                out = ""
        log = parse_trainer_log(read_jsonl(os.path.join(out, TRAINER_LOG))) if out else parse_trainer_log([])
        points = curve_points(log)
        curves = [log["train"], log["eval"]]
        if curves == shown_curves:
            frame = gr.update()  # unchanged: the browser keeps the plot as drawn
        else:  # None when empty: a LinePlot whose first frame is empty draws no lines of its colors
            frame = pd.DataFrame(points, columns=["step", "loss", "curve"]) if points else None
        samples = latest_samples(read_jsonl(os.path.join(out, SAMPLES_LOG))) if out else []
        result = run_result(out, rc, log, runner.log_path, runner.model) if out and not running and rc is not None \
            else ""
        return (progress_html(log["progress"], running), frame,
                pd.DataFrame(samples, columns=["step", "index", "prompt", "answer"]),
                log_tail(runner.log_path) if runner.log_path else "", result, curves)

    def flag_component(action, value):
        label = f"--{action.dest}"
        info = (action.help or "").replace("%(default)s", as_text(action.default))[:120] or None
        elem_id = f"flag_{action.dest}"
        if is_switch(action):
            return gr.Checkbox(value=bool(value), label=label, info=info, elem_id=elem_id)
        if action.choices:
            return gr.Dropdown(list(action.choices), value=value, label=label, info=info, elem_id=elem_id)
        return gr.Textbox(value=value, label=label, info=info, max_lines=1, elem_id=elem_id)

    with gr.Blocks(title="Vicuna-LoRA training") as page:
        gr.Markdown(f"## Vicuna-LoRA training\nThe page runs `finetune.py` with the command shown; it reads "
                    f"and writes only in {', '.join(f'`{r}`' for r in folders.roots)}.")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Model")
                model = gr.Textbox(value=args.model_path, label="Base model (embedded name, folder, .gguf or hub id)",
                                   max_lines=1)
                quant = gr.Radio(list(QUANT_CHOICES), value=parser.parse_args(start_flags).quant, label="Quantization")
                lora = gr.Textbox(value=args.lora_path or "", label="Continue adapter (optional, --lora_path)",
                                  max_lines=1)
                preset = gr.Dropdown(preset_names, value=preset_names[0] if preset_names else None,
                                     label="Preset (the recipes of scripts/common.sh)")
            with gr.Column():
                gr.Markdown("### Data")
                data = gr.Textbox(value=args.data_path, label="Data files (comma-separated)", max_lines=1,
                                  elem_id="data_path")
                uploads = gr.File(label="Or upload data (.json / .jsonl)", file_count="multiple",
                                  file_types=[".json", ".jsonl"], type="filepath", elem_id="uploads")
                check = gr.Button("Check data")
                data_report = gr.Markdown(elem_id="data_report")
        gr.Markdown("### What the model will see (green: supervised, grey: not trained on)")
        examples = gr.HTML(elem_id="examples_box")
        gr.Markdown("### Flags")
        with gr.Row():
            output = gr.Textbox(value=os.path.join(folders.work_dir, "lora-run"), max_lines=1, elem_id="output",
                                label="Output folder (relative: inside the work folder)")
            overwrite = gr.Checkbox(value=False, label="Overwrite an earlier run in the output folder")
        flag_boxes = []
        with gr.Row(equal_height=False):
            for i in range(0, len(actions), 6):
                with gr.Column(min_width=160):
                    flag_boxes += [flag_component(a, start_values[a.dest]) for a in actions[i:i + 6]]
        command = gr.Code(label="Command (what Start runs)", language="shell", elem_id="command")
        with gr.Row():
            start_btn = gr.Button("Start", variant="primary")
            stop_btn = gr.Button("Stop")
            resume_btn = gr.Button("Resume")
        status = gr.Markdown(elem_id="status")
        gr.Markdown("### Progress")
        progress = gr.HTML(progress_html({}, False))
        plot = gr.LinePlot(None, x="step", y="loss", color="curve", color_map={"train": "#1f77b4", "eval": "#d62728"},
                           label="Loss", elem_id="loss_plot", height=280)
        shown_curves = gr.State(None)
        samples = gr.Dataframe(headers=["step", "index", "prompt", "answer"], label="Samples at each evaluation",
                               wrap=True, elem_id="samples")
        log = gr.Textbox(label="Log (tail)", lines=12, max_lines=12, autoscroll=True, elem_id="log")
        result = gr.Markdown(elem_id="result")
        with gr.Row():
            chat_btn = gr.Button("Open in chat page")
            chat_status = gr.Markdown(elem_id="chat_status")

        inputs = [model, quant, data, output, lora, overwrite, *flag_boxes]
        for box in inputs:
            box.change(show_command, inputs=inputs, outputs=command, queue=False, api_visibility="private")
        preset.change(apply_preset, inputs=preset, outputs=[quant, *flag_boxes], queue=False, api_name="preset",
                      api_visibility="private")
        uploads.upload(upload, inputs=uploads, outputs=data, api_name="upload", api_visibility="private")
        check.click(check_data, inputs=inputs, outputs=[data_report, examples], api_name="check_data")
        start_btn.click(start, inputs=inputs, outputs=[status, command], api_name="start", concurrency_limit=None)
        resume_btn.click(resume, inputs=inputs, outputs=[status, command], api_name="resume", concurrency_limit=None)
        stop_btn.click(stop, outputs=status, api_name="stop", queue=False)
        chat_btn.click(open_chat, inputs=[model, output], outputs=chat_status, api_name="open_chat",
                       concurrency_limit=None)
        timer = gr.Timer(1.5)
        timer.tick(refresh, inputs=[shown_curves, output], outputs=[progress, plot, samples, log, result, shown_curves],
                   queue=False, api_visibility="private")
        page.load(show_command, inputs=inputs, outputs=command, queue=False, api_visibility="private")
    return guard_requests(page, max_chars)


def run(args) -> None:
    from webui import check_limit_flag, launch, parse_auth

    parse_auth(args.auth)
    check_limit_flag("max_input_chars", args.max_input_chars)
    check_limit_flag("max_upload_mb", args.max_upload_mb)
    os.makedirs(args.work_dir, exist_ok=True)
    folders = Folders(args.work_dir, args.allow_dir or [os.getcwd()])
    presets = read_presets()
    runner, chat = Runner(folders.work_dir), Runner(folders.work_dir)
    page = build_page(args, folders, presets, runner, chat)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the run below is stopped too
    try:
        launch(page, args, max_file_size=args.max_upload_mb * 1024 * 1024, allowed_paths=[])
    finally:
        if runner.stop():  # the run saves a checkpoint and exits on its own; Resume continues it
            print(f"stopping the run in {runner.output}: it saves a checkpoint and exits", file=sys.stderr)
        chat.stop()


def main(argv: list[str] | None = None):
    setup_logging()
    args = build_parser().parse_args(argv)
    return cli_errors(run)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
