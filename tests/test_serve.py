"""serve.py, the OpenAI-compatible API: one in-process server on a free loopback port, the tiny
random model with two adapters (instruct and chat templates; the base uses chat_template), the
official `openai` client and raw httpx streams; the command line in subprocesses."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT

KEY = "sk-test-key"
pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(tiny_model, out_dir, seed, prompt_type):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "training_config.json"), "w") as f:
        json.dump({"prompt_type": prompt_type}, f)
    return out_dir


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("serve-adapters")
    return {"alpha": make_adapter(tiny_model, str(root / "alpha"), 1, "instruct"),
            "beta": make_adapter(tiny_model, str(root / "beta"), 2, "chat")}


class Running:
    def __init__(self, engine, app):
        import uvicorn

        self.engine = engine
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.stop()


@pytest.fixture(scope="module")
def loaded(tiny_model, adapters):
    from serve import load_served

    return load_served(tiny_model, [("alpha", adapters["alpha"]), ("beta", adapters["beta"])], base_name="base")


@pytest.fixture(scope="module")
def server(loaded):
    from serve import Engine, build_app

    model, tokenizer, served = loaded
    engine = Engine(model, tokenizer, served, max_queue=16)
    jobs = []
    submit = engine.submit

    def recording(job):  # keep each job, and the number of tokens it generated (its final update)
        emit = job.emit

        def counting(item):
            if getattr(item, "finished", False):
                job.final_tokens = len(item.token_ids or [])
            emit(item)

        job.emit = counting
        jobs.append(job)
        submit(job)

    engine.submit = recording
    running = Running(engine, build_app(engine, api_key=KEY, max_body_bytes=64 * 1024))
    running.jobs = jobs
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def http(server, method, path, body=None, key=KEY, raw=None, headers=None):
    import httpx

    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    if raw is not None:
        h["Content-Type"] = "application/json"
        return httpx.request(method, server.url + path, content=raw, headers=h, timeout=60)
    return httpx.request(method, server.url + path, json=body, headers=h, timeout=60)


GREEDY = {"temperature": 0, "max_tokens": 12}


def chat_body(model, question="Hello there", **kw):
    return {"model": model, "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": question}], **GREEDY, **kw}


def stream_text(server, body):
    """(text, [event payloads]) of a raw streamed request."""
    import httpx

    events = []
    with httpx.stream("POST", server.url + "/v1/chat/completions" if "messages" in body else
                      server.url + "/v1/completions", json=dict(body, stream=True),
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        raw = b"".join(r.iter_raw())
    parts = raw.split(b"\n\n")
    assert parts[-1] == b"" and parts[-2] == b"data: [DONE]", raw[-200:]
    for part in parts[:-2]:
        assert part.startswith(b"data: ") and b"\n" not in part, part
        events.append(json.loads(part[len(b"data: "):]))
    text = "".join((c["choices"][0].get("delta", {}).get("content") or c["choices"][0].get("text") or "")
                   for c in events if c["choices"])
    return text, events


# --- endpoints and clients ------------------------------------------------------------------------------


def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", "alpha", "beta"]


def test_chat_streaming_equals_non_streaming_with_openai(client):
    for model in ("base", "alpha", "beta"):
        whole = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], model=model,
                                               temperature=0, max_tokens=10)
        parts = []
        usage = None
        for ch in client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], model=model,
                                                 temperature=0, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}):
            if ch.choices:
                parts.append(ch.choices[0].delta.content or "")
            else:
                usage = ch.usage
        assert "".join(parts) == whole.choices[0].message.content
        assert whole.choices[0].finish_reason in ("stop", "length")
        assert whole.usage.completion_tokens <= 10 and whole.usage.prompt_tokens > 0
        assert usage.prompt_tokens == whole.usage.prompt_tokens
        assert usage.completion_tokens == whole.usage.completion_tokens
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_adapters_answer_differently(client):
    texts = {m: client.completions.create(model=m, prompt="The quick brown fox", temperature=0, max_tokens=8,
                                          extra_body={"min_tokens": 8}).choices[0].text
             for m in ("base", "alpha", "beta")}
    assert len(set(texts.values())) == 3, texts


def test_completion_length_and_usage(client):
    out = client.completions.create(model="alpha", prompt="Once upon a time", max_tokens=7, temperature=0,
                                    extra_body={"min_tokens": 7})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 7
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="alpha", prompt="Once upon a time", max_tokens=7, temperature=0, stream=True,
        extra_body={"min_tokens": 7}) if c.choices)
    assert streamed == out.choices[0].text


def test_stop_string_cuts_and_reports_stop(client):
    whole = client.completions.create(model="beta", prompt="Numbers:", max_tokens=16, temperature=0,
                                      extra_body={"min_tokens": 16}).choices[0].text
    assert len(whole) > 6
    stop = whole[3:6]
    cut = client.completions.create(model="beta", prompt="Numbers:", max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"min_tokens": 16})
    assert cut.choices[0].text == whole[:whole.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("model,prompt_type", [("base", "chat_template"), ("alpha", "instruct"), ("beta", "chat")])
def test_prompt_ids_are_what_training_saw(server, client, loaded, model, prompt_type):
    from prompt import Conversation, build_prompt_ids

    _, tokenizer, served = loaded
    assert served[model].prompt_type == prompt_type
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "First question"},
                {"role": "assistant", "content": "First answer"}, {"role": "user", "content": "Second question"}]
    server.jobs.clear()
    out = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=3)
    if prompt_type == "instruct":  # one question, as the chat page sends it
        conv = Conversation(turns=[("Second question", None)], system="You are terse.")
    else:
        conv = Conversation(turns=[("First question", "First answer"), ("Second question", None)],
                            system="You are terse.")
    expected = build_prompt_ids(prompt_type, conv, tokenizer)
    assert server.jobs[-1].ids == expected
    assert out.usage.prompt_tokens == len(expected)
    if prompt_type != "instruct":
        assert "You are terse." in tokenizer.decode(expected)


def test_answer_equals_stream_generate_with_that_adapter(server, loaded):
    """The server's answer is generation.stream_generate's on the same ids with the adapter active."""
    import openai_api as api
    from generation import generate_text
    from prompt import STOP_STRINGS

    model, tokenizer, served = loaded
    server.jobs.clear()
    r = http(server, "POST", "/v1/chat/completions", chat_body("beta", max_tokens=10)).json()
    job = server.jobs[-1]
    model.set_adapter(served["beta"].adapter)
    raw = generate_text(model, tokenizer, job.ids, job.params, STOP_STRINGS["chat"])
    assert r["choices"][0]["message"]["content"] == api.TextCutter(STOP_STRINGS["chat"]).update(raw, final=True)


def test_raw_sse_framing(server):
    text, events = stream_text(server, chat_body("alpha", stream_options={"include_usage": True}))
    first, *middle, finish, usage = events
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["id"] == first["id"] and e["model"] == "alpha" for e in events)
    assert all(set(e["choices"][0]["delta"]) == {"content"} for e in middle)
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] > 0
    assert all(e["usage"] is None for e in events[:-1])
    whole = http(server, "POST", "/v1/chat/completions", chat_body("alpha")).json()
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["content"] == text
    # without include_usage: no usage key in chunks
    _, events = stream_text(server, chat_body("alpha"))
    assert all("usage" not in e for e in events)


def test_beam_search_streams(server, client):
    whole = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=6, extra_body={"num_beams": 3})
    assert whole.usage.completion_tokens >= 1
    text, events = stream_text(server, chat_body("alpha", num_beams=3, max_tokens=6))
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_n_choices_streamed_and_not(server, client):
    kw = dict(model="beta", messages=[{"role": "user", "content": "Tell me"}], max_tokens=6, temperature=1.0,
              seed=7, n=3, extra_body={"min_tokens": 6})
    whole = client.chat.completions.create(**kw)
    texts = [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    assert [c.index for c in whole.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert whole.usage.completion_tokens == 18
    parts = ["", "", ""]
    finished = set()
    for ch in client.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            parts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert parts == texts and finished == {0, 1, 2}
    one = client.chat.completions.create(**dict(kw, n=1))
    assert one.choices[0].message.content == texts[0]  # choice i samples with seed + i


def test_sampling_with_seed_repeats(client):
    kw = dict(model="beta", prompt="Tell me", max_tokens=8, temperature=0.9, top_p=0.9, seed=123,
              extra_body={"top_k": 50, "min_tokens": 8})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


# --- concurrency and faults ------------------------------------------------------------------------------


def test_eight_concurrent_streams_on_two_adapters_do_not_mix(server):
    bodies = [chat_body(["alpha", "beta"][i % 2], question=f"Question number {i}", max_tokens=10)
              for i in range(8)]
    alone = [stream_text(server, b)[0] for b in bodies]
    assert len(set(alone)) > 2
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda b: stream_text(server, b)[0], bodies))
    assert together == alone


def test_disconnect_frees_the_worker_at_once(server):
    import httpx

    engine = server.engine
    done_before = engine.completed
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "alpha", "prompt": "Go", "max_tokens": 900, "min_tokens": 900,
                            "temperature": 0, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
    t0 = time.time()
    while engine.completed == done_before:
        assert time.time() - t0 < 2.0, "the generation went on after the client left"
        time.sleep(0.01)
    assert engine.active is None
    assert server.jobs[-1].final_tokens < 900
    out = http(server, "POST", "/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 2})
    assert out.status_code == 200


def test_non_streamed_request_stops_when_the_client_leaves(server):
    import httpx

    engine = server.engine
    done_before = engine.completed
    with pytest.raises(httpx.TimeoutException):
        http_timeout = httpx.Timeout(1.0)
        httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=http_timeout,
                   json={"model": "alpha", "prompt": "Go", "max_tokens": 1000, "min_tokens": 1000})
    t0 = time.time()
    while engine.completed == done_before:
        assert time.time() - t0 < 3.0, "the generation went on after the client left"
        time.sleep(0.01)
    assert server.jobs[-1].final_tokens < 1000


def test_full_queue_answers_429(loaded):
    import httpx

    from generation import GenerationParams
    from serve import Engine, Job, build_app

    model, tokenizer, served = loaded
    engine = Engine(model, tokenizer, served, max_queue=1)
    running = Running(engine, build_app(engine))
    release = threading.Event()
    # The worker is held by a job whose first token waits for `release`.
    engine.submit(Job(served["alpha"], [1, 2, 3], GenerationParams(max_new_tokens=2), [], threading.Event(),
                      lambda item: release.wait(30)))
    body = {"model": "alpha", "prompt": "Go", "max_tokens": 2}
    try:
        deadline = time.time() + 10
        while engine.active is None:
            assert time.time() < deadline
            time.sleep(0.01)
        results = []
        waiting = threading.Thread(target=lambda: results.append(
            httpx.post(running.url + "/v1/completions", json=body, timeout=60)))
        waiting.start()
        while engine.jobs.qsize() < 1:
            assert time.time() < deadline
            time.sleep(0.01)
        r = httpx.post(running.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "queue_full" and "--max_queue" in r.json()["error"]["message"]
        release.set()
        waiting.join(30)
        assert results[0].status_code == 200
    finally:
        release.set()
        running.close()


def test_context_overflow_names_both_numbers(server):
    r = http(server, "POST", "/v1/chat/completions", chat_body("alpha", max_tokens=5000))
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "5000" in message and "1024" in message and "tokens" in message
    assert r.json()["error"]["code"] == "context_length_exceeded"


BAD_BODIES = [
    ("not json", b"{nope", None),
    ("not an object", b"[1, 2]", None),
    ("not utf-8", b"\xff\xfe{}", None),
    ("no model", {"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ("model not a string", {"model": 3, "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ("no messages", {"model": "alpha"}, "messages"),
    ("empty messages", {"model": "alpha", "messages": []}, "messages"),
    ("messages not a list", {"model": "alpha", "messages": "hi"}, "messages"),
    ("message not an object", {"model": "alpha", "messages": ["hi"]}, "messages[0]"),
    ("unknown role", {"model": "alpha", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("tool role", {"model": "alpha", "messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role"),
    ("content a number", {"model": "alpha", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("image part", {"model": "alpha", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content"),
    ("ends with assistant", {"model": "alpha", "messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}]}, "messages"),
    ("two users", {"model": "alpha", "messages": [{"role": "user", "content": "a"},
                                                  {"role": "user", "content": "b"}]}, "messages[1].role"),
    ("late system", {"model": "alpha", "messages": [{"role": "user", "content": "a"},
                                                    {"role": "assistant", "content": "b"},
                                                    {"role": "system", "content": "c"}]}, "messages[2].role"),
    ("max_tokens string", dict(chat_body("alpha"), max_tokens="10"), "max_tokens"),
    ("max_tokens zero", dict(chat_body("alpha"), max_tokens=0), "max_tokens"),
    ("max_tokens float", dict(chat_body("alpha"), max_tokens=1.5), "max_tokens"),
    ("temperature too high", dict(chat_body("alpha"), temperature=3), "temperature"),
    ("temperature bool", dict(chat_body("alpha"), temperature=True), "temperature"),
    ("top_p zero", dict(chat_body("alpha"), top_p=0), "top_p"),
    ("stop a number", dict(chat_body("alpha"), stop=5), "stop"),
    ("stop empty string", dict(chat_body("alpha"), stop=[""]), "stop"),
    ("n = 9", dict(chat_body("alpha"), n=9), "n"),
    ("n = 0", dict(chat_body("alpha"), n=0), "n"),
    ("stream a string", dict(chat_body("alpha"), stream="yes"), "stream"),
    ("stream_options without stream", dict(chat_body("alpha"), stream_options={"include_usage": True}),
     "stream_options"),
    ("tools", dict(chat_body("alpha"), tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ("logprobs true", dict(chat_body("alpha"), logprobs=True), "logprobs"),
    ("presence_penalty", dict(chat_body("alpha"), presence_penalty=0.5), "presence_penalty"),
    ("response_format json", dict(chat_body("alpha"), response_format={"type": "json_object"}), "response_format"),
    ("unknown parameter", dict(chat_body("alpha"), frobnicate=1), "frobnicate"),
    ("num_beams zero", dict(chat_body("alpha"), num_beams=0), "num_beams"),
    ("repetition_penalty negative", dict(chat_body("alpha"), repetition_penalty=-1), "repetition_penalty"),
    ("min_tokens negative", dict(chat_body("alpha"), min_tokens=-1), "min_tokens"),
    ("temperature below the floor", dict(chat_body("alpha"), temperature=0.001), None),
    ("seed a string", dict(chat_body("alpha"), seed="1"), "seed"),
    ("max_tokens huge", dict(chat_body("alpha"), max_tokens=10 ** 30), "max_tokens"),
    ("deep nesting", b'{"model": "alpha", "messages": ' + b"[" * 30000 + b"]" * 30000 + b"}", None),
    ("lone surrogate", b'{"model": "alpha", "messages": [{"role": "user", "content": "a\\ud800b"}]}', None),
    ("messages null", {"model": "alpha", "messages": None}, "messages"),
    ("role missing", {"model": "alpha", "messages": [{"content": "hi"}]}, "messages[0].role"),
    ("content missing", {"model": "alpha", "messages": [{"role": "user"}]}, "messages[0].content"),
    ("stream_options not an object", dict(chat_body("alpha"), stream=True, stream_options=1), "stream_options"),
    ("nan", b'{"model": "alpha", "messages": [{"role": "user", "content": "a"}], "temperature": NaN}', None),
]


@pytest.mark.parametrize("name,body,param", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_are_400_in_the_openai_shape(server, name, body, param):
    if isinstance(body, bytes):
        r = http(server, "POST", "/v1/chat/completions", raw=body)
    else:
        r = http(server, "POST", "/v1/chat/completions", body)
    assert r.status_code == 400, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert "Traceback" not in error["message"] and "\n" not in error["message"]
    if param is not None:
        assert error["param"] == param, error


BAD_COMPLETIONS = [
    ("prompt missing", {"model": "alpha"}),
    ("prompt empty", {"model": "alpha", "prompt": ""}),
    ("two prompts", {"model": "alpha", "prompt": ["a", "b"]}),
    ("token id out of range", {"model": "alpha", "prompt": [10 ** 9]}),
    ("echo", {"model": "alpha", "prompt": "a", "echo": True}),
    ("best_of", {"model": "alpha", "prompt": "a", "best_of": 3}),
    ("suffix", {"model": "alpha", "prompt": "a", "suffix": "z"}),
    ("logprobs 2", {"model": "alpha", "prompt": "a", "logprobs": 2}),
]


@pytest.mark.parametrize("name,body", BAD_COMPLETIONS, ids=[b[0] for b in BAD_COMPLETIONS])
def test_bad_completion_bodies(server, name, body):
    r = http(server, "POST", "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_neutral_values_real_clients_send_are_accepted(server):
    body = chat_body("alpha", presence_penalty=0, frequency_penalty=0.0, logprobs=False, user="u1", n=1,
                     top_logprobs=None, logit_bias={}, max_completion_tokens=12, stream=False,
                     metadata={"a": "b"}, tools=[], parallel_tool_calls=True)
    r = http(server, "POST", "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    r = http(server, "POST", "/v1/completions", {"model": "alpha", "prompt": [1, 2, 3], "max_tokens": 2,
                                                 "echo": False, "logprobs": None, "best_of": 1})
    assert r.status_code == 200, r.text


def test_openai_errors(server, client):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert "nope" in str(e.value) and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alpha", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                       logprobs=True)
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_auth_body_cap_routes_and_cors(server):
    assert http(server, "GET", "/v1/models", key=None).status_code == 401
    r = http(server, "GET", "/v1/models", key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    big = json.dumps(chat_body("alpha", question="x" * 70_000)).encode()
    r = http(server, "POST", "/v1/chat/completions", raw=big)
    assert r.status_code == 413 and "error" in r.json()
    r = http(server, "GET", "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = http(server, "GET", "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = http(server, "GET", "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_origin_allows_one(loaded):
    import httpx

    from serve import Engine, build_app

    model, tokenizer, served = loaded
    engine = Engine(model, tokenizer, served)
    running = Running(engine, build_app(engine, cors_origin="http://ui.example"))
    try:
        ok = httpx.get(running.url + "/v1/models", headers={"Origin": "http://ui.example"})
        assert ok.headers.get("access-control-allow-origin") == "http://ui.example"
        other = httpx.get(running.url + "/v1/models", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        running.close()


# --- command line ----------------------------------------------------------------------------------------


def run_serve(*args, env=None):
    return subprocess.run([sys.executable, "serve.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, **(env or {})))


def test_help_loads_no_heavy_library():
    code = ("import runpy, sys\nsys.argv = ['serve.py', '--help']\ntry:\n    runpy.run_path('serve.py', "
            "run_name='__main__')\nexcept SystemExit:\n    pass\nheavy = sorted(m for m in ('gradio', 'torch', "
            "'transformers', 'peft', 'uvicorn', 'starlette') if m in sys.modules)\nsys.stderr.write('HEAVY=' + "
            "','.join(heavy))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip().endswith("HEAVY="), proc.stderr[-500:]


@pytest.mark.parametrize("args,env,needle", [
    (["--host", "0.0.0.0"], {}, "--api_key"),
    (["--host", "192.168.1.5", "--api_key", ""], {}, "--api_key is empty"),
    (["--lora", "nameonly"], {}, "NAME=PATH"),
    (["--lora", "a=/no/such/dir"], {}, "not a directory"),
    (["--max_queue", "-1"], {}, "--max_queue"),
    (["--dry_run"], {}, "--engine vllm"),
    (["--engine", "vllm"], {"PATH": "/usr/bin:/bin"}, "pip install vllm"),
])
def test_bad_flags_are_one_line_errors(args, env, needle):
    proc = run_serve(*args, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_port_in_use_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = run_serve("--port", str(taken.getsockname()[1]))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: cannot listen on")


def test_api_key_from_the_environment(monkeypatch):
    from errors import UserError
    from serve import build_parser, check_flags

    args = build_parser().parse_args(["--host", "0.0.0.0"])
    with pytest.raises(UserError, match="--insecure"):
        check_flags(args)
    monkeypatch.setenv("VICUNA_API_KEY", "from-env")
    args = build_parser().parse_args(["--host", "0.0.0.0"])
    check_flags(args)
    assert args.api_key == "from-env"
    args = build_parser().parse_args(["--host", "::", "--insecure"])
    monkeypatch.delenv("VICUNA_API_KEY")
    check_flags(args)
    assert args.api_key is None
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_flags(build_parser().parse_args(["--host", host]))


def test_vllm_command_line(tmp_path, adapters):
    import argparse

    from serve import build_parser, jinja_template, vllm_command

    args = build_parser().parse_args(["--model_path", "meta-llama/Llama-2-7b-hf", "--host", "0.0.0.0",
                                      "--port", "9000", "--api_key", "k", "--cors_origin", "http://ui"])
    assert isinstance(args, argparse.Namespace)
    cmd = vllm_command(args, [("alpha", adapters["alpha"])], str(tmp_path), 4, prompt_type_of=lambda p: "instruct",
                       lead="<s>")
    assert cmd[:3] == ["vllm", "serve", "meta-llama/Llama-2-7b-hf"]
    pairs = {cmd[i]: cmd[i + 1] for i in range(3, len(cmd) - 1) if cmd[i].startswith("--")}
    assert pairs["--host"] == "0.0.0.0" and pairs["--port"] == "9000" and pairs["--api-key"] == "k"
    assert pairs["--tensor-parallel-size"] == "4" and pairs["--served-model-name"] == "meta-llama/Llama-2-7b-hf"
    assert "--enable-lora" in cmd and f"alpha={adapters['alpha']}" in cmd
    assert pairs["--max-lora-rank"] == "8"
    with open(pairs["--chat-template"]) as f:
        assert f.read() == jinja_template("instruct", "<s>")


@pytest.mark.parametrize("kind", ["bpe", "sp"])
@pytest.mark.parametrize("prompt_type", ["instruct", "chat"])
def test_vllm_jinja_template_renders_prompt_py(tiny_models, kind, prompt_type):
    """The Jinja file given to vLLM renders, tokenized without special tokens as vLLM does, exactly
    build_prompt_ids's ids (LLaMA's BOS included, none for SmolLM2)."""
    import jinja2

    from models import load_tokenizer
    from prompt import Conversation, build_prompt_ids, leading_special_ids
    from serve import jinja_template

    tokenizer = load_tokenizer(tiny_models[kind])
    lead = tokenizer.decode(leading_special_ids(tokenizer))
    template = jinja2.Environment().from_string(jinja_template(prompt_type, lead))
    if prompt_type == "instruct":
        messages = [{"role": "user", "content": "old"}, {"role": "assistant", "content": "x"},
                    {"role": "user", "content": "Name three colours."}]
        conv = Conversation(turns=[("Name three colours.", None)])
    else:
        messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "How are you?"}]
        conv = Conversation(turns=[("Hi", "Hello"), ("How are you?", None)], system="Be kind.")
    text = template.render(messages=messages, bos_token="<unused>", eos_token=tokenizer.eos_token,
                           add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = build_prompt_ids(prompt_type, conv, tokenizer)
    if kind == "bpe":
        assert ids == expected
    else:  # SentencePiece: the same text, but one encode of it differs from prompt.py's per-piece encodes
        # (the dummy-prefix space after <s> and at each piece): a known limit of any text template
        from prompt import generation_prompt

        answer_eos = {"Hello": "Hello" + tokenizer.eos_token} if prompt_type == "chat" else {}
        same = lead + generation_prompt(prompt_type, conv, tokenizer)
        for old, new in answer_eos.items():
            same = same.replace(old, new)
        assert text == same


def test_serve_script_passes_the_environment(tmp_path):
    """scripts/serve.sh: MODEL_PATH, LORA_PATH, PORT (the API's port) and TOT_CUDA reach serve.py."""
    import shlex

    from serve import build_parser

    clean = {k: v for k, v in os.environ.items()
             if k not in ("TOT_CUDA", "PORT", "PAGE_PORT", "MODEL_PATH", "BASE_MODEL", "LORA_PATH", "PYTHON",
                          "CUDA_VISIBLE_DEVICES")}
    script = os.path.join(ROOT, "scripts", "serve.sh")
    proc = subprocess.run(["bash", script, "--api_key", "k"], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(clean, PYTHON="echo", MODEL_PATH="my base", LORA_PATH="my lora",
                                   TOT_CUDA="0,1", PORT="9001"))
    assert proc.returncode == 0, proc.stderr
    assert "CUDA_VISIBLE_DEVICES=0,1" in proc.stderr
    argv = shlex.split(proc.stderr.strip().splitlines()[-1].split(" ", 2)[2])[2:]
    assert argv == ["--port", "9001", "--model_path", "my base", "--lora_path", "my lora", "--api_key", "k"]
    args = build_parser().parse_args(argv)
    assert (args.port, args.model_path, args.lora_path, args.host) == (9001, "my base", "my lora", "127.0.0.1")
    bare = subprocess.run(["bash", script], cwd=tmp_path, env=dict(clean, PYTHON="echo"), capture_output=True,
                          text=True)
    assert bare.stdout.split() == ["serve.py", "--port", "8000"]


def test_embedded_model_answers_as_the_pages(embedded_path):
    """On the embedded SmolLM2 (its chat template): the server's greedy answer is stream_generate's
    on build_prompt_ids's ids, and the openai client reads it back."""
    import openai

    from generation import GenerationParams, generate_text
    from prompt import Conversation, build_prompt_ids
    from serve import Engine, build_app, load_served

    model, tokenizer, served = load_served(embedded_path, [], base_name="smol")
    assert served["smol"].prompt_type == "chat_template"
    engine = Engine(model, tokenizer, served)
    running = Running(engine, build_app(engine))
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(model="smol", temperature=0, max_tokens=16, messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}])
        ids = build_prompt_ids("chat_template", Conversation(turns=[("What is the capital of France?", None)],
                                                            system="You are a helpful assistant."), tokenizer)
        expected = generate_text(model, tokenizer, ids, GenerationParams(max_new_tokens=16)).strip()
        assert out.choices[0].message.content == expected
        assert "Paris" in expected
        assert out.usage.prompt_tokens == len(ids)
    finally:
        running.close()


