"""Hostile input to the pages and the generation CLIs (issue 10).

Raw HTTP requests to every handler of both pages, the hidden ones included (gradio_client only
hides them: `POST /gradio_api/queue/join` reaches them all): nothing is written outside
--save_dir, every bad value gets a one-line error and the server keeps serving without printing
a traceback. Also: linear history trimming, the context cap, invalid UTF-8 on the command line
and stdin, the temperature floor, /generate without context, named API parameters.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from conftest import ROOT
from generation import GenerationParams

TINY_CONTEXT = 1024  # make_tiny_model's max_position_embeddings
MAX_CHARS = 3000  # the chat server's --max_input_chars here
MAX_MESSAGES = 20  # ... and --max_history_messages
DEFAULTS = GenerationParams()
GREEDY = GenerationParams(max_new_tokens=8, repetition_penalty=1.0).control_values()  # temperature ... do_sample
TEMPERATURE = json.dumps(DEFAULTS.temperature)  # the first number in a request's JSON text after max memory
HISTORY = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]


# --- servers ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    """An entry script serving its page; `call` posts raw requests to any handler."""

    def __init__(self, script: str, args: list[str], env: dict, log_path: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        self.log = open(log_path, "w+")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), "--port", str(self.port), *args],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self):
        import httpx

        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()[-3000:]}")
            try:
                httpx.get(self.url, timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise RuntimeError(f"server did not start: {self.output()[-3000:]}")
        config = httpx.get(self.url + "config", timeout=10).json()
        self.fn_index = {d["api_name"]: d["id"] for d in config["dependencies"]}
        self.queued = {d["api_name"]: d.get("queue") is not False for d in config["dependencies"]}
        self.prefix = config.get("api_prefix", "/gradio_api").strip("/")

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def call(self, api_name: str, data, raw: str | None = None) -> dict:
        """Post `data` (or the raw JSON text of the data list) to a handler, as any HTTP client can;
        returns {"ok": bool, "data": outputs of the last update, "error": message}."""
        import httpx

        session = uuid.uuid4().hex[:12]
        body = '{"data": %s, "fn_index": %d, "session_hash": "%s", "event_data": null, "trigger_id": null}' % (
            raw if raw is not None else json.dumps(data), self.fn_index[api_name], session)
        with httpx.Client(timeout=120) as client:
            if not self.queued[api_name]:  # the page calls these directly, outside the queue
                r = client.post(f"{self.url}{self.prefix}/run/predict", content=body,
                                headers={"content-type": "application/json"})
                out = r.json()
                return {"ok": r.status_code == 200 and "error" not in out, "data": out.get("data"),
                        "error": out.get("error")}
            r = client.post(f"{self.url}{self.prefix}/queue/join", content=body,
                            headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text
            last = None
            with client.stream("GET", f"{self.url}{self.prefix}/queue/data", params={"session_hash": session}) as s:
                for line in s.iter_lines():
                    if line.startswith("data:"):
                        message = json.loads(line[5:])
                        if message.get("msg") in ("process_generating", "process_completed"):
                            last = message
                        if message.get("msg") in ("process_completed", "close_stream", "unexpected_error"):
                            break
        assert last is not None and last["msg"] == "process_completed", last
        out = last["output"]
        return {"ok": last["success"], "data": out.get("data"), "error": out.get("error")}

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """root/{save, home, outside}: the chat page may write in save/ only; save/ holds a symbolic
    link to a file and one to a folder outside it."""
    root = tmp_path_factory.mktemp("hostile")
    for name in ("save", "home", "outside"):
        (root / name).mkdir()
    (root / "save" / "link.jsonl").symlink_to(root / "outside" / "target.jsonl")
    (root / "save" / "linkdir").symlink_to(root / "outside", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def pages(tiny_model, sandbox, tmp_path_factory):
    """The chat page (HOME pointed into the sandbox) and the QA page, started side by side."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False", HOME=str(sandbox / "home"),
               MPLCONFIGDIR=str(tmp_path_factory.mktemp("mpl")))  # matplotlib's font cache: not in HOME
    logs = os.environ.get("TMPDIR", "/tmp")
    chat = Page("chat.py", ["--model_path", tiny_model, "--save_dir", str(sandbox / "save"), "--max_input_chars",
                            str(MAX_CHARS), "--max_history_messages", str(MAX_MESSAGES)], env,
                os.path.join(logs, f"hostile-chat-{os.getpid()}.log"))
    qa = Page("generate.py", ["--model_path", tiny_model], dict(env, HOME=os.environ.get("HOME", "/root")),
              os.path.join(logs, f"hostile-qa-{os.getpid()}.log"))
    try:
        chat.wait()
        qa.wait()
        yield {"chat": chat, "qa": qa}
    finally:
        chat.stop()
        qa.stop()


