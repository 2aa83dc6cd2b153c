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
message longer than --max_input_chars and a history longer than --max_history_messages.
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

from errors import UserError, check_utf8, cli_errors, setup_logging
from models import add_model_args, load_for_inference, resolve_prompt_type
from prompt import STOP_STRINGS, Conversation, StopStringFilter, fit_history
from streaming import add_generation_args, params_from_args

SAVE_FILE = "chat_history.jsonl"  # the page's default file name inside --save_dir
SAVE_NAME = re.compile(r"\w[\w.-]{0,122}\.jsonl")  # a plain file name: no folder, no "..", no leading "."
PROMPT_CHOICES = ["chat", "chat_template", "instruct"]


def build_parser() -> argparse.ArgumentParser:
    from webui import MAX_HISTORY_MESSAGES, add_server_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_generation_args(p, {"max_new_tokens": 256, "do_sample": False})
    p.add_argument("--cli", action="store_true", help="chat in the terminal")
    p.add_argument("--max_memory", type=int, default=1024,
                   help="history budget in tokens, including room for --max_new_tokens (at most the model's context)")
    p.add_argument("--system", default=None, help="instruction / system prompt replacing the default preamble")
    p.add_argument("--save_dir", default="chat_logs",
                   help="the only folder the page's Save chat writes to: it appends to a .jsonl file named on "
                        f"the page (default {SAVE_FILE})")
    add_server_args(p)
    p.add_argument("--max_history_messages", type=int, default=MAX_HISTORY_MESSAGES,
                   help=f"the page refuses a longer chat history (default {MAX_HISTORY_MESSAGES} messages)")
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
    from streaming import check_context

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
    from streaming import stream_generate

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
    from streaming import model_context

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


