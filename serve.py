"""An OpenAI-compatible API server for the base model and any number of LoRA adapters on it.

    python serve.py                                          # http://127.0.0.1:8000/v1, the embedded model
    python serve.py --lora vicuna=lora-Vicuna --lora chat=lora-Vicuna-chat --api_key sk-local
    python serve.py --engine vllm --lora vicuna=lora-Vicuna  # the same API from vLLM, on GPUs

Endpoints: GET /v1/models, POST /v1/chat/completions and POST /v1/completions, streaming
(server-sent events, `stream_options.include_usage`) or not. The request's `model` picks the base
(named as --model_path, or --served_model_name) or an adapter (--lora NAME=PATH, repeatable; every
adapter is loaded once on the one base model, peft multi-adapter). Chat messages are rendered in
the template the adapter was trained with (its training_config.json; --prompt_type overrides),
so the prompt is the one training saw; the base model uses its tokenizer's chat template.
Generation goes through generation.stream_generate, one request at a time in a worker thread
(requests wait in a queue of --max_queue; more are answered 429); a client that disconnects stops
its generation within one step. Errors are answered in the OpenAI shape, never as a traceback.

Security: the server listens on 127.0.0.1 unless --host says otherwise, and refuses a non-loopback
--host without --api_key (or $VICUNA_API_KEY) unless --insecure is given; bodies over
--max_body_bytes are refused; CORS is off unless --cors_origin names the one origin to allow.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import ipaddress
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass

from errors import UserError, check_utf8, cli_errors, logger, one_line, setup_logging
from models import add_model_args

DEFAULT_PORT = 8000
API_KEY_ENV = "VICUNA_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    from webui import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve this adapter as model NAME (repeatable); --lora_path P is --lora basename(P)=P")
    p.add_argument("--served_model_name", default=None, help="the base model's name in the API (default: --model_path)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (non-loopback needs --api_key)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    p.add_argument("--api_key", default=None,
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} when set)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--max_queue", type=int, default=64, help="requests that may wait for the model; more get 429")
    p.add_argument("--max_body_bytes", type=int, default=4 * 1024 * 1024, help="largest request body accepted")
    p.add_argument("--cors_origin", default=None, help="allow browser requests from this one origin (default: none)")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="hf: this process (transformers + peft); vllm: start `vllm serve` with our adapters "
                        "and template (pip install vllm; GPUs)")
    p.add_argument("--dry_run", action="store_true", help="--engine vllm: print the command and exit")
    return p


# --- flags ------------------------------------------------------------------------------------------


def parse_loras(specs: list[str], lora_path: str | None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if lora_path:
        out.append((os.path.basename(os.path.normpath(lora_path)) or "lora", lora_path))
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise UserError(f"--lora {spec!r}: expected NAME=PATH, e.g. --lora vicuna=lora-Vicuna")
        if not os.path.isdir(path):
            raise UserError(f"--lora {spec}: {path} is not a directory")
        out.append((name, path))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"--lora: the name {dup[0]} is used twice; give each adapter its own name")
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_flags(args) -> None:
    for name in ("api_key", "served_model_name", "cors_origin", "host"):
        check_utf8(f"--{name}", getattr(args, name))
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api_key is empty; pass a key or leave the flag out")
    if not is_loopback(args.host) and not args.api_key and not args.insecure:
        raise UserError(f"--host {args.host} is reachable from other machines and no --api_key (or ${API_KEY_ENV}) "
                        "is set; set a key, or pass --insecure to serve without one")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_queue < 0:
        raise UserError(f"--max_queue must be >= 0, got {args.max_queue}")
    if args.max_body_bytes < 1024:
        raise UserError(f"--max_body_bytes must be at least 1024, got {args.max_body_bytes}")
    if args.dry_run and args.engine != "vllm":
        raise UserError("--dry_run prints the vLLM command; it needs --engine vllm")


# --- the model and its adapters -------------------------------------------------------------------


@dataclass
class Served:
    """One name in /v1/models: the base (adapter None) or a peft adapter of the one model."""

    name: str
    adapter: str | None
    prompt_type: str
    path: str | None = None


def add_adapter(model, peft_name: str, lora_path: str) -> None:
    """Load another adapter onto a PeftModel under `peft_name`, with load_adapter's checks."""
    from peft import set_peft_model_state_dict

    from models import (check_adapter_file, find_adapter_weights, lora_config_from_dict, read_adapter_config)

    weights = find_adapter_weights(lora_path)
    state = check_adapter_file(weights)
    config = lora_config_from_dict(read_adapter_config(lora_path, state, weights), lora_path)
    config.inference_mode = True
    try:
        model.add_adapter(peft_name, config)
    except (ValueError, TypeError) as e:
        raise UserError(f"adapter {lora_path} does not fit the base model: {one_line(e)}") from None
    marker = f".{peft_name}"
    expected = {}
    for key, value in model.state_dict().items():
        if "lora_" in key and (f"{marker}." in key or key.endswith(marker)):
            expected[key.replace(f"{marker}.", ".").removesuffix(marker)] = value
    for key, value in state.items():
        if key not in expected or tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(f"adapter {lora_path} does not fit the base model: {key} "
                            f"{'has no module in the model' if key not in expected else 'has another shape'}; "
                            "serve adapters trained on this base")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"adapter {lora_path} lacks {len(missing)} LoRA tensors its config declares, e.g. {missing[0]}")
    set_peft_model_state_dict(model, state, adapter_name=peft_name)
    model.eval()


