"""Gradio pieces shared by generate.py (QA page) and chat.py (chat page).

Server flags, the decoding controls (with the sampling sliders disabled unless sampling is on, so
no control is ever silently dead), per-session stop requests, request checks and a safe `launch`.

Gradio hands a handler whatever JSON a client posts (a hidden handler too: hiding it from
gradio_client does not hide it from HTTP). `guard_requests` checks every value against its
component (text of bounded length, a finite number within the slider, a bool, one of the
choices, a list of text chat messages) before gradio touches it, and turns every refusal into
a one-line error on the page: no traceback on the server, which keeps serving. The handlers
check their values again with the same functions, so they are safe without the guard too.
"""

from __future__ import annotations

import html
import math
import threading

import gradio as gr

from errors import one_line
from errors import UserError

# Decoding defaults shown on the pages (Chinese-Vicuna's sliders, with our defaults).
CONTROL_DEFAULTS = dict(temperature=0.7, top_p=0.9, top_k=40, num_beams=1, max_new_tokens=256,
                        min_new_tokens=1, repetition_penalty=1.1, do_sample=False)
CONTROL_ORDER = ("temperature", "top_p", "top_k", "num_beams", "max_new_tokens", "min_new_tokens",
                 "repetition_penalty", "do_sample")
# Slider ranges (a default outside one widens it) and labels; the server refuses values outside.
CONTROL_LIMITS = dict(temperature=(0.05, 2.0), top_p=(0.05, 1.0), top_k=(0, 100), num_beams=(1, 10),
                      max_new_tokens=(1, 2048), min_new_tokens=(1, 512), repetition_penalty=(1.0, 3.0))
CONTROL_LABELS = dict(temperature="Temperature", top_p="Top-p", top_k="Top-k (0 = off)", num_beams="Beams",
                      max_new_tokens="Max new tokens", min_new_tokens="Min new tokens",
                      repetition_penalty="Repetition penalty", do_sample="Sample (otherwise greedy / beam search)")
INTEGER_CONTROLS = {"top_k", "num_beams", "max_new_tokens", "min_new_tokens"}

MAX_INPUT_CHARS = 32768  # --max_input_chars: one message, instruction, input or instruction text
MAX_HISTORY_MESSAGES = 512  # --max_history_messages: chat messages (user and assistant) per request


def add_server_args(parser, port: int = 7860) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default: this machine only; 0.0.0.0 for the network)")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    parser.add_argument("--max_input_chars", type=int, default=MAX_INPUT_CHARS,
                        help="the page refuses a longer message, instruction, input or instruction text "
                             f"(default {MAX_INPUT_CHARS} characters)")


def parse_auth(auth: str | None):
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise UserError(f"--auth {auth!r}: write it as user:password")
    return (user, password)


def check_limit_flag(name: str, value: int) -> int:
    if value < 1:
        raise UserError(f"--{name} must be >= 1, got {value}")
    return value


def generation_controls(gr, defaults: dict | None = None) -> list:
    """Sliders and the do-sample box, in CONTROL_ORDER; sampling sliders follow the checkbox."""
    d = {**CONTROL_DEFAULTS, **(defaults or {})}

    def slider(name, step, **kwargs):
        low, high = CONTROL_LIMITS[name]
        return gr.Slider(min(low, d[name]), max(high, d[name]), step=step, value=d[name], label=CONTROL_LABELS[name],
                         **kwargs)

    with gr.Row():
        do_sample = gr.Checkbox(value=d["do_sample"], label=CONTROL_LABELS["do_sample"])
        num_beams = slider("num_beams", 1)
    with gr.Row():
        temperature = slider("temperature", 0.05, interactive=d["do_sample"])
        top_p = slider("top_p", 0.05, interactive=d["do_sample"])
        top_k = slider("top_k", 1, interactive=d["do_sample"])
    with gr.Row():
        max_new_tokens = slider("max_new_tokens", 1)
        min_new_tokens = slider("min_new_tokens", 1)
        repetition_penalty = slider("repetition_penalty", 0.05)
    sampling = [temperature, top_p, top_k]

    def follow_sampling(on):
        return [gr.update(interactive=on is True)] * 3

    do_sample.change(follow_sampling, inputs=do_sample, outputs=sampling, queue=False, api_visibility="private")
    return [temperature, top_p, top_k, num_beams, max_new_tokens, min_new_tokens, repetition_penalty, do_sample]


