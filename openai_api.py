"""The OpenAI API's request parsing and response shapes, for serve.py; no server, no torch.

    req = parse_chat(body, known_models)       # or parse_completion: an APIError (status, message, param)
    ids = chat_prompt_ids(req.messages, prompt_type, tokenizer)   # prompt.py's template, as training saw it
    params = generation_params(req, prompt_len, context)          # a validated GenerationParams

Bodies are checked field by field: a wrong type, an unknown role, empty messages or a parameter
we do not implement at a non-neutral value (`tools`, `logprobs: true`, `echo: true`, ...) is an
APIError with status 400 naming the field, never silently ignored. The extensions the pages have
(`top_k`, `repetition_penalty`, `min_tokens`, `num_beams`, `do_sample`) are accepted in the body
as vLLM accepts extra parameters. Absent knobs take `generation.GenerationParams`'s defaults
(greedy unless `temperature` > 0 or `do_sample`), so the API answers like the pages.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field, replace

from errors import UserError
from prompt import StopStringFilter

ROLES = ("system", "developer", "user", "assistant")

# Parameters accepted only at the neutral value clients send by default (absent or None is fine too).
NEUTRAL = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    "logit_bias": ({},),
    "parallel_tool_calls": (True, False),
    "tool_choice": ("none",),
    "tools": ([],),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "service_tier": ("auto", "default"),
    "modalities": (["text"],),
    "store": (False,),
    "reasoning_effort": (),
    "audio": (),
    "prediction": (),
    "web_search_options": (),
}
# Accepted and without effect on the answer (bookkeeping fields).
IGNORED = ("user", "metadata", "stream_options")
MAX_N = 8  # choices per request; generated one after another


class APIError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.status, self.param, self.code)


def error_body(message: str, status: int = 400, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": APIError.TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# --- the request -----------------------------------------------------------------------------------


@dataclass
class Request:
    """One parsed request of either endpoint."""

    kind: str  # "chat" or "completion"
    model: str
    messages: list[dict] = field(default_factory=list)  # chat: [{"role", "content": str}]
    prompt: str | list[int] | None = None  # completion: text or token ids
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    n: int = 1
    knobs: dict = field(default_factory=dict)  # GenerationParams fields the body set
    max_tokens: int | None = None


def parse_json(raw: bytes):
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad("the request body is not UTF-8") from None
    except ValueError as e:
        raise bad(f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise bad("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    try:  # JSON may spell lone surrogates (\ud800), which no tokenizer takes
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad("the request body holds a lone surrogate (\\ud800-\\udfff): not valid Unicode text") from None
    except (RecursionError, ValueError):
        raise bad("the request body is nested too deeply") from None
    return body


def _type_name(value) -> str:
    return "null" if value is None else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


def _number(body: dict, name: str, low=None, high=None, integer: bool = False):
    """body[name] as a number within [low, high], None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer()))):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {_type_name(value)} "
                  f"{json.dumps(value)[:40]}", name)
    if value != value or value in (float("inf"), float("-inf")):
        raise bad(f"'{name}' must be a finite number", name)
    if (low is not None and value < low) or (high is not None and value > high):
        where = f"at least {low}" if high is None else f"between {low} and {high}"
        raise bad(f"'{name}' must be {where}, got {value}", name)
    return int(value) if integer else float(value)


