"""Page plumbing shared by generate.py (QA page) and chat.py (chat page).

Server flags, the decoding controls (starting values, ranges and labels from GenerationParams,
with the sampling sliders disabled unless sampling is on, so no control is ever silently dead),
per-session stop requests, request checks and a safe `launch`.

gradio is imported only inside the functions that build or serve a page, never at import: the
parsers (add_server_args, the caps, parse_auth, HelpFormatter) and the value checks cost nothing,
so `--help` and `chat.py --cli` never load gradio.

Gradio hands a handler whatever JSON a client posts (a hidden handler too: hiding it from
gradio_client does not hide it from HTTP). `guard_requests` checks every value against its
component (text of bounded length, a finite number within the slider, a bool, one of the
choices, a list of text chat messages) before gradio touches it, and turns every refusal into
a one-line error on the page: no traceback on the server, which keeps serving. The handlers
check their values again with the same functions, so they are safe without the guard too.
"""

from __future__ import annotations

import argparse
import html
import threading

from errors import UserError, check_bool, check_number, one_line, shown

MAX_INPUT_CHARS = 32768  # --max_input_chars: one message, instruction, input or instruction text
MAX_HISTORY_MESSAGES = 512  # --max_history_messages: chat messages (user and assistant) per request
MAX_UPLOAD_BYTES = 1024  # no page has a file input; gradio's upload route still exists


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The page scripts' --help: the docstring as written, and every flag's default (unless its
    help already says what the default is)."""

    def _get_help_string(self, action):
        if action.help and "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def add_server_args(parser, port: int = 7860) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on: 127.0.0.1 is this machine only, 0.0.0.0 the network")
    parser.add_argument("--port", type=int, default=port, help="port of the page")
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    parser.add_argument("--max_input_chars", type=int, default=MAX_INPUT_CHARS,
                        help="the page refuses a longer message, instruction, input or instruction text (characters)")


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


def generation_controls(gr, start=None) -> list:
    """Sliders and the do-sample box in GenerationParams.CONTROLS order, starting at `start`'s
    values (GenerationParams(); a value outside a control's range widens it); sampling sliders
    follow the checkbox."""
    from generation import GenerationParams

    start = start or GenerationParams()

    def slider(name, **kwargs):
        label, low, high, step = GenerationParams.control(name)
        value = getattr(start, name)
        return gr.Slider(min(low, value), max(high, value), step=step, value=value, label=label, **kwargs)

    with gr.Row():
        do_sample = gr.Checkbox(value=start.do_sample, label=GenerationParams.control("do_sample")[0])
        num_beams = slider("num_beams")
    with gr.Row():
        temperature = slider("temperature", interactive=start.do_sample)
        top_p = slider("top_p", interactive=start.do_sample)
        top_k = slider("top_k", interactive=start.do_sample)
    with gr.Row():
        max_new_tokens = slider("max_new_tokens")
        min_new_tokens = slider("min_new_tokens")
        repetition_penalty = slider("repetition_penalty")
    sampling = [temperature, top_p, top_k]

    def follow_sampling(on):
        return [gr.update(interactive=on is True)] * 3

    do_sample.change(follow_sampling, inputs=do_sample, outputs=sampling, queue=False, api_visibility="private")
    controls = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "num_beams": num_beams,
                "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens,
                "repetition_penalty": repetition_penalty, "do_sample": do_sample}
    return [controls[name] for name in GenerationParams.CONTROLS]


# --- checks of request values --------------------------------------------------------------------------


def check_text(label: str, value, max_chars: int, flag: str = "--max_input_chars") -> str:
    """Text of at most max_chars characters (None is empty), else UserError."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{label} must be text, got {shown(value)}")
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
        raise UserError(f"Chat history must be a list of messages, got {shown(value)}")
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


def page_error(e: BaseException):
    """A UserError as gradio shows it (a gr.Error): a one-line message on the page, no traceback
    on the server."""
    import gradio as gr

    return gr.Error(html.escape(str(e), quote=False), print_exception=False)


def _check_component_value(gr, block, value, max_chars: int, max_messages: int):
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
    import gradio as gr

    original = blocks.preprocess_data

    async def preprocess_data(block_fn, inputs, *args, **kwargs):
        try:
            inputs = [_check_component_value(gr, block, value, max_chars, max_messages)
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
    """Let gradio pass its gr.Request to fn's `request` parameter (fn: a function or a method).

    Gradio finds that parameter by its type hint, but under `from __future__ import annotations`
    a hint is a string evaluated in the function's module, where gradio is not imported (it loads
    only when a page starts): the hint would not resolve and `request` would be None, so every
    browser session would share one stop event. The pages' handlers carry no other hints.
    """
    import gradio as gr

    getattr(fn, "__func__", fn).__annotations__ = {"request": gr.Request}
    return fn


class StopRegistry:
    """The running generation of each browser session, so Stop ends that session's generation only.

    A generation is a cancel event (`start(session)` makes one) or any object with a `stop()`
    method (the chat page registers its ChatSession, so Clear can find it too). The Stop button
    runs outside the queue (the queue is busy with the generation it stops); page scripts wire it
    as `gets_request(stops.stop_request)`.
    """

    def __init__(self):
        self._jobs: dict[str, object] = {}
        self._lock = threading.Lock()

    def start(self, session: str | None, job=None):
        """Register a new generation (`job`, by default a new cancel event, which is returned); one
        still running in this session is stopped (a Regenerate pressed mid-reply must not leave
        the old reply streaming beyond Stop's reach)."""
        job = threading.Event() if job is None else job
        with self._lock:
            previous = self._jobs.get(session or "")
            self._jobs[session or ""] = job
        if previous is not None:
            _stop(previous)
        return job

    def running(self, session: str | None):
        """The session's running generation, or None."""
        with self._lock:
            return self._jobs.get(session or "")

    def stop(self, session: str | None) -> bool:
        """Stop the session's generation; False when none was running."""
        job = self.running(session)
        if job is not None:
            _stop(job)
        return job is not None

    def stop_request(self, request=None):  # gradio passes the request once gets_request marked it
        self.stop(session_of(request))

    def finish(self, session: str | None, job) -> None:
        _stop(job)
        with self._lock:
            if self._jobs.get(session or "") is job:
                del self._jobs[session or ""]


def _stop(job) -> None:
    job.set() if isinstance(job, threading.Event) else job.stop()


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