def test_vllm_dry_run_from_the_command_line(adapters, tiny_model):
    """serve.py --engine vllm --dry_run prints the vllm serve command (no vLLM needed), with the
    adapter's instruct template written as a Jinja file that starts with no BOS for SmolLM2's tokenizer."""
    import shlex

    proc = run_serve("--engine", "vllm", "--dry_run", "--model_path", tiny_model, "--lora",
                     f"alpha={adapters['alpha']}", "--port", "8123", env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout.strip())
    assert cmd[:3] == ["vllm", "serve", tiny_model]
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2" and cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[cmd.index("--lora-modules") + 1] == f"alpha={adapters['alpha']}"
    with open(cmd[cmd.index("--chat-template") + 1]) as f:
        template = f.read()
    assert '-%}{{ "" }}{{ "Below is' in template and "### Instruction" in template


def test_the_command_line_serves(tiny_model, adapters):
    """python serve.py --lora NAME=PATH --api_key: the real process answers, then stops on SIGTERM."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", "--model_path", tiny_model, "--served_model_name", "tiny",
                             "--lora", f"alpha={adapters['alpha']}", "--lora_path", adapters["beta"], "--port",
                             str(port), "--api_key", KEY], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2)
                break
            except httpx.HTTPError:
                assert time.time() < deadline
                time.sleep(0.2)
        assert [m["id"] for m in r.json()["data"]] == ["tiny", "beta", "alpha"]
        r = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                       json={"model": "alpha", "prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
    finally:
        proc.terminate()
        proc.wait(30)