# --- checks of request values --------------------------------------------------------------------------


def _shown(value) -> str:
    """A short description of a refused value: numbers as they are, anything else by its type."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return {str: "text", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def check_number(label: str, value, low: float, high: float, integer: bool = False):
    """A finite number within [low, high] (a whole one when `integer`), else UserError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{label} must be a number from {low:g} to {high:g}, got {_shown(value)}")
    if not low <= value <= high:
        raise UserError(f"{label} must be from {low:g} to {high:g}, got {value:g}")
    if integer:
        if value != int(value):
            raise UserError(f"{label} must be a whole number, got {value:g}")
        return int(value)
    return float(value)


def check_bool(label: str, value) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{label} must be true or false, got {_shown(value)}")
    return value


def check_text(label: str, value, max_chars: int, flag: str = "--max_input_chars") -> str:
    """Text of at most max_chars characters (None is empty), else UserError."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{label} must be text, got {_shown(value)}")
    if len(value) > max_chars:
        raise UserError(f"{label} is {len(value)} characters; the limit is {max_chars} ({flag})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{label} is not valid Unicode text (it holds a lone surrogate); send UTF-8 text") from None
    return value


def check_choice(label: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise UserError(f"{label} must be one of: {', '.join(map(str, choices))}")
    return value


def check_history(value, max_messages: int, max_chars: int) -> list[dict]:
    """Chat messages as [{"role": "user" | "assistant", "content": str}], from gradio's messages
    (content a string or a list of {"type": "text", "text": ...} parts); refuses anything else."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"Chat history must be a list of messages, got {_shown(value)}")
    if len(value) > max_messages:
        raise UserError(f"the chat holds {len(value)} messages; the limit is {max_messages} "
                        "(--max_history_messages): press Clear history (Save chat first to keep it)")
    out = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise UserError(f"Chat history: message {i} must be an object with role user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            parts = [content]
        elif isinstance(content, list) and all(isinstance(p, dict) and p.get("type", "text") == "text"
                                               and isinstance(p.get("text"), str) for p in content):
            parts = [p["text"] for p in content]
        else:
            raise UserError(f"Chat history: message {i} must hold text only")
        out.append({"role": m["role"], "content": check_text(f"Chat history: message {i}", "".join(parts),
                                                             max_chars)})
    return out


def params_from_controls(values, components: list | None = None, seed: int | None = None):
    """Validated GenerationParams from the control values (in CONTROL_ORDER).

    Each value must lie within its slider (`components`, as generation_controls returned them;
    by default the standard ranges); a refusal names the control as the page labels it.
    """
    from streaming import GenerationParams

    values = list(values)
    if len(values) != len(CONTROL_ORDER):
        raise UserError(f"expected {len(CONTROL_ORDER)} generation settings ({', '.join(CONTROL_ORDER)}), "
                        f"got {len(values)}")
    v = {}
    for i, (name, value) in enumerate(zip(CONTROL_ORDER, values)):
        component = components[i] if components is not None else None
        label = getattr(component, "label", None) or CONTROL_LABELS[name]
        if name == "do_sample":
            v[name] = check_bool(label, value)
            continue
        low, high = ((component.minimum, component.maximum) if component is not None else CONTROL_LIMITS[name])
        v[name] = check_number(label, value, low, high, integer=name in INTEGER_CONTROLS)
    params = GenerationParams(**v, seed=seed)
    params.validate()
    return params


def page_error(e: BaseException) -> gr.Error:
    """A UserError as gradio shows it: a one-line message on the page, no traceback on the server."""
    return gr.Error(html.escape(str(e), quote=False), print_exception=False)


def _check_component_value(block, value, max_chars: int, max_messages: int):
    """The value a client sent for `block`, checked (UserError) and normalised for gradio."""
    label = getattr(block, "label", None) or type(block).__name__
    if isinstance(block, gr.Chatbot):
        return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                for m in check_history(value, max_messages, max_chars)]
    if isinstance(block, gr.Textbox):
        return check_text(label, value, max_chars)
    if isinstance(block, gr.Slider):
        check_number(label, value, block.minimum, block.maximum, integer=float(block.step or 0).is_integer()
                     and float(block.minimum).is_integer())
        return value
    if isinstance(block, gr.Checkbox):
        return check_bool(label, value)
    if isinstance(block, (gr.Radio, gr.Dropdown)):
        return check_choice(label, value, [choice for _, choice in block.choices])
    return value


