"""Multi-turn chat with a base model and an optional LoRA adapter, streaming as it generates.

    python chat.py                            # gradio chat page on http://127.0.0.1:7860
    python chat.py --lora_path lora-Vicuna-chat --port 7861
    python chat.py --cli                      # terminal chat; /clear resets, /exit quits

History is kept within --max_memory tokens (room for --max_new_tokens included, and never more
than the model's context): the oldest turns are dropped first and the current question is never
dropped; a question that alone cannot be answered within the context is refused with the
numbers. The page has Submit/Stop, Regenerate, Clear, Reset parameters and Save chat (appending
to a .jsonl file inside --save_dir, never elsewhere), a choice of instruction (system prompt) and
prompt template, and a named API endpoint `/chat` that streams the reply. The page refuses a
message longer than --max_input_chars and a history longer than --max_history_messages. The
generation flags are also the page's starting values (and what Reset parameters restores).

One conversation is a `ChatSession` (respond, regenerate, stop, clear, the history budget, save):
--cli keeps one for the whole run; the page, whose browser holds the history, makes one per
request from the history it sends. gradio loads only when the page starts.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import re
import stat
import sys
import threading
from typing import Iterator

from errors import UserError, check_utf8, cli_errors, setup_logging
from generation import GenerationParams
from models import add_model_args, load_for_inference, resolve_prompt_type
from prompt import STOP_STRINGS, Conversation, StopStringFilter, fit_history
from webui import MAX_HISTORY_MESSAGES, HelpFormatter, add_server_args

SAVE_FILE = "chat_history.jsonl"  # the page's default file name inside --save_dir
SAVE_NAME = re.compile(r"\w[\w.-]{0,122}\.jsonl")  # a plain file name: no folder, no "..", no leading "."
PROMPT_CHOICES = ["chat", "chat_template", "instruct"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    GenerationParams.add_args(p)
    p.add_argument("--cli", action="store_true", help="chat in the terminal")
    p.add_argument("--max_memory", type=int, default=1024,
                   help="history budget in tokens, including room for --max_new_tokens (at most the model's context)")
    p.add_argument("--system", default=None, help="instruction / system prompt replacing the default preamble")
    p.add_argument("--save_dir", default="chat_logs",
                   help="the only folder the page's Save chat writes to: it appends to a .jsonl file named on "
                        f"the page ({SAVE_FILE} unless named)")
    add_server_args(p)
    p.add_argument("--max_history_messages", type=int, default=MAX_HISTORY_MESSAGES,
                   help="the page refuses a longer chat history (messages)")
    return p


# Instructions offered on the page; "Template default" keeps the template's own preamble/system.
SYSTEM_PRESETS = {
    "Template default": "",
    "Helpful assistant": "You are a helpful, honest assistant. Answer clearly and concisely.",
    "中文助手": "你是一个乐于助人的中文助手，回答准确、简洁、有条理。",
    "Translator zh<->en": "You translate between Chinese and English. Reply with the translation only.",
    "Code helper": "You are an expert programmer. Answer with short explanations and correct, runnable code.",
}


def chat_prompt_ids(model, tokenizer, prompt_type: str, history: list[tuple[str, str]], question: str,
                    max_new_tokens: int, max_memory: int, system: str | None = None,
                    new_name: str = "max new tokens") -> list[int]:
    """The prompt ids for `question` after `history`, trimmed to max_memory; refuses (UserError,
    with the numbers) a question that cannot be answered within the model's context.

    The instruct template has no turns, so with it only the current question is sent.
    """
    from generation import check_context

    if prompt_type == "instruct":
        history = []
    conv = Conversation(turns=history + [(question, None)], system=system or None)
    _, ids = fit_history(prompt_type, conv, tokenizer, max_memory, max_new_tokens)
    check_context(model, len(ids), max_new_tokens, prompt="the question (with the instruction and template)",
                  new_name=new_name, fix="shorten the question")
    return ids


def reply_stream(model, tokenizer, prompt_type: str, history: list[tuple[str, str]], question: str,
                 params, max_memory: int, system: str | None = None, cancel=None, ids: list[int] | None = None):
    """Yield the growing reply to `question` given the history; the core of every chat front end.

    `ids`: the prompt, when chat_prompt_ids already built it.
    """
    from generation import stream_generate

    if ids is None:
        ids = chat_prompt_ids(model, tokenizer, prompt_type, history, question, params.max_new_tokens, max_memory,
                              system)
    stop = StopStringFilter(prompt_type)
    text = ""
    for update in stream_generate(model, tokenizer, ids, params, STOP_STRINGS[prompt_type], cancel):
        text = update.text
        yield stop.update(text)
        if stop.done:
            break
    yield stop.update(text, final=True)


def message_text(content) -> str:
    """The text of a chatbot message: gradio 6 hands content back as [{"type": "text", "text"}]."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return str(content)