def load_served(model_path: str, loras: list[tuple[str, str]], quant: str = "none", prompt_type: str | None = None,
                base_name: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, {name: Served}): the base once, every adapter on it."""
    from models import load_adapter, load_for_inference, resolve_prompt_type

    model, tokenizer = load_for_inference(model_path, None, quant, trust_remote_code=trust_remote_code)
    # a merged or quantized folder's own training_config.json, as generate.py and chat.py read it
    base_type = resolve_prompt_type(prompt_type, model_path,
                                    "chat_template" if getattr(tokenizer, "chat_template", None) else "instruct")
    served = {base_name or model_path: Served(base_name or model_path, None, base_type)}
    for i, (name, path) in enumerate(loras):
        if name in served:
            raise UserError(f"--lora {name}: the base model is served under that name; choose another")
        if i == 0:
            model = load_adapter(model, path)
            peft_name = "default"
        else:
            peft_name = f"adapter{i}"
            add_adapter(model, peft_name, path)
        served[name] = Served(name, peft_name, resolve_prompt_type(prompt_type, path, "instruct"), path)
        logger.info("model %s: adapter %s, prompt type %s", name, path, served[name].prompt_type)
    model.eval()
    return model, tokenizer, served


# --- the worker --------------------------------------------------------------------------------------

END = object()


@dataclass
class Job:
    served: Served
    ids: list[int]
    params: object  # GenerationParams
    stop_strings: list[str]
    cancel: threading.Event
    emit: object  # callable(item): a StreamUpdate, an exception, or END


class Engine:
    """One worker thread runs one job at a time through generation.stream_generate, with the job's
    adapter active; jobs wait in a queue of `max_queue` (full: 429)."""

    def __init__(self, model, tokenizer, served: dict[str, Served], max_queue: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.served = served
        self.jobs: queue.Queue = queue.Queue(maxsize=max(1, max_queue))
        self.max_queue = max_queue
        self.active: Job | None = None
        self.completed = 0
        self._stopping = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="serve-worker", daemon=True)
        self._thread.start()

    def context(self) -> int | None:
        from generation import model_context

        return model_context(self.model)

    def submit(self, job: Job) -> None:
        from openai_api import APIError

        with self._lock:
            if self.max_queue == 0 and (self.active is not None or not self.jobs.empty()):
                raise APIError(429, "the server is busy (queue of 0); retry later", None, "queue_full")
            try:
                self.jobs.put_nowait(job)
            except queue.Full:
                raise APIError(429, f"the server is busy: {self.max_queue} requests are waiting (--max_queue); "
                                    "retry later", None, "queue_full") from None

    def stop(self) -> None:
        """End the worker after its current job (waiting jobs are not run)."""
        self._stopping = True
        try:
            self.jobs.put_nowait(None)
        except queue.Full:
            pass  # the worker sees _stopping after its current job

    def _adapter(self, served: Served):
        import contextlib

        if not hasattr(self.model, "disable_adapter"):
            return contextlib.nullcontext()
        if served.adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(served.adapter)
        return contextlib.nullcontext()

    def _work(self) -> None:
        from generation import stream_generate

        while True:
            job = self.jobs.get()
            if job is None or self._stopping:
                if job is not None:
                    job.emit(END)
                return
            with self._lock:
                self.active = job
            try:
                if not job.cancel.is_set():
                    with self._adapter(job.served):
                        for update in stream_generate(self.model, self.tokenizer, job.ids, job.params,
                                                      job.stop_strings or None, job.cancel):
                            job.emit(update)
            except BaseException as e:  # handed to the request, answered in the OpenAI shape
                logger.warning("generation failed: %s", one_line(e))
                job.emit(e)
            finally:
                with self._lock:
                    self.active = None
                    self.completed += 1
                job.emit(END)


# --- the app ------------------------------------------------------------------------------------------


def finish_reason(final, cutter, eos: list[int], max_new_tokens: int) -> str:
    ids = final.token_ids or []
    if cutter.done or (ids and ids[-1] in eos):
        return "stop"
    return "length" if len(ids) >= max_new_tokens else "stop"


class SSEResponse:
    """Server-sent events from an async iterator of bytes; a client disconnect sets `cancel` at once
    (the generation stops within one step) and closes the iterator."""

    def __init__(self, chunks, cancel: threading.Event, headers: dict | None = None):
        self.chunks = chunks
        self.cancel = cancel
        self.headers = headers or {}

    async def __call__(self, scope, receive, send):
        import anyio

        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        headers += [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async with anyio.create_task_group() as tg:
            async def watch():
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        self.cancel.set()
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch)
            try:
                async for data in self.chunks:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                self.cancel.set()
            finally:
                self.cancel.set()  # harmless once the job ended; stops it otherwise
                await self.chunks.aclose()
                tg.cancel_scope.cancel()


def build_app(engine: Engine, api_key: str | None = None, cors_origin: str | None = None,
              max_body_bytes: int = 4 * 1024 * 1024):
    """The Starlette app of the API over `engine`."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    import openai_api as api
    from generation import eos_token_ids
    from prompt import STOP_STRINGS

    eos = eos_token_ids(engine.tokenizer, engine.model)

    def error_response(e: api.APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def check_auth(request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise api.APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                               "invalid_api_key")

    async def read_body(request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise api.APIError(413, f"the request body is {length} bytes; the limit is {max_body_bytes} "
                                    "(--max_body_bytes)")
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > max_body_bytes:
                raise api.APIError(413, f"the request body exceeds {max_body_bytes} bytes (--max_body_bytes)")
        return api.parse_json(bytes(raw))

    def guarded(fn):
        async def endpoint(request):
            try:
                check_auth(request)
                return await fn(request)
            except api.APIError as e:
                return error_response(e)
            except UserError as e:
                return error_response(api.bad(one_line(e)))
            except Exception as e:  # never a traceback to the client
                logger.warning("request failed: %s: %s", type(e).__name__, one_line(e))
                return error_response(api.APIError(500, f"internal error: {type(e).__name__}: {one_line(e)}"))
        return endpoint

    async def list_models(request):
        return JSONResponse(api.models_list(list(engine.served)))

    def prepare(req: api.Request):
        served = engine.served.get(req.model)
        if served is None:
            raise api.APIError(404, f"The model '{req.model}' does not exist; this server has "
                                    f"{', '.join(engine.served)}", "model", "model_not_found")
        if req.kind == "chat":
            ids = api.chat_prompt_ids(req.messages, served.prompt_type, engine.tokenizer)
            markers = STOP_STRINGS.get(served.prompt_type, []) + req.stop
        else:
            ids = api.completion_prompt_ids(req.prompt, engine.tokenizer)
            markers = list(req.stop)
        if not ids:
            raise api.bad("the prompt is empty", "prompt")
        params = api.generation_params(req, len(ids), engine.context())
        return served, ids, params, markers

    async def complete(request, kind: str):
        body = await read_body(request)
        req = api.parse_chat(body) if kind == "chat" else api.parse_completion(body)
        served, ids, params, markers = prepare(req)
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emitter(index: int):
            def emit(item):
                try:
                    loop.call_soon_threadsafe(items.put_nowait, (index, item))
                except RuntimeError:  # the loop is gone (shutdown): stop generating
                    cancel.set()
            return emit

        # n choices: n jobs, one after another on the worker; choice i samples with seed + i.
        try:
            for i in range(req.n):
                seeded = params if params.seed is None or i == 0 else \
                    dataclasses.replace(params, seed=(params.seed + i) % 2 ** 32)
                engine.submit(Job(served, ids, seeded, markers, cancel, emitter(i)))
        except api.APIError:
            cancel.set()  # the choices already queued are skipped
            raise
        cutters = [api.TextCutter(markers, strip=(kind == "chat")) for _ in range(req.n)]
        rid, created = api.new_id(kind), int(time.time())

        async def updates(watch_disconnect: bool = False):
            """(index, StreamUpdate) until every choice ended."""
            checked = time.monotonic()
            running = req.n
            while running:
                if watch_disconnect:  # a non-streamed answer: stop generating for a client that left
                    try:
                        got = await asyncio.wait_for(items.get(), 0.25)
                    except asyncio.TimeoutError:
                        got = None
                    if time.monotonic() - checked >= 0.25:
                        checked = time.monotonic()
                        if not cancel.is_set() and await request.is_disconnected():
                            cancel.set()
                    if got is None:
                        continue
                else:
                    got = await items.get()
                index, item = got
                if item is END:
                    running -= 1
                    continue
                if isinstance(item, BaseException):
                    cancel.set()
                    raise item
                yield index, item

        def reason(i: int, final) -> str:
            return finish_reason(final, cutters[i], eos, params.max_new_tokens)

        if not req.stream:
            finals: list = [None] * req.n
            try:
                async for i, update in updates(watch_disconnect=True):
                    finals[i] = update
            except UserError as e:
                raise api.bad(one_line(e)) from None
            finally:
                cancel.set()
            if any(f is None or not f.finished for f in finals):
                raise api.APIError(500, "the generation ended without an answer")
            choices = [(cutters[i].update(f.text, final=True), reason(i, f)) for i, f in enumerate(finals)]
            use = api.usage(len(ids), sum(len(f.token_ids or []) for f in finals))
            return JSONResponse(api.response(req, rid, created, choices, use))

        async def events():
            sent = [""] * req.n
            finals: list = [None] * req.n
            if kind == "chat":
                for i in range(req.n):
                    yield api.sse(api.chunk(req, rid, created, text="", role=True, index=i))
            try:
                async for i, update in updates():
                    shown = cutters[i].update(update.text, final=update.finished)
                    if len(shown) > len(sent[i]) and shown.startswith(sent[i]):
                        yield api.sse(api.chunk(req, rid, created, text=shown[len(sent[i]):], index=i))
                        sent[i] = shown
                    if update.finished:
                        finals[i] = update
                        yield api.sse(api.chunk(req, rid, created, finish_reason=reason(i, update), index=i))
            except Exception as e:  # after the 200 is sent: an error event, then [DONE]
                status = 400 if isinstance(e, UserError) else 500
                yield api.sse(api.error_body(one_line(e), status))
                yield api.SSE_DONE
                return
            if any(f is None for f in finals):
                return  # cancelled: the client is gone
            if req.include_usage:
                use = api.usage(len(ids), sum(len(f.token_ids or []) for f in finals))
                yield api.sse(api.chunk(req, rid, created, use=use))
            yield api.SSE_DONE

        return SSEResponse(events(), cancel)

    async def chat_completions(request):
        return await complete(request, "chat")

    async def completions(request):
        return await complete(request, "completion")

    async def http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no endpoint {request.url.path}; see /v1/models, /v1/chat/completions, /v1/completions",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(api.error_body(message, exc.status_code, None, code), status_code=exc.status_code)

    async def server_error(request, exc):
        return JSONResponse(api.error_body(f"internal error: {type(exc).__name__}", 500), status_code=500)

    middleware = []
    if cors_origin:
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["GET", "POST"],
                                     allow_headers=["authorization", "content-type"]))
    routes = [Route("/v1/models", guarded(list_models), methods=["GET"]),
              Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
              Route("/v1/completions", guarded(completions), methods=["POST"])]
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.engine = engine
    return app


