"""Gradio pieces shared by generate.py (QA page) and chat.py (chat page).

Server flags, the decoding controls (with the sampling sliders disabled unless sampling is on, so
no control is ever silently dead), per-session stop requests and a safe `launch`.
"""

from __future__ import annotations

import threading

import gradio as gr

from utils import UserError

# Decoding defaults shown on the pages (Chinese-Vicuna's sliders, with our defaults).
CONTROL_DEFAULTS = dict(temperature=0.7, top_p=0.9, top_k=40, num_beams=1, max_new_tokens=256,
                        min_new_tokens=1, repetition_penalty=1.1, do_sample=False)
CONTROL_ORDER = ("temperature", "top_p", "top_k", "num_beams", "max_new_tokens", "min_new_tokens",
                 "repetition_penalty", "do_sample")


def add_server_args(parser, port: int = 7860) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default: this machine only; 0.0.0.0 for the network)")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")


def parse_auth(auth: str | None):
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise UserError(f"--auth {auth!r}: write it as user:password")
    return (user, password)


def generation_controls(gr, defaults: dict | None = None) -> list:
    """Sliders and the do-sample box, in CONTROL_ORDER; sampling sliders follow the checkbox."""
    d = {**CONTROL_DEFAULTS, **(defaults or {})}
    with gr.Row():
        do_sample = gr.Checkbox(value=d["do_sample"], label="Sample (otherwise greedy / beam search)")
        num_beams = gr.Slider(1, 10, step=1, value=d["num_beams"], label="Beams")
    with gr.Row():
        temperature = gr.Slider(0.05, 2.0, step=0.05, value=d["temperature"], label="Temperature",
                                interactive=d["do_sample"])
        top_p = gr.Slider(0.05, 1.0, step=0.05, value=d["top_p"], label="Top-p", interactive=d["do_sample"])
        top_k = gr.Slider(0, 100, step=1, value=d["top_k"], label="Top-k (0 = off)", interactive=d["do_sample"])
    with gr.Row():
        max_new_tokens = gr.Slider(1, 2048, step=1, value=d["max_new_tokens"], label="Max new tokens")
        min_new_tokens = gr.Slider(1, 512, step=1, value=d["min_new_tokens"], label="Min new tokens")
        repetition_penalty = gr.Slider(1.0, 3.0, step=0.05, value=d["repetition_penalty"],
                                       label="Repetition penalty")
    sampling = [temperature, top_p, top_k]
    do_sample.change(lambda on: [gr.update(interactive=on)] * 3, inputs=do_sample, outputs=sampling,
                     queue=False, api_visibility="private")
    return [temperature, top_p, top_k, num_beams, max_new_tokens, min_new_tokens, repetition_penalty, do_sample]


def params_from_controls(values, seed: int | None = None):
    """GenerationParams from the control values (in CONTROL_ORDER)."""
    from streaming import GenerationParams

    v = dict(zip(CONTROL_ORDER, values))
    params = GenerationParams(
        temperature=float(v["temperature"]), top_p=float(v["top_p"]), top_k=int(v["top_k"]),
        num_beams=int(v["num_beams"]), max_new_tokens=int(v["max_new_tokens"]),
        min_new_tokens=int(v["min_new_tokens"]), repetition_penalty=float(v["repetition_penalty"]),
        do_sample=bool(v["do_sample"]), seed=seed)
    params.validate()
    return params


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

    def stop(self, session: str | None) -> None:
        with self._lock:
            event = self._events.get(session or "")
        if event is not None:
            event.set()

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
    return demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                       auth=parse_auth(args.auth), show_error=True, **kwargs)