def pairs(messages: list[dict]) -> list[tuple[str, str]]:
    """Chatbot messages [{"role", "content"}, ...] -> completed (user, assistant) turns."""
    out, user = [], None
    for m in messages:
        content = message_text(m["content"])
        if m["role"] == "user":
            user = content
        elif m["role"] == "assistant" and user is not None:
            out.append((user, content))
            user = None
    return out


def check_max_memory(model, max_memory: int) -> int:
    """--max_memory within the model's context."""
    from generation import model_context

    context = model_context(model)
    if context is not None and max_memory > context:
        raise UserError(f"--max_memory {max_memory} exceeds the model's context of {context} tokens "
                        "(max_position_embeddings); lower --max_memory")
    return max_memory


def check_save_dir(save_dir: str, lora_path: str | None) -> str:
    """The folder to save chats in, resolved; refuses `/` and anything inside the adapter folder."""
    if not save_dir or not save_dir.strip():
        raise UserError("--save_dir is empty; choose a folder to save chats in")
    path = os.path.realpath(os.path.expanduser(save_dir.strip()))
    if path == os.path.realpath("/"):
        raise UserError("refusing to save chats in /; choose a folder of your own with --save_dir")
    if lora_path:
        lora = os.path.realpath(lora_path)
        if path == lora or path.startswith(lora + os.sep):
            raise UserError(f"refusing to save chats inside the adapter folder {lora_path}; choose another --save_dir")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--save_dir {save_dir} is a file, not a folder; choose a folder")
    return path


def check_save_name(name) -> str:
    """A plain .jsonl file name (the page's Save as box); empty means chat_history.jsonl."""
    if name is None or (isinstance(name, str) and not name.strip()):
        return SAVE_FILE
    if not isinstance(name, str) or not SAVE_NAME.fullmatch(name.strip()):
        raise UserError(f"Save as: give a plain file name ending in .jsonl, like {SAVE_FILE} (letters, digits, "
                        "'_', '-', '.'; no folder): chats are saved in the server's --save_dir only")
    return name.strip()


def save_chat(save_dir: str, record: dict, lora_path: str | None = None, name: str = SAVE_FILE) -> str:
    """Append one conversation as a JSON line to the file `name` directly inside `save_dir`.

    Returns the file's full path. Only that folder is ever written: the name is a plain file
    name, the file is opened relative to the folder without following a symbolic link, and an
    existing file must be a plain file with no other hard link.
    """
    folder = check_save_dir(save_dir, lora_path)
    name = check_save_name(name)
    os.makedirs(folder, exist_ok=True)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    path = os.path.join(folder, name)
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        what = "a symbolic link" if os.path.islink(path) else "not a plain file"
        raise UserError(f"{name} in the save folder is {what}; choose another name")
    try:
        if os.open in os.supports_dir_fd:
            folder_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
            try:
                fd = os.open(name, flags, 0o644, dir_fd=folder_fd)
            finally:
                os.close(folder_fd)
        else:
            if os.path.islink(path):
                raise OSError(errno.ELOOP, "symbolic link")
            fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # swapped for a link or a pipe since the check above
            raise UserError(f"{name} in the save folder is not a plain file; choose another name") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise UserError(f"{name} in the save folder is not a plain file; choose another name")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            fd = None
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if fd is not None:
            os.close(fd)
    return path