def build_page(model, tokenizer, args, default_prompt_type: str, title: str):
    import gradio as gr

    from streaming import model_context
    from webui import (CONTROL_DEFAULTS, CONTROL_ORDER, MAX_HISTORY_MESSAGES, MAX_INPUT_CHARS, StopRegistry,
                       check_choice, check_history, check_number, check_text, generation_controls, gets_request,
                       guard_requests, page_error, params_from_controls, session_of)

    stops = StopRegistry()
    cleared: set = set()  # sessions that pressed Clear while a reply streamed
    model_info = {"model_path": args.model_path, "lora_path": args.lora_path, "quant": args.quant}
    save_root = check_save_dir(args.save_dir, args.lora_path)
    max_chars = getattr(args, "max_input_chars", MAX_INPUT_CHARS)
    max_messages = getattr(args, "max_history_messages", MAX_HISTORY_MESSAGES)
    context = model_context(model)
    memory_range = (min(128, args.max_memory), context or max(8192, args.max_memory))

    def settings(system, prompt_type, max_memory, controls):
        """The checked settings shared by every handler: (system, prompt_type, max_memory, params)."""
        system = check_text("Instruction text", system, max_chars)
        prompt_type = check_choice("Prompt template", prompt_type, PROMPT_CHOICES)
        max_memory = check_number("Max memory", max_memory, *memory_range, integer=True)
        return system, prompt_type, max_memory, params_from_controls(controls, control_components)

    @gets_request
    def respond(message, history, system, prompt_type, max_memory, temperature, top_p, top_k, num_beams,
                max_new_tokens, min_new_tokens, repetition_penalty, do_sample, request=None):
        """Stream the reply to `message` after `history`; yields ("", history + the growing reply)."""
        controls = (temperature, top_p, top_k, num_beams, max_new_tokens, min_new_tokens, repetition_penalty,
                    do_sample)
        try:
            history = check_history(history, max_messages, max_chars)
            message = check_text("Message", message, max_chars).strip()
            system, prompt_type, max_memory, params = settings(system, prompt_type, max_memory, controls)
        except UserError as e:
            raise page_error(e) from None
        if not message:
            yield "", history
            return
        session = session_of(request)
        cleared.discard(session)
        cancel = stops.start(session)
        shown = history + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        try:
            if max_memory <= params.max_new_tokens:
                raise UserError(f"max memory {max_memory} leaves no room beyond max new tokens "
                                f"{params.max_new_tokens}; raise it")
            for text in reply_stream(model, tokenizer, prompt_type, pairs(history), message, params,
                                     max_memory, system, cancel):
                shown[-1] = {"role": "assistant", "content": text}
                yield "", shown
            if session in cleared:  # Clear stopped this reply: its last update must not refill the chat
                yield "", []
        except UserError as e:  # settings that cannot work together, a question beyond the context
            shown[-1] = {"role": "assistant", "content": f"**Error:** {e}"}
            yield "", shown
        except Exception as e:  # out of memory: show it in the chat, keep serving
            _free_memory()
            shown[-1] = {"role": "assistant", "content": f"**Error:** {type(e).__name__}: {e}"}
            yield "", shown
        finally:
            cleared.discard(session)
            stops.finish(session, cancel)

    @gets_request
    def regenerate(history, system, prompt_type, max_memory, temperature, top_p, top_k, num_beams, max_new_tokens,
                   min_new_tokens, repetition_penalty, do_sample, request=None):
        """Answer the last question again: drops the last reply and streams a new one."""
        try:
            history = check_history(history, max_messages, max_chars)
        except UserError as e:
            raise page_error(e) from None
        while history and history[-1]["role"] == "assistant":
            history.pop()
        if not history:
            yield "", history
            return
        last = history.pop()
        yield from respond(last["content"], history, system, prompt_type, max_memory, temperature, top_p, top_k,
                           num_beams, max_new_tokens, min_new_tokens, repetition_penalty, do_sample, request=request)

    def save(history, file_name, system, prompt_type, max_memory, temperature, top_p, top_k, num_beams,
             max_new_tokens, min_new_tokens, repetition_penalty, do_sample):
        """Append the chat to a .jsonl file in the server's --save_dir; returns the status line."""
        controls = (temperature, top_p, top_k, num_beams, max_new_tokens, min_new_tokens, repetition_penalty,
                    do_sample)
        try:
            history = check_history(history, max_messages, max_chars)
            name = check_save_name(check_text("Save as", file_name, 255))
            system, prompt_type, max_memory, params = settings(system, prompt_type, max_memory, controls)
            if not history:
                return "Nothing to save yet."
            record = {"time": datetime.datetime.now().isoformat(timespec="seconds"), **model_info,
                      "prompt_type": prompt_type, "system": system, "max_memory": max_memory,
                      "parameters": {k: getattr(params, k) for k in CONTROL_ORDER}, "conversation": history}
            path = save_chat(save_root, record, args.lora_path, name)
        except (UserError, OSError) as e:
            return f"Not saved: {e}"  # our words; a file name is \w, '.' and '-' only
        return f"Saved to `{path}`"

    def reset():
        d = CONTROL_DEFAULTS
        return [d[k] for k in CONTROL_ORDER] + [args.max_memory, "Template default", "", default_prompt_type]

    def choose_preset(name):
        return SYSTEM_PRESETS.get(name, "") if isinstance(name, str) else ""

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
                controls = generation_controls(gr, {"max_new_tokens": args.max_new_tokens})
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
        stop.click(stops.stop_request, inputs=None, outputs=None, queue=False, cancels=events,
                   api_visibility="private")

        @gets_request
        def clear_history(request=None):
            session = session_of(request)
            if stops.stop(session):  # a reply still streaming ends with an empty chat, not its own text
                cleared.add(session)
            return [], ""

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
    history: list[tuple[str, str]] = []
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
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if not command:
            continue
        try:
            ids = chat_prompt_ids(model, tokenizer, prompt_type, history, question, params.max_new_tokens,
                                  args.max_memory, args.system, new_name="--max_new_tokens")
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        print("Assistant: ", end="", flush=True)
        shown = ""
        for shown_now in reply_stream(model, tokenizer, prompt_type, history, question, params,
                                      args.max_memory, args.system, ids=ids):
            if shown_now.startswith(shown):
                print(shown_now[len(shown):], end="", flush=True)
            shown = shown_now
        print(flush=True)
        history.append((question, shown.strip()))


def run(args) -> None:
    from webui import check_limit_flag, launch, parse_auth

    if args.max_memory <= args.max_new_tokens:
        raise UserError(f"--max_memory {args.max_memory} leaves no room for history and question beyond "
                        f"--max_new_tokens {args.max_new_tokens}; raise --max_memory")
    params = params_from_args(args)  # validate the flags before loading anything
    check_utf8("--system", args.system)
    if not args.cli:
        parse_auth(args.auth)
        check_limit_flag("max_input_chars", args.max_input_chars)
        check_limit_flag("max_history_messages", args.max_history_messages)
        check_save_dir(args.save_dir, args.lora_path)
    prompt_type = resolve_prompt_type(args.prompt_type, args.lora_path, "chat")
    model, tokenizer = load_for_inference(args.model_path, args.lora_path, args.quant,
                                          trust_remote_code=args.trust_remote_code)
    check_max_memory(model, args.max_memory)
    if args.cli:
        return run_cli(args, model, tokenizer, prompt_type, params)
    title = f"Vicuna-LoRA chat: {args.model_path}" + (f" + {args.lora_path}" if args.lora_path else "")
    launch(build_page(model, tokenizer, args, prompt_type, title), args)


def main(argv: list[str] | None = None):
    setup_logging()
    args = build_parser().parse_args(argv)
    return cli_errors(run)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