def guard_requests(blocks, max_chars: int, max_messages: int = MAX_HISTORY_MESSAGES):
    """Check every request's input values before gradio preprocesses them (see the module doc).

    Gradio's own checks (a slider bound, a pydantic model) print a traceback and show a long
    message; ours refuse first with one line naming the control. Whatever still fails in gradio's
    preprocessing is shown as one line too, without a traceback.
    """
    original = blocks.preprocess_data

    async def preprocess_data(block_fn, inputs, *args, **kwargs):
        try:
            inputs = [_check_component_value(block, value, max_chars, max_messages)
                      for block, value in zip(block_fn.inputs, inputs)] + list(inputs[len(block_fn.inputs):])
            return await original(block_fn, inputs, *args, **kwargs)
        except UserError as e:
            raise page_error(e) from None
        except gr.Error as e:
            e.print_exception = False
            raise
        except Exception as e:  # noqa: BLE001 - a malformed request, not a bug of ours
            raise page_error(UserError(f"invalid request: {one_line(e)}")) from None

    blocks.preprocess_data = preprocess_data
    return blocks


def gets_request(fn):
    """Let gradio pass its gr.Request to fn's `request` parameter.

    Gradio finds that parameter by its type hint, but under `from __future__ import annotations`
    a hint is a string evaluated in the module's globals, where the pages' `gr` (imported inside
    build_page) is not: the hint would not resolve and `request` would be None, so every browser
    session would share one stop event. The pages' handlers carry no other hints.
    """
    fn.__annotations__ = {"request": gr.Request}
    return fn


class StopRegistry:
    """One cancel event per browser session, so Stop ends that session's generation only.

    The Stop button runs outside the queue (the queue is busy with the generation it stops).
    """

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str | None) -> threading.Event:
        """The cancel event of a new generation; one still running in this session is stopped (a
        Regenerate pressed mid-reply must not leave the old reply streaming beyond Stop's reach)."""
        event = threading.Event()
        with self._lock:
            previous = self._events.get(session or "")
            self._events[session or ""] = event
        if previous is not None:
            previous.set()
        return event

    def stop(self, session: str | None) -> bool:
        """Stop the session's generation; False when none was running."""
        with self._lock:
            event = self._events.get(session or "")
        if event is not None:
            event.set()
        return event is not None

    def stop_request(self, request: gr.Request):  # gradio injects the request by its annotation
        self.stop(session_of(request))

    def finish(self, session: str | None, event: threading.Event) -> None:
        event.set()
        with self._lock:
            if self._events.get(session or "") is event:
                del self._events[session or ""]


def session_of(request) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def launch(demo, args, **kwargs):
    """Queue (concurrent users wait their turn, never mixed), then serve on --host/--port."""
    demo.queue(default_concurrency_limit=1)
    # The pages take no files, but gradio's /gradio_api/upload route accepts them from any client:
    # cap what one request can put in gradio's temporary folder.
    kwargs.setdefault("max_file_size", MAX_UPLOAD_BYTES)
    return demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                       auth=parse_auth(args.auth), show_error=True, **kwargs)


MAX_UPLOAD_BYTES = 1024  # no page has a file input; gradio's upload route still exists