def user_message(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": text}


class ChatSession:
    """One conversation and what can be done with it; the page and --cli are wiring over it.

    `messages` is the conversation as shown ([{"role": "user" | "assistant", "content": str}]);
    the prompt is built from its completed (question, answer) turns within `max_memory` tokens
    (`prompt_ids`: the oldest turns are dropped first, the current question never). `respond`
    streams a reply and keeps it in `messages` as it grows; `regenerate` answers the last question
    again in place of its answer; `stop` ends the reply within one step (the partial answer stays);
    `clear` ends it too and empties the conversation; `save` appends it to a .jsonl file.

    stop() and clear() may come from another thread while respond() streams (the page's Stop and
    Clear buttons run outside its queue). A reply that fails (UserError, out of memory) leaves
    `messages` as they were. `cli`: errors name the command-line flags, not the page's controls.
    """

    def __init__(self, model, tokenizer, prompt_type: str, max_memory: int, params: GenerationParams | None = None,
                 system: str | None = None, messages: list[dict] | None = None, cli: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.prompt_type = prompt_type
        self.max_memory = max_memory
        self.params = params or GenerationParams()
        self.system = system
        self.messages: list[dict] = [dict(m) for m in messages or []]
        self.cli = cli
        self.cleared = False  # clear() ended the last reply
        self._cancel: threading.Event | None = None  # the running reply's
        self._lock = threading.Lock()

    @property
    def turns(self) -> list[tuple[str, str]]:
        """The completed (question, answer) turns."""
        return pairs(self.messages)

    def prompt_ids(self, question: str) -> list[int]:
        """The prompt for `question` after the history, within the budget; UserError (with the
        numbers) for settings that leave no room or a question beyond the model's context."""
        new_name, memory_name = ("--max_new_tokens", "--max_memory") if self.cli else ("max new tokens", "max memory")
        if self.max_memory <= self.params.max_new_tokens:
            raise UserError(f"{memory_name} {self.max_memory} leaves no room beyond {new_name} "
                            f"{self.params.max_new_tokens}; raise it")
        return chat_prompt_ids(self.model, self.tokenizer, self.prompt_type, self.turns, question,
                               self.params.max_new_tokens, self.max_memory, self.system, new_name=new_name)

    def respond(self, question: str, ids: list[int] | None = None) -> Iterator[str]:
        """Stream the reply to `question` (the growing text, stop markers cut); the question and
        the reply join `messages` as it grows. A reply still running in this session stops.

        `ids`: the prompt, when prompt_ids already built it. Errors surface on the first next().
        """
        cancel = threading.Event()  # made now, so a stop() before the first next() counts
        with self._lock:
            previous, self._cancel = self._cancel, cancel
            self.cleared = False
        if previous is not None:
            previous.set()
        return self._stream(question, ids, cancel)

    def _stream(self, question: str, ids: list[int] | None, cancel: threading.Event) -> Iterator[str]:
        added = False
        try:
            if ids is None:
                ids = self.prompt_ids(question)
            replies = reply_stream(self.model, self.tokenizer, self.prompt_type, [], question, self.params,
                                   self.max_memory, self.system, cancel, ids=ids)
            with self._lock:
                if self.cleared:
                    return
                self.messages += [user_message(question), assistant_message("")]
                added = True
            for text in replies:
                with self._lock:
                    if self.cleared:
                        return  # the conversation is gone: nothing to show or keep
                    self.messages[-1] = assistant_message(text)
                yield text
        except Exception:
            with self._lock:
                if added and not self.cleared:
                    del self.messages[-2:]
            raise
        finally:
            with self._lock:
                if self._cancel is cancel:
                    self._cancel = None

    def regenerate(self) -> Iterator[str]:
        """Answer the last question again: its answer (any trailing assistant messages) and the
        question leave `messages`, and `respond` streams a new answer. Nothing to regenerate (no
        question): `messages` ends empty and nothing is streamed."""
        question = self.pop_last_question()
        return self.respond(question) if question is not None else iter(())

    def pop_last_question(self) -> str | None:
        """Remove the trailing answers and the last question from `messages`; the question."""
        with self._lock:
            while self.messages and self.messages[-1]["role"] == "assistant":
                self.messages.pop()
            return self.messages.pop()["content"] if self.messages else None

    def stop(self) -> bool:
        """End the running reply within one step (its text so far stays); False when none runs."""
        with self._lock:
            cancel = self._cancel
        if cancel is not None:
            cancel.set()
        return cancel is not None

    def clear(self) -> None:
        """Forget the conversation; a reply still streaming ends and adds nothing."""
        with self._lock:
            cancel = self._cancel
            self.messages = []
            self.cleared = cancel is not None
        if cancel is not None:
            cancel.set()

    def record(self, info: dict | None = None) -> dict:
        """The conversation as Save chat writes it: time, `info` (model, adapter...), settings."""
        return {"time": datetime.datetime.now().isoformat(timespec="seconds"), **(info or {}),
                "prompt_type": self.prompt_type, "system": self.system, "max_memory": self.max_memory,
                "parameters": {k: getattr(self.params, k) for k in GenerationParams.CONTROLS},
                "conversation": [dict(m) for m in self.messages]}

    def save(self, save_dir: str, name: str = SAVE_FILE, lora_path: str | None = None,
             info: dict | None = None) -> str | None:
        """Append `record(info)` to the file `name` inside `save_dir` (save_chat's rules: never
        inside `lora_path`); returns its path, or None when there is nothing to save yet."""
        if not self.messages:
            return None
        return save_chat(save_dir, self.record(info), lora_path, name)


def build_page(model, tokenizer, args, default_prompt_type: str, title: str):
    """The chat page: checks the values each request sends, makes a ChatSession of them, shows
    its messages as they grow. The controls start at the flags' values."""
    import gradio as gr

    from generation import model_context
    from webui import (MAX_INPUT_CHARS, StopRegistry, check_choice, check_history, check_number, check_text,
                       generation_controls, gets_request, guard_requests, page_error, session_of)

    stops = StopRegistry()  # the running ChatSession of each browser session, for Stop and Clear
    start = GenerationParams.from_args(args)
    model_info = {"model_path": args.model_path, "lora_path": args.lora_path, "quant": args.quant}
    save_root = check_save_dir(args.save_dir, args.lora_path)
    max_chars = getattr(args, "max_input_chars", MAX_INPUT_CHARS)
    max_messages = getattr(args, "max_history_messages", MAX_HISTORY_MESSAGES)
    context = model_context(model)
    memory_range = (min(128, args.max_memory), context or max(8192, args.max_memory))

    def session(messages, system, prompt_type, max_memory, controls) -> ChatSession:
        """A ChatSession of checked values (UserError names the control)."""
        system = check_text("Instruction text", system, max_chars)
        prompt_type = check_choice("Prompt template", prompt_type, PROMPT_CHOICES)
        max_memory = check_number("Max memory", max_memory, *memory_range, integer=True)
        params = GenerationParams.from_controls(controls, control_components, seed=start.seed)
        return ChatSession(model, tokenizer, prompt_type, max_memory, params, system, messages)

    def stream_reply(chat: ChatSession, question: str, request):
        """Yield ("", the messages) as the reply grows; an error becomes the reply."""
        before = list(chat.messages)
        replies = chat.respond(question)
        key = session_of(request)
        stops.start(key, chat)
        try:
            for _ in replies:
                yield "", list(chat.messages)
            if chat.cleared:  # Clear stopped this reply: its last update must not refill the chat
                yield "", []
        except UserError as e:  # settings that cannot work together, a question beyond the context
            yield "", before + [user_message(question), assistant_message(f"**Error:** {e}")]
        except Exception as e:  # out of memory: show it in the chat, keep serving
            _free_memory()
            yield "", before + [user_message(question), assistant_message(f"**Error:** {type(e).__name__}: {e}")]
        finally:
            stops.finish(key, chat)

    @gets_request
    def respond(message, history, system, prompt_type, max_memory, temperature, top_p, top_k, num_beams,
                max_new_tokens, min_new_tokens, repetition_penalty, do_sample, request=None):
        """Stream the reply to `message` after `history`; yields ("", history + the growing reply)."""
        controls = (temperature, top_p, top_k, num_beams, max_new_tokens, min_new_tokens, repetition_penalty,
                    do_sample)
        try:
            history = check_history(history, max_messages, max_chars)
            message = check_text("Message", message, max_chars).strip()
            chat = session(history, system, prompt_type, max_memory, controls)
        except UserError as e:
            raise page_error(e) from None
        if not message:
            yield "", history
            return
        yield from stream_reply(chat, message, request)

    @gets_request
    def regenerate(history, system, prompt_type, max_memory, temperature, top_p, top_k, num_beams, max_new_tokens,
                   min_new_tokens, repetition_penalty, do_sample, request=None):
        """Answer the last question again: drops the last reply and streams a new one."""
        controls = (temperature, top_p, top_k, num_beams, max_new_tokens, min_new_tokens, repetition_penalty,
                    do_sample)
        try:
            history = check_history(history, max_messages, max_chars)
            chat = session(history, system, prompt_type, max_memory, controls)
        except UserError as e:
            raise page_error(e) from None
        question = chat.pop_last_question()
        if question is None or not question.strip():
            yield "", chat.messages
            return
        yield from stream_reply(chat, question.strip(), request)

    def save(history, file_name, system, prompt_type, max_memory, temperature, top_p, top_k, num_beams,
             max_new_tokens, min_new_tokens, repetition_penalty, do_sample):
        """Append the chat to a .jsonl file in the server's --save_dir; returns the status line."""
        controls = (temperature, top_p, top_k, num_beams, max_new_tokens, min_new_tokens, repetition_penalty,
                    do_sample)
        try:
            history = check_history(history, max_messages, max_chars)
            name = check_save_name(check_text("Save as", file_name, 255))
            chat = session(history, system, prompt_type, max_memory, controls)
            path = chat.save(save_root, name, args.lora_path, model_info)
        except (UserError, OSError) as e:
            return f"Not saved: {e}"  # our words; a file name is \w, '.' and '-' only
        return f"Saved to `{path}`" if path else "Nothing to save yet."

    def reset():
        return start.control_values() + [args.max_memory, "Template default", "", default_prompt_type]

    def choose_preset(name):
        return SYSTEM_PRESETS.get(name, "") if isinstance(name, str) else ""

    @gets_request
    def clear_history(request=None):
        running = stops.running(session_of(request))
        if running is not None:  # a reply still streaming ends with an empty chat, not its own text
            running.clear()
        return [], ""

    with gr.Blocks(title=title) as page:
        gr.Markdown(f"## {title}")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=480, elem_id="chatbot")
                message = gr.Textbox(label="Message", placeholder="Type a message and press Enter",
                                     elem_id="message")
                with gr.Row():
                    submit = gr.Button("Submit", variant="primary")
                    stop = gr.Button("Stop")
                    regen = gr.Button("Regenerate")
                    clear = gr.Button("Clear history")
                with gr.Row():
                    save_name = gr.Textbox(value=SAVE_FILE, label=f"Save as (a .jsonl file in {save_root})",
                                           scale=3, max_lines=1)
                    save_btn = gr.Button("Save chat", scale=1)
                status = gr.Markdown()
            with gr.Column(scale=2):
                preset = gr.Dropdown(list(SYSTEM_PRESETS), value="Template default", label="Instruction")
                system = gr.Textbox(value=args.system or "", lines=3, label="Instruction text (editable)",
                                    placeholder="empty: the template's own preamble / system prompt")
                prompt_type = gr.Radio(PROMPT_CHOICES, value=default_prompt_type,
                                       label="Prompt template (instruct: single turn, no history)")
                max_memory = gr.Slider(*memory_range, step=64, value=args.max_memory,
                                       label="Max memory (tokens of history + answer)")
                controls = generation_controls(gr, start)
                control_components = controls
                reset_btn = gr.Button("Reset parameters")
        preset.change(choose_preset, inputs=preset, outputs=system, queue=False, api_visibility="private")
        settings_inputs = [system, prompt_type, max_memory, *controls]
        events = [
            submit.click(respond, inputs=[message, chatbot, *settings_inputs], outputs=[message, chatbot],
                         api_name="chat"),
            message.submit(respond, inputs=[message, chatbot, *settings_inputs], outputs=[message, chatbot],
                           api_visibility="private"),
            regen.click(regenerate, inputs=[chatbot, *settings_inputs], outputs=[message, chatbot],
                        api_name="regenerate"),
        ]
        stop.click(gets_request(stops.stop_request), inputs=None, outputs=None, queue=False, cancels=events,
                   api_visibility="private")
        clear.click(clear_history, outputs=[chatbot, status], queue=False, api_visibility="private")
        save_btn.click(save, inputs=[chatbot, save_name, *settings_inputs], outputs=status, api_visibility="private")
        reset_btn.click(reset, outputs=[*controls, max_memory, preset, system, prompt_type], queue=False,
                        api_visibility="private")
    return guard_requests(page, max_chars, max_messages)


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _stdin_line_ok(line: str) -> bool:
    """False for a line that was not valid UTF-8 (stdin decodes bad bytes to lone surrogates)."""
    try:
        line.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def run_cli(args, model, tokenizer, prompt_type: str, params) -> None:
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a bad line is reported, not fatal
    chat = ChatSession(model, tokenizer, prompt_type, args.max_memory, params, args.system, cli=True)
    print("Chat with the model. /clear forgets the history, /exit quits.", file=sys.stderr)
    while True:
        try:
            question = input("User: ")
        except EOFError:
            break
        if not _stdin_line_ok(question):
            print("(that line was not valid UTF-8 text and was skipped; type it again)", file=sys.stderr)
            continue
        command = question.strip()
        if command == "/exit":
            break
        if command == "/clear":
            chat.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if not command:
            continue
        try:
            ids = chat.prompt_ids(question)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        print("Assistant: ", end="", flush=True)
        shown = ""
        for shown_now in chat.respond(question, ids=ids):
            if shown_now.startswith(shown):
                print(shown_now[len(shown):], end="", flush=True)
            shown = shown_now
        print(flush=True)


def run(args) -> None:
    from webui import check_limit_flag, parse_auth

    if args.max_memory <= args.max_new_tokens:
        raise UserError(f"--max_memory {args.max_memory} leaves no room for history and question beyond "
                        f"--max_new_tokens {args.max_new_tokens}; raise --max_memory")
    params = GenerationParams.from_args(args)  # validate the flags before loading anything
    check_utf8("--system", args.system)
    if not args.cli:
        parse_auth(args.auth)
        check_limit_flag("max_input_chars", args.max_input_chars)
        check_limit_flag("max_history_messages", args.max_history_messages)
        check_save_dir(args.save_dir, args.lora_path)
    prompt_type = resolve_prompt_type(args.prompt_type, args.lora_path or args.model_path, "chat")
    model, tokenizer = load_for_inference(args.model_path, args.lora_path, args.quant,
                                          trust_remote_code=args.trust_remote_code)
    check_max_memory(model, args.max_memory)
    if args.cli:
        return run_cli(args, model, tokenizer, prompt_type, params)
    from webui import launch

    title = f"Vicuna-LoRA chat: {args.model_path}" + (f" + {args.lora_path}" if args.lora_path else "")
    launch(build_page(model, tokenizer, args, prompt_type, title), args)


def main(argv: list[str] | None = None):
    setup_logging()
    args = build_parser().parse_args(argv)
    return cli_errors(run)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