def files_under(root) -> set[str]:
    out = set()
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            out.add(os.path.relpath(os.path.join(folder, name), root))
    return out


def chat_inputs(message="hi", history=(), system="", prompt_type="chat", max_memory=512, controls=GREEDY):
    return [message, list(history), system, prompt_type, max_memory, *controls]


# --- writes anywhere ---------------------------------------------------------------------------------------

ESCAPES = ["../escape.jsonl", "../../escape.jsonl", "../../../../../../../../tmp/{tag}.jsonl", "/tmp/{tag}.jsonl",
           "{outside}/abs.jsonl", "new/nested.jsonl", "linkdir/x.jsonl", "link.jsonl", "~/home.jsonl", "~",
           "../home/x.jsonl", "..", ".", ".hidden.jsonl", "notes.txt", "a\u0000.jsonl", "..\\x.jsonl",
           "../../..", "{home}", "{outside}"]


@pytest.mark.parametrize("name", ESCAPES)
def test_save_writes_nowhere_but_save_dir(pages, sandbox, name):
    tag = f"hostile-{uuid.uuid4().hex}"
    name = name.format(tag=tag, outside=sandbox / "outside", home=sandbox / "home")
    before = files_under(sandbox)
    result = pages["chat"].call("save", [HISTORY, name, *chat_inputs()[2:]])
    assert result["ok"] and result["data"][0].startswith("Not saved:"), result
    assert files_under(sandbox) == before
    assert not os.path.exists(f"/tmp/{tag}.jsonl")
    assert not (sandbox / "outside" / "target.jsonl").exists()


@pytest.mark.parametrize("name", [123, ["x.jsonl"], {"a": 1}])
def test_save_refuses_a_file_name_that_is_not_text(pages, sandbox, name):
    before = files_under(sandbox)
    result = pages["chat"].call("save", [HISTORY, name, *chat_inputs()[2:]])
    assert not result["ok"] and result["error"].startswith("Save as") and "must be text" in result["error"]
    assert files_under(sandbox) == before


def test_save_appends_inside_save_dir_and_shows_the_full_path(pages, sandbox):
    save = os.path.realpath(sandbox / "save")
    for _ in range(2):
        result = pages["chat"].call("save", [HISTORY, "mine.jsonl", *chat_inputs()[2:]])
        assert result["data"] == [f"Saved to `{os.path.join(save, 'mine.jsonl')}`"]
    records = [json.loads(line) for line in open(os.path.join(save, "mine.jsonl"), encoding="utf-8")]
    assert [r["conversation"] for r in records] == [HISTORY, HISTORY]
    assert records[0]["parameters"]["max_new_tokens"] == 8 and records[0]["max_memory"] == 512
    result = pages["chat"].call("save", [HISTORY, "", *chat_inputs()[2:]])  # empty: the default name
    assert result["data"] == [f"Saved to `{os.path.join(save, 'chat_history.jsonl')}`"]