def _bool(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {_type_name(value)}", name)
    return value


def _check_neutral(body: dict) -> None:
    for name, neutral in NEUTRAL.items():
        if name not in body or body[name] is None:
            continue
        value = body[name]
        if any(value == v and type(value) is type(v) or (isinstance(v, (int, float)) and not isinstance(value, bool)
               and isinstance(value, (int, float)) and value == v) for v in neutral):
            continue
        raise bad(f"'{name}' is not supported by this server (got {json.dumps(value)[:60]}); "
                  f"leave it out{' or send ' + json.dumps(neutral[0]) if neutral else ''}", name,
                  "unsupported_parameter")


def _common(body: dict, kind: str, known_fields: set[str]) -> Request:
    unknown = sorted(set(body) - known_fields - set(NEUTRAL) - set(IGNORED))
    if unknown:
        raise bad(f"unknown parameter{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}", unknown[0],
                  "unsupported_parameter")
    _check_neutral(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: a name from GET /v1/models", "model")
    stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        extra = sorted(set(options) - {"include_usage", "continuous_usage_stats"})
        if extra:
            raise bad(f"unknown stream_options: {', '.join(extra)}", "stream_options")
        include_usage = bool(_bool(options, "include_usage"))
        if options.get("continuous_usage_stats"):
            raise bad("'stream_options.continuous_usage_stats' is not supported", "stream_options")
        if not stream:
            raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("'stop' must be a string or an array of strings", "stop")
    if len(stop) > 4 or any(not s for s in stop):
        raise bad("'stop' takes at most 4 non-empty strings", "stop")
    n = _number(body, "n", 1, None, integer=True)
    if n is not None and n > MAX_N:
        raise bad(f"'n' must be between 1 and {MAX_N} on this server, got {n}", "n")
    max_tokens = _number(body, "max_tokens", 1, None, integer=True)
    max_completion = _number(body, "max_completion_tokens", 1, None, integer=True)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise bad("'max_tokens' and 'max_completion_tokens' differ; send one", "max_completion_tokens")
    knobs = {}
    temperature = _number(body, "temperature", 0, 2)
    do_sample = _bool(body, "do_sample")
    if temperature is not None:
        if temperature == 0:
            if do_sample:
                raise bad("'do_sample': true needs 'temperature' above 0", "temperature")
            knobs["do_sample"] = False
        else:
            knobs.update(temperature=temperature, do_sample=True if do_sample is None else do_sample)
    elif do_sample is not None:
        knobs["do_sample"] = do_sample
    for name, low, high, integer in (("top_p", 0, 1, False), ("top_k", -1, None, True),
                                     ("repetition_penalty", 0, None, False), ("num_beams", 1, 16, True),
                                     ("seed", -2 ** 63, 2 ** 64 - 1, True), ("length_penalty", None, None, False)):
        value = _number(body, name, low, high, integer)
        if value is not None:
            knobs[name] = 0 if (name == "top_k" and value == -1) else value  # vLLM: -1 = all
    if knobs.get("seed") is not None:
        knobs["seed"] = int(knobs["seed"]) % 2 ** 32
    if "top_p" in knobs and knobs["top_p"] == 0:
        raise bad("'top_p' must be above 0", "top_p")
    if "repetition_penalty" in knobs and knobs["repetition_penalty"] == 0:
        raise bad("'repetition_penalty' must be above 0", "repetition_penalty")
    min_tokens = _number(body, "min_tokens", 0, None, integer=True)
    if min_tokens is not None:
        knobs["min_new_tokens"] = min_tokens
    return Request(kind=kind, model=model, stream=stream, include_usage=include_usage, stop=stop, n=n or 1,
                   knobs=knobs, max_tokens=max_tokens if max_tokens is not None else max_completion)


COMMON_FIELDS = {"model", "stream", "stop", "n", "max_tokens", "temperature", "top_p", "top_k", "seed",
                 "repetition_penalty", "min_tokens", "num_beams", "do_sample", "length_penalty"}


def message_text(content, i: int) -> str:
    """A message's content: a string or an array of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise bad(f"messages[{i}].content: only text parts are supported, got {json.dumps(kind)[:40]}",
                          f"messages[{i}].content")
            out.append(part["text"])
        return "".join(out)
    raise bad(f"messages[{i}].content must be a string or an array of text parts, got {_type_name(content)}",
              f"messages[{i}].content")


def parse_chat(body: dict) -> Request:
    req = _common(body, "chat", COMMON_FIELDS | {"messages", "max_completion_tokens"})
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad("'messages' is required: an array of {role, content} objects", "messages")
    if not messages:
        raise bad("'messages' is empty; send at least one user message", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}",
                      f"messages[{i}].role")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise bad(f"messages[{i}]: {', '.join(extra)} not supported (no tools)", f"messages[{i}]")
        out.append({"role": "system" if role == "developer" else role, "content": message_text(m.get("content"), i)})
    req.messages = out
    conversation(out)  # shape errors now, before the model is looked up
    return req


def parse_completion(body: dict) -> Request:
    req = _common(body, "completion", COMMON_FIELDS | {"prompt"})
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        pass
    elif not isinstance(prompt, str):
        raise bad("'prompt' must be a string, an array of token ids or an array of one of these "
                  "(one prompt per request)", "prompt")
    if not prompt:
        raise bad("'prompt' is empty", "prompt")
    req.prompt = prompt
    return req


# --- prompts ----------------------------------------------------------------------------------------


def conversation(messages: list[dict]):
    """(system or None, [(user, assistant), ...] ending with (question, None)) from chat messages:
    system messages first, then user and assistant alternating, ending with a user message."""
    from prompt import Conversation

    system = []
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        system.append(messages[i]["content"])
        i += 1
    turns = []
    expect = "user"
    for j in range(i, len(messages)):
        role = messages[j]["role"]
        if role == "system":
            raise bad(f"messages[{j}]: a system message must come before the conversation", f"messages[{j}].role")
        if role != expect:
            raise bad(f"messages[{j}]: expected a {expect} message (user and assistant alternate), got {role}",
                      f"messages[{j}].role")
        if role == "user":
            turns.append([messages[j]["content"], None])
        else:
            turns[-1][1] = messages[j]["content"]
        expect = "assistant" if role == "user" else "user"
    if not turns or turns[-1][1] is not None:
        raise bad("the last message must be a user message (the question to answer)", "messages")
    return Conversation(turns=[tuple(t) for t in turns], system="\n\n".join(system) if system else None)


def chat_prompt_ids(messages: list[dict], prompt_type: str, tokenizer) -> list[int]:
    """The prompt ids of a chat request in the adapter's template (prompt.build_prompt_ids). The
    instruct template holds one question, so, as on the chat page, only the last one is sent."""
    from prompt import Conversation, build_prompt_ids

    conv = conversation(messages)
    if prompt_type == "instruct":
        conv = Conversation(turns=[conv.turns[-1]], system=conv.system)
    return build_prompt_ids(prompt_type, conv, tokenizer)


def completion_prompt_ids(prompt, tokenizer) -> list[int]:
    """A raw completion prompt: token ids as given, text with the tokenizer's own special tokens (BOS)."""
    if isinstance(prompt, list):
        vocab = len(tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise bad(f"'prompt' has token ids outside the vocabulary (0..{vocab - 1})", "prompt")
        return list(prompt)
    return list(tokenizer(prompt)["input_ids"])


# --- generation parameters -------------------------------------------------------------------------

FLAG_NAMES = {"--max_new_tokens": "max_tokens", "--min_new_tokens": "min_tokens", "drop --do_sample": "use 0",
              "--do_sample": "do_sample"}


def generation_params(req: Request, prompt_len: int, context: int | None):
    """A validated GenerationParams for the request. Without max_tokens: the defaults' max_new_tokens,
    or what is left of the context when that is less. A prompt plus max_tokens beyond the context is
    a 400 naming both numbers."""
    from generation import GenerationParams

    params = GenerationParams()
    knobs = dict(req.knobs)
    if req.max_tokens is not None:
        knobs["max_new_tokens"] = req.max_tokens
    elif context is not None:
        knobs["max_new_tokens"] = max(1, min(params.max_new_tokens, context - prompt_len))
    if context is not None and prompt_len + knobs["max_new_tokens"] > context:
        raise bad(f"the prompt is {prompt_len} tokens and max_tokens is {knobs['max_new_tokens']}: "
                  f"{prompt_len + knobs['max_new_tokens']} tokens exceed the model's context of {context} tokens; "
                  "shorten the messages or lower max_tokens", "max_tokens", "context_length_exceeded")
    params = replace(params, **knobs)
    params = replace(params, min_new_tokens=min(params.min_new_tokens, params.max_new_tokens))
    try:
        params.validate()
    except UserError as e:
        message = str(e)
        for flag, name in FLAG_NAMES.items():
            message = message.replace(flag, name)
        raise bad(message.replace("--", "")) from None
    return params


# --- streamed text ---------------------------------------------------------------------------------


class TextCutter(StopStringFilter):
    """The answer to show from the generated text so far: cut at the first stop marker (the
    request's), holding back a tail that may be the start of one, and without leading or trailing
    whitespace when `strip`. What it returns only grows (each result is a prefix of the next), so
    streamed deltas never need taking back, and the last result equals the non-streamed answer."""

    def __init__(self, markers: list[str], strip: bool = True):
        super().__init__(markers=markers)
        self.strip = strip

    def update(self, text: str, final: bool = False) -> str:
        shown = self.visible(text, final)
        return shown.strip() if self.strip else shown


# --- responses -------------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(req: Request, rid: str, created: int, choices: list[tuple[str, str]], use: dict) -> dict:
    """A non-streamed answer; `choices`: (text, finish_reason) per choice."""
    out = []
    for i, (text, finish_reason) in enumerate(choices):
        if req.kind == "chat":
            out.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": finish_reason})
        else:
            out.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason})
    obj = "chat.completion" if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": out, "usage": use}


def chunk(req: Request, rid: str, created: int, text: str | None = None, finish_reason: str | None = None,
          role: bool = False, use: dict | None = None, index: int = 0) -> dict:
    """One streamed chunk of choice `index`: a text delta, the finish reason (with an empty delta),
    or, with `use`, the usage chunk that has no choices."""
    if use is not None:
        choices = []
    elif req.kind == "chat":
        delta = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        choices = [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    out = {"id": rid, "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
           "created": created, "model": req.model, "choices": choices}
    if req.include_usage:
        out["usage"] = use
    return out


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def models_list(names: list[str], owner: str = "vicuna-lora") -> dict:
    now = int(time.time())
    return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": owner}
                                       for n in names]}