# --- vLLM ---------------------------------------------------------------------------------------------


def visible_gpus() -> int:
    ids = os.environ.get("CUDA_VISIBLE_DEVICES")
    if ids is not None:
        return len([i for i in ids.split(",") if i.strip() and i.strip() != "-1"])
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no torch build with CUDA: one
        return 1


def jinja_template(prompt_type: str, lead: str = "") -> str | None:
    """Our instruct / chat template as a Jinja chat template for vLLM (prompt.py's texts, so the
    prompt is the one training saw); None for chat_template (the tokenizer's own is used). `lead`:
    the text of the special tokens build_prompt_ids puts first (LLaMA's BOS; none for SmolLM2), as
    vLLM tokenizes a rendered chat without adding special tokens."""
    import json as _json

    from prompt import CHAT_PREAMBLE, CHAT_TURN_SEPARATOR, CHAT_USER, INSTRUCT_NO_INPUT

    def lit(s: str) -> str:
        return _json.dumps(s)  # a JSON string is a valid Jinja string literal

    if prompt_type == "instruct":
        before, after = INSTRUCT_NO_INPUT.split("{instruction}")
        return ("{%- set q = (messages | selectattr('role', 'equalto', 'user') | list | last) -%}"
                f"{{{{ {lit(lead)} }}}}{{{{ {lit(before)} }}}}{{{{ q['content'] }}}}{{{{ {lit(after)} }}}}")
    if prompt_type == "chat":
        user_before, user_after = CHAT_USER.split("{input}")
        return (f"{{{{ {lit(lead)} }}}}"
                "{%- set ns = namespace(first=true) -%}"
                "{%- if messages[0]['role'] == 'system' -%}"
                "{{ messages[0]['content'].rstrip('\\n') + '\\n\\n' }}{%- else -%}"
                f"{{{{ {lit(CHAT_PREAMBLE)} }}}}{{%- endif -%}}"
                "{%- for m in messages if m['role'] != 'system' -%}"
                f"{{%- if m['role'] == 'user' -%}}{{%- if not ns.first -%}}{{{{ {lit(CHAT_TURN_SEPARATOR)} }}}}"
                f"{{%- endif -%}}{{{{ {lit(user_before)} + m['content'] + {lit(user_after)} }}}}"
                "{%- set ns.first = false -%}"
                "{%- else -%}{{ m['content'] + eos_token }}{%- endif -%}{%- endfor -%}")
    return None


