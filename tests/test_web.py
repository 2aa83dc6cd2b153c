"""The gradio pages: API endpoints driven with gradio_client, and a real headless Chromium."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from conftest import ROOT, run_script
from generation import GenerationParams

GREEDY = GenerationParams(max_new_tokens=24, repetition_penalty=1.0)  # the defaults: greedy


def controls(**overrides):
    """The pages' generation values in their positional order."""
    return dataclasses.replace(GREEDY, **overrides).control_values()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An entry script serving its page on a free port, stopped at exit."""

    def __init__(self, script: str, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"{script}-{self.port}.log"), "w+")
        env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), "--port", str(self.port), *args],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{script} exited: {self.output()[-3000:]}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{script} did not start: {self.output()[-3000:]}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def qa_server(tiny_model):
    server = Server("generate.py", "--model_path", tiny_model, "--show_beam")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chat_server(tiny_model, tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp("chat_logs"))
    server = Server("chat.py", "--model_path", tiny_model, "--save_dir", save_dir)
    server.save_dir = save_dir
    yield server
    server.stop()


def stream(client, *args, api_name):
    """All outputs of a streaming endpoint, partial ones first."""
    job = client.submit(*args, api_name=api_name)
    while not job.done():
        time.sleep(0.05)
    return job.outputs()


def test_stop_registry_one_generation_per_session():
    from webui import StopRegistry

    stops = StopRegistry()
    first = stops.start("a")
    other = stops.start("b")
    second = stops.start("a")  # Regenerate while the first reply streams: the first one stops
    assert first.is_set() and not second.is_set() and not other.is_set()
    stops.finish("a", first)  # the old generation ending must not unregister the new one
    stops.stop("a")
    assert second.is_set() and not other.is_set()
    stops.finish("a", second)
    stops.stop("a")  # nothing running: no error
    stops.stop("b")
    assert other.is_set()


def test_generate_api_streams_and_matches_cli(qa_server, tiny_model):
    from gradio_client import Client

    client = Client(qa_server.url, verbose=False)
    outputs = stream(client, "Say hi", "ctx", *controls(), api_name="/generate")
    texts = [o[0] if isinstance(o, (list, tuple)) else o for o in outputs]
    assert len(texts) >= 4, texts  # partial updates before the final one
    assert all(texts[-1].startswith(t.strip()) for t in texts[:-1])
    cli = run_script("generate.py", "--model_path", tiny_model, "--instruction", "Say hi", "--input", "ctx",
                     "--num_beams", "1", "--max_new_tokens", "24", "--repetition_penalty", "1.0")
    assert cli.returncode == 0, cli.stderr
    assert texts[-1] == cli.stdout.rstrip("\n")


def test_generate_api_beams_match_cli(qa_server, tiny_model):
    from gradio_client import Client

    client = Client(qa_server.url, verbose=False)
    outputs = stream(client, "Name a colour", "", *controls(num_beams=3), api_name="/generate")
    final = outputs[-1]
    assert isinstance(final, (list, tuple)) and len(final) == 11  # answer + 10 beam boxes
    cli = run_script("generate.py", "--model_path", tiny_model, "--instruction", "Name a colour",
                     "--num_beams", "3", "--max_new_tokens", "24", "--repetition_penalty", "1.0")
    assert final[0] == cli.stdout.rstrip("\n")


def test_server_binds_loopback_only_and_no_share_link(qa_server):
    import psutil

    addresses = {c.laddr.ip for c in psutil.Process(qa_server.proc.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN}
    assert addresses == {"127.0.0.1"}
    assert "gradio.live" not in qa_server.output()


def chat_args(message, history, system="", prompt_type="chat", max_memory=512, **over):
    return [message, history, system, prompt_type, max_memory, *controls(**over)]


def texts_of(history):
    from chat import message_text

    return [message_text(m["content"]) for m in history]


def test_chat_api_streams_with_history(chat_server):
    from gradio_client import Client

    client = Client(chat_server.url, verbose=False)
    outputs = stream(client, *chat_args("hello", []), api_name="/chat")
    assert len(outputs) >= 3
    _, history = outputs[-1]
    assert [m["role"] for m in history] == ["user", "assistant"] and texts_of(history)[0] == "hello"
    outputs = stream(client, *chat_args("and again", history), api_name="/chat")
    _, history2 = outputs[-1]
    assert texts_of(history2)[:3] == ["hello", texts_of(history)[1], "and again"]


def test_two_concurrent_chat_clients_keep_their_own_histories(chat_server):
    from gradio_client import Client

    results = {}

    def talk(name):
        client = Client(chat_server.url, verbose=False)
        results[name] = stream(client, *chat_args(f"I am {name}", []), api_name="/chat")[-1][1]

    threads = [threading.Thread(target=talk, args=(n,)) for n in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert texts_of(results["alice"])[0] == "I am alice" and len(results["alice"]) == 2
    assert texts_of(results["bob"])[0] == "I am bob" and len(results["bob"]) == 2


def test_chat_generation_error_is_shown_and_server_survives(chat_server):
    from gradio_client import Client

    client = Client(chat_server.url, verbose=False)
    # max memory below max new tokens: a settings error, shown as a chat message
    _, history = stream(client, *chat_args("hi", [], max_memory=128, max_new_tokens=200), api_name="/chat")[-1]
    assert texts_of(history)[-1].startswith("**Error:**")
    _, history = stream(client, *chat_args("hi", []), api_name="/chat")[-1]
    assert not texts_of(history)[-1].startswith("**Error:**")


# --- real browser ------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (.ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def test_qa_page_in_browser(browser, qa_server, tmp_path):
    page = browser.new_page()
    page.goto(qa_server.url)
    page.get_by_label("Instruction").fill("Say hi")
    page.get_by_role("button", name="Submit").click()
    answer = page.locator("#answer textarea")
    seen = set()
    deadline = time.time() + 60
    while time.time() < deadline:
        seen.add(answer.input_value())
        if len(seen) >= 3:
            break
        time.sleep(0.05)
    assert len(seen - {""}) >= 2, seen  # the answer grew while we watched
    page.screenshot(path=str(tmp_path / "qa.png"), full_page=True)
    assert (tmp_path / "qa.png").stat().st_size > 10_000
    page.close()


def test_chat_page_in_browser(browser, chat_server, tmp_path):
    page = browser.new_page()
    page.goto(chat_server.url)
    box = page.locator("#message textarea")
    box.fill("hello there")
    page.get_by_role("button", name="Submit").click()
    bot = page.locator("#chatbot")
    seen = set()
    deadline = time.time() + 60
    while time.time() < deadline and len(seen) < 3:
        seen.add(bot.inner_text())
        time.sleep(0.05)
    assert len(seen) >= 3, seen  # the reply grew while we watched
    done = """() => { const t = document.querySelector('#chatbot').innerText;
                      return t.includes('hello there') && !t.includes('processing'); }"""
    page.wait_for_function(done, timeout=120_000)
    before = bot.inner_text()
    page.get_by_role("button", name="Regenerate").click()
    page.wait_for_timeout(500)
    page.wait_for_function(done, timeout=120_000)
    after = bot.inner_text()
    assert after.count("hello there") == before.count("hello there") == 1  # replaced, not appended
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    page.get_by_role("button", name="Save chat").click()
    saved = os.path.join(os.path.realpath(chat_server.save_dir), "chat_history.jsonl")
    page.get_by_text(f"Saved to {saved}").wait_for(timeout=10_000)  # the page shows the full path
    assert os.path.isfile(saved)
    save_as = page.get_by_label("Save as")
    save_as.fill("../escaped.jsonl")  # a file name only: the folder is the server's --save_dir
    page.get_by_role("button", name="Save chat").click()
    page.get_by_text("Not saved: Save as: give a plain file name").wait_for(timeout=10_000)
    assert not os.path.exists(os.path.join(os.path.dirname(saved), "..", "escaped.jsonl"))
    save_as.fill("mine.jsonl")
    page.get_by_role("button", name="Save chat").click()
    page.get_by_text(f"Saved to {os.path.join(os.path.dirname(saved), 'mine.jsonl')}").wait_for(timeout=10_000)
    page.get_by_role("button", name="Clear history").click()
    page.wait_for_timeout(1000)
    assert "hello there" not in bot.inner_text()
    # Clear while a reply streams: the generation stops and does not refill the box
    box.fill("one more question")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_function("() => document.querySelector('#chatbot').innerText.includes('one more question')",
                           timeout=60_000)
    page.get_by_role("button", name="Clear history").click()
    page.wait_for_timeout(1000)
    assert "one more question" not in bot.inner_text()
    page.wait_for_timeout(2000)
    assert "one more question" not in bot.inner_text()
    page.close()