def test_save_chat_refuses_links_and_special_files(tmp_path):
    from chat import save_chat
    from errors import UserError

    root = tmp_path / "save"
    root.mkdir()
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    os.link(outside, root / "hard.jsonl")
    os.mkfifo(root / "pipe.jsonl")
    (root / "soft.jsonl").symlink_to(outside)
    for name, message in (("hard.jsonl", "not a plain file"), ("pipe.jsonl", "not a plain file"),
                          ("soft.jsonl", "symbolic link"), ("../x.jsonl", "plain file name"),
                          (str(tmp_path / "abs.jsonl"), "plain file name")):
        with pytest.raises(UserError, match=message):
            save_chat(str(root), {"conversation": []}, None, name)
    assert outside.read_text() == "" and not (tmp_path / "x.jsonl").exists() and not (tmp_path / "abs.jsonl").exists()
    path = save_chat(str(root), {"conversation": []}, None, "ok.jsonl")
    assert path == os.path.join(os.path.realpath(root), "ok.jsonl")


# --- bad values to every handler --------------------------------------------------------------------------


def _replace(values: list, index: int, value) -> list:
    values = list(values)
    values[index] = value
    return values


CHAT = chat_inputs()
REGENERATE = chat_inputs()[1:]
SAVE = [HISTORY, "x.jsonl", *chat_inputs()[2:]]
QA = ["Say hi", "", *GREEDY]
LONG = "a" * (MAX_CHARS + 1)
# (handler, inputs, raw JSON text of the inputs or None, expected words of the one-line error)
BAD_REQUESTS = [
    ("chat", _replace(CHAT, 4, "abc"), None, "Max memory (tokens of history + answer) must be a number from 128 to"),
    ("chat", _replace(CHAT, 4, 10 ** 9), None, f"must be from 128 to {TINY_CONTEXT}, got 1e+09"),
    ("chat", _replace(CHAT, 1, "not a list"), None, "Chat history must be a list of messages, got text"),
    ("chat", _replace(CHAT, 1, {"role": "user"}), None, "Chat history must be a list of messages"),
    ("chat", _replace(CHAT, 1, [{"role": "system", "content": "x"}]), None, "message 1 must be an object with role"),
    ("chat", _replace(CHAT, 1, [{"role": "user", "content": [{"type": "file", "file": {"path": "/etc/passwd"}}]}]),
     None, "message 1 must hold text only"),
    ("chat", _replace(CHAT, 1, HISTORY * (MAX_MESSAGES // 2 + 1)), None,
     f"the chat holds {MAX_MESSAGES + 2} messages; the limit is {MAX_MESSAGES} (--max_history_messages)"),
    ("chat", _replace(CHAT, 0, LONG), None, f"Message is {MAX_CHARS + 1} characters; the limit is {MAX_CHARS}"),
    ("chat", _replace(CHAT, 0, ["hi"]), None, "Message must be text, got a list"),
    ("chat", _replace(CHAT, 2, LONG), None, "Instruction text (editable) is"),
    ("chat", _replace(CHAT, 3, "../../etc"), None, "Prompt template (instruct: single turn, no history) must be one of"),
    ("chat", None, json.dumps(CHAT).replace(TEMPERATURE, "NaN", 1), "Temperature must be a number from 0.05 to 2, got nan"),
    ("chat", None, json.dumps(CHAT).replace(TEMPERATURE, "Infinity", 1), "Temperature must be a number from 0.05 to 2"),
    ("chat", _replace(CHAT, 5, "0.7"), None, "Temperature must be a number from 0.05 to 2, got text"),
    ("chat", _replace(CHAT, 8, 10 ** 6), None, "Beams must be from 1 to 10, got 1e+06"),
    ("chat", _replace(CHAT, 8, 2.5), None, "Beams must be a whole number, got 2.5"),
    ("chat", _replace(CHAT, 9, -5), None, "Max new tokens must be from 1 to 2048, got -5"),
    ("chat", _replace(CHAT, 12, "false"), None, "Sample (otherwise greedy / beam search) must be true or false"),
    ("chat", _replace(CHAT, 11, True), None, "Repetition penalty must be a number"),
    ("chat", CHAT[:3], None, "invalid request"),
    ("regenerate", _replace(REGENERATE, 0, 42), None, "Chat history must be a list of messages"),
    ("regenerate", _replace(REGENERATE, 3, None), None, "Max memory (tokens of history + answer) must be a number"),
    ("save", _replace(SAVE, 0, "x"), None, "Chat history must be a list of messages"),
    ("save", _replace(SAVE, 9, 10 ** 9), None, "Max new tokens must be from 1 to 2048"),
    ("choose_preset", [["Helpful assistant"]], None, "Instruction must be one of"),
    ("choose_preset", [{"a": 1}], None, "Instruction must be one of"),
    ("follow_sampling", ["yes"], None, "must be true or false, got text"),
    ("generate", _replace(QA, 0, 3.5), None, "Instruction must be text"),
    ("generate", _replace(QA, 0, LONG * 11), None, "the limit is 32768 (--max_input_chars)"),
    ("generate", _replace(QA, 1, {"x": 1}), None, "Input (optional context) must be text"),
    ("generate", _replace(QA, 0, "   "), None, "Type an instruction first."),
    ("generate", _replace(QA, 6, 4096), None, "Max new tokens must be from 1 to 2048, got 4096"),
    ("generate", _replace(QA, 5, 64), None, "Beams must be from 1 to 10, got 64"),
    ("generate", None, json.dumps(QA).replace(json.dumps(DEFAULTS.top_p), "NaN", 1),
     "Top-p must be a number from 0.05 to 1, got nan"),
    ("generate", _replace(QA, 4, -1), None, "Top-k (0 = off) must be from 0 to 100, got -1"),
]


@pytest.mark.parametrize("api_name, inputs, raw, expected", BAD_REQUESTS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(BAD_REQUESTS)])
def test_bad_values_get_a_one_line_error(pages, api_name, inputs, raw, expected):
    page = pages["qa"] if api_name == "generate" else pages["chat"]
    result = page.call(api_name, inputs, raw)
    assert not result["ok"], result
    assert expected in result["error"] and "\n" not in result["error"], result["error"]


def test_handlers_without_inputs_ignore_posted_values(pages):
    chat = pages["chat"]
    for name in ("clear_history", "reset", "stop_request"):
        result = chat.call(name, [["../../x"], {"a": 1}, 10 ** 9])
        assert result["ok"], (name, result)
    assert chat.call("reset", [])["data"][:8] == DEFAULTS.control_values()  # the server's flags: the defaults


def test_question_beyond_the_context_is_refused_with_the_numbers(pages):
    # 2,000 characters of CJK are ~2,000 tokens: under the character cap, over the 1,024-token context.
    result = pages["chat"].call("chat", chat_inputs(message="饕餮" * 1000))
    assert result["ok"]
    reply = result["data"][1][-1]["content"][0]["text"]
    assert reply.startswith("**Error:** the question (with the instruction and template) is ")
    assert f"exceed the model's context of {TINY_CONTEXT} tokens" in reply
    result = pages["qa"].call("generate", _replace(QA, 0, "饕餮" * 1000))
    assert not result["ok"] and "max new tokens is 8" in result["error"]
    assert f"exceed the model's context of {TINY_CONTEXT} tokens" in result["error"]


def test_api_parameters_are_named_and_context_is_optional(pages):
    from gradio_client import Client

    controls = ["temperature", "top_p", "top_k", "num_beams", "max_new_tokens", "min_new_tokens",
                "repetition_penalty", "do_sample"]
    info = Client(pages["chat"].url, verbose=False).view_api(return_format="dict", print_info=False)
    names = {api: [p["parameter_name"] for p in e["parameters"]] for api, e in info["named_endpoints"].items()}
    assert names == {"/chat": ["message", "history", "system", "prompt_type", "max_memory", *controls],
                     "/regenerate": ["history", "system", "prompt_type", "max_memory", *controls]}
    qa = Client(pages["qa"].url, verbose=False)
    info = qa.view_api(return_format="dict", print_info=False)
    params = info["named_endpoints"]["/generate"]["parameters"]
    assert [p["parameter_name"] for p in params] == ["instruction", "context", *controls]
    assert [p["parameter_has_default"] for p in params] == [False] + [True] * 9
    by_name = qa.predict("Say hi", max_new_tokens=6, api_name="/generate")  # no context; greedy by default
    positional = qa.predict("Say hi", "", *GenerationParams(max_new_tokens=6).control_values(), api_name="/generate")
    assert by_name == positional and by_name.strip()


def test_uploads_are_capped(pages, sandbox):
    """No page takes a file, but gradio's upload route accepts any client's: one request may put at
    most webui.MAX_UPLOAD_BYTES in gradio's temporary folder."""
    import httpx

    from webui import MAX_UPLOAD_BYTES

    chat = pages["chat"]
    url = f"{chat.url}{chat.prefix}/upload"
    small = httpx.post(url, files={"files": ("a.txt", b"x" * 10)}, timeout=30)
    big = httpx.post(url, files={"files": ("b.txt", b"x" * (MAX_UPLOAD_BYTES * 64))}, timeout=30)
    assert small.status_code == 200, small.text
    assert big.status_code == 413, (big.status_code, big.text[:300])


def test_pages_still_answer_and_printed_no_traceback(pages):
    chat, qa = pages["chat"], pages["qa"]
    result = chat.call("chat", chat_inputs(message="still there?", history=HISTORY))
    texts = [m["content"][0]["text"] for m in result["data"][1]]
    assert result["ok"] and texts[:3] == ["hello", "hi there", "still there?"] and texts[3].strip()
    assert qa.call("generate", _replace(QA, 6, 4))["ok"]
    for page in (chat, qa):
        assert page.proc.poll() is None
        assert "Traceback" not in page.output(), page.output()[-3000:]


# --- gradio passes the request: Stop and Clear act on their own session -----------------------------------


def test_handlers_receive_the_request(tiny_model, tmp_path):
    """Under `from __future__ import annotations` the pages' `request: gr.Request` hint did not
    resolve, so gradio passed None and every browser session shared one stop event."""
    import argparse

    from gradio.helpers import special_args

    import chat
    import generate
    from models import load_for_inference

    model, tokenizer = load_for_inference(tiny_model)
    args = chat.build_parser().parse_args(["--save_dir", str(tmp_path)])
    args.model_path = tiny_model
    pages = [chat.build_page(model, tokenizer, args, "chat", "t"), generate.build_page(model, tokenizer, "instruct", "t")]
    marker = argparse.Namespace(session_hash="session-a")
    checked = 0
    for page in pages:
        for fn in page.fns.values():
            if fn.name in ("respond", "regenerate", "generate", "clear_history", "stop_request"):
                inputs, *_ = special_args(fn.fn, [None] * len(fn.inputs), request=marker)
                assert marker in inputs, fn.name
                checked += 1
    assert checked == 7  # respond twice (button and Enter), regenerate, clear, 2 stops, generate


# --- linear history trimming ----------------------------------------------------------------------------


class CountingTokenizer:
    """Wraps a tokenizer, counting the texts it encodes and their characters; fails past `limit`
    calls (the old loop would otherwise take minutes to fail)."""

    def __init__(self, tokenizer, limit: int):
        self._tokenizer = tokenizer
        self.limit = limit
        self.calls = 0
        self.chars = 0

    def __call__(self, text, *args, **kwargs):
        self.calls += 1
        self.chars += len(text)
        assert self.calls <= self.limit, f"more than {self.limit} texts encoded"
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def old_fit_history(prompt_type, conv, tokenizer, budget, max_new_tokens):
    """The quadratic reference: rebuild the prompt once per dropped turn."""
    from prompt import Conversation, build_prompt_ids

    turns = list(conv.turns)
    while True:
        trimmed = Conversation(turns=turns, system=conv.system, input=conv.input if len(turns) == len(conv.turns) else "")
        ids = build_prompt_ids(prompt_type, trimmed, tokenizer)
        if len(ids) + max_new_tokens <= budget or len(turns) == 1:
            return trimmed, ids
        turns = turns[1:]


@pytest.mark.parametrize("prompt_type", ["chat", "chat_template"])
def test_trimming_3000_turns_tokenizes_each_turn_a_bounded_number_of_times(bpe_tokenizer, prompt_type):
    from prompt import Conversation, fit_history

    turns = [(f"question {i}", f"answer {i}") for i in range(3000)] + [("and now?", None)]
    conv = Conversation(turns=turns, system="Be brief.")
    total_chars = sum(len(q) + len(a or "") for q, a in turns)
    for budget, kept_at_most in ((1024, 200), (10 ** 7, len(turns))):
        counting = CountingTokenizer(bpe_tokenizer, limit=3 * len(turns) + 10)
        trimmed, ids = fit_history(prompt_type, conv, counting, budget, 64)
        assert trimmed.turns == turns[-len(trimmed.turns):] and len(trimmed.turns) <= kept_at_most
        assert len(ids) + 64 <= budget
        # the old loop encoded ~n^2/2 turns (4.5 million here): now each turn it looks at 3 times
        # (as opening prompt, as answer, as following prompt), plus the special-token probe.
        assert counting.calls <= 3 * (len(trimmed.turns) + 1) + 4
        assert counting.chars <= 3 * total_chars + 200 * (len(trimmed.turns) + 1)
    assert len(trimmed.turns) == len(turns)  # the big budget keeps everything


def test_trimming_keeps_the_result_of_the_old_loop(bpe_tokenizer, sp_tokenizer):
    import random

    from prompt import Conversation, fit_history

    rnd = random.Random(0)
    words = ["hello", "world", "你好", "饕餮", "the", "fox", "\n", "User:", "###", "1 2", ""]

    def text(k):
        return " ".join(rnd.choice(words) for _ in range(rnd.randint(0, k)))

    for trial in range(60):
        n = rnd.randint(1, 7)
        conv = Conversation(turns=[(text(12), text(12)) for _ in range(n - 1)] + [(text(12), None)],
                            system=rnd.choice([None, "", "Be brief."]), input=rnd.choice(["", "ctx " + text(5)]))
        budget, max_new = rnd.randint(10, 300), rnd.randint(1, 40)
        for prompt_type, tokenizer in (("chat", bpe_tokenizer), ("chat", sp_tokenizer),
                                       ("chat_template", bpe_tokenizer)):
            assert fit_history(prompt_type, conv, tokenizer, budget, max_new) == \
                old_fit_history(prompt_type, conv, tokenizer, budget, max_new), (trial, prompt_type)


def test_trimming_with_a_position_dependent_template_stays_exact(bpe_tokenizer):
    import copy

    from prompt import Conversation, build_prompt_ids, fit_history

    tokenizer = copy.deepcopy(bpe_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{{ m.role }} {{ loop.index }}: {{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant {{ messages|length + 1 }}:{% endif %}")
    conv = Conversation(turns=[(f"question {i}", f"answer {i}") for i in range(30)] + [("now?", None)])
    for budget in (40, 120, 400):
        trimmed, ids = fit_history("chat_template", conv, tokenizer, budget, 16)
        assert ids == build_prompt_ids("chat_template", trimmed, tokenizer) and len(ids) + 16 <= budget
        assert trimmed.turns == conv.turns[-len(trimmed.turns):]


# --- the context cap ----------------------------------------------------------------------------------


def test_stream_generate_never_runs_past_the_context(tiny_model):
    from generation import model_context, stream_generate
    from errors import UserError
    from models import load_for_inference

    model, tokenizer = load_for_inference(tiny_model)
    assert model_context(model) == TINY_CONTEXT
    ids = [tokenizer.eos_token_id + 1] * 1000
    with pytest.raises(UserError, match=f"1000 tokens and max_new_tokens is 30: 1030 tokens exceed the model's "
                                        f"context of {TINY_CONTEXT}"):
        next(stream_generate(model, tokenizer, ids, GenerationParams(max_new_tokens=30)))
    with pytest.raises(UserError, match="exceed the model's context"):
        next(stream_generate(model, tokenizer, ids[:10], GenerationParams(max_new_tokens=TINY_CONTEXT)))
    last = list(stream_generate(model, tokenizer, ids[:1000], GenerationParams(max_new_tokens=24, min_new_tokens=24)))[-1]
    assert len(last.token_ids) == 24  # exactly at the context: allowed


def test_chat_refuses_max_memory_beyond_the_context(tiny_model, capsys):
    import chat

    with pytest.raises(SystemExit) as exit_:
        chat.main(["--cli", "--model_path", tiny_model, "--max_memory", "4096"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --max_memory 4096 exceeds the model's context of {TINY_CONTEXT} tokens (max_position_embeddings); "
        "lower --max_memory")


def test_generate_cli_refuses_a_prompt_beyond_the_context(tiny_model, capsys):
    import generate

    with pytest.raises(SystemExit) as exit_:
        generate.main(["--model_path", tiny_model, "--instruction", "Summarise.", "--input", "word " * 5000,
                       "--max_new_tokens", "16"])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]
    assert out == "" and "Traceback" not in err
    assert last.startswith("error: the prompt (--instruction and --input in the instruct template) is ")
    assert last.endswith(f"tokens exceed the model's context of {TINY_CONTEXT} tokens; shorten --instruction/--input, "
                         "or lower --max_new_tokens")


# --- invalid UTF-8 -----------------------------------------------------------------------------------------


def run(argv: list, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a script with byte arguments / stdin, as a shell passes $'\\xff'; text output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, input=stdin, capture_output=True, timeout=300)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(errors="replace"),
                                       result.stderr.decode(errors="replace"))


def test_generate_cli_refuses_invalid_utf8(tiny_model, capsys):
    import generate

    # as a shell passes $'\xff\xfe ok': Python hands the bytes over surrogate-escaped
    result = run([os.path.join(ROOT, "generate.py").encode(), b"--model_path", tiny_model.encode(),
                  b"--instruction", b"\xff\xfe ok"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        "error: --instruction is not valid UTF-8 (byte 0xff at character 0); pass UTF-8 text"
    with pytest.raises(SystemExit) as exit_:
        generate.main(["--model_path", tiny_model, "--instruction", "hi", "--input",
                       b"ok \xc3".decode("utf-8", "surrogateescape")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: --input is not valid UTF-8 (byte 0xc3 at character 3); pass UTF-8 text"


def test_chat_cli_skips_a_line_that_is_not_utf8_or_beyond_the_context(tiny_model, monkeypatch, capsys):
    import io

    import chat

    # stdin as Python opens it (UTF-8, strict); 2,000 CJK characters are ~5,000 tokens: beyond the
    # tiny model's 1,024-token context.
    lines = b"hello\n\xff\xfe bad \xc3\n" + ("饕餮" * 1000).encode() + b"\n\xe4\xbd\xa0\xe5\xa5\xbd\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8"))
    chat.main(["--cli", "--model_path", tiny_model, "--max_new_tokens", "4"])
    out, err = capsys.readouterr()
    assert "(that line was not valid UTF-8 text and was skipped; type it again)" in err
    assert "error: the question (with the instruction and template) is " in err and "--max_new_tokens is 4" in err
    assert out.count("Assistant: ") == 2 and "Traceback" not in err


# --- temperature floor --------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-30, 0.0, -1.0, float("nan")])
def test_sampling_refuses_temperatures_below_the_floor(temperature):
    from errors import UserError

    for beams in (1, 3):
        with pytest.raises(UserError, match="--temperature must"):
            GenerationParams(num_beams=beams, do_sample=True, temperature=temperature).validate()