def vllm_command(args, loras: list[tuple[str, str]], template_dir: str, n_gpus: int,
                 prompt_type_of=None, lead: str | None = None) -> list[str]:
    """The `vllm serve` command line for these flags. vLLM takes one chat template for all models
    (the base included): our adapters' template when they agree (and it is ours), else the
    tokenizer's. `lead`: the leading special tokens' text (default: read from the tokenizer)."""
    from models import resolve_model_path, resolve_prompt_type

    model = resolve_model_path(args.model_path) if prompt_type_of is None else args.model_path
    prompt_type_of = prompt_type_of or (lambda path: resolve_prompt_type(args.prompt_type, path, "instruct"))
    cmd = ["vllm", "serve", model, "--host", args.host, "--port", str(args.port),
           "--served-model-name", args.served_model_name or args.model_path,
           "--tensor-parallel-size", str(max(1, n_gpus))]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    if args.cors_origin:
        cmd += ["--allowed-origins", f'["{args.cors_origin}"]']
    if args.trust_remote_code:
        cmd.append("--trust-remote-code")
    if args.quant != "none":
        cmd += ["--quantization", "bitsandbytes"]
    if loras:
        types = {prompt_type_of(path) for _, path in loras}
        cmd += ["--enable-lora", "--lora-modules", *[f"{name}={path}" for name, path in loras]]
        if len(types) > 1:
            raise UserError(f"--engine vllm takes one chat template for every model, but the adapters were trained "
                            f"with {', '.join(sorted(types))}; serve them from separate servers")
        prompt_type = types.pop()
        if lead is None and prompt_type != "chat_template":
            from models import load_tokenizer
            from prompt import leading_special_ids

            tokenizer = load_tokenizer(model, args.trust_remote_code)
            lead = tokenizer.decode(leading_special_ids(tokenizer))
        template = jinja_template(prompt_type, lead or "")
        if template is not None:
            path = os.path.join(template_dir, "chat_template.jinja")
            with open(path, "w", encoding="utf-8") as f:
                f.write(template)
            cmd += ["--chat-template", path]
        ranks = []
        for _, path in loras:
            import json as _json

            try:
                with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
                    ranks.append(int(_json.load(f).get("r", 8)))
            except (OSError, ValueError, TypeError):
                pass
        cmd += ["--max-lora-rank", str(max([8] + ranks)), "--max-loras", str(len(loras))]
    return cmd


