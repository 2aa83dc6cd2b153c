"""Server overhead and throughput of serve.py on the embedded model (docs/performance.md).

    .venv/bin/python tools/bench_serve.py [--tokens 64] [--repeats 3] [--clients 1,4,8] [--json out.json]

1. direct: generation.stream_generate in this process on the chat prompt the server builds;
   time to first token (TTFT) and decode tokens/s (tokens after the first / time after the first).
2. server: serve.py started as its own process on a free loopback port; one streaming client
   (httpx, raw SSE) sends the same request; the same two numbers, and the overhead against 1.
   Direct and server runs alternate (medians of --repeats each), so a busy machine weighs on both.
3. aggregate tokens/s with 1, 4 and 8 concurrent streaming clients (each a different question).

4. per-token server cost, independent of the model and of machine load: the same server code
   in this process with generation.stream_generate replaced by a stream that yields --fake_tokens
   tokens instantly; one streaming client; the wall time per token is what the server (JSON, SSE,
   the thread hand-over) and the client add to each token, against the model's time per token.

Every request is greedy with min_tokens = max_tokens = --tokens, so each answer has exactly that
many tokens. serve.py runs one generation at a time (no batching), so concurrent clients share
the one worker: aggregate tokens/s stays that of one client, and each client waits its turn.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(question: str, tokens: int) -> dict:
    return {"model": "base", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": tokens, "min_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}}


def direct_runner(tokens: int, question: str):
    """A function that runs one direct stream and returns (ttft, decode tokens/s)."""
    import openai_api as api
    from generation import stream_generate
    from models import EMBEDDED_MODEL
    from serve import load_served

    model, tokenizer, served = load_served(EMBEDDED_MODEL, [], base_name="base")
    req = api.parse_chat(body(question, tokens))
    ids = api.chat_prompt_ids(req.messages, served["base"].prompt_type, tokenizer)
    params = api.generation_params(req, len(ids), None)

    def run():
        t0 = time.perf_counter()
        first = last = None
        n = 0
        for update in stream_generate(model, tokenizer, ids, params):
            now = time.perf_counter()
            if update.finished:
                n = len(update.token_ids)
                break
            first = first or now
            last = now
        return first - t0, (n - 1) / (last - first)

    return run


def stream_once(url: str, request: dict) -> tuple[float, float, int, float]:
    """(ttft, decode tokens/s, tokens, total seconds) of one streamed request."""
    import httpx

    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=request, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    return first - t0, (tokens - 1) / (last - first), tokens, total


def start_server(port: int):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--port", str(port),
                             "--served_model_name", "base"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve.py exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("serve.py did not start in 300 s")


def per_token_cost(n_tokens: int) -> float:
    """Seconds per streamed token of the server code alone (see 4. above)."""
    import uvicorn

    import generation
    import serve
    from generation import StreamUpdate
    from models import EMBEDDED_MODEL

    def fake_stream(model, tokenizer, ids, params, stop_strings=None, cancel=None, all_beams=False):
        text = ""
        for i in range(n_tokens):
            if cancel is not None and cancel.is_set():
                break
            text += " tok"
            yield StreamUpdate(text, None, False)
        yield StreamUpdate(text, None, True, list(range(n_tokens)))

    model, tokenizer, served = serve.load_served(EMBEDDED_MODEL, [], base_name="base")
    real = generation.stream_generate
    generation.stream_generate = fake_stream
    engine = serve.Engine(model, tokenizer, served)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(serve.build_app(engine), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        url = f"http://127.0.0.1:{port}"
        request = dict(body("hi", 8), max_tokens=n_tokens, min_tokens=n_tokens)
        stream_once(url, request)
        totals = []
        for _ in range(3):
            _, _, tokens, total = stream_once(url, request)
            totals.append(total / tokens)
        return min(totals)
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()
        generation.stream_generate = real


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", default="1,4,8")
    p.add_argument("--json", default=None)
    p.add_argument("--fake_tokens", type=int, default=2000)
    args = p.parse_args(argv)
    question = "Write a short story about a llama who learns to code."
    result = {"tokens": args.tokens}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port)
    try:
        run_direct = direct_runner(args.tokens, question)
        run_direct()  # warm-up
        stream_once(url, body(question, args.tokens))
        direct_runs, server_runs = [], []
        for _ in range(args.repeats):  # alternated, so both see the same machine load
            direct_runs.append(run_direct())
            server_runs.append(stream_once(url, body(question, args.tokens)))
        for name, runs in (("direct", direct_runs), ("server", server_runs)):
            result[name] = {"ttft_s": statistics.median(r[0] for r in runs),
                            "tokens_per_s": statistics.median(r[1] for r in runs)}
        result["overhead_pct"] = 100 * (1 - result["server"]["tokens_per_s"] / result["direct"]["tokens_per_s"])
        result["concurrent"] = {}
        for n in [int(c) for c in args.clients.split(",")]:
            out: list = [None] * n
            threads = [threading.Thread(target=lambda i=i: out.__setitem__(
                i, stream_once(url, body(f"{question} Variant {i}.", args.tokens)))) for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            result["concurrent"][n] = {"aggregate_tokens_per_s": sum(r[2] for r in out) / wall,
                                       "mean_ttft_s": statistics.mean(r[0] for r in out), "wall_s": wall}
    finally:
        server.terminate()
        server.wait(30)
    d, s = result["direct"], result["server"]
    print(f"| path | TTFT | decode tokens/s |\n|---|---|---|\n"
          f"| stream_generate in process | {d['ttft_s'] * 1000:.0f} ms | {d['tokens_per_s']:.1f} |\n"
          f"| serve.py, 1 streaming client | {s['ttft_s'] * 1000:.0f} ms | {s['tokens_per_s']:.1f} |\n"
          f"\nserver overhead on tokens/s: {result['overhead_pct']:.1f} %\n")
    print("| concurrent clients | aggregate tokens/s | mean TTFT | wall |\n|---|---|---|---|")
    for n, c in result["concurrent"].items():
        print(f"| {n} | {c['aggregate_tokens_per_s']:.1f} | {c['mean_ttft_s']:.2f} s | {c['wall_s']:.1f} s |")
    cost = per_token_cost(args.fake_tokens)
    step = 1 / result["server"]["tokens_per_s"]
    result["server_cost_per_token_s"] = cost
    print(f"\nserver code per streamed token (model replaced by an instant stream): {cost * 1e6:.0f} us, "
          f"{100 * cost / step:.1f} % of a model step here ({step * 1000:.0f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