def run_vllm(args, loras) -> None:
    import tempfile

    if shutil.which("vllm") is None and not args.dry_run:
        raise UserError("--engine vllm needs vLLM: pip install vllm (GPUs); or use --engine hf")
    template_dir = tempfile.mkdtemp(prefix="vicuna-serve-")
    cmd = vllm_command(args, loras, template_dir, visible_gpus())
    shown = " ".join(c if c != args.api_key else "***" for c in cmd)
    if args.dry_run:
        print(" ".join(cmd))
        return
    logger.info("starting: %s", shown)
    os.execvp(cmd[0], cmd)


# --- main ---------------------------------------------------------------------------------------------


def check_port_free(host: str, port: int) -> None:
    """Refuse, before the model loads, an address this process cannot listen on."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {one_line(e)}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or one_line(e)}; "
                            "pick another --port (or PORT)") from None


def run(args) -> None:
    check_flags(args)
    loras = parse_loras(args.lora, args.lora_path)
    if args.engine == "vllm":
        return run_vllm(args, loras)
    import uvicorn

    check_port_free(args.host, args.port)

    model, tokenizer, served = load_served(args.model_path, loras, args.quant, args.prompt_type,
                                           args.served_model_name, args.trust_remote_code)
    engine = Engine(model, tokenizer, served, args.max_queue)
    app = build_app(engine, args.api_key, args.cors_origin, args.max_body_bytes)
    logger.info("serving %s on http://%s:%d/v1%s", ", ".join(served), args.host, args.port,
                " (API key required)" if args.api_key else "")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    except OSError as e:  # port taken, address not available
        raise UserError(f"cannot listen on {args.host}:{args.port}: {one_line(e)}") from None
    finally:
        engine.stop()


def main(argv: list[str] | None = None):
    setup_logging()
    args = build_parser().parse_args(argv)
    return cli_errors(run)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
